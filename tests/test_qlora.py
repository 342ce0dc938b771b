"""QLoRA: lora(fn) on a quantized base equals fn on the dequantized, merged base.

The reference is always ``fn(merge(dequantize_base(qbase), lt), ...)``: the adapted
model is the quantized model plus the adapter, so the only tolerance is float
rounding, not the quantization error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import randomize_b

import lorax_fn
from lorax_fn import LoraError, LoraSpec, dequantize_base, merge, quantize_base

FORMATS = ["nf4", "int8"]


def adapt(fn, variables, targets, *args, rank=4):
    layouts = lorax_fn.infer_layouts(fn, variables, *args)
    base, lt = lorax_fn.split(
        variables, LoraSpec(targets, rank=rank), key=jax.random.key(1), layouts=layouts
    )
    return base, randomize_b(lt), layouts


def scalar(out):
    return jnp.sum(jnp.sin(out.astype(jnp.float32)))


def assert_qlora_matches(fn, qbase, lt, *args, tol=2e-5):
    """Values and gradients w.r.t. lt against merge-then-call on the dequantized base."""
    assert any(isinstance(x, lorax_fn.QuantizedArray) for x in _leaves(qbase))
    g = lorax_fn.lora(fn, on_fallback="error")

    def reference(qbase, lt):
        return fn(merge(dequantize_base(qbase), lt), *args)

    # One compiled program each: eager evaluation compiles every small op separately.
    def value_and_grad(f):
        return jax.jit(jax.value_and_grad(lambda lt, qbase: scalar(f(qbase, lt)), has_aux=False))

    got = jax.jit(lambda q, lt: g(q, lt, *args))(qbase, lt)
    np.testing.assert_allclose(got, jax.jit(reference)(qbase, lt), rtol=tol, atol=tol)
    (_, grad), (_, grad_want) = (
        value_and_grad(f)(lt, qbase) for f in (lambda q, lt: g(q, lt, *args), reference)
    )
    for path in lt:
        for a, b in zip(jax.tree.leaves(grad[path]), jax.tree.leaves(grad_want[path]), strict=True):
            scale = float(jnp.abs(b).max())
            assert scale > 0, path
            np.testing.assert_allclose(a / scale, b / scale, atol=1e-4, err_msg=path)


def _leaves(tree):
    return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, lorax_fn.QuantizedArray))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(128)(x))
        x = nn.Dense(64)(x)
        return nn.Dense(64)(x)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dense_mlp_with_a_quantized_weight_that_is_not_adapted(fmt):
    model = MLP()
    x = jax.random.normal(jax.random.key(2), (4, 64))
    variables = model.init(jax.random.key(0), x)
    base, lt, _ = adapt(model.apply, variables, ["**/Dense_0/kernel", "**/Dense_1/kernel"], x)
    # Dense_2's kernel is quantized but not adapted: it is dequantized where it is used.
    qbase = quantize_base(base, "**/kernel", format=fmt)
    assert isinstance(qbase["params"]["Dense_2"]["kernel"], lorax_fn.QuantizedArray)
    assert_qlora_matches(model.apply, qbase, lt, x)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dense_general_attention(fmt):
    model = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=64, out_features=64)
    x = jax.random.normal(jax.random.key(2), (2, 5, 64))
    variables = model.init(jax.random.key(0), x)
    base, lt, layouts = adapt(model.apply, variables, ["**/query/kernel", "**/out/kernel"], x)
    assert np.shape(base["params"]["query"]["kernel"]) == (64, 4, 16)
    qbase = quantize_base(base, "**/kernel", format=fmt, layouts=layouts)
    assert_qlora_matches(model.apply, qbase, lt, x)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        # 64·192 / 64 = 192 NF4 absmax constants per layer: layer 1's straddle the
        # 256-constant groups of double quantization.
        return x + nn.Dense(64)(nn.gelu(nn.Dense(192)(nn.LayerNorm()(x)))), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return stack()(x, None)[0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_scanned_stack(fmt):
    model = Stack()
    x = jax.random.normal(jax.random.key(2), (2, 4, 64))
    variables = model.init(jax.random.key(0), x)
    base, lt, layouts = adapt(model.apply, variables, "**/kernel", x)
    qbase = quantize_base(base, "**/kernel", format=fmt, layouts=layouts)
    wide = next(p for p in lt if p.endswith("Dense_1/kernel"))
    assert lt[wide].a.shape == (3, 64, 4)  # one adapter per layer
    # The stored arrays keep the layer axis, so scan slices them.
    stored = dict(_flat(qbase))[wide]
    assert stored.codes.shape[0] == 3 and stored.scale.shape[0] == 3
    assert_qlora_matches(model.apply, qbase, lt, x)


def _flat(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, lorax_fn.QuantizedArray)
    )
    return [(lorax_fn.paths.path_str(k), x) for k, x in flat]


@pytest.mark.parametrize("fmt", FORMATS)
def test_conv(fmt):
    model = nn.Conv(64, (3, 3))
    x = jax.random.normal(jax.random.key(2), (2, 6, 6, 8))
    variables = model.init(jax.random.key(0), x)
    base, lt, layouts = adapt(model.apply, variables, "**/kernel", x)
    qbase = quantize_base(base, "**/kernel", format=fmt, layouts=layouts)
    assert_qlora_matches(model.apply, qbase, lt, x)


def _float_residuals(f, lt):
    _, vjp = jax.vjp(f, lt)
    return [x for x in jax.tree.leaves(vjp) if jnp.issubdtype(x.dtype, jnp.floating)]


def test_backward_saves_codes_not_the_dequantized_weight():
    d = 256
    params = {
        "w1": jax.random.normal(jax.random.key(0), (d, d)) / 16,
        "w2": jax.random.normal(jax.random.key(1), (d, d)) / 16,  # frozen, not adapted
        "w3": jax.random.normal(jax.random.key(2), (d, d)) / 16,
    }

    def fn(p, x):
        return jnp.tanh(jnp.tanh(jnp.tanh(x @ p["w1"]) @ p["w2"]) @ p["w3"])

    x = jax.random.normal(jax.random.key(3), (4, d))
    base, lt = lorax_fn.split(params, LoraSpec(["w1", "w3"], rank=4), key=jax.random.key(4))
    g = lorax_fn.lora(fn, on_fallback="error")
    # The float base: its frozen weights are what the backward pass multiplies by.
    assert any(x.shape == (d, d) for x in _float_residuals(lambda lt: g(base, lt, x).sum(), lt))
    for fmt in FORMATS:
        qbase = quantize_base(base, ["w1", "w2", "w3"], format=fmt)
        residuals = _float_residuals(lambda lt, qbase=qbase: g(qbase, lt, x).sum(), lt)
        assert max(r.size for r in residuals) < d * d // 8, [r.shape for r in residuals]
        _, vjp = jax.vjp(lambda lt, qbase=qbase: g(qbase, lt, x).sum(), lt)
        assert any(
            x.shape[0] == d and x.dtype in (jnp.int8, jnp.uint8) for x in jax.tree.leaves(vjp)
        )


def test_multi_lora_on_a_quantized_base():
    model = MLP()
    x = jax.random.normal(jax.random.key(2), (3, 64))
    variables = model.init(jax.random.key(0), x)
    spec = LoraSpec(["**/Dense_0/kernel", "**/Dense_2/kernel"], rank=4)
    base, lt0 = lorax_fn.split(variables, spec, key=jax.random.key(1))
    trees = [randomize_b(lt0, seed=s) for s in (1, 2)]
    qbase = quantize_base(base, "**/kernel", format="nf4")
    g = lorax_fn.multi_lora(model.apply, on_fallback="error")
    ids = jnp.array([1, -1, 0])
    out = g(qbase, lorax_fn.stack_adapters(trees), ids, x[:, None])
    float_base = dequantize_base(qbase)
    for i, k in enumerate(ids.tolist()):
        params = float_base if k < 0 else merge(float_base, trees[k])
        np.testing.assert_allclose(out[i, 0], model.apply(params, x[i]), rtol=2e-5, atol=2e-5)


def test_adapter_for_another_shape_is_refused_by_path_before_running():
    params = {"w": jnp.ones((64, 64)), "v": jnp.ones((64, 128))}
    _, lt = lorax_fn.split(params, LoraSpec("w", rank=2), key=jax.random.key(0))
    wrong = quantize_base({"w": jnp.ones((128, 64)), "v": params["v"]}, "w")
    calls = []

    def fn(p, x):
        calls.append(1)
        return x @ p["w"]

    with pytest.raises(
        LoraError, match=r"w: the adapter was made for a weight of shape \(64, 64\)"
    ):
        lorax_fn.lora(fn)(wrong, lt, jnp.ones((2, 128)))
    assert not calls
