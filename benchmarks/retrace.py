"""What changing a Python float argument costs per call of ``lorax_fn.lora(fn)``.

A small GPT-2-shaped decoder (defaults: d=256, 4 heads, 2 layers, 64 tokens, batch 4,
vocabulary 2048; random weights, LoRA r=8 on ``W_q, W_v`` with random B), and a loss
``fn(params, ids, temperature)``: the cross-entropy of ``logits / temperature``. It is
called eagerly, as a Python loop does with a schedule (a temperature, a loss weight),
through ``lora(fn)`` (``forward``) and ``jax.value_and_grad(lora(fn), argnums=1)``
(``grad``), with the temperature passed as

- ``float, changing``: a new Python float every call;
- ``float, same``: the same Python float every call;
- ``jnp, changing``: a new ``jnp.float32`` scalar every call.

A Python float that keys the trace cache (static) makes every new value retrace ``fn``
and recompile; traced as a weakly typed scalar (as ``jax.jit`` does), it costs what a
``jnp`` scalar costs. ``traces`` counts how often ``fn`` was traced during the timed
calls. Prints one JSON line per configuration, then a table.

    python benchmarks/retrace.py                 # ~1 min on 2 cores
    python benchmarks/retrace.py --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, table
from models import Decoder, DecoderConfig

import lorax_fn

QV = ["**/attn/query/kernel", "**/attn/value/kernel"]
TEMPERATURES = {
    "float, changing": lambda k: 1.0 + 1e-3 * k,
    "float, same": lambda k: 1.0,
    "jnp, changing": lambda k: jnp.float32(1.0 + 1e-3 * k),
}


def calls(cfg: DecoderConfig, batch: int, rank: int) -> tuple[dict[str, Callable], list[int]]:
    """The timed calls, by ``"<call> / <temperature>"``, and the trace counter they share.

    Example::

        fns, traces = calls(DecoderConfig(vocab=64, d=32, heads=2, layers=1, seq=8), 2, 2)
        fns["forward / float, changing"]()
    """
    model = Decoder(cfg)
    ids = jax.random.randint(jax.random.key(0), (batch, cfg.seq), 0, cfg.vocab)
    variables = jax.jit(model.init)(jax.random.key(1), ids)
    base, lt = lorax_fn.split(variables, lorax_fn.LoraSpec(QV, rank=rank), key=jax.random.key(2))
    # A trained adapter has B != 0.
    lt = {
        path: dataclasses.replace(
            f, b=0.02 * jax.random.normal(jax.random.fold_in(jax.random.key(3), i), f.b.shape)
        )
        for i, (path, f) in enumerate(lt.items())
    }
    traces = [0]

    def loss(params: Any, ids: jax.Array, temperature: Any) -> jax.Array:
        traces[0] += 1
        logits = model.apply(params, ids) / temperature
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    wrapped = {
        "forward": lorax_fn.lora(loss, on_fallback="error"),
        "grad": jax.value_and_grad(lorax_fn.lora(loss, on_fallback="error"), argnums=1),
    }
    fns = {}
    for call, g in wrapped.items():
        for kind, temperature in TEMPERATURES.items():
            counter = iter(range(10**9))

            def run(g=g, temperature=temperature, counter=counter) -> Any:
                return g(base, lt, ids, temperature(next(counter)))

            fns[f"{call} / {kind}"] = run
    return fns, traces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    cfg = DecoderConfig(vocab=args.vocab, d=args.d, heads=args.heads, layers=args.layers)
    cfg = dataclasses.replace(cfg, seq=args.seq)
    fns, traces = calls(cfg, args.batch, args.rank)
    rows = []
    for name, fn in fns.items():
        # One configuration at a time, so that the trace count is its own.
        jax.block_until_ready(fn())  # the first call traces and compiles in every case
        before = traces[0]
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(1e3 * (time.perf_counter() - start))
        call, kind = name.split(" / ")
        row = {
            "benchmark": "retrace",
            "config": name,
            "call": call,
            "temperature": kind,
            "d": cfg.d,
            "layers": cfg.layers,
            "seq": cfg.seq,
            "batch": args.batch,
            "repeats": args.repeats,
            "step_ms": statistics.median(times),
            "step_ms_min": min(times),
            "traces": traces[0] - before,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        table(
            rows,
            [
                ("call", "call", "s"),
                ("temperature", "temperature", "s"),
                ("step_ms", "ms per call (median)", ".2f"),
                ("step_ms_min", "ms (min)", ".2f"),
                ("traces", "traces of fn", "d"),
            ],
        )
    )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
