"""One process of tests/test_multihost.py: data-parallel LoRA training over 2 processes.

    python multihost_worker.py PORT PROCESS_ID NUM_PROCESSES WORKDIR

Each process has 2 CPU devices (the parent sets XLA_FLAGS); the global mesh spans
all of them. The model, data and schedule are :mod:`multihost_model`'s, shared with the
parent test, which checks what this writes under WORKDIR (process 0 only):
``trained.npz`` (uninterrupted run), ``resumed.npz`` (restored at SAVE_AT and resumed).
"""

import os
import sys
import traceback

import jax
import multihost_model as mm
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lorax_fn


def put(tree, sharding: NamedSharding):
    """Global arrays from host values every process has (the model and data are seeded)."""

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree)


def main(port: str, process_id: int, num_processes: int, workdir: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
    )
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated, by_row = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    base, lt = mm.model()
    base, lt = put(base, replicated), put(lt, replicated)
    assert not jax.tree.leaves(lt)[0].is_fully_addressable  # a truly multi-process array
    opt_state = jax.jit(mm.tx.init)(lt)
    step = jax.jit(mm.train_step)
    manager = lorax_fn.LoraCheckpointManager(f"{workdir}/run", mm.SPEC, base=base)
    for i in range(mm.STEPS):
        if i == mm.SAVE_AT:
            manager.save(i, lt, opt_state, data_state={"next": i})
            lorax_fn.save(f"{workdir}/adapter", lt, mm.SPEC, base=base)
        lt, opt_state = step(lt, opt_state, base, *put(mm.batch(i), by_row))
    trained = mm.flat(lt)

    # Resume on 2 processes with the README's abstract template.
    state = manager.restore(opt_state=jax.eval_shape(mm.tx.init, lt), shardings=replicated)
    manager.close()
    lt, opt_state = state.lora_tree, state.opt_state
    for i in range(state.data_state["next"], mm.STEPS):
        lt, opt_state = step(lt, opt_state, base, *put(mm.batch(i), by_row))
    resumed = mm.flat(lt)

    # Default placement: every process gets its own copy on one of its local devices.
    local = lorax_fn.restore(f"{workdir}/adapter", base=base)
    assert all(x.is_fully_addressable for x in jax.tree.leaves(local))
    # A checkpoint written by one process restores onto the 2-process mesh, verified.
    single = lorax_fn.restore(f"{workdir}/single", base=base, shardings=replicated)
    assert not jax.tree.leaves(single)[0].is_fully_addressable
    if process_id == 0:
        np.savez(f"{workdir}/trained.npz", **trained)
        np.savez(f"{workdir}/resumed.npz", **resumed)
        np.savez(f"{workdir}/local.npz", **mm.flat(local))
        np.savez(f"{workdir}/single.npz", **mm.flat(single))
    print(f"process {process_id} ok", flush=True)


if __name__ == "__main__":
    try:
        main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    except BaseException:
        # Exit at once: a normal exit would wait in jax.distributed's shutdown barrier for
        # the peer, which itself waits for this process inside orbax; the parent kills it.
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
