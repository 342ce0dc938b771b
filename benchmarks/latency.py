"""Inference latency of LoRA (merged and unmerged) vs Houlsby adapters: the paper's Table 1.

A GPT-2-medium-shaped decoder (d=1024, 16 heads, 24 layers, 50257-token vocabulary; random
weights, nothing downloaded), one forward pass at batch 1 and sequence 128, as in Hu et al.
(2021), Table 1. Configurations:

- ``base``: the model itself;
- ``lora_merged``: ``model.apply`` on ``lorax_fn.merge(base, lora_tree)`` (LoRA r=8 on
  ``W_q, W_v``): the same shapes as the base, so the same latency is expected;
- ``lora_unmerged``: ``lorax_fn.lora(model.apply)`` (factorized), which adds the low-rank
  products ``(x·A)·B`` to every adapted matmul: what serving several adapters at once costs;
- ``houlsby``: Houlsby et al. (2019) bottleneck adapters after attention and after the MLP
  (``DecoderConfig(houlsby=...)``), which add sequential layers that cannot be merged away.

Each configuration runs in its own process; the time is the median of ``--repeats`` calls
after compilation. Prints one JSON line per configuration, then a table with ratios to base.

    python benchmarks/latency.py                       # GPT-2 medium shape, ~4 min on 2 cores
    python benchmarks/latency.py --layers 8 --repeats 50
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import compile_and_time, machine, run_isolated, table
from models import Decoder, DecoderConfig

import lorax_fn

CONFIGS = ("base", "lora_merged", "lora_unmerged", "houlsby")
QV = ["**/attn/query/kernel", "**/attn/value/kernel"]


def measure(
    config: str,
    cfg: DecoderConfig,
    *,
    batch: int = 1,
    rank: int = 8,
    houlsby: int = 64,
    repeats: int = 20,
) -> dict[str, Any]:
    """Compiles and times one forward pass of ``config`` (one of :data:`CONFIGS`).

    ``cfg.seq`` is the sequence length; ``houlsby`` the adapter bottleneck width used by the
    ``"houlsby"`` configuration. Returns the timing (``step_ms`` = median) with the extra
    parameters the configuration adds to the base model.

    Example::

        row = measure("lora_unmerged", DecoderConfig(vocab=512, d=64, heads=4, layers=2))
        row["step_ms"]
    """
    if config not in CONFIGS:
        raise ValueError(f"unknown config {config!r}; expected one of {CONFIGS}")
    model = Decoder(dataclasses.replace(cfg, houlsby=houlsby if config == "houlsby" else 0))
    ids = jax.random.randint(jax.random.key(0), (batch, cfg.seq), 0, cfg.vocab)
    variables = jax.jit(model.init)(jax.random.key(1), ids)
    n_base = sum(x.size for x in jax.tree.leaves(variables))
    extra = 0
    if config == "houlsby":
        extra = sum(
            x.size
            for path, x in lorax_fn.paths.leaves_with_paths(variables)
            if "/adapter_" in f"/{path}"
        )
        n_base -= extra
    if config in ("base", "houlsby"):
        fn, args = model.apply, (variables, ids)
    else:
        base, lt = lorax_fn.split(
            variables, lorax_fn.LoraSpec(QV, rank=rank), key=jax.random.key(2)
        )
        # A trained adapter has B != 0; with B = 0 a merge would change nothing.
        lt = {
            path: dataclasses.replace(
                f, b=0.02 * jax.random.normal(jax.random.fold_in(jax.random.key(3), i), f.b.shape)
            )
            for i, (path, f) in enumerate(lt.items())
        }
        extra = sum(x.size for x in jax.tree.leaves(lt))
        if config == "lora_merged":
            fn, args = model.apply, (lorax_fn.merge(base, lt), ids)
        else:
            fn, args = lorax_fn.lora(model.apply, on_fallback="error"), (base, lt, ids)
    result = compile_and_time(fn, args, repeats=repeats)
    return {
        "benchmark": "latency",
        "config": config,
        "layers": cfg.layers,
        "d": cfg.d,
        "heads": cfg.heads,
        "vocab": cfg.vocab,
        "seq": cfg.seq,
        "batch": batch,
        "rank": rank if config.startswith("lora") else None,
        "houlsby": houlsby if config == "houlsby" else None,
        "base_params": int(n_base),
        "extra_params": int(extra),
        "repeats": repeats,
        **result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=CONFIGS)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--houlsby", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.config:
        cfg = DecoderConfig(
            vocab=args.vocab, d=args.d, heads=args.heads, layers=args.layers, seq=args.seq
        )
        row = measure(
            args.config,
            cfg,
            batch=args.batch,
            rank=args.rank,
            houlsby=args.houlsby,
            repeats=args.repeats,
        )
        print(json.dumps(row))
        return
    passthrough = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("config", "json")]
    rows = run_isolated(__file__, CONFIGS, passthrough)
    base = rows[0]["step_ms"]
    for row in rows:
        row["vs_base"] = row["step_ms"] / base
        row["extra_percent"] = 100 * row["extra_params"] / row["base_params"]
    print(
        table(
            rows,
            [
                ("config", "config", "s"),
                ("extra_params", "extra params", ",d"),
                ("extra_percent", "extra %", ".2f"),
                ("step_ms", "ms (median)", ".1f"),
                ("step_ms_min", "ms (min)", ".1f"),
                ("vs_base", "× base", ".3f"),
                ("gflops", "GFLOP", ".2f"),
                ("compile_s", "compile s", ".1f"),
            ],
        )
    )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
