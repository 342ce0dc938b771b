"""MoE train step (E=8 experts, top-2): full fine-tuning vs LoRA merge-then-call vs factorized.

A stack of residual mixture-of-experts FFN layers (router ``Dense(d→E)``, top-2
gating with a softmax over the two chosen logits, token copies sorted by expert,
``lax.ragged_dot`` into ``w_up (E, d, h)``, GELU, ``ragged_dot`` with
``w_down (E, h, d)``, unsorted and combined by the gate weights). Defaults: d=512,
h=1024, 2 layers, batch 8 × seq 128 tokens, Adam; LoRA r=8 on the router and both
expert weights, one adapter per expert (layouts from :func:`lorax_fn.infer_layouts`).
``full`` trains every parameter; ``lora_merged`` is ``lora(fn, factorized=False)``;
``lora_factorized`` is ``lora(fn, on_fallback="error")``, so a product that silently
fell back to merge-then-call would fail the run rather than hide in the numbers.
Each configuration runs in its own process so its peak memory is its own. Prints one
JSON line per configuration and a markdown table. GFLOP is XLA's count for the
compiled step: the CPU backend computes a ``ragged_dot`` as every expert over every
row (a (2048, 512)·(8, 512, 1024) ragged_dot counts 17.2 GFLOP, 8× the routed 2.1),
so on CPU the expert products cost E× their routed work in every configuration.

    python benchmarks/moe.py [--hidden 2048 --layers 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import compile_and_time, machine, run_configs, table

import lorax_fn

CONFIGS = ("full", "lora_merged", "lora_factorized")
TARGETS = ["**/w_up", "**/w_down", "**/router/kernel"]


class MoE(nn.Module):
    """Top-k routing over ``experts`` FFNs: sort token copies by expert, two ragged_dots."""

    experts: int
    hidden: int
    top_k: int = 2

    @nn.compact
    def __call__(self, x):
        tokens, d = x.shape
        init = nn.initializers.lecun_normal(batch_axis=(0,))
        logits = nn.Dense(self.experts, use_bias=False, name="router")(x)
        top, chosen = lax.top_k(logits, self.top_k)
        gates = jax.nn.softmax(top, axis=-1)
        flat = chosen.reshape(-1)
        order = jnp.argsort(flat)
        sizes = jnp.bincount(flat, length=self.experts).astype(jnp.int32)
        routed = jnp.repeat(x, self.top_k, axis=0)[order]
        w_up = self.param("w_up", init, (self.experts, d, self.hidden))
        w_down = self.param("w_down", init, (self.experts, self.hidden, d))
        y = lax.ragged_dot(jax.nn.gelu(lax.ragged_dot(routed, w_up, sizes)), w_down, sizes)
        y = jnp.zeros_like(y).at[order].set(y)
        return jnp.sum(y.reshape(tokens, self.top_k, d) * gates[..., None], axis=1)


class MoEStack(nn.Module):
    layers: int
    experts: int
    hidden: int

    @nn.compact
    def __call__(self, x):
        batch, seq, d = x.shape
        h = x.reshape(batch * seq, d)
        for _ in range(self.layers):
            h = h + MoE(self.experts, self.hidden)(nn.LayerNorm()(h))
        return h.reshape(batch, seq, d)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=CONFIGS)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args()


def measure(config: str, args: argparse.Namespace) -> dict:
    model = MoEStack(args.layers, args.experts, args.hidden)
    x = jax.random.normal(jax.random.key(0), (args.batch, args.seq, args.d))
    target = jax.random.normal(jax.random.key(3), x.shape)
    variables = jax.jit(model.init)(jax.random.key(1), x)
    tx = optax.adam(1e-4)

    def loss_fn(y):
        return jnp.mean((y - target) ** 2)

    if config == "full":

        def step(params, opt_state, x):
            loss, grads = jax.value_and_grad(lambda p: loss_fn(model.apply(p, x)))(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        trainable = variables
        run_args = (variables, tx.init(variables), x)
    else:
        layouts = lorax_fn.infer_layouts(model.apply, variables, x)
        spec = lorax_fn.LoraSpec(TARGETS, rank=args.rank)
        base, lt = lorax_fn.split(variables, spec, key=jax.random.key(2), layouts=layouts)
        apply = lorax_fn.lora(
            model.apply, factorized=config == "lora_factorized", on_fallback="error"
        )
        lora_tx = lorax_fn.optimizer(tx, lt)

        def step(lt, opt_state, x, base):
            loss, grads = jax.value_and_grad(lambda t: loss_fn(apply(base, t, x)))(lt)
            updates, opt_state = lora_tx.update(grads, opt_state, lt)
            return optax.apply_updates(lt, updates), opt_state, loss

        trainable = lt
        run_args = (lt, lora_tx.init(lt), x, base)
    n_trainable = sum(x.size for x in jax.tree_util.tree_leaves(trainable))
    result = compile_and_time(step, run_args, repeats=args.repeats, donate=(0, 1))
    return {
        "benchmark": "moe",
        "config": config,
        "layers": args.layers,
        "d": args.d,
        "hidden": args.hidden,
        "experts": args.experts,
        "tokens": args.batch * args.seq,
        "rank": args.rank,
        "trainable_params": int(n_trainable),
        **result,
    }


def main() -> None:
    args = parse_args()
    if args.config:
        print(json.dumps(measure(args.config, args)))
        return
    rows = run_configs(__file__, CONFIGS, args)
    full = rows[0]
    for row in rows:
        row["vs_full"] = row["step_ms"] / full["step_ms"]
        row["gflops_vs_full"] = row["gflops"] / full["gflops"]
    print(
        table(
            rows,
            [
                ("config", "config", "s"),
                ("trainable_params", "trainable", ",d"),
                ("gflops", "GFLOP", ".2f"),
                ("gflops_vs_full", "GFLOP × full", ".2f"),
                ("step_ms", "step ms (median)", ".1f"),
                ("step_ms_min", "step ms (min)", ".1f"),
                ("vs_full", "× full", ".2f"),
                ("compile_s", "compile s", ".1f"),
                ("temp_mib", "XLA temp MiB", ".0f"),
                ("peak_rss_mib", "peak RSS MiB", ".0f"),
            ],
        )
    )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
