"""Tunix's own LoRA path (Qwix) vs lorax_fn, on the same Tunix NNX model, targets and rank.

Qwix is how Tunix's SFT examples add LoRA: ``qwix.LoraProvider(module_path=regex, rank,
alpha)`` and ``qwix.apply_lora_to_model(model, provider, **model.get_model_input())``
rewrite the module so that each matched einsum/linear also holds ``*_lora_a``/``*_lora_b``
``nnx.LoRAParam`` variables. lorax_fn leaves the model alone: ``split`` takes it as it is
and ``lora(loss)`` adds ``s·(x@A)@B`` where the loss reads a weight. Both train steps
here are the same shape: ``jax.jit`` of value-and-grad of the next-token loss with
respect to the LoRA parameters alone, then AdamW (optax); the frozen weights are an
argument of the step, not a closure constant. Before timing, both adapters are set to
the same random factors and the two losses must agree, so the comparison is of one
computation written two ways.

Reported per path: trainable parameters, XLA's compiled FLOPs (``cost_analysis``) and
temporary memory (``memory_analysis``) of the train step, and its wall time, the two
steps taking turns in one process (``benchmarks.common.timings``) so that a busy moment
on a shared machine hits both; the ratios are what to read. Needs ``google-tunix``::

    python benchmarks/zoo_qwix.py --family qwen3 --out docs/results/zoo_qwix
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import qwix
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, timings

import lorax_fn

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--family", nargs="+", choices=["qwen3", "llama3"], default=["qwen3", "llama3"]
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, help="write OUT.jsonl and OUT.md")
    return parser.parse_args()


def make_model(args: argparse.Namespace, family_name: str) -> nnx.Module:
    """A random-init Tunix model; the same seed gives the same weights for both paths."""
    if family_name == "qwen3":
        from tunix.models.qwen3 import model as family
    else:
        from tunix.models.llama3 import model as family
    config = family.ModelConfig(
        num_layers=args.layers,
        vocab_size=args.vocab,
        embed_dim=args.d,
        hidden_dim=3 * args.d,
        num_heads=args.heads,
        head_dim=args.d // args.heads,
        num_kv_heads=args.kv_heads,
        rope_theta=1_000_000,
        norm_eps=1e-6,
    )
    cls = family.Qwen3 if family_name == "qwen3" else family.Llama3
    return randomized(cls(config, rngs=nnx.Rngs(0)))


def randomized(model: nnx.Module) -> nnx.Module:
    """Every weight random (Tunix zero-inits the MLP, which would hide its adapters)."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    drawn = [
        (1.0 if x.ndim == 1 else 0.0) + 0.1 * jax.random.normal(k, x.shape, x.dtype)
        for x, k in zip(leaves, keys, strict=True)
    ]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, drawn))


def next_token_loss(model: nnx.Module, tokens: jax.Array) -> jax.Array:
    """Tunix's forward pass without a cache (causal mask), mean next-token cross-entropy."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    length = inputs.shape[-1]
    positions = jnp.broadcast_to(jnp.arange(length), inputs.shape)
    mask = jnp.tril(jnp.ones((1, length, length), bool))
    logits = model(inputs, positions, None, mask)[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def adamw_step(loss: Callable[[Any, Any], jax.Array], tx: optax.GradientTransformation):
    """``(trainable, opt_state, frozen, tokens) -> (trainable, opt_state, loss)``."""

    def step(trainable: Any, opt_state: Any, frozen: Any, tokens: jax.Array):
        value, grads = jax.value_and_grad(loss)(trainable, frozen, tokens)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    return step


def qwix_path(args: argparse.Namespace, family: str) -> dict[str, Any]:
    """Tunix's way: Qwix rewrites the model; the LoRAParam variables are what trains."""
    model = make_model(args, family)
    provider = qwix.LoraProvider(
        module_path="|".join(f".*{p}" for p in PROJECTIONS), rank=args.rank, alpha=2.0 * args.rank
    )
    model = qwix.apply_lora_to_model(model, provider, **model.get_model_input(), rngs=nnx.Rngs(1))
    graphdef, lora_params, rest = nnx.split(model, nnx.LoRAParam, ...)

    def loss(lora_params: nnx.State, rest: nnx.State, tokens: jax.Array) -> jax.Array:
        return next_token_loss(nnx.merge(graphdef, lora_params, rest), tokens)

    tx = optax.adamw(1e-3)
    return {"loss": loss, "trainable": lora_params, "frozen": rest, "tx": tx}


def lorax_path(args: argparse.Namespace, family: str, tokens: jax.Array) -> dict[str, Any]:
    """lorax_fn's way: the model as it is; ``lora(loss)`` adds the factors where it reads."""
    spec = lorax_fn.LoraSpec(
        [f"**/{p}/*" for p in PROJECTIONS], rank=args.rank, alpha=2.0 * args.rank
    )
    base, lt = lorax_fn.split(
        make_model(args, family),
        spec,
        key=jax.random.key(1),
        fn=next_token_loss,
        example_args=(tokens,),
    )
    adapted = lorax_fn.lora(next_token_loss, on_fallback="error")

    def loss(lt: dict, base: nnx.Module, tokens: jax.Array) -> jax.Array:
        return adapted(base, lt, tokens)

    tx = lorax_fn.optimizer(optax.adamw(1e-3), lt)
    return {"loss": loss, "trainable": lt, "frozen": base, "tx": tx}


def same_factors(qwix: dict[str, Any], lorax: dict[str, Any], seed: int = 0) -> None:
    """Give both adapters the same random A and B (B = 0 would make any two agree)."""
    rng = np.random.default_rng(seed)
    flat = dict(nnx.to_flat_state(qwix["trainable"]))
    new_lt = {}
    for path, entry in lorax["trainable"].items():
        prefix = tuple(int(k) if k.isdigit() else k for k in path.split("/"))
        a_key, b_key = (
            (*prefix[:-1], f"{prefix[-1]}_lora_a"),
            (*prefix[:-1], f"{prefix[-1]}_lora_b"),
        )
        a = jnp.asarray(rng.normal(0, 0.05, entry.a.shape), entry.a.dtype)
        b = jnp.asarray(rng.normal(0, 0.05, entry.b.shape), entry.b.dtype)
        if flat[a_key].shape != a.shape or flat[b_key].shape != b.shape:
            raise SystemExit(
                f"{path}: Qwix factors {flat[a_key].shape}, {flat[b_key].shape} "
                f"differ from lorax_fn's {a.shape}, {b.shape}"
            )
        flat[a_key].set_value(a)
        flat[b_key].set_value(b)
        new_lt[path] = dataclasses.replace(entry, a=a, b=b)
    lorax["trainable"] = new_lt


def count(tree: Any) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def compiled_stats(path: dict[str, Any], tokens: jax.Array) -> tuple[Callable, dict[str, float]]:
    """The jitted step with its arguments bound, and its compiled FLOPs and temp memory."""
    opt_state = path["tx"].init(path["trainable"])
    args = (path["trainable"], opt_state, path["frozen"], tokens)
    jitted = jax.jit(adamw_step(path["loss"], path["tx"]))
    compiled = jitted.lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    stats = {
        "trainable": count(path["trainable"]),
        "gflops": float(cost["flops"]) / 1e9,
        "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20,
    }
    return (lambda: compiled(*args)), stats


def measure(args: argparse.Namespace, family: str) -> list[dict[str, Any]]:
    """One family: the two paths' rows and the row of lorax_fn's ratios to Qwix's."""
    tokens = jax.random.randint(jax.random.key(2), (args.batch, args.seq + 1), 0, args.vocab)
    paths = {"qwix": qwix_path(args, family), "lorax_fn": lorax_path(args, family, tokens)}
    same_factors(paths["qwix"], paths["lorax_fn"])
    losses = {
        n: float(jax.jit(p["loss"])(p["trainable"], p["frozen"], tokens)) for n, p in paths.items()
    }
    if not np.isclose(losses["qwix"], losses["lorax_fn"], rtol=1e-5):
        raise SystemExit(f"{family}: the two adapted models disagree: {losses}")

    calls, rows = {}, []
    for name, path in paths.items():
        calls[name], stats = compiled_stats(path, tokens)
        rows.append({"family": family, "path": name, **stats, "loss_same_factors": losses[name]})
    times = timings(calls, args.repeats)
    for row in rows:
        row["step_ms"] = statistics.median(times[row["path"]])
    ratios = [lx / qw for lx, qw in zip(times["lorax_fn"], times["qwix"], strict=True)]
    qw, lx = rows
    summary = {
        "family": family,
        "path": "lorax_fn / qwix",
        "trainable": lx["trainable"] / qw["trainable"],
        "gflops": lx["gflops"] / qw["gflops"],
        "temp_mib": lx["temp_mib"] / qw["temp_mib"] if qw["temp_mib"] else None,
        "step_ms": statistics.median(ratios),
        "step_ratio_min": min(ratios),
        "step_ratio_max": max(ratios),
    }
    return [*rows, summary]


def main() -> None:
    args = parse_args()
    setup = {k: v for k, v in vars(args).items() if k not in ("out", "family")}
    meta = {"date": datetime.date.today().isoformat(), "machine": machine(), "setup": setup}
    rows = [row for family in args.family for row in measure(args, family)]
    lines = [json.dumps({**r, **meta}) for r in rows]
    print("\n".join(lines))
    columns = [
        ("family", "model", ""),
        ("path", "path", ""),
        ("trainable", "trainable params", ",.0f"),
        ("gflops", "step GFLOPs", ".3f"),
        ("temp_mib", "temp MiB", ".2f"),
        ("step_ms", "step ms (median)", ".2f"),
    ]
    ratio_columns = [*columns[:2], *((k, h, ".2f") for k, h, _ in columns[2:])]
    ratio_columns.append(("step_ratio_min", "step ratio min", ".2f"))
    ratio_columns.append(("step_ratio_max", "step ratio max", ".2f"))
    summaries = [r for r in rows if r["path"] == "lorax_fn / qwix"]
    text = (
        table([r for r in rows if r not in summaries], columns)
        + "\n\nlorax_fn's over Qwix's:\n\n"
        + table(summaries, ratio_columns)
    )
    print(text)
    if args.out:
        args.out.with_suffix(".jsonl").write_text("\n".join(lines) + "\n")
        args.out.with_suffix(".md").write_text(report(text, meta))


def report(text: str, meta: dict[str, Any]) -> str:
    """The committed markdown: setup, machine, date and the tables."""
    s, m = meta["setup"], meta["machine"]
    return (
        "# Tunix's LoRA path (Qwix) vs lorax_fn on Tunix models\n\n"
        f"`python benchmarks/zoo_qwix.py` (issue #19 item 2), {meta['date']}, "
        f"{m['backend']} ({m['devices'][0]}, {m['cpus']} cores shared with other work, "
        f"jax {m['jax']}, google-tunix 0.1.7, qwix 0.1.8). Tunix Qwen3 and Llama3, random "
        f"init: d = {s['d']}, {s['layers']} layers, {s['heads']} heads ({s['kv_heads']} KV), "
        f"MLP {3 * s['d']}, vocabulary {s['vocab']}, batch {s['batch']} × {s['seq']} tokens; "
        f"LoRA r = {s['rank']}, alpha = {2 * s['rank']} on q/k/v/o and gate/up/down of every "
        "layer, one jitted AdamW step each (value and gradient with respect to the LoRA "
        "parameters, frozen weights as an argument). Both adapters were first set to the "
        "same random factors and gave the same loss. FLOPs and temporary memory are XLA's "
        "compiled cost and memory analysis (independent of load); step times are medians of "
        f"{s['repeats']} turns each, the two steps alternating in one process, and the step "
        "ratio is the median (and range) of the per-turn ratios.\n\n"
        f"{text}\n"
    )


if __name__ == "__main__":
    main()
