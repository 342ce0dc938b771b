"""Fine-tune the experts of a Tunix (google-tunix) Qwen3 mixture-of-experts with lorax_fn.

Tunix's ``MoELayer`` keeps its experts as bare ``nnx.Param`` s of shape
``(experts, d, hidden)`` (``gate_proj``, ``up_proj``) and ``(experts, hidden, d)``
(``down_proj``). ``split`` with the function and an example input sees each expert sliced
out and multiplied, so the expert axis is a batch axis: one rank-r adapter per expert,
``A (E, d, r)``, ``B (E, r, hidden)``. The export writes one PEFT ``Linear`` adapter per
expert (``mlp.experts.{e}.gate_proj``), which PEFT fuses on load into
``Qwen3MoeForCausalLM``'s ``experts.gate_up_proj``. A small random-init model::

    python examples/zoo/tunix_moe.py [--smoke]

Needs the zoo install (``bash scripts/zoo.sh`` makes ``.venv-zoo``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tunix.models.qwen3 import model as qwen3

import lorax_fn
from lorax_fn.peft.presets import tunix_qwen3_name_map

# Attention projections (3-D einsum kernels) and every expert's gate/up/down weight.
TARGETS = ["**/attn/*_proj/w", "**/mlp/gate_proj", "**/mlp/up_proj", "**/mlp/down_proj"]


def small_config() -> qwen3.ModelConfig:
    return qwen3.ModelConfig(
        num_layers=2,
        vocab_size=128,
        embed_dim=64,
        hidden_dim=64,
        num_heads=4,
        head_dim=16,
        num_kv_heads=2,
        rope_theta=1_000_000,
        norm_eps=1e-6,
        num_experts=4,
        num_experts_per_tok=2,
    )


def logits(model: qwen3.Qwen3, tokens: jax.Array) -> jax.Array:
    """Tunix's forward pass without a KV cache: causal mask, positions 0, 1, …"""
    length = tokens.shape[-1]
    positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
    mask = jnp.tril(jnp.ones((1, length, length), bool))
    return model(tokens, positions, None, mask)[0]


def next_token_loss(model: qwen3.Qwen3, tokens: jax.Array) -> jax.Array:
    out = logits(model, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(out, tokens[:, 1:]).mean()


def main(steps: int = 40, seed: int = 0, verbose: bool = True) -> dict[str, Any]:
    """Train, check save/restore, export to PEFT; returns the losses and the export path."""
    config = small_config()
    model = qwen3.Qwen3(config, rngs=nnx.Rngs(seed))
    tokens = jax.random.randint(jax.random.key(seed + 1), (8, 17), 0, config.vocab_size)

    spec = lorax_fn.LoraSpec(TARGETS, rank=4, alpha=8.0)
    base, lt = lorax_fn.split(
        model, spec, key=jax.random.key(seed + 2), fn=logits, example_args=(tokens[:, :-1],)
    )
    experts = lt["layers/0/mlp/gate_proj"]
    if verbose:
        print(lorax_fn.summary(base, lt))
        print("experts:", experts.layout, "A", experts.a.shape, "B", experts.b.shape)

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

    out = Path(tempfile.mkdtemp(prefix="tunix_moe_"))
    lorax_fn.save(out / "adapter", lt, spec, base=base)
    restored = lorax_fn.restore(out / "adapter", base=base)
    for path, entry in lt.items():
        np.testing.assert_array_equal(restored[path].b, entry.b, err_msg=path)
    peft_dir = lorax_fn.export_peft(out / "peft", lt, spec, name_map=tunix_qwen3_name_map())
    modules = json.loads((peft_dir / "adapter_config.json").read_text())["target_modules"]
    if verbose:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; restored {len(restored)} entries")
        print(f"PEFT adapter for Qwen3MoeForCausalLM: {len(modules)} modules, e.g.")
        print("  " + "\n  ".join(m for m in modules if ".experts.0." in m))
    return {"losses": losses, "peft_dir": peft_dir, "base": base, "lora": lt}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    args = parser.parse_args()
    main(steps=10 if args.smoke else 40)
