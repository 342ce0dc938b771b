"""Shared benchmark plumbing: timing, compiled cost, peak memory, JSON + table output."""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lorax_fn


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import os

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.devices()][:1],
        "cpus": os.cpu_count(),
    }


def compile_and_time(
    fn: Callable, args: Sequence[Any], *, repeats: int, donate: Sequence[int] = ()
) -> dict[str, float]:
    """Compile ``fn`` once, then time ``repeats`` calls (median), with compiled FLOPs."""
    jitted = jax.jit(fn, donate_argnums=tuple(donate))
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    memory = compiled.memory_analysis()
    out = compiled(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        if donate:
            args = list(args)
            for i, value in zip(donate, out[: len(donate)], strict=True):
                args[i] = value
        start = time.perf_counter()
        out = compiled(*args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
    return {
        "step_ms": 1e3 * statistics.median(times),
        "step_ms_min": 1e3 * min(times),
        "compile_s": compile_s,
        "gflops": float(cost.get("flops", float("nan"))) / 1e9,
        "temp_mib": getattr(memory, "temp_size_in_bytes", 0) / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def decoder_step_args(description: str, configs: Sequence[str]) -> argparse.Namespace:
    """The options of the GPT-2-small-shaped train-step benchmarks (one ``--config`` per
    process, the rest passed through by :func:`run_configs`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", choices=configs)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args()


def run_configs(script: str, configs: Sequence[str], args: argparse.Namespace) -> list[dict]:
    """:func:`run_isolated` with the parsed options forwarded to every configuration."""
    passthrough = [
        f"--{name}={value}"
        for name, value in vars(args).items()
        if name not in ("config", "json") and value is not None
    ]
    return run_isolated(script, configs, passthrough)


def run_isolated(script: str, configs: Sequence[str], extra: Sequence[str] = ()) -> list[dict]:
    """Run each configuration in its own process (so peak memory is its own)."""
    results = []
    for config in configs:
        proc = subprocess.run(
            [sys.executable, script, "--config", config, *extra],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{script} --config {config} failed:\n{proc.stderr[-4000:]}")
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
        results.append(json.loads(line))
        print(line, flush=True)
    return results


def table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A markdown table: ``columns`` are (key, header, format)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = [
        "| "
        + " | ".join(format(r.get(k, ""), f) if r.get(k) is not None else "" for k, _, f in columns)
        + " |"
        for r in rows
    ]
    return "\n".join([head, rule, *body])


def timings(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall times (ms) of each call; the calls take turns, so a busy moment hits them all."""
    for call in calls.values():
        jax.block_until_ready(call())  # compile outside the timed runs
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(1e3 * (time.perf_counter() - start))
    return times


def random_adapters(template: dict[str, Any], n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` LoRA trees shaped like ``template`` with random A and B (a fresh split has
    B = 0, which would make every adapter the same)."""
    rng = np.random.default_rng(seed)
    return [
        {
            path: lorax_fn.LoraFactors(
                jnp.asarray(rng.normal(0, 0.05, f.a.shape), jnp.float32),
                jnp.asarray(rng.normal(0, 0.05, f.b.shape), jnp.float32),
                f.scale,
                f.layout,
            )
            for path, f in template.items()
        }
        for _ in range(n)
    ]
