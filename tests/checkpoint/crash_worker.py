"""Subprocess for tests/test_crash_safety.py: saves or trains until SIGKILLed.

    python crash_worker.py save DIR    # saves forever, printing "saved K" after each save
    python crash_worker.py train DIR   # trains STEPS steps, resuming from DIR/run if present

Both build everything deterministically from fixed seeds, so the parent test can
recompute what any step must contain. The parent sets JAX_PLATFORMS/XLA_FLAGS and
LORAX_TEST_JAX_CACHE (a persistent compilation cache, so that restarts are fast).
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax_fn
from lorax_fn.checkpoint import LoraCheckpointManager, save

STEPS, SAVE_EVERY = 40, 4
SPEC = lorax_fn.LoraSpec(targets=["**/kernel"], rank=4, trainable=["**/bias"])


def model() -> tuple[dict, dict]:
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {
        "l0": {"kernel": jax.random.normal(k1, (32, 64)) / 6, "bias": jnp.zeros(64)},
        "l1": {"kernel": jax.random.normal(k2, (64, 8)) / 8, "bias": jnp.zeros(8)},
    }
    return lorax_fn.split(params, SPEC, key=jax.random.key(1))


def tree_at(lt: dict, k: int) -> dict:
    """The tree the save loop writes at iteration ``k``: every array filled with ``k``."""
    return jax.tree.map(lambda x: jnp.full_like(x, k), lt)


def batch(index: int) -> tuple[jax.Array, jax.Array]:
    kx, ky = jax.random.split(jax.random.fold_in(jax.random.key(2), index))
    return jax.random.normal(kx, (16, 32)), jax.random.normal(ky, (16, 8))


def loss_fn(lt: dict, base: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    def dense(name: str, h: jax.Array) -> jax.Array:
        w = base[name]["kernel"] + lorax_fn.factors.delta(lt[f"{name}/kernel"])
        return h @ w + lt[f"{name}/bias"]

    return jnp.mean((dense("l1", jnp.tanh(dense("l0", x))) - y) ** 2)


def train(directory: str) -> None:
    base, lt = model()
    tx = optax.adam(1e-2)
    opt_state = tx.init(lt)
    manager = LoraCheckpointManager(f"{directory}/run", SPEC, base=base, max_to_keep=2)
    start = 0
    if manager.latest_step() is not None:
        state = manager.restore(opt_state=opt_state)
        lt, opt_state, start = state.lora_tree, state.opt_state, state.data_state["next"]
    print(f"start {start}", flush=True)

    @jax.jit
    def step(lt, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(lt, base, x, y)
        updates, opt_state = tx.update(grads, opt_state, lt)
        return optax.apply_updates(lt, updates), opt_state, loss

    for i in range(start, STEPS):
        lt, opt_state, _ = step(lt, opt_state, *batch(i))
        if (i + 1) % SAVE_EVERY == 0:
            manager.save(i + 1, lt, opt_state, data_state={"next": i + 1})
        print(f"step {i + 1}", flush=True)
    manager.close()
    flat = {
        f"{p}/{r}": np.asarray(getattr(v, r)) if r else np.asarray(v)
        for p, v in lt.items()
        for r in (("a", "b") if hasattr(v, "a") else ("",))
    }
    np.savez(f"{directory}/final.tmp.npz", **flat)
    os.replace(f"{directory}/final.tmp.npz", f"{directory}/final.npz")
    print("done", flush=True)


def save_loop(directory: str) -> None:
    base, lt = model()
    manager = LoraCheckpointManager(
        f"{directory}/run", SPEC, base=base, max_to_keep=2, async_save=True
    )
    k = (manager.latest_step() or 0) + 1
    while True:
        # Nearly all the time of this loop is spent saving, so a random kill lands in a save.
        tree = tree_at(lt, k)
        save(f"{directory}/adapter", tree, SPEC, base=base, overwrite=True)
        manager.save(k, tree, {"count": jnp.full((), k)})
        print(f"saved {k}", flush=True)
        k += 1


if __name__ == "__main__":
    if cache := os.environ.get("LORAX_TEST_JAX_CACHE"):
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    {"train": train, "save": save_loop}[sys.argv[1]](sys.argv[2])
