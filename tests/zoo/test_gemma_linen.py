"""The ``gemma`` package's linen Gemma3 (examples/zoo/gemma3_linen.py): ``lora(model.apply)``
with ``on_fallback="error"`` equals merge-then-call in logits and LoRA gradients, for
both of Gemma's attention forms under one target list; training lowers the loss; the
restored adapter is the trained one.

Small random-init float32 configs, nothing downloaded; every factor perturbed so that
B = 0 cannot make a misplaced adapter look right.
"""

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("gemma.gm.nn._transformer")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "zoo" / "gemma3_linen.py"


def load_example():
    spec = importlib.util.spec_from_file_location("gemma3_linen", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# kv_heads=2: grouped-query q_einsum + kv_einsum (kernel (2, kv, d, head_dim), the k/v
# axis kept as a batch axis); kv_heads=4 (= heads): the fused qkv_einsum (3, heads, d, hd).
@pytest.mark.parametrize(
    ("kv_heads", "attention"),
    [(2, {"q_einsum", "kv_einsum", "attn_vec_einsum"}), (4, {"qkv_einsum", "attn_vec_einsum"})],
)
def test_gemma3_lora_equals_merge_then_call_trains_and_restores(kv_heads, attention):
    example = load_example()
    out = example.main(smoke=True, kv_heads=kv_heads, verbose=False)

    # main asserts the equalities; the numbers are checked here again, with the tolerances
    # the docs quote, so that a loosened assertion in the example cannot pass unnoticed.
    assert out["value_max_diff"] < 1e-5
    assert out["grad_max_diff"] < 2e-5
    adapted = {p.split("/")[-2] for p in out["paths"] if "/attn/" in p}
    assert adapted == attention
    assert {p.split("/")[-1] for p in out["paths"] if "/mlp/" in p} == {"gating_einsum", "linear"}
    assert len(out["paths"]) == 2 * (len(attention) + 2)  # two layers: local and global
    assert out["losses"][-1] < out["losses"][0]
    for got, want in zip(
        jax.tree.leaves(out["restored"]), jax.tree.leaves(out["trained"]), strict=True
    ):
        np.testing.assert_array_equal(got, want)
