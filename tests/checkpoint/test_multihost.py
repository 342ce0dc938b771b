"""Multi-host checkpoints with 2 real processes (jax.distributed on CPU, gloo collectives).

Each process has 2 CPU devices; the mesh spans the 4. Checked: sharded training equals
single-process training; a checkpoint saved by 2 processes is verified (every array has
a SHA-256) and restores on 2 processes (onto the mesh, and by default onto local devices)
and on 1; a single-process checkpoint restores onto the 2-process mesh; resuming on 2
processes and on 1 ends where the uninterrupted run ends.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import multihost_model as mm
import numpy as np
import pytest

import lorax_fn

WORKER = Path(__file__).with_name("multihost_worker.py")
TIMEOUT = 120  # seconds for the whole 2-process run; it takes ~15 s on 2 cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(workdir: Path, n: int = 2) -> None:
    """Run the n workers; if one fails, kill the others at once (they would wait for it)."""
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    port = free_port()
    logs = [workdir / f"process_{i}.log" for i in range(n)]
    procs = []
    for i, log in enumerate(logs):
        with log.open("w") as out:  # a file, not a pipe: a chatty worker never blocks on it
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-u", str(WORKER), str(port), str(i), str(n), str(workdir)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
    deadline = time.monotonic() + TIMEOUT
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    failures = [
        f"process {i} exited with {p.returncode}:\n"
        + "\n".join(line for line in log.read_text().splitlines()[-40:] if "Gloo" not in line)
        for i, (p, log) in enumerate(zip(procs, logs, strict=True))
        if p.returncode != 0
    ]
    assert not failures, "\n\n".join(failures)


def train_single_process(lt: dict, opt_state, base: dict, start: int) -> dict:
    step = jax.jit(mm.train_step)
    for i in range(start, mm.STEPS):
        lt, opt_state = step(lt, opt_state, base, *mm.batch(i))
    return lt


def assert_close(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        # Data-parallel gradients are summed in another order: equal up to float rounding.
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("multihost")
    base, lt = mm.model()
    lorax_fn.save(workdir / "single", lt, mm.SPEC, base=base)
    run_processes(workdir)
    return workdir


def test_sharded_training_matches_one_process_and_resumes_identically(two_process_run):
    base, lt = mm.model()
    reference = mm.flat(train_single_process(lt, mm.tx.init(lt), base, 0))
    trained = dict(np.load(two_process_run / "trained.npz"))
    assert_close(trained, reference)
    # Resumed on the 2 processes from the step they saved: the very same numbers.
    resumed = dict(np.load(two_process_run / "resumed.npz"))
    assert sorted(resumed) == sorted(trained)
    for name in trained:
        np.testing.assert_array_equal(resumed[name], trained[name], err_msg=name)


def test_two_process_checkpoint_is_verified_and_restores_on_one_process(two_process_run):
    base, _ = mm.model()
    for directory in (two_process_run / "adapter", two_process_run / "run" / str(mm.SAVE_AT)):
        meta = json.loads((directory / "lorax_fn" / "metadata").read_text())
        digests = [e[r]["sha256"] for e in meta["entries"] for r in ("a", "b", "array") if r in e]
        digests += [o["sha256"] for o in meta.get("opt_state", [])]
        assert digests and all(d is not None for d in digests)  # multi-host arrays too
    manager = lorax_fn.LoraCheckpointManager(two_process_run / "run", mm.SPEC, base=base)
    _, lt = mm.model()
    state = manager.restore(opt_state=jax.eval_shape(mm.tx.init, lt))
    manager.close()
    adapter = lorax_fn.restore(two_process_run / "adapter", base=base)
    assert_close(mm.flat(adapter), mm.flat(state.lora_tree))
    for name, x in np.load(two_process_run / "local.npz").items():  # default placement
        np.testing.assert_array_equal(x, mm.flat(adapter)[name])
    resumed = mm.flat(train_single_process(state.lora_tree, state.opt_state, base, state.step))
    assert_close(resumed, dict(np.load(two_process_run / "trained.npz")))


def test_single_process_checkpoint_restores_on_two_processes(two_process_run):
    _, lt = mm.model()
    for name, x in np.load(two_process_run / "single.npz").items():
        np.testing.assert_array_equal(x, mm.flat(lt)[name])
