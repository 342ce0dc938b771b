"""A plain Flax NNX transformer (examples/zoo/nnx_model.py) given to lorax_fn as the module
itself and as ``nnx.split`` state: the same paths and factors either way, ``lora(fn)``
with ``on_fallback="error"`` equal to merge-then-call in logits and gradients in both
forms, training lowers the loss, and the restored adapter merged into a plain module
serves the adapted logits. Needs only flax: it runs in the main venv too.
"""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import lorax_fn

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "zoo" / "nnx_model.py"


def load_example():
    spec = importlib.util.spec_from_file_location("nnx_model", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nnx_module_and_state_forms_equal_merge_train_and_restore():
    example = load_example()
    out = example.main(smoke=True, verbose=False)

    # main asserts these with its tolerances; the bounds quoted in the docs are held here.
    for key in ("value_max_diff", "state_value_max_diff"):
        assert out[key] < 1e-5, key
    for key in ("grad_max_diff", "state_grad_max_diff"):
        assert out[key] < 1e-5, key
    # q, k, v, out of nnx.MultiHeadAttention and both MLP kernels, in each of two blocks.
    kernels = {p.removeprefix("blocks/0/") for p in out["paths"] if p.startswith("blocks/0/")}
    assert kernels == {
        "attn/query/kernel",
        "attn/key/kernel",
        "attn/value/kernel",
        "attn/out/kernel",
        "mlp/up/kernel",
        "mlp/down/kernel",
    }
    assert len(out["paths"]) == 12
    assert out["losses"][-1] < out["losses"][0]
    assert isinstance(out["base"], example.TinyLM) and isinstance(out["served"], example.TinyLM)
    for got, want in zip(
        jax.tree.leaves(out["restored"]), jax.tree.leaves(out["trained"]), strict=True
    ):
        np.testing.assert_array_equal(got, want)


def test_split_of_the_module_leaves_the_module_and_its_base_untouched():
    """The base is a fresh module: training or serving never writes into the original."""
    example = load_example()
    model = example.TinyLM(64, 32, 4, 1, rngs=nnx.Rngs(0))
    before = [np.array(x) for x in jax.tree.leaves(nnx.state(model))]
    tokens = jnp.arange(8).reshape(1, 8)
    spec = lorax_fn.LoraSpec(targets=example.TARGETS, rank=2)
    base, lt = lorax_fn.split(
        model, spec, key=jax.random.key(0), fn=example.call, example_args=(tokens,)
    )
    lt = example.perturb(lt, jax.random.key(1))
    served = lorax_fn.merge(base, lt)
    served.blocks[0].mlp.up.kernel[...] = served.blocks[0].mlp.up.kernel[...] + 1.0
    assert base is not model
    for got, was in zip(jax.tree.leaves(nnx.state(model)), before, strict=True):
        np.testing.assert_array_equal(np.asarray(got), was)
    for got, was in zip(jax.tree.leaves(nnx.state(base)), before, strict=True):
        np.testing.assert_array_equal(np.asarray(got), was)
