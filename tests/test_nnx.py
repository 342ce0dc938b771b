"""The NNX workflow: nnx.split -> lorax_fn.split -> lora(loss) + optimizer -> merge -> module."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import lorax_fn

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "nnx_train.py"


def load_example():
    spec = importlib.util.spec_from_file_location("nnx_train", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nnx_example_trains_and_merges():
    example = load_example()
    out = example.main(steps=40, verbose=False)
    losses = out["losses"]
    assert losses[-1] < 0.5 * losses[0]
    assert out["max_diff"] < 1e-5

    base, lt = out["base"], out["lora"]
    assert isinstance(base, nnx.State)
    assert sorted(p for p, e in lt.items() if isinstance(e, lorax_fn.LoraFactors)) == [
        "blocks/0/down/kernel",
        "blocks/0/up/kernel",
        "blocks/1/down/kernel",
        "blocks/1/up/kernel",
    ]

    # The base is the untouched pretrained state: a fresh model from the same seed.
    _, fresh = nnx.split(example.Regressor(8, 32, 4, rngs=nnx.Rngs(0)))
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(fresh), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()

    # The merged module is a plain NNX module that differs from the base where trained.
    merged = out["merged_model"]
    assert isinstance(merged, example.Regressor)
    x = out["x"]
    graphdef, _ = nnx.split(merged)
    pretrained = nnx.merge(graphdef, base)
    assert float(jnp.max(jnp.abs(merged(x) - pretrained(x)))) > 1e-2
    np.testing.assert_allclose(
        nnx.state(merged)["blocks"][0]["up"]["kernel"][...],
        lorax_fn.merge(base, lt)["blocks"][0]["up"]["kernel"][...],
    )
