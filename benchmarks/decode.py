"""Decode and prefill throughput with N distinct LoRA adapters in one batch (examples/serve.py).

The Llama-style decoder of ``examples/serve.py`` at a size a CPU can time (4 layers,
d=512, 8 query / 2 KV heads, SwiGLU 1408, vocabulary 2048) with r=8 adapters on every
projection; a batch of B=64 requests, request i using adapter i mod N, N ∈ {1, 4, 16, 64}.
One *decode step* is one new token for every request against a preallocated KV cache
(the cache donated, as a server would); *prefill* is the forward pass over B prompts.
Variants, each compiled before timing and timed in turns (so a busy moment on a shared
machine hits them all):

- ``merged``: the plain model on ``merge(base, adapter)``: the zero-overhead bound;
- ``single``: one adapter for the whole batch, unmerged (``lorax_fn.lora``);
- ``multi``: ``lorax_fn.multi_lora(apply, batch_of_one=False)`` over an N-adapter stack —
  per-request factors gathered, one program for any N;
- ``multi/chunkK``: the same with ``chunk_size=K`` (``--chunk``);
- ``multi/preselected``: the same step given ``lorax_fn.multi.select_adapters(stack, ids)``,
  made once before the timed calls, as a Python-driven decode loop would reuse it;
- ``multi/grouped``: ``multi_lora(..., method="grouped")``: requests sorted by adapter,
  the low-rank products as two ``lax.ragged_dot`` over adapter groups (SGMV / Punica),
  each adapter's factors read once per step;
- ``decode loop``: per step of a whole ``serve.generate`` (prefill, then ``lax.scan``):
  the time of a long loop minus a one-token loop, over the extra steps. Within one
  program XLA may hoist work that does not change between steps.

``ideal`` is the issue's bound ``1/(1+2Nr/d)``: the fraction of the merged throughput
left when decoding is limited by reading weights and each step reads the base weights
(~d² per matrix) plus the factors of each of the N distinct adapters (2·d·r per matrix),
as a kernel that reads each adapter once per batch (Punica/S-LoRA) would. ``bytes`` is
the same bound computed exactly for this model: all weights read by a step vs those plus
N adapters. ``multi_lora`` gathers one copy of the factors per *request*, so a step
moves B copies whatever N is: it is bounded like N = B. In a decode step (one token per
request) that is a lot: per d×d matrix B·2dr = 2d² numbers at B=64, r=8, d=512, twice
the weight itself. In prefill the same gather is shared by the prompt's tokens, and in
a whole decode loop XLA hoists it out of the ``lax.scan`` (in the compiled
``serve.generate_with_adapters`` every factor gather sits outside the while loop), so
the loop pays it once per generation; a jitted step called once per token pays it
every time, unless it is given a selection (``multi/preselected``).

Also checks that replacing an adapter (``lorax_fn.multi.replace_adapter``) does not recompile
the decode step (a counter inside the traced function). Prints JSON lines, then a table.

    python benchmarks/decode.py [--batch 64] [--repeats 10] [--targets qv]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import machine, random_adapters, table, timings  # noqa: E402

import lorax_fn  # noqa: E402
from examples import serve  # noqa: E402

TRACES = {"multi_step": 0}


def steppers(config: serve.Config, chunk: int) -> dict[str, Callable]:
    """Jitted decode/prefill steps per variant: ``f(weights, tokens, cache, pos)``."""
    apply = serve.Llama(config).apply
    single = jax.vmap(lorax_fn.lora(apply), in_axes=(None, None, 0, 0, 0))

    def merged(weights, tokens, cache, pos):
        return serve.plain_forward(config, weights)(tokens, cache, pos)

    def one_adapter(weights, tokens, cache, pos):
        return single(*weights, tokens, cache, pos)

    def multi(weights, tokens, cache, pos, chunk_size=None):
        TRACES["multi_step"] += 1
        base, stack, ids = weights
        return serve.adapter_forward(config, base, stack, ids, chunk_size)(tokens, cache, pos)

    def multi_chunked(weights, tokens, cache, pos):
        return multi(weights, tokens, cache, pos, chunk)

    run = lorax_fn.multi_lora(apply, batch_of_one=False)

    def preselected(weights, tokens, cache, pos):
        base, selection = weights
        return run(base, selection, tokens, cache, pos)

    run_grouped = lorax_fn.multi_lora(apply, batch_of_one=False, method="grouped")

    def grouped(weights, tokens, cache, pos):
        return run_grouped(*weights, tokens, cache, pos)

    fns = {
        "merged": merged,
        "single": one_adapter,
        "multi": multi,
        f"multi/chunk{chunk}": multi_chunked,
        "multi/preselected": preselected,
        "multi/grouped": grouped,
    }
    return {name: jax.jit(fn, donate_argnums=(2,)) for name, fn in fns.items()}


def runner(fn: Callable, weights, tokens, cache, pos) -> Callable[[], jax.Array]:
    """A call of ``fn`` that feeds the donated cache back in, as a decode loop does."""
    state = {"cache": jax.tree.map(jnp.copy, cache)}

    def call() -> jax.Array:
        logits, state["cache"] = fn(weights, tokens, state["cache"], pos)
        return logits

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=64, help="prefill length")
    parser.add_argument("--max-len", type=int, default=128, help="KV cache length")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", choices=["all", "qv"], default="all")
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--prefill-repeats", type=int, default=3)
    parser.add_argument("--loop-steps", type=int, default=49, help="tokens of a decode loop")
    parser.add_argument("--loop-prompt", type=int, default=16, help="prompt of a decode loop")
    args = parser.parse_args()

    config = serve.Config(
        vocab=2048, d=512, heads=8, kv_heads=2, layers=4, hidden=1408, max_len=args.max_len
    )
    targets = serve.TARGETS if args.targets == "all" else [
        t for t in serve.TARGETS if t.split("/")[-2] in ("q_proj", "v_proj")
    ]  # fmt: skip
    variables = serve.init_params(config, 0)
    spec = lorax_fn.LoraSpec(targets, rank=args.rank)
    base, template = lorax_fn.split(variables, spec, key=jax.random.key(0))
    trees = random_adapters(template, max(args.adapters) + 1)
    spare = trees.pop()
    merged = lorax_fn.merge(base, trees[0])
    stacks = {n: lorax_fn.stack_adapters(trees[:n]) for n in args.adapters}
    b = args.batch
    ids = {n: jnp.arange(b, dtype=jnp.int32) % n for n in args.adapters}

    base_bytes = sum(
        x.size
        for p, x in lorax_fn.paths.leaves_with_paths(variables)
        if not p.endswith("embedding")
    )
    adapter_bytes = sum(f.a.size + f.b.size for f in trees[0].values())

    def bounds(n: int) -> dict[str, float]:
        return {
            "ideal": 1 / (1 + 2 * n * args.rank / config.d),
            "bytes": base_bytes / (base_bytes + n * adapter_bytes),
        }

    fns = steppers(config, args.chunk)
    chunk = f"multi/chunk{args.chunk}"
    cache = serve.init_cache(config, b)
    token = jax.random.randint(jax.random.key(1), (b, 1), 0, config.vocab)
    pos = jnp.full((b,), args.prompt, jnp.int32)
    prompts = jax.random.randint(jax.random.key(2), (b, args.prompt), 0, config.vocab)
    start = jnp.zeros((b,), jnp.int32)

    selections = {
        n: jax.jit(lorax_fn.multi.select_adapters)(stacks[n], ids[n]) for n in args.adapters
    }

    def weights(method: str, n: int):
        if method == "merged":
            return merged
        if method == "single":
            return (base, trees[0])
        if method == "multi/preselected":
            return (base, selections[n])
        return (base, stacks[n], ids[n])

    decode_calls, prefill_calls = {}, {}
    for method in ("merged", "single"):
        decode_calls[f"{method} 1"] = runner(fns[method], weights(method, 1), token, cache, pos)
        prefill_calls[f"{method} 1"] = runner(
            fns[method], weights(method, 1), prompts, cache, start
        )
    for n in args.adapters:
        for method in ("multi", chunk, "multi/preselected", "multi/grouped"):
            decode_calls[f"{method} {n}"] = runner(
                fns[method], weights(method, n), token, cache, pos
            )
        if n in (min(args.adapters), max(args.adapters)):  # prefill cost does not depend on N
            for method in ("multi", "multi/grouped"):
                prefill_calls[f"{method} {n}"] = runner(
                    fns[method], weights(method, n), prompts, cache, start
                )

    info = machine()
    print(json.dumps({"machine": info, "batch": b, "d": config.d, "layers": config.layers,
                      "rank": args.rank, "targets": args.targets, "prompt": args.prompt,
                      "max_len": args.max_len}))  # fmt: skip
    rows = []
    for benchmark, calls, repeats, tokens_per_call in (
        ("decode", decode_calls, args.repeats, b),
        ("prefill", prefill_calls, args.prefill_repeats, b * args.prompt),
    ):
        times = timings(calls, repeats)
        ms = {name: statistics.median(values) for name, values in times.items()}
        best = {name: min(values) for name, values in times.items()}
        for name, values in times.items():
            method, n = name.split()
            n = int(n)
            row = {
                "benchmark": benchmark,
                "method": method,
                "adapters": n,
                "ms": ms[name],
                "ms_min": min(values),
                "tokens_per_s": 1e3 * tokens_per_call / ms[name],
                "best_tokens_per_s": 1e3 * tokens_per_call / best[name],
                # Ratios of the fastest runs: on a shared machine medians also measure
                # the neighbours.
                "vs_merged": best["merged 1"] / best[name],
                "vs_single": best["single 1"] / best[name],
            }
            if benchmark == "decode" and method != "merged":
                row.update(bounds(n))
            rows.append(row)
            print(json.dumps(row), flush=True)

    # The whole loop, serve.generate: prefill, then a lax.scan over the steps. Per step:
    # the difference of a long and a one-token loop (the same prefill), over the extra
    # steps. In one program XLA can hoist what does not change from step to step, such
    # as the per-request gather of the factors.
    loop_prompts = prompts[:, : args.loop_prompt]
    lengths = jnp.full((b,), args.loop_prompt, jnp.int32)
    greedy = serve.sampling_of(
        {"seeds": np.arange(b), "temperature": np.zeros(b), "top_k": np.zeros(b, np.int32)}
    )

    def loop(method: str, n: int, steps: int) -> Callable[[], jax.Array]:
        if method == "merged":
            return lambda: serve.generate_plain(
                config, merged, loop_prompts, lengths, greedy, steps=steps
            )[0]
        return lambda: serve.generate_with_adapters(
            config, base, stacks[n], ids[n], loop_prompts, lengths, greedy, steps=steps
        )[0]

    variants = [("merged", 1)] + [
        ("multi", n) for n in sorted({min(args.adapters), max(args.adapters)})
    ]
    loops = {f"{m} {n} {s}": loop(m, n, s) for m, n in variants for s in (1, args.loop_steps)}
    times = timings(loops, args.prefill_repeats)
    per_step = {
        (m, n): (min(times[f"{m} {n} {args.loop_steps}"]) - min(times[f"{m} {n} 1"]))
        / (args.loop_steps - 1)
        for m, n in variants
    }
    for (method, n), ms_step in per_step.items():
        row = {
            "benchmark": "decode loop",
            "method": method,
            "adapters": n,
            "ms_min": ms_step,
            "best_tokens_per_s": 1e3 * b / ms_step,
            "vs_merged": per_step["merged", 1] / ms_step,
        }
        if method != "merged":
            row.update(bounds(n))
        rows.append(row)
        print(json.dumps(row), flush=True)

    # Hot swap: a new adapter in slot 0 of the largest stack, then the same decode step.
    n = max(args.adapters)
    before = TRACES["multi_step"]
    swapped = lorax_fn.multi.replace_adapter(stacks[n], 0, spare)
    call = runner(fns["multi"], (base, swapped, ids[n]), token, cache, pos)
    jax.block_until_ready(call())
    swap = {"benchmark": "hot swap", "adapters": n, "recompiles": TRACES["multi_step"] - before}
    print(json.dumps(swap))

    print(
        f"\nB={b}, d={config.d}, {config.layers} layers, r={args.rank} on {args.targets} "
        f"projections, prompt {args.prompt}, cache {args.max_len}; median and best of "
        f"{args.repeats} decode / {args.prefill_repeats} prefill runs on {info['backend']}"
    )
    print(
        table(
            rows,
            [
                ("benchmark", "", "s"),
                ("method", "method", "s"),
                ("adapters", "N", "d"),
                ("ms", "ms / call", ".1f"),
                ("ms_min", "best ms", ".1f"),
                ("tokens_per_s", "tokens / s", ".0f"),
                ("best_tokens_per_s", "best tokens / s", ".0f"),
                ("vs_merged", "× merged (best)", ".2f"),
                ("vs_single", "× single (best)", ".2f"),
                ("ideal", "ideal 1/(1+2Nr/d)", ".2f"),
                ("bytes", "bytes bound", ".2f"),
            ],
        )
    )
    print(
        "\nideal: the fraction of the merged throughput a weight-read-bound decode step keeps "
        "when it also reads N adapters once each; bytes: that bound from this model's exact "
        f"sizes. Hot swap of one adapter: {swap['recompiles']} recompilation(s) of the step."
    )


if __name__ == "__main__":
    main()
