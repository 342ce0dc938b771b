"""Subspace similarity of adapters learned on a real task: the LoRA paper's Figure 3.

Trains LoRA on ``W_q, W_v`` of the real all-MiniLM-L6-v2 at ``r = 8`` and ``r = 64`` on the
task of ``examples/table2.py`` (same data, same order, same schedule; its ``train`` does the
work), plus a second ``r = 8`` run with another seed (new A init, head init and data order).
Then, with :mod:`lorax_fn.analysis`, it computes the normalised subspace similarity

    φ(A1, A2, i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j)

between the runs, for every layer, on two bases:

- ``A``: the singular vectors of the A factors themselves, the paper's definition. A starts
  random (std ``1/r``) and a short schedule moves it only partly, so part of what it spans
  is still its initialisation;
- ``ΔW``: the input-side singular vectors of the learned update ``ΔW = s·A·B``, ordered by
  how much the update actually uses them. ``ΔW = (A·U_B·S_B)·V_Bᵀ`` with ``B = U_B S_B V_Bᵀ``
  and orthonormal ``V_B``, so ``A·U_B·S_B`` (``(fan_in, r)``) has exactly those vectors.

Two random subspaces of dimensions ``i`` and ``j`` in ``R^d`` have ``E[φ] = max(i, j) / d``
(the baseline printed beside each value). The heat map of one layer (paper's Figure 3
layout: ``i ≤ 8`` rows against ``j ≤ 64`` columns, then the ``8 × 8`` corner) goes to
``results/subspace.png`` and the numbers to ``results/subspace.json``.

    python examples/subspace.py              # three runs, ~4 min on 2 CPU cores
    python examples/subspace.py --layer 2 --no-seed-pair
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.bert import BertConfig, init_classifier_params
from examples.table2 import ROOT, RunResult, Settings, load_task, lora_qv, machine, train
from lorax_fn import analysis

MATRICES = {"W_q": "attention/query/kernel", "W_v": "attention/value/kernel"}
BASES = ("A", "ΔW")


def input_basis(factors: Any, basis: str) -> np.ndarray:
    """A ``(fan_in, r)`` matrix whose left singular vectors are the basis φ compares.

    ``"A"`` is the A factor itself; ``"ΔW"`` is ``A·U_B·S_B``, which has the left singular
    vectors (and singular values, up to the scale) of ``ΔW = A·B``.

    Example::

        m = input_basis(result.lora_tree["params/encoder/layer_0/attention/query/kernel"], "ΔW")
    """
    a = np.asarray(factors.a, np.float64)
    if basis == "A":
        return a
    u_b, s_b, _ = np.linalg.svd(np.asarray(factors.b, np.float64), full_matrices=False)
    return a @ (u_b * s_b)


def similarity(
    tree1: dict[str, Any], tree2: dict[str, Any], num_layers: int
) -> dict[str, dict[str, np.ndarray]]:
    """φ grids ``{basis: {matrix: (layers, r1, r2)}}`` between two trained LoRA trees."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for basis in BASES:
        out[basis] = {}
        for name, leaf in MATRICES.items():
            paths = [f"params/encoder/layer_{i}/{leaf}" for i in range(num_layers)]
            m1 = np.stack([input_basis(tree1[p], basis) for p in paths])
            m2 = np.stack([input_basis(tree2[p], basis) for p in paths])
            out[basis][name] = np.asarray(analysis.subspace_similarity_grid(m1, m2))
    return out


def movement(result: RunResult, num_layers: int) -> dict[str, float]:
    """Per matrix, the mean over layers of ``‖A − A_init‖_F / ‖A_init‖_F``.

    Near 0, A still spans mostly its random initialisation, and φ between two runs' A
    factors stays near the random baseline whatever the runs learned.
    """
    out = {}
    for name, leaf in MATRICES.items():
        ratios = []
        for i in range(num_layers):
            path = f"params/encoder/layer_{i}/{leaf}"
            a0 = np.asarray(result.initial_lora_tree[path].a)
            ratios.append(
                np.linalg.norm(np.asarray(result.lora_tree[path].a) - a0) / np.linalg.norm(a0)
            )
        out[name] = round(float(np.mean(ratios)), 3)
    return out


def summary(grids: dict[str, dict[str, np.ndarray]], fan_in: int) -> dict[str, Any]:
    """Per basis, matrix and layer: φ at a few (i, j), each with its random baseline."""
    out: dict[str, Any] = {}
    for basis, by_matrix in grids.items():
        for name, grid in by_matrix.items():
            r1, r2 = grid.shape[-2:]
            points = sorted({(1, 1), (1, r2), (r1, r1), (r1, r2)})
            out[f"{basis} {name}"] = {
                f"phi({i},{j})": {
                    "per_layer": [round(float(v), 3) for v in grid[:, i - 1, j - 1]],
                    "random": round(max(i, j) / fan_in, 3),
                }
                for i, j in points
            }
    return out


def plot(
    grids: dict[str, dict[str, np.ndarray]], layer: int, path: Path, title: str, dpi: int = 80
) -> None:
    """The paper's Figure 3 layout, one row per basis: W_q and W_v full, then both zoomed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 2.4 * len(grids) + 0.6), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(grids), 4, gridspec_kw={"width_ratios": [3, 3, 1.2, 1.2]})
    for row, (basis, by_matrix) in zip(np.atleast_2d(axes), grids.items(), strict=True):
        panels = [(n, g[layer], False) for n, g in by_matrix.items()]
        panels += [(n, g[layer], True) for n, g in by_matrix.items()]
        for ax, (name, grid, zoom) in zip(row, panels, strict=True):
            if zoom:
                grid = grid[:, : grid.shape[0]]
            r1, r2 = grid.shape
            image = analysis.draw_subspace_similarity(ax, grid)
            ax.set_title(f"{basis}, {name}" + (f" (j ≤ {r2})" if zoom else ""), fontsize=9)
            ax.set_xlabel("j", fontsize=8)
            ax.set_ylabel("i", fontsize=8)
            ax.set_yticks(range(1, r1 + 1))
            if zoom:
                ax.set_xticks(range(1, r2 + 1))
            ax.tick_params(labelsize=7)
    fig.colorbar(image, ax=axes, shrink=0.8, label="φ")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, format="png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs=2, default=(8, 64), metavar=("R1", "R2"))
    parser.add_argument("--layer", type=int, default=5, help="the layer the heat map shows")
    parser.add_argument(
        "--seed-pair",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also compare two seeds at rank R1",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    settings = Settings()
    config = BertConfig()
    task = load_task(settings)
    variables = init_classifier_params(jax.random.key(settings.seed), config, len(task.label_names))
    r1, r2 = args.ranks
    runs = {f"r={r1}": train(lora_qv(r1), task, settings, variables)}
    runs[f"r={r2}"] = train(lora_qv(r2), task, settings, variables)
    pairs = {f"r={r1} vs r={r2}": (f"r={r1}", f"r={r2}")}
    if args.seed_pair:
        runs[f"r={r1} seed 1"] = train(lora_qv(r1), task, dataclasses.replace(settings, seed=1))
        pairs[f"r={r1} seed 0 vs seed 1"] = (f"r={r1}", f"r={r1} seed 1")

    results: dict[str, Any] = {
        "runs": {
            k: {
                "val_accuracy": v.val_accuracy,
                "lr": v.lr,
                "a_relative_change": movement(v, config.num_layers),
            }
            for k, v in runs.items()
        },
        "settings": dataclasses.asdict(settings),
        "layer_plotted": args.layer,
    }
    for pair, (k1, k2) in pairs.items():
        grids = similarity(runs[k1].lora_tree, runs[k2].lora_tree, config.num_layers)
        results[pair] = summary(grids, config.hidden_size)
        slug = pair.replace(" ", "_").replace("=", "")
        plot(
            grids,
            args.layer,
            args.out / f"subspace_{slug}.png",
            f"all-MiniLM-L6-v2 layer {args.layer}: φ between LoRA runs {pair} "
            f"(random subspaces: max(i, j)/{config.hidden_size})",
        )
    results["machine"] = {**machine(), "total_wall_s": round(time.perf_counter() - start)}
    text = json.dumps(results, indent=1, ensure_ascii=False)
    (args.out / "subspace.json").write_text(text)
    for name, run in results["runs"].items():
        print(
            f"{name}: val accuracy {run['val_accuracy']:.1%}, "
            f"‖A − A_init‖/‖A_init‖ (mean over layers) {run['a_relative_change']}"
        )
    for pair in pairs:
        print(f"\n{pair}  (layers 0..{config.num_layers - 1}; random baseline in brackets)")
        for key, points in results[pair].items():
            cells = [f"{p} {v['per_layer']} [{v['random']}]" for p, v in points.items()]
            print(f"  {key:6s} " + "  ".join(cells))
    print(f"\nwrote {args.out}/subspace.json and subspace_*.png")


if __name__ == "__main__":
    main()
