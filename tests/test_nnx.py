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
    # Its kernel is W0 + scale·A·B, computed here by hand (not by lorax_fn.merge, which
    # built the merged module).
    up = lt["blocks/0/up/kernel"]
    want = np.asarray(base["blocks"][0]["up"]["kernel"][...], np.float64) + up.scale * (
        np.asarray(up.a, np.float64) @ np.asarray(up.b, np.float64)
    )
    assert np.any(np.asarray(up.b) != 0)
    np.testing.assert_allclose(
        nnx.state(merged)["blocks"][0]["up"]["kernel"][...], want, rtol=1e-5, atol=1e-6
    )


class Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(4, 6, rngs=rngs)
        self.down = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.down(jnp.tanh(self.up(x)))


def test_updating_the_model_never_changes_the_base_or_the_lora_tree():
    model = Tiny(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    original = [np.array(x) for x in jax.tree.leaves(state)]
    spec = lorax_fn.LoraSpec("**/kernel", rank=2, trainable="up/bias")
    base, lt = lorax_fn.split(state, spec, key=jax.random.key(0))
    lt = jax.tree.map(lambda x: x + 0.5, lt)  # B = 0 would hide a doubled ΔW
    lt_values = [np.array(x) for x in jax.tree.leaves(lt)]

    def fn(s, x):
        return nnx.merge(graphdef, s)(x)

    x = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
    want = np.asarray(fn(lorax_fn.merge(base, lt), x))
    # The deployment step that used to rewrite the frozen base through shared Variables.
    nnx.update(model, lorax_fn.merge(base, lt))
    served = nnx.merge(graphdef, lorax_fn.merge(base, lt))
    served.up.kernel[...] = served.up.kernel[...] * 3.0
    unmerged = lorax_fn.unmerge(lorax_fn.merge(base, lt), lt)
    nnx.update(model, unmerged)
    model.down.kernel[...] = model.down.kernel[...] + 1.0
    pretrained = nnx.merge(graphdef, base, copy=True)  # as split's docstring advises
    pretrained.up.bias[...] = pretrained.up.bias[...] - 1.0

    for got, was in zip(jax.tree.leaves(base), original, strict=True):
        np.testing.assert_array_equal(np.asarray(got), was)
    for got, was in zip(jax.tree.leaves(lt), lt_values, strict=True):
        np.testing.assert_array_equal(np.asarray(got), was)
    np.testing.assert_allclose(lorax_fn.lora(fn)(base, lt, x), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fn(lorax_fn.merge(base, lt), x), want, rtol=1e-6, atol=1e-6)
