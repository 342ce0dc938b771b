"""QLoRA train step: a LoRA step on a bf16, int8 or NF4 frozen base — time and memory.

The GPT-2-small-shaped decoder of ``train_step.py`` (d=768, 12 heads, seq 128,
batch 8, 4 layers, 8192-token vocabulary by default), in bfloat16, LoRA r=8 on every
attention and MLP matrix, Adam. For ``int8`` and ``nf4`` those matrices are stored
quantized (:func:`lorax_fn.quantize_base`; embeddings, norms and biases stay bf16) and
``lora(fn)`` dequantizes each inside the product that reads it, recomputing it in the
backward pass; ``nf4_whole`` instead dequantizes the whole base at the start of the
step, for comparison. Each configuration runs in its own process. Reported: the base's
stored bytes, the compiled step's argument and temporary bytes
(``compiled.memory_analysis()``), peak RSS, and step time, as ratios to bf16.

    python benchmarks/qlora_train.py [--layers 12 --vocab 50257] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import compile_and_time, decoder_step_args, machine, run_configs, table
from models import ATTENTION_AND_MLP, Decoder, DecoderConfig

import lorax_fn
from lorax_fn.quant.quantized import storage_bytes

# nf4_whole: the naive alternative, the whole base dequantized at the start of the step.
CONFIGS = ("bf16", "int8", "nf4", "nf4_whole")


def loss_fn(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), ids[:, 1:]
    ).mean()


def measure(config: str, args: argparse.Namespace) -> dict:
    cfg = DecoderConfig(
        vocab=args.vocab, d=args.d, heads=args.heads, layers=args.layers, seq=args.seq
    )
    model = Decoder(cfg)
    ids = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, args.vocab)
    variables = jax.tree.map(lambda x: x.astype(jnp.bfloat16), model.init(jax.random.key(1), ids))
    spec = lorax_fn.LoraSpec(ATTENTION_AND_MLP, rank=args.rank)
    base, lt = lorax_fn.split(variables, spec, key=jax.random.key(2))
    if config != "bf16":
        base = lorax_fn.quantize_base(base, lt, format=config.removesuffix("_whole"))
    lora_apply = lorax_fn.lora(model.apply, on_fallback="error")

    def apply(base, lt, ids):
        if config == "nf4_whole":
            base = lorax_fn.quant.dequantize_base(base)
        return lora_apply(base, lt, ids)

    tx = lorax_fn.optimizer(optax.adam(1e-4), lt)

    def step(lt, opt_state, ids, base):
        loss, grads = jax.value_and_grad(lambda t: loss_fn(apply(base, t, ids), ids))(lt)
        updates, opt_state = tx.update(grads, opt_state, lt)
        return optax.apply_updates(lt, updates), opt_state, loss

    # What autodiff keeps for the backward pass (jaxpr level, before XLA): the leaves of
    # the VJP closure of the loss w.r.t. the LoRA tree.
    residuals = jax.eval_shape(
        lambda lt: jax.vjp(lambda t: loss_fn(apply(base, t, ids), ids), lt)[1], lt
    )
    run_args = (lt, tx.init(lt), ids, base)
    compiled = jax.jit(step).lower(*run_args).compile()
    memory = compiled.memory_analysis()
    result = compile_and_time(step, run_args, repeats=args.repeats, donate=(0, 1))
    return {
        "benchmark": "qlora_train",
        "config": config,
        "layers": args.layers,
        "d": args.d,
        "seq": args.seq,
        "batch": args.batch,
        "vocab": args.vocab,
        "rank": args.rank,
        "base_mib": storage_bytes(base) / 2**20,
        "argument_mib": memory.argument_size_in_bytes / 2**20,
        "residual_mib": storage_bytes(residuals) / 2**20,
        "float_residual_mib": storage_bytes(
            [x for x in jax.tree.leaves(residuals) if jnp.issubdtype(x.dtype, jnp.floating)]
        )
        / 2**20,
        "compiled_mib": (memory.argument_size_in_bytes + memory.temp_size_in_bytes) / 2**20,
        **result,
    }


def main() -> None:
    args = decoder_step_args(__doc__.splitlines()[0], CONFIGS)
    if args.config:
        print(json.dumps(measure(args.config, args)))
        return
    rows = run_configs(__file__, CONFIGS, args)
    ref = rows[0]
    for row in rows:
        for key in ("step_ms", "base_mib", "compiled_mib"):
            row[f"{key}_ratio"] = row[key] / ref[key]
    print(
        table(
            rows,
            [
                ("config", "base", "s"),
                ("base_mib", "base MiB", ".1f"),
                ("base_mib_ratio", "× bf16", ".2f"),
                ("argument_mib", "step args MiB", ".1f"),
                ("residual_mib", "VJP residuals MiB", ".1f"),
                ("temp_mib", "XLA temp MiB", ".1f"),
                ("compiled_mib", "args + temp MiB", ".1f"),
                ("compiled_mib_ratio", "× bf16", ".2f"),
                ("peak_rss_mib", "peak RSS MiB", ".0f"),
                ("step_ms", "step ms (median)", ".1f"),
                ("step_ms_ratio", "× bf16", ".2f"),
            ],
        )
    )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
