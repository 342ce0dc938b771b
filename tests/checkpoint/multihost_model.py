"""The model, data and schedule shared by tests/test_multihost.py and its worker processes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax_fn

SPEC = lorax_fn.LoraSpec(targets=["**/kernel"], rank=2, trainable=["**/bias"])
STEPS, SAVE_AT, BATCH = 6, 3, 8
tx = optax.adam(1e-2)


def model() -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    params = {
        "l0": {
            "kernel": rng.standard_normal((6, 16), np.float32) / 3,
            "bias": np.zeros(16, np.float32),
        },
        "l1": {
            "kernel": rng.standard_normal((16, 3), np.float32) / 4,
            "bias": np.zeros(3, np.float32),
        },
    }
    return lorax_fn.split(params, SPEC, key=jax.random.key(1))


def batch(i: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + i)
    return rng.standard_normal((BATCH, 6), np.float32), rng.standard_normal((BATCH, 3), np.float32)


def loss_fn(lt: dict, base: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    def dense(name: str, h: jax.Array) -> jax.Array:
        w = base[name]["kernel"] + lorax_fn.factors.delta(lt[f"{name}/kernel"])
        return h @ w + lt[f"{name}/bias"]

    return jnp.mean((dense("l1", jnp.tanh(dense("l0", x))) - y) ** 2)


def train_step(lt, opt_state, base, x, y):
    grads = jax.grad(loss_fn)(lt, base, x, y)
    updates, opt_state = tx.update(grads, opt_state, lt)
    return optax.apply_updates(lt, updates), opt_state


def flat(lt: dict) -> dict[str, np.ndarray]:
    """Every array of a LoRA tree as host numpy (gathered from all processes if need be)."""
    from jax.experimental import multihost_utils

    out = {}
    for path, entry in lt.items():
        for role in ("a", "b") if hasattr(entry, "a") else ("",):
            x = getattr(entry, role) if role else entry
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                x = multihost_utils.process_allgather(x, tiled=True)
            out[f"{path}/{role}".replace("/", "|")] = np.asarray(x)
    return out
