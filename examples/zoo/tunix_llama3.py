"""Fine-tune a Tunix (google-tunix) NNX Llama3 with lorax_fn; export it for transformers + PEFT.

Tunix's models are ``nnx.Module`` s whose attention weights are einsum kernels named
``w`` (``q_proj/w`` is ``(d, heads, head_dim)``). ``split`` takes the module itself and,
given the function and an example input, reads each kernel's layout off the einsum, so
the factors are ``A (d, r)``, ``B (r, heads, head_dim)``. ``lora(fn, on_fallback="error")``
then runs Tunix's own forward pass with every targeted weight factorized (an error, not
a silent dense fallback, if any were not). A small random-init model, nothing from a hub::

    python examples/zoo/tunix_llama3.py [--smoke]

Needs the zoo install (``bash scripts/zoo.sh`` makes ``.venv-zoo``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tunix.models.llama3 import model as llama3

import lorax_fn
from lorax_fn.peft.presets import tunix_llama3_name_map

# Every attention projection (3-D einsum kernels) and every MLP projection (nnx.Linear).
TARGETS = ["**/attn/*_proj/w", "**/mlp/*_proj/kernel"]


def small_config() -> llama3.ModelConfig:
    return llama3.ModelConfig(
        num_layers=2,
        vocab_size=128,
        embed_dim=64,
        hidden_dim=128,
        num_heads=4,
        head_dim=16,
        num_kv_heads=2,
        rope_theta=500_000,
        norm_eps=1e-5,
    )


def logits(model: llama3.Llama3, tokens: jax.Array) -> jax.Array:
    """Tunix's forward pass without a KV cache: causal mask, positions 0, 1, …"""
    length = tokens.shape[-1]
    positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
    mask = jnp.tril(jnp.ones((1, length, length), bool))
    return model(tokens, positions, None, mask)[0]


def next_token_loss(model: llama3.Llama3, tokens: jax.Array) -> jax.Array:
    out = logits(model, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(out, tokens[:, 1:]).mean()


def main(steps: int = 40, seed: int = 0, verbose: bool = True) -> dict[str, Any]:
    """Train, check save/restore, export to PEFT; returns the losses and the export path."""
    config = small_config()
    model = llama3.Llama3(config, rngs=nnx.Rngs(seed))
    tokens = jax.random.randint(jax.random.key(seed + 1), (8, 17), 0, config.vocab_size)

    spec = lorax_fn.LoraSpec(TARGETS, rank=8, alpha=16.0)
    base, lt = lorax_fn.split(
        model, spec, key=jax.random.key(seed + 2), fn=logits, example_args=(tokens[:, :-1],)
    )
    if verbose:
        print(lorax_fn.summary(base, lt))
        print("q_proj:", lt["layers/0/attn/q_proj/w"].layout)

    tx = lorax_fn.optimizer(optax.adam(1e-2), lt)
    loss = lorax_fn.lora(next_token_loss, on_fallback="error")

    @jax.jit
    def step(base: Any, lt: dict, opt_state: Any) -> tuple[dict, Any, jax.Array]:
        value, grads = jax.value_and_grad(loss, argnums=1)(base, lt, tokens)
        updates, opt_state = tx.update(grads, opt_state, lt)
        return optax.apply_updates(lt, updates), opt_state, value

    opt_state = tx.init(lt)
    losses = []
    for i in range(steps):
        lt, opt_state, value = step(base, lt, opt_state)
        losses.append(float(value))
        if verbose and (i % 10 == 0 or i == steps - 1):
            print(f"step {i:3d}  loss {value:.4f}")
    assert losses[-1] < losses[0], losses

    out = Path(tempfile.mkdtemp(prefix="tunix_llama3_"))
    lorax_fn.save(out / "adapter", lt, spec, base=base)
    restored = lorax_fn.restore(out / "adapter", base=base)
    for path, entry in lt.items():
        np.testing.assert_array_equal(restored[path].b, entry.b, err_msg=path)
    peft_dir = lorax_fn.export_peft(out / "peft", lt, spec, name_map=tunix_llama3_name_map())
    if verbose:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; restored {len(restored)} entries")
        print(f"PEFT adapter for LlamaForCausalLM: {sorted(f.name for f in peft_dir.iterdir())}")
    return {"losses": losses, "peft_dir": peft_dir, "base": base, "lora": lt}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    args = parser.parse_args()
    main(steps=10 if args.smoke else 40)
