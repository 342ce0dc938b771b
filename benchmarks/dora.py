"""DoRA train step: LoRA vs DoRA factorized vs DoRA merge-then-call — FLOPs, time, memory.

A stack of residual dense layers (``h = h + gelu(h @ W_i)``, ``W_i`` of ``d × d``;
defaults: d=1024, 4 layers, 1024 tokens), mean-squared error to a fixed random
target, Adam, rank 8 on every ``W_i``. Configurations:

- ``lora``: plain LoRA, ``lora(fn, on_fallback="error")`` (factorized);
- ``dora``: DoRA (``LoraSpec(use_dora=True)``), ``lora(fn, on_fallback="error")``: the
  factorized rule, so a weight formed in full would fail the run rather than hide in
  the numbers;
- ``dora_merged``: DoRA through ``lora(fn, factorized=False)``: every adapted weight is
  formed in full (``m · V / ‖V‖_c``) and then called.

Before timing, B is set to small random values and the magnitude to ``‖W0‖_c`` times a
random factor near 1 (a fresh split has B = 0 and ``m = ‖W0‖_c``, where DoRA is the base
model), and the loss at those factors is reported: ``dora`` and ``dora_merged`` must
agree. Each configuration runs in its own process so its peak memory is its own.
Reported: trainable parameters, XLA's FLOP count of the compiled step
(``cost_analysis``), median step time, the compiled step's argument and temporary
bytes (``memory_analysis``), peak RSS, and each as a ratio to ``lora``. Prints one JSON
line per configuration and a markdown table.

    python benchmarks/dora.py                 # d=1024, 4 layers, 1024 tokens
    python benchmarks/dora.py --d 256 --tokens 128 --layers 2 --repeats 2   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import compile_and_time, machine, run_configs, table

import lorax_fn

CONFIGS = ("lora", "dora", "dora_merged")
TARGETS = "**/kernel"


class DenseStack(nn.Module):
    """``layers`` residual ``h + gelu(Dense(d)(h))`` blocks, no bias."""

    layers: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for _ in range(self.layers):
            x = x + nn.gelu(nn.Dense(x.shape[-1], use_bias=False)(x))
        return x


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=CONFIGS)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args()


def perturb(lt: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """``lt`` with B random (std 0.02) and a DoRA magnitude scaled by ``1 + N(0, 0.05)``.

    Example::

        lt = perturb(lt)   # the adapter now changes the model
    """
    rng = np.random.default_rng(seed)

    def one(f: lorax_fn.LoraFactors) -> lorax_fn.LoraFactors:
        b = jnp.asarray(rng.normal(0.0, 0.02, f.b.shape), f.b.dtype)
        if "magnitude" not in f.extras:
            return dataclasses.replace(f, b=b)
        jitter = jnp.asarray(1.0 + rng.normal(0.0, 0.05, f.magnitude.shape), f.magnitude.dtype)
        return dataclasses.replace(f, b=b).with_extras(magnitude=f.magnitude * jitter)

    return {path: one(f) for path, f in lt.items()}


def measure(config: str, args: argparse.Namespace) -> dict[str, Any]:
    """One configuration's row: FLOPs, step time and memory of its jitted train step.

    Example::

        row = measure("dora", parse_args())
        row["gflops"], row["step_ms"]
    """
    model = DenseStack(args.layers)
    x = jax.random.normal(jax.random.key(0), (args.tokens, args.d))
    target = jax.random.normal(jax.random.key(3), x.shape)
    variables = model.init(jax.random.key(1), x)
    spec = lorax_fn.LoraSpec(TARGETS, rank=args.rank, use_dora=config != "lora")
    base, lt = lorax_fn.split(variables, spec, key=jax.random.key(2))
    lt = perturb(lt)
    apply = lorax_fn.lora(model.apply, factorized=config != "dora_merged", on_fallback="error")
    tx = lorax_fn.optimizer(optax.adam(1e-4), lt)

    def loss_fn(lt: dict[str, Any], x: jax.Array, base: Any) -> jax.Array:
        return jnp.mean((apply(base, lt, x) - target) ** 2)

    def step(lt, opt_state, x, base):
        loss, grads = jax.value_and_grad(loss_fn)(lt, x, base)
        updates, opt_state = tx.update(grads, opt_state, lt)
        return optax.apply_updates(lt, updates), opt_state, loss

    loss = float(jax.jit(loss_fn)(lt, x, base))
    run_args = (lt, tx.init(lt), x, base)
    memory = jax.jit(step).lower(*run_args).compile().memory_analysis()
    result = compile_and_time(step, run_args, repeats=args.repeats, donate=(0, 1))
    return {
        "benchmark": "dora",
        "config": config,
        "layers": args.layers,
        "d": args.d,
        "tokens": args.tokens,
        "rank": args.rank,
        "trainable_params": sum(int(v.size) for v in jax.tree.leaves(lt)),
        "loss": loss,
        "argument_mib": memory.argument_size_in_bytes / 2**20,
        **result,
    }


def main() -> None:
    args = parse_args()
    if args.config:
        print(json.dumps(measure(args.config, args)))
        return
    rows = run_configs(__file__, CONFIGS, args)
    ref = rows[0]
    for row in rows:
        for key in ("gflops", "step_ms", "temp_mib", "peak_rss_mib"):
            row[f"{key}_vs_lora"] = row[key] / ref[key] if ref[key] else float("nan")
    print(
        table(
            rows,
            [
                ("config", "config", "s"),
                ("trainable_params", "trainable", ",d"),
                ("loss", "loss at the test factors", ".6f"),
                ("gflops", "GFLOP", ".2f"),
                ("gflops_vs_lora", "GFLOP × LoRA", ".3f"),
                ("step_ms", "step ms (median)", ".1f"),
                ("step_ms_min", "step ms (min)", ".1f"),
                ("step_ms_vs_lora", "× LoRA", ".2f"),
                ("argument_mib", "step args MiB", ".1f"),
                ("temp_mib", "XLA temp MiB", ".1f"),
                ("temp_mib_vs_lora", "temp × LoRA", ".2f"),
                ("peak_rss_mib", "peak RSS MiB", ".0f"),
                ("compile_s", "compile s", ".1f"),
            ],
        )
    )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
