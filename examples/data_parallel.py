"""Data-parallel LoRA training on 8 virtual CPU devices: ``jax.pmap`` and sharded ``jax.jit``.

Both runs take the same steps as one device on the full batch:

- ``pmap``: the trees are replicated, each device gets ``1/8`` of the batch, and the
  gradients (of the LoRA tree only) are averaged with ``lax.pmean``;
- ``jit`` on a ``("data",)`` mesh: the batch is split over ``data``, the frozen base is
  sharded FSDP-style over the same axis, and each factor is sharded like its weight.

On a real cluster, call ``jax.distributed.initialize()`` first and drop the
``XLA_FLAGS`` line; the code is otherwise unchanged::

    python examples/data_parallel.py
"""

from __future__ import annotations

import os

# Must be set before JAX initialises its backends.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax_fn


class MLP(nn.Module):
    """A pretrained-looking MLP: three Dense layers."""

    width: int = 64

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.gelu(nn.Dense(self.width)(x))
        x = nn.gelu(nn.Dense(self.width)(x))
        return nn.Dense(4)(x)


def make_step(
    apply: Callable[..., jax.Array], tx: optax.GradientTransformation, axis_name: str | None = None
) -> Callable[..., tuple[Any, Any, jax.Array]]:
    """The training step; with ``axis_name`` it averages over the ``pmap`` axis."""

    def loss_fn(variables: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.mean((apply(variables, x) - y) ** 2)

    def step(base: Any, lt: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple:
        loss, grads = jax.value_and_grad(lorax_fn.lora(loss_fn), argnums=1)(base, lt, x, y)
        if axis_name is not None:
            grads, loss = jax.lax.pmean((grads, loss), axis_name)
        updates, opt_state = tx.update(grads, opt_state, lt)
        return optax.apply_updates(lt, updates), opt_state, loss

    return step


def batches(steps: int, batch: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """A fixed stream of regression batches (host numpy arrays, as a loader gives)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(16, 4)).astype(np.float32) / 4
    out = []
    for _ in range(steps):
        x = rng.normal(size=(batch, 16)).astype(np.float32)
        out.append((x, np.tanh(x @ w)))
    return out


def setup(seed: int = 0) -> tuple[Any, Any, Any, optax.GradientTransformation]:
    model = MLP()
    variables = model.init(jax.random.key(seed), jnp.ones((1, 16)))
    spec = lorax_fn.LoraSpec(targets="**/kernel", rank=4, trainable="params/Dense_2/bias")
    base, lt = lorax_fn.split(variables, spec, key=jax.random.key(seed + 1))
    tx = lorax_fn.optimizer(optax.adam(1e-2), lt)
    return model, base, lt, tx


def train_single(data: list, seed: int = 0) -> tuple[Any, list[float]]:
    model, base, lt, tx = setup(seed)
    step = jax.jit(make_step(model.apply, tx))
    opt_state, losses = tx.init(lt), []
    for x, y in data:
        lt, opt_state, loss = step(base, lt, opt_state, x, y)
        losses.append(float(loss))
    return lt, losses


def train_pmap(data: list, seed: int = 0) -> tuple[Any, list[float]]:
    model, base, lt, tx = setup(seed)
    step = jax.pmap(make_step(model.apply, tx, "batch"), axis_name="batch", donate_argnums=(1, 2))
    base, lt, opt_state = lorax_fn.parallel.replicate((base, lt, tx.init(lt)))
    losses = []
    for x, y in data:
        lt, opt_state, loss = step(base, lt, opt_state, *lorax_fn.parallel.shard_batch((x, y)))
        losses.append(float(loss[0]))
    return lorax_fn.parallel.unreplicate(lt), losses


def train_sharded(data: list, seed: int = 0) -> tuple[Any, list[float]]:
    model, base, lt, tx = setup(seed)
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    base_shardings = lorax_fn.sharding.fsdp_shardings(base, mesh, "data")
    base = jax.device_put(base, base_shardings)
    lt = jax.device_put(lt, lorax_fn.lora_shardings(lt, base_shardings))
    step = jax.jit(make_step(model.apply, tx), donate_argnums=(1, 2))
    # Eager init: zeros_like keeps each factor's sharding (under jit it would be a constant).
    opt_state, losses = tx.init(lt), []
    for x, y in data:
        lt, opt_state, loss = step(base, lt, opt_state, *lorax_fn.sharding.put_batch((x, y), mesh))
        losses.append(float(loss))
    return lt, losses


def max_abs_diff(a: Any, b: Any) -> float:
    return max(
        float(jnp.max(jnp.abs(jnp.asarray(u) - jnp.asarray(v))))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def main(steps: int = 40, batch: int = 64, verbose: bool = True) -> dict[str, Any]:
    """Train three ways on the same batches and report how far apart they end."""
    data = batches(steps, batch)
    runs = {
        "single": train_single(data),
        "pmap": train_pmap(data),
        "sharded jit": train_sharded(data),
    }
    if verbose:
        print(f"{jax.device_count()} devices, global batch {batch}")
        for name, (_, losses) in runs.items():
            shown = "  ".join(f"{v:.4f}" for v in losses[:: max(steps // 5, 1)])
            print(f"{name:>12}: loss {shown}  ... {losses[-1]:.4f}")
    ref = runs["single"][0]
    diffs = {name: max_abs_diff(ref, lt) for name, (lt, _) in runs.items() if name != "single"}
    if verbose:
        for name, d in diffs.items():
            print(f"{name:>12}: max |param - single-device param| = {d:.2e}")
    return {"runs": runs, "diffs": diffs}


if __name__ == "__main__":
    main()
