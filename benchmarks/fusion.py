"""Shared-input fusion: lorax_fn's LoRA train step vs a hand-written JAX LoRA step.

One process, the configurations compiled first and then timed in turns (a busy moment
on a shared machine hits them all), ``--rounds`` rounds of ``--repeats`` calls each;
reported per configuration: the median over rounds of its round-median time divided
by the hand-written step's in the same round (and by ``lorax_unfused``'s).

Workloads (pure JAX GPT-2-style decoders: pre-LN, causal attention, GELU MLP, tied
embeddings; AdamW on the LoRA factors):

- ``peer``: d=512, 8 heads, 4 layers, seq 128, batch 8, r=8 on q/k/v/o;
- ``train_step``: ``train_step.py``'s shape: d=768, 12 heads, 4 layers, seq 128, batch 8,
  r=8 on q/k/v/o/fc/proj.

Configurations: ``handwritten`` (each adapted product ``x·W0 + s·(x·A)·B``, one per
weight, as one writes it by hand), ``lorax_fused`` (``lorax_fn.lora(model)``, the
default ``fuse_shared_inputs=True``) and ``lorax_unfused`` (``fuse_shared_inputs=False``).
``dots`` counts the dot operations in each compiled step (XLA's optimized HLO).

    python benchmarks/fusion.py [--workloads peer train_step] [--rounds 7] [--repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, table, timings

import lorax_fn


@dataclasses.dataclass(frozen=True)
class Workload:
    d: int
    heads: int
    layers: int
    seq: int
    batch: int
    vocab: int
    rank: int
    targets: tuple[str, ...]


WORKLOADS = {
    "peer": Workload(512, 8, 4, 128, 8, 8192, 8, ("q", "k", "v", "o")),
    "train_step": Workload(768, 12, 4, 128, 8, 8192, 8, ("q", "k", "v", "o", "fc", "proj")),
}
MATRICES = ("q", "k", "v", "o", "fc", "proj")

Dense = Callable[[dict[str, Any], str, jax.Array], jax.Array]


def init(w: Workload, key: jax.Array) -> dict[str, Any]:
    """GPT-2-style weights: ``wte``, ``wpe``, and per layer ``h{i}/{q,k,v,o,fc,proj}``."""
    shapes = {"q": (w.d, w.d), "k": (w.d, w.d), "v": (w.d, w.d), "o": (w.d, w.d)}
    shapes |= {"fc": (w.d, 4 * w.d), "proj": (4 * w.d, w.d)}
    params: dict[str, Any] = {
        "wte": 0.02 * jax.random.normal(key, (w.vocab, w.d)),
        "wpe": 0.01 * jax.random.normal(jax.random.fold_in(key, 1), (w.seq, w.d)),
    }
    for i in range(w.layers):
        for j, (name, shape) in enumerate(shapes.items()):
            k = jax.random.fold_in(key, 100 * i + j + 2)
            params[f"h{i}/{name}"] = 0.02 * jax.random.normal(k, shape)
    return params


def _norm(x: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5)


def forward(w: Workload, params: dict[str, Any], ids: jax.Array, dense: Dense) -> jax.Array:
    """Logits of the decoder; ``dense(params, name, x)`` computes ``x·W[name]``."""
    b, t = ids.shape
    x = params["wte"][ids] + params["wpe"][:t]
    mask = jnp.tril(jnp.ones((t, t), bool))
    hd = w.d // w.heads
    for i in range(w.layers):
        h = _norm(x)
        q, k, v = (dense(params, f"h{i}/{n}", h).reshape(b, t, w.heads, hd) for n in "qkv")
        att = jnp.einsum("bthd,bshd->bhts", q, k) / hd**0.5
        att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
        out = jnp.einsum("bhts,bshd->bthd", att, v).reshape(b, t, w.d)
        x = x + dense(params, f"h{i}/o", out)
        h = jax.nn.gelu(dense(params, f"h{i}/fc", _norm(x)))
        x = x + dense(params, f"h{i}/proj", h)
    return _norm(x) @ params["wte"].T


def _loss(logits: jax.Array, ids: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def _plain(params, name, x):
    return x @ params[name]


def handwritten_step(w: Workload, params: dict[str, Any], key: jax.Array):
    """A LoRA step as written by hand: ``{name: (A, B)}`` trained, one product per weight."""
    names = [f"h{i}/{n}" for i in range(w.layers) for n in w.targets]
    keys = jax.random.split(key, len(names))
    lora = {
        n: (
            jax.random.normal(k, (params[n].shape[0], w.rank)) / params[n].shape[0] ** 0.5,
            0.01 * jax.random.normal(jax.random.fold_in(k, 1), (w.rank, params[n].shape[1])),
        )
        for n, k in zip(names, keys, strict=True)
    }
    tx = optax.adamw(1e-4)

    def step(lora, opt_state, ids, frozen):
        def loss(lora):
            def dense(p, name, x):
                y = x @ p[name]
                if name in lora:  # scale alpha/r = 1, lorax_fn's default (alpha = r)
                    a, b = lora[name]
                    y = y + (x @ a) @ b
                return y

            return _loss(forward(w, frozen, ids, dense), ids)

        value, grads = jax.value_and_grad(loss)(lora)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, value

    return step, (lora, tx.init(lora))


def lorax_step(w: Workload, params: dict[str, Any], key: jax.Array, fuse: bool):
    """The same step through ``lorax_fn.lora``: a LoraSpec on the same weights."""
    spec = lorax_fn.LoraSpec([f"*/{n}" for n in w.targets], rank=w.rank)
    base, lt = lorax_fn.split(params, spec, key=key)
    apply = lorax_fn.lora(
        lambda p, ids: forward(w, p, ids, _plain), fuse_shared_inputs=fuse, on_fallback="error"
    )
    tx = lorax_fn.optimizer(optax.adamw(1e-4), lt)

    def step(lt, opt_state, ids, base):
        value, grads = jax.value_and_grad(lambda t: _loss(apply(base, t, ids), ids))(lt)
        updates, opt_state = tx.update(grads, opt_state, lt)
        return optax.apply_updates(lt, updates), opt_state, value

    return step, base, (lt, tx.init(lt))


def dot_count(compiled: Any) -> int:
    """Dot operations in a compiled program's optimized HLO."""
    return len(re.findall(r" dot\(", compiled.as_text()))


def measure(name: str, w: Workload, rounds: int, repeats: int) -> list[dict[str, Any]]:
    params = init(w, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (w.batch, w.seq), 0, w.vocab)
    hand, (lora, opt) = handwritten_step(w, params, jax.random.key(2))
    steps = {"handwritten": (jax.jit(hand), (lora, opt, ids, params))}
    for fuse in (True, False):
        step, base, (lt, lt_opt) = lorax_step(w, params, jax.random.key(2), fuse)
        steps["lorax_fused" if fuse else "lorax_unfused"] = (jax.jit(step), (lt, lt_opt, ids, base))
    dots = {c: dot_count(f.lower(*a).compile()) for c, (f, a) in steps.items()}
    calls = {c: (lambda f=f, a=a: f(*a)) for c, (f, a) in steps.items()}
    per_round = [
        {c: statistics.median(ts) for c, ts in timings(calls, repeats).items()}
        for _ in range(rounds)
    ]
    rows = []
    for config in steps:
        ratios = [r[config] / r["handwritten"] for r in per_round]
        rows.append(
            {
                "benchmark": "fusion",
                "workload": name,
                "config": config,
                **dataclasses.asdict(w),
                "targets": "/".join(w.targets),
                "dots": dots[config],
                "ms": statistics.median(r[config] for r in per_round),
                "vs_handwritten": statistics.median(ratios),
                "vs_handwritten_min": min(ratios),
                "vs_handwritten_max": max(ratios),
                "vs_unfused": statistics.median(r[config] / r["lorax_unfused"] for r in per_round),
                "rounds": rounds,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--d", type=int, help="override every workload's width (smoke tests)")
    parser.add_argument("--json", type=Path, help="also write the rows here (JSON lines)")
    args = parser.parse_args()
    print(json.dumps({"machine": machine(), "rounds": args.rounds, "repeats": args.repeats}))
    rows = []
    for name in args.workloads:
        w = WORKLOADS[name]
        if args.d:
            w = dataclasses.replace(w, d=args.d, heads=max(1, args.d // 64), vocab=512)
        rows += measure(name, w, args.rounds, args.repeats)
    print(
        table(
            rows,
            [
                ("workload", "workload", "s"),
                ("config", "config", "s"),
                ("dots", "dots in HLO", "d"),
                ("ms", "step ms (median)", ".1f"),
                ("vs_handwritten", "× hand-written (median)", ".3f"),
                ("vs_handwritten_min", "min", ".3f"),
                ("vs_handwritten_max", "max", ".3f"),
                ("vs_unfused", "× lorax unfused (median)", ".3f"),
            ],
        )
    )
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
