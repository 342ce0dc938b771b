"""Train-step cost of full fine-tuning vs LoRA merge-then-call vs LoRA factorized.

A GPT-2-small-shaped decoder (d=768, 12 heads, seq 128, batch 8; 4 layers and an
8192-token vocabulary by default so that a 2-core CPU finishes in minutes), Adam,
LoRA r=8 on every attention and MLP matrix. Each configuration runs in its own
process so its peak memory is its own. Prints one JSON line per configuration and
a markdown table.

    python benchmarks/train_step.py            # all three configurations
    python benchmarks/train_step.py --layers 12 --vocab 50257   # the full GPT-2 small
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import compile_and_time, decoder_step_args, machine, run_configs, table
from models import ATTENTION_AND_MLP, Decoder, DecoderConfig

import lorax_fn

CONFIGS = ("full", "lora_merged", "lora_factorized")


def loss_fn(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def measure(config: str, args: argparse.Namespace) -> dict:
    cfg = DecoderConfig(
        vocab=args.vocab, d=args.d, heads=args.heads, layers=args.layers, seq=args.seq
    )
    model = Decoder(cfg)
    ids = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, args.vocab)
    variables = model.init(jax.random.key(1), ids)
    tx = optax.adam(1e-4)
    if config == "full":

        def step(params, opt_state, ids):
            loss, grads = jax.value_and_grad(lambda p: loss_fn(model.apply(p, ids), ids))(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        params = variables
        trainable = params
        run_args = (params, tx.init(params), ids)
    else:
        spec = lorax_fn.LoraSpec(ATTENTION_AND_MLP, rank=args.rank)
        base, lt = lorax_fn.split(variables, spec, key=jax.random.key(2))
        apply = lorax_fn.lora(
            model.apply, factorized=config == "lora_factorized", on_fallback="error"
        )
        lora_tx = lorax_fn.optimizer(tx, lt)

        def step(lt, opt_state, ids, base):
            loss, grads = jax.value_and_grad(lambda t: loss_fn(apply(base, t, ids), ids))(lt)
            updates, opt_state = lora_tx.update(grads, opt_state, lt)
            return optax.apply_updates(lt, updates), opt_state, loss

        trainable = lt
        run_args = (lt, lora_tx.init(lt), ids, base)
    n_trainable = sum(x.size for x in jax.tree_util.tree_leaves(trainable))
    result = compile_and_time(step, run_args, repeats=args.repeats, donate=(0, 1))
    return {
        "benchmark": "train_step",
        "config": config,
        "layers": args.layers,
        "d": args.d,
        "seq": args.seq,
        "batch": args.batch,
        "vocab": args.vocab,
        "rank": args.rank,
        "trainable_params": int(n_trainable),
        **result,
    }


def main() -> None:
    args = decoder_step_args(__doc__.splitlines()[0], CONFIGS)
    if args.config:
        print(json.dumps(measure(args.config, args)))
        return
    rows = run_configs(__file__, CONFIGS, args)
    full = rows[0]["step_ms"]
    merged = rows[1]["step_ms"]
    for row in rows:
        row["vs_full"] = row["step_ms"] / full
        row["vs_merged"] = row["step_ms"] / merged
    print(
        table(
            rows,
            [
                ("config", "config", "s"),
                ("trainable_params", "trainable", ",d"),
                ("step_ms", "step ms (median)", ".1f"),
                ("vs_full", "× full", ".2f"),
                ("vs_merged", "× merged", ".2f"),
                ("compile_s", "compile s", ".1f"),
                ("gflops", "GFLOP", ".1f"),
                ("temp_mib", "XLA temp MiB", ".0f"),
                ("peak_rss_mib", "peak RSS MiB", ".0f"),
            ],
        )
    )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
