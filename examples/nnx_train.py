"""LoRA fine-tuning of a Flax NNX model, with the same workflow as for linen.

``nnx.split`` turns the module into a static ``graphdef`` and an ``nnx.State`` pytree;
lorax_fn works on the state (paths drop NNX's trailing ``.value``: ``block/up/kernel``),
the loss rebuilds the module with ``nnx.merge`` inside, and the merged state goes back
into a module for inference at no extra latency::

    python examples/nnx_train.py
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lorax_fn


class Block(nnx.Module):
    """A pre-norm residual MLP block."""

    def __init__(self, width: int, *, rngs: nnx.Rngs) -> None:
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 4 * width, rngs=rngs)
        self.down = nnx.Linear(4 * width, width, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.down(jax.nn.gelu(self.up(self.norm(x))))


class Regressor(nnx.Module):
    """Embed, two residual blocks, a linear head."""

    def __init__(self, d_in: int, width: int, d_out: int, *, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Linear(d_in, width, rngs=rngs)
        self.blocks = nnx.List([Block(width, rngs=rngs) for _ in range(2)])
        self.head = nnx.Linear(width, d_out, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def make_task(key: jax.Array, n: int, d_in: int, d_out: int) -> tuple[jax.Array, jax.Array]:
    """A regression target the pretrained model does not fit: a random smooth map."""
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (n, d_in))
    w = jax.random.normal(kw, (d_in, d_out)) / jnp.sqrt(d_in)
    return x, jnp.sin(2.0 * x @ w)


def main(steps: int = 300, seed: int = 0, verbose: bool = True) -> dict[str, Any]:
    """Fine-tune with LoRA, merge, and check the merged module against the adapted one."""
    d_in, width, d_out = 8, 32, 4
    model = Regressor(d_in, width, d_out, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)

    spec = lorax_fn.LoraSpec(
        targets=["blocks/*/up/kernel", "blocks/*/down/kernel"], rank=4, trainable=["head/**"]
    )
    base, lt = lorax_fn.split(state, spec, key=jax.random.key(seed + 1))
    if verbose:
        print(lorax_fn.summary(base, lt))

    def loss(state: nnx.State, x: jax.Array, y: jax.Array) -> jax.Array:
        m = nnx.merge(graphdef, state)
        return jnp.mean((m(x) - y) ** 2)

    tx = lorax_fn.optimizer(optax.adam(3e-3), lt)
    lora_loss = lorax_fn.lora(loss)

    @jax.jit
    def step(lt: dict, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple[dict, Any, jax.Array]:
        value, grads = jax.value_and_grad(lora_loss, argnums=1)(base, lt, x, y)
        updates, opt_state = tx.update(grads, opt_state, lt)
        return optax.apply_updates(lt, updates), opt_state, value

    x, y = make_task(jax.random.key(seed + 2), 256, d_in, d_out)
    opt_state = tx.init(lt)
    losses = []
    for i in range(steps):
        lt, opt_state, value = step(lt, opt_state, x, y)
        losses.append(float(value))
        if verbose and (i % 50 == 0 or i == steps - 1):
            print(f"step {i:4d}  loss {value:.5f}")

    merged_model = nnx.merge(graphdef, lorax_fn.merge(base, lt))
    adapted = lorax_fn.lora(lambda s, x: nnx.merge(graphdef, s)(x))(base, lt, x)
    max_diff = float(jnp.max(jnp.abs(merged_model(x) - adapted)))
    if verbose:
        print(
            f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; merged vs adapted max |diff| {max_diff:.2e}"
        )
    return {
        "losses": losses,
        "max_diff": max_diff,
        "base": base,
        "lora": lt,
        "merged_model": merged_model,
        "x": x,
    }


if __name__ == "__main__":
    main()
