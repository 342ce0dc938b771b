"""LoRA on the ``gemma`` package's linen Gemma3 (Google DeepMind), random-init, on CPU.

The model is ``gemma.gm.nn.Transformer`` with a small Gemma3 config (sliding-window and
global layers, QK norm, grouped-query attention, nothing downloaded). Its attention
weights are 3-D and 4-D einsum kernels named ``w`` (``q_einsum/w`` is
``(heads, d, head_dim)``, ``kv_einsum/w`` is ``(2, kv_heads, d, head_dim)``) and the
model calls ``nn.jit`` inside: ``split(..., fn=, example_args=)`` reads each kernel's
layout off the traced call, and ``lora(..., on_fallback="error")`` would refuse to run
if any adapted weight had to be merged instead of kept factorized.

The ``gemma`` package declares ``kauldron`` and through it TensorFlow, TFDS, grain and
xmanager (~190 packages). The model itself needs far fewer (31 packages, 96 s cold on
the 2-core CI machine); ``scripts/zoo.sh`` installs them through the ``zoo`` extra::

    pip install --no-deps gemma==3.3.0 kauldron==1.4.2
    pip install tensorflow-cpu typeguard lark immutabledict ml-collections tqdm clu \\
        jaxtyping sentencepiece einops

(``kauldron.typing`` imports TensorFlow itself, so it stays; ``gemma.gm.ckpts`` needs a
kauldron older than 1.4, which in turn no longer imports under jax 0.10, so this example
builds the config itself instead of using ``gm.nn.Gemma3_*``.) Run::

    python examples/zoo/gemma3_linen.py --smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax_fn

try:
    from gemma import gm
    from gemma.gm.nn import _config as gemma_config
except ImportError as err:  # the zoo is an optional install: see the docstring
    gm = None
    GEMMA_IMPORT_ERROR: ImportError | None = err
else:
    GEMMA_IMPORT_ERROR = None

# One target list for both Gemma attention variants: the fused ``qkv_einsum`` (as many
# KV heads as query heads) and the grouped-query ``q_einsum`` + ``kv_einsum``.
TARGETS = [
    lorax_fn.AnyOf("**/attn/qkv_einsum/w", "**/attn/q_einsum/w", "**/attn/kv_einsum/w"),
    "**/attn/attn_vec_einsum/w",
    "**/mlp/gating_einsum",
    "**/mlp/linear",
]
# float32 on CPU: the factorized and the merged forms sum in different orders.
VALUE_TOL = {"rtol": 1e-4, "atol": 1e-5}
GRAD_TOL = {"rtol": 1e-3, "atol": 1e-5}


def gemma3_config(*, vocab: int, d: int, layers: int, kv_heads: int) -> Any:
    """A small Gemma3: every other layer global, the rest sliding-window, as Gemma3 does."""
    local, glob = gm.nn.AttentionType.LOCAL_SLIDING, gm.nn.AttentionType.GLOBAL
    return gemma_config.TransformerConfig(
        num_embed=vocab,
        embed_dim=d,
        hidden_dim=2 * d,
        num_heads=4,
        head_dim=d // 4,
        num_kv_heads=kv_heads,
        final_logit_softcap=None,
        use_post_attn_norm=True,
        use_post_ffw_norm=True,
        use_qk_norm=True,
        attention_types=tuple(glob if i % 2 else local for i in range(layers)),
        query_pre_attn_norm=gemma_config.QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_HEAD_DIM,
        attn_logits_soft_cap=None,
        sliding_window_size=4,
        transpose_gating_einsum=True,
        local_base_frequency=10_000,
        global_base_frequency=1_000_000,
        vision_encoder=None,
    )


def logits_fn(model: Any) -> Callable[[Any, jax.Array], jax.Array]:
    """The function lorax_fn wraps: variables first, as ``model.apply`` takes them."""
    return lambda variables, tokens: model.apply(variables, tokens).logits


def next_token_loss(fn: Callable[..., jax.Array], variables: Any, tokens: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting each token from the ones before it."""
    logits = fn(variables, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def perturb(lt: dict[str, Any], key: jax.Array) -> dict[str, Any]:
    """Add noise to every factor: with B = 0 any adapter, even a misplaced one, looks right."""
    leaves, treedef = jax.tree.flatten(lt)
    keys = jax.random.split(key, len(leaves))
    noisy = [
        x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, noisy)


def check_against_merge(fn: Callable, base: Any, lt: dict, tokens: jax.Array) -> dict[str, float]:
    """Assert ``lora(fn)`` equals ``fn(merge(base, lt))`` in logits and in LoRA gradients."""
    adapted = lorax_fn.lora(fn, on_fallback="error")
    # Jitted: one compile each instead of op-by-op dispatch through the whole model.
    got = jax.jit(adapted)(base, lt, tokens)
    want = jax.jit(lambda b, t: fn(lorax_fn.merge(b, t), tokens))(base, lt)
    np.testing.assert_allclose(got, want, **VALUE_TOL)

    def via_lora(t: dict) -> jax.Array:
        return next_token_loss(lambda v, x: adapted(v, t, x), base, tokens)

    def via_merge(t: dict) -> jax.Array:
        return next_token_loss(fn, lorax_fn.merge(base, t), tokens)

    pairs = list(
        zip(
            jax.tree.leaves(jax.jit(jax.grad(via_lora))(lt)),
            jax.tree.leaves(jax.jit(jax.grad(via_merge))(lt)),
            strict=True,
        )
    )
    for g, w in pairs:
        np.testing.assert_allclose(g, w, **GRAD_TOL)
    return {
        "value_max_diff": float(jnp.max(jnp.abs(got - want))),
        "grad_max_diff": max(float(jnp.max(jnp.abs(g - w))) for g, w in pairs),
    }


def train(fn: Callable, base: Any, lt: dict, tokens: jax.Array, steps: int) -> tuple[dict, list]:
    """AdamW on the LoRA tree alone, jitted; returns the trained tree and the losses."""
    loss = lorax_fn.lora(lambda v, x: next_token_loss(fn, v, x), on_fallback="error")
    tx = lorax_fn.optimizer(optax.adamw(1e-2), lt)

    @jax.jit
    def step(lt: dict, opt_state: Any) -> tuple[dict, Any, jax.Array]:
        value, grads = jax.value_and_grad(loss, argnums=1)(base, lt, tokens)
        updates, opt_state = tx.update(grads, opt_state, lt)
        return optax.apply_updates(lt, updates), opt_state, value

    opt_state, losses = tx.init(lt), []
    for _ in range(steps):
        lt, opt_state, value = step(lt, opt_state)
        losses.append(float(value))
    return lt, losses


def save_and_restore(lt: dict, spec: lorax_fn.LoraSpec, base: Any) -> dict:
    """Round-trip the adapter alone through lorax_fn's orbax checkpoint, checked against base."""
    with tempfile.TemporaryDirectory() as tmp:
        lorax_fn.save(os.path.join(tmp, "adapter"), lt, spec, base=base)
        return lorax_fn.restore(os.path.join(tmp, "adapter"), base=base)


def main(smoke: bool = False, kv_heads: int = 2, verbose: bool = True) -> dict[str, Any]:
    """Split, check against merge, train a few steps, save and restore; return the numbers."""
    vocab, d, layers, steps = (64, 32, 2, 5) if smoke else (256, 64, 4, 40)
    config = gemma3_config(vocab=vocab, d=d, layers=layers, kv_heads=kv_heads)
    # gemma's default is bfloat16 parameters; float32 makes the equality check tight.
    model = gm.nn.Transformer(config=config, dtype=jnp.float32)
    tokens = jax.random.randint(jax.random.key(1), (4, 12), 0, vocab)
    variables = jax.jit(model.init)(jax.random.key(0), tokens)
    fn = logits_fn(model)

    spec = lorax_fn.LoraSpec(targets=TARGETS, rank=4)
    base, lt = lorax_fn.split(variables, spec, key=jax.random.key(2), fn=fn, example_args=(tokens,))
    if verbose:
        print(lorax_fn.summary(base, lt))
    diffs = check_against_merge(fn, base, perturb(lt, jax.random.key(3)), tokens)

    lt, losses = train(fn, base, lt, tokens, steps)
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"
    restored = save_and_restore(lt, spec, base)
    served = jax.jit(lorax_fn.lora(fn, on_fallback="error"))
    np.testing.assert_array_equal(served(base, restored, tokens), served(base, lt, tokens))
    if verbose:
        print(
            f"lora(fn) vs merge-then-call: logits max |diff| {diffs['value_max_diff']:.1e}, "
            f"gradients {diffs['grad_max_diff']:.1e}"
        )
        print(
            f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {steps} AdamW steps; "
            "restored adapter gives identical logits"
        )
    return {**diffs, "losses": losses, "paths": sorted(lt), "restored": restored, "trained": lt}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny config, a few steps (CI)")
    args = parser.parse_args()
    if gm is None:
        message = f"gemma3_linen: gemma is not installed ({GEMMA_IMPORT_ERROR}); see the docstring"
        if os.environ.get("LORAX_FN_REQUIRE_ZOO") == "1":
            sys.exit(message)
        print(f"SKIP {message}")
        sys.exit(0)
    main(smoke=args.smoke)
