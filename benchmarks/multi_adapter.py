"""Throughput of one batch spread over N distinct LoRA adapters (multi-adapter serving).

A small decoder (4 pre-LN layers, d=256, 4 heads, sequence 64, random weights) with
r=8 adapters on the attention query/value/output projections and both MLP matrices.
A batch of B=64 sequences is spread evenly over N ∈ {1, 4, 16, 64} distinct adapters
(example i uses adapter i mod N) and run three ways, each compiled before timing:

- ``single``: the whole batch on one adapter, ``jax.jit(lorax_fn.lora(model.apply))``
  — the reference throughput (the same FLOPs as every mixed batch);
- ``gather``: ``jax.jit(lorax_fn.multi_lora(model.apply))`` on an N-adapter stack:
  per-example factors gathered, one program, ``x·W0`` shared by the batch;
- ``loop``: PEFT's ``adapter_names=`` strategy — for each distinct adapter, run the
  jitted ``lora(model.apply)`` on its subset of the batch, then reassemble the rows;
- ``chunked``: the control for ``loop`` — the same N calls on subsets of B/N rows, all
  with one adapter. On a CPU, a few calls of 8–32 rows can beat one call of 64 (the
  activations fit in cache), which ``loop`` profits from whatever the adapters;
  ``loop / chunked`` is the cost of switching adapters itself.

``merged`` (the model on merged weights, one adapter, no low-rank path) is the
zero-overhead bound. The time is the median of ``--repeats`` timed calls. Prints one
JSON line per measurement, then a table.

    python benchmarks/multi_adapter.py [--batch 64] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import lorax_fn

TARGETS = [
    "**/attn/query/kernel",
    "**/attn/value/kernel",
    "**/attn/out/kernel",
    "**/fc/kernel",
    "**/proj/kernel",
]


class Block(nn.Module):
    heads: int

    @nn.compact
    def __call__(self, x, mask):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(h, h, mask=mask)
        h = nn.Dense(4 * x.shape[-1], name="fc")(nn.LayerNorm()(x))
        return x + nn.Dense(x.shape[-1], name="proj")(nn.gelu(h))


class Decoder(nn.Module):
    vocab: int = 512
    d: int = 256
    heads: int = 4
    layers: int = 4

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, self.d)(ids)
        x = x + self.param("pos", nn.initializers.normal(0.02), (ids.shape[-1], self.d))
        mask = nn.make_causal_mask(ids)
        for i in range(self.layers):
            x = Block(self.heads, name=f"h_{i}")(x, mask)
        return nn.Dense(self.vocab, name="head")(nn.LayerNorm()(x))


def make_adapters(variables, n: int, rank: int) -> tuple[dict, list[dict]]:
    """n adapters with random A and B (B = 0 would make every adapter the same)."""
    spec = lorax_fn.LoraSpec(TARGETS, rank=rank, alpha=2.0 * rank)
    base, template = lorax_fn.split(variables, spec, key=jax.random.key(0))
    rng = np.random.default_rng(0)
    trees = []
    for _ in range(n):
        trees.append(
            {
                path: lorax_fn.LoraFactors(
                    jnp.asarray(rng.normal(0, 0.05, f.a.shape), jnp.float32),
                    jnp.asarray(rng.normal(0, 0.05, f.b.shape), jnp.float32),
                    f.scale,
                    f.layout,
                )
                for path, f in template.items()
            }
        )
    return base, trees


def median_ms(call: Callable[[], object], repeats: int) -> float:
    jax.block_until_ready(call())  # compile (or reuse) outside the timed runs
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16, 64])
    args = parser.parse_args()

    model = Decoder()
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, model.vocab)
    variables = jax.jit(model.init)(jax.random.key(0), tokens)
    base, trees = make_adapters(variables, max(args.adapters), args.rank)

    apply = jax.jit(model.apply)
    single = jax.jit(lorax_fn.lora(model.apply))
    gather = jax.jit(lorax_fn.multi_lora(model.apply))
    merged = lorax_fn.merge(base, trees[0])

    def loop(n: int, one_adapter: bool) -> Callable[[], jax.Array]:
        ids = np.arange(args.batch) % n
        groups = [np.flatnonzero(ids == k) for k in range(n)]
        order = np.argsort(np.concatenate(groups))

        def call() -> jax.Array:
            parts = [
                single(base, trees[0 if one_adapter else k], tokens[rows])
                for k, rows in enumerate(groups)
            ]
            return jnp.concatenate(parts)[order]

        return call

    info = {"jax": jax.__version__, "backend": jax.default_backend(), "cpu": platform.machine()}
    print(json.dumps({"machine": info, "batch": args.batch, "seq": args.seq, "rank": args.rank}))
    reference = {
        "merged": median_ms(lambda: apply(merged, tokens), args.repeats),
        "single": median_ms(lambda: single(base, trees[0], tokens), args.repeats),
    }
    rows = []
    for method, ms in reference.items():
        rows.append({"method": method, "adapters": 1, "ms": ms})
    for n in args.adapters:
        stack = lorax_fn.stack_adapters(trees[:n])
        ids = jnp.arange(args.batch) % n
        rows.append(
            {
                "method": "gather",
                "adapters": n,
                "ms": median_ms(lambda s=stack, i=ids: gather(base, s, i, tokens), args.repeats),
            }
        )
        for method, one_adapter in (("loop", False), ("chunked", True)):
            ms = median_ms(loop(n, one_adapter), args.repeats)
            rows.append({"method": method, "adapters": n, "ms": ms})
    for row in rows:
        row["examples_per_s"] = 1e3 * args.batch / row["ms"]
        row["vs_single"] = reference["single"] / row["ms"]
        print(json.dumps(row))

    print(f"\nB={args.batch}, seq {args.seq}, r={args.rank}; median of {args.repeats} runs")
    print("| method | adapters | ms / batch | examples / s | × single-adapter |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['method']} | {row['adapters']} | {row['ms']:.1f} | "
            f"{row['examples_per_s']:.1f} | {row['vs_single']:.2f} |"
        )


if __name__ == "__main__":
    main()
