"""Throughput of one batch spread over N distinct LoRA adapters (multi-adapter serving).

A small decoder (4 pre-LN layers, d=256, 4 heads, sequence 64, random weights) with
r=8 adapters on the attention query/value/output projections and both MLP matrices.
A batch of B=64 sequences is spread evenly over N ∈ {1, 4, 16, 64} distinct adapters
(example i uses adapter i mod N); every variant is compiled before timing:

- ``single``: the whole batch on one adapter, ``jax.jit(lorax_fn.lora(model.apply))``
  — the reference throughput (the same FLOPs as every mixed batch);
- ``gather``: ``jax.jit(lorax_fn.multi_lora(model.apply))`` on an N-adapter stack:
  per-example factors gathered, one program, ``x·W0`` shared by the batch;
- ``gather/unbatched``: the same with ``batch_of_one=False`` — this decoder also runs
  on one unbatched example, which spares XLA the copies that the unit batch axis
  causes in attention under ``vmap``;
- ``gather/unbatched/chunkK``: that with ``chunk_size=K`` (``--chunk``, a ``lax.map``
  over chunks of K examples), and ``single/chunkK``, its one-adapter reference;
- ``loop``: PEFT's ``adapter_names=`` strategy — for each distinct adapter, run the
  jitted ``lora(model.apply)`` on its subset of the batch, then reassemble the rows;
- ``chunked``: the control for ``loop`` — the same N calls on subsets of B/N rows, all
  with one adapter, so ``loop / chunked`` is the cost of switching adapters itself.
- ``merged``: the model on merged weights (no low-rank path), the zero-overhead bound.

On a CPU, calls on 1–16 rows can beat one call on 64 because their activations stay
in cache; ``loop`` and ``chunked`` profit from that whatever the adapters, which is
what the chunked variants of ``single`` and ``gather`` make visible. The variants take
turns (so a busy moment on a shared machine hits them all); each time is the median
(and the minimum) of ``--repeats`` calls. Prints one JSON line per measurement, then a table.

    python benchmarks/multi_adapter.py [--batch 64] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from common import random_adapters, timings
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
    trees = random_adapters(template, n)
    return base, trees


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16, 64])
    args = parser.parse_args()

    model = Decoder()
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, model.vocab)
    variables = jax.jit(model.init)(jax.random.key(0), tokens)
    base, trees = make_adapters(variables, max(args.adapters), args.rank)
    chunk = f"chunk{args.chunk}"

    apply = jax.jit(model.apply)
    lora_apply = lorax_fn.lora(model.apply)
    single = jax.jit(lora_apply)

    @jax.jit
    def single_chunked(base, tree, tokens):
        chunks = tokens.reshape(-1, args.chunk, *tokens.shape[1:])
        out = jax.lax.map(lambda x: lora_apply(base, tree, x), chunks)
        return out.reshape(tokens.shape[0], *out.shape[2:])

    gathers = {
        "gather": jax.jit(lorax_fn.multi_lora(model.apply)),
        "gather/unbatched": jax.jit(lorax_fn.multi_lora(model.apply, batch_of_one=False)),
        f"gather/unbatched/{chunk}": jax.jit(
            lorax_fn.multi_lora(model.apply, batch_of_one=False, chunk_size=args.chunk)
        ),
    }
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

    calls: dict[str, Callable[[], object]] = {
        "merged 1": lambda: apply(merged, tokens),
        "single 1": lambda: single(base, trees[0], tokens),
        f"single/{chunk} 1": lambda: single_chunked(base, trees[0], tokens),
    }
    for n in args.adapters:
        stack, ids = lorax_fn.stack_adapters(trees[:n]), jnp.arange(args.batch) % n
        for name, gather in gathers.items():
            calls[f"{name} {n}"] = lambda g=gather, s=stack, i=ids: g(base, s, i, tokens)
        calls[f"loop {n}"] = loop(n, one_adapter=False)
        calls[f"chunked {n}"] = loop(n, one_adapter=True)

    info = {"jax": jax.__version__, "backend": jax.default_backend(), "cpu": platform.machine()}
    print(json.dumps({"machine": info, "batch": args.batch, "seq": args.seq, "rank": args.rank}))
    times = timings(calls, args.repeats)
    reference = statistics.median(times["single 1"])
    rows = []
    for name, values in times.items():
        method, n = name.split()
        ms = statistics.median(values)
        rows.append(
            {
                "method": method,
                "adapters": int(n),
                "ms": ms,
                "ms_min": min(values),
                "examples_per_s": 1e3 * args.batch / ms,
                "vs_single": reference / ms,
            }
        )
        print(json.dumps(rows[-1]))

    print(f"\nB={args.batch}, seq {args.seq}, r={args.rank}; median (min) of {args.repeats} runs")
    print("| method | adapters | ms / batch | examples / s | × single-adapter |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['method']} | {row['adapters']} | {row['ms']:.0f} ({row['ms_min']:.0f}) | "
            f"{row['examples_per_s']:.0f} | {row['vs_single']:.2f} |"
        )


if __name__ == "__main__":
    main()
