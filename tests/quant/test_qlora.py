"""QLoRA: lora(fn) on a quantized base equals fn on the dequantized, merged base.

The reference is always ``fn(merge(dequantize_base(qbase), lt), ...)``: the adapted
model is the quantized model plus the adapter, so the only tolerance is float
rounding, not the quantization error.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from helpers import randomize_b

import lorax_fn
from lorax_fn import LoraError, LoraSpec, merge, quantize_base
from lorax_fn.quant import dequantize_base

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

    def residuals(base):
        _, vjp = jax.vjp(lambda lt: g(base, lt, x).sum(), lt)
        return jax.tree.leaves(vjp)

    # The float base: its frozen weights are what the backward pass multiplies by.
    assert any(r.shape == (d, d) for r in residuals(base))
    for fmt in FORMATS:
        saved = residuals(quantize_base(base, ["w1", "w2", "w3"], format=fmt))
        floats = [r.shape for r in saved if jnp.issubdtype(r.dtype, jnp.floating)]
        assert max(math.prod(s) for s in floats) < d * d // 8, floats
        assert any(r.shape[0] == d and r.dtype in (jnp.int8, jnp.uint8) for r in saved)


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


def test_merge_gives_the_float_model_and_unmerge_is_refused(tmp_path):
    model = MLP()
    x = jax.random.normal(jax.random.key(2), (4, 64))
    variables = jax.tree.map(lambda v: v.astype(jnp.bfloat16), model.init(jax.random.key(0), x))
    base, lt, _ = adapt(model.apply, variables, "**/Dense_0/kernel", x)
    qbase = quantize_base(base, "**/kernel")
    merged = merge(qbase, lt)
    assert not any(isinstance(v, lorax_fn.QuantizedArray) for v in _leaves(merged))
    # The update is added to the float32 dequantized weight, then rounded once.
    w0 = qbase["params"]["Dense_0"]["kernel"].dequantize(jnp.float32)
    update = w0 + lorax_fn.factors.delta(lt["params/Dense_0/kernel"])
    want = dict(_flat(dequantize_base(qbase)), **{"params/Dense_0/kernel": update})
    for path, got in _flat(merged):
        assert got.dtype == jnp.bfloat16, path
        np.testing.assert_allclose(
            np.asarray(got, np.float32), want[path], rtol=2**-8, atol=1e-6, err_msg=path
        )
    as_f32 = merge(qbase, lt, dtype=jnp.float32)
    assert as_f32["params"]["Dense_0"]["bias"].dtype == jnp.bfloat16
    np.testing.assert_allclose(as_f32["params"]["Dense_0"]["kernel"], update, rtol=1e-5, atol=1e-7)
    with pytest.raises(LoraError, match=r"unmerge of a quantized base .*params/Dense_0/kernel"):
        lorax_fn.unmerge(qbase, lt)
    with pytest.raises(LoraError, match="dtype must be floating"):
        merge(qbase, lt, dtype=jnp.int8)
    # The adapter is an ordinary tree: it exports, and imports against the quantized base.
    lorax_fn.export_peft(tmp_path / "adapter", lt)
    back = lorax_fn.import_peft(tmp_path / "adapter", qbase)
    np.testing.assert_array_equal(back["params/Dense_0/kernel"].b, lt["params/Dense_0/kernel"].b)


@pytest.mark.parametrize("fmt", FORMATS)
def test_layer_picked_by_a_traced_index_in_cond_and_fori_loop(fmt):
    def fn(p, x):
        w, v = p["w"], p["v"]
        y = jax.lax.cond(x.sum() > 0, lambda: x @ w[0], lambda: -(x @ w[2]))

        def body(i, h):
            return jnp.tanh(jnp.tanh(h @ w[i % 3]) @ v[i % 3])

        return jax.lax.fori_loop(0, 4, body, y)

    keys = jax.random.split(jax.random.key(0), 2)
    params = {k: jax.random.normal(key, (3, 64, 64)) / 8 for k, key in zip("wv", keys, strict=True)}
    x = jax.random.normal(jax.random.key(2), (4, 64))
    base, lt = lorax_fn.split(
        params,
        LoraSpec("w", rank=4),
        key=jax.random.key(1),
        layouts={"w": lorax_fn.Layout((1,), (2,), (0,))},
    )
    layouts = {p: lorax_fn.Layout((1,), (2,), (0,)) for p in ("w", "v")}
    # NF4 blocks of 32: 128 absmax constants per layer, so layer 2's start at 256, in
    # the second group of double quantization.
    block = {"block_size": 32} if fmt == "nf4" else {}
    qbase = quantize_base(base, ["w", "v"], format=fmt, layouts=layouts, **block)
    assert_qlora_matches(fn, qbase, randomize_b(lt), x)
    assert_qlora_matches(fn, qbase, randomize_b(lt), -x)


def test_a_quantized_weight_dequantized_outside_a_consumer_is_reported():
    params = {"w": jax.random.normal(jax.random.key(0), (64, 64)), "v": jnp.ones((64, 64))}
    base, lt = lorax_fn.split(params, LoraSpec("v", rank=2), key=jax.random.key(1))
    qbase = quantize_base(base, ["w", "v"])

    def fn(p, x):
        return x @ p["v"], p["w"]  # the frozen weight itself is an output

    x = jnp.ones((2, 64))
    with pytest.raises(LoraError, match=r"w is consumed by `output`.*dequantized in full"):
        lorax_fn.lora(fn, on_fallback="error")(qbase, lt, x)
    with pytest.warns(UserWarning, match="w is consumed by `output`"):
        _, w = lorax_fn.lora(fn)(qbase, lt, x)
    np.testing.assert_array_equal(w, qbase["w"].dequantize())


def _assert_same_adapter(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)  # scale, layout, dropout
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_quantized_base_checkpoints_like_a_float_one(tmp_path, fmt):
    # Each QuantizedArray is one leaf of the base, checked by its float shape and dtype, in
    # save, restore, the manager and stack_checkpoints (it used to be its codes and scales:
    # "not a leaf of the given base").
    model = MLP()
    x = jax.random.normal(jax.random.key(2), (4, 64))
    variables = jax.tree.map(lambda v: v.astype(jnp.bfloat16), model.init(jax.random.key(0), x))
    spec = LoraSpec(["**/Dense_0/kernel", "**/Dense_2/kernel"], rank=4, trainable="**/bias")
    base, lt0 = lorax_fn.split(variables, spec, key=jax.random.key(1))
    trees = [randomize_b(lt0, seed=s) for s in (1, 2)]
    qbase = quantize_base(base, "**/kernel", format=fmt)
    g = jax.jit(lorax_fn.lora(model.apply, on_fallback="error"))
    for i, lt in enumerate(trees):
        lorax_fn.save(tmp_path / f"ad{i}", lt, spec, base=qbase)
    info = lorax_fn.checkpoint.checkpoint_info(tmp_path / "ad0")
    assert info.base_leaves["params/Dense_0/kernel"] == ((64, 128), "bfloat16")
    restored = lorax_fn.restore(tmp_path / "ad0", base=qbase)
    _assert_same_adapter(restored, trees[0])
    np.testing.assert_array_equal(g(qbase, restored, x), g(qbase, trees[0], x))

    tx = optax.adam(1e-2)
    opt_state = tx.init(trees[0])
    with lorax_fn.LoraCheckpointManager(tmp_path / "run", spec, base=qbase) as manager:
        manager.save(3, trees[0], opt_state)
        state = manager.restore(opt_state=jax.eval_shape(tx.init, trees[0]), base=qbase)
    _assert_same_adapter(state.lora_tree, trees[0])
    _assert_same_adapter(state.opt_state, opt_state)

    stack = lorax_fn.multi.stack_checkpoints([tmp_path / "ad0", tmp_path / "ad1"], base=qbase)
    _assert_same_adapter(stack, lorax_fn.stack_adapters(trees, base=qbase))

    with pytest.raises(LoraError, match=r"extra= selects quantized weights \['params/Dense_1"):
        lorax_fn.save(tmp_path / "x", trees[0], spec, base=qbase, extra="**/Dense_1/kernel")
    # The checks still bite: a quantized weight of another shape is refused by path.
    dense_2 = dict(base["params"]["Dense_2"], kernel=jnp.ones((64, 128), jnp.bfloat16))
    wider = {"params": dict(base["params"], Dense_2=dense_2)}
    other = quantize_base(wider, "**/kernel", format=fmt)
    with pytest.raises(LoraError, match=r"Dense_2/kernel: made for shape \(64, 64\)"):
        lorax_fn.restore(tmp_path / "ad0", base=other)
    with pytest.raises(LoraError, match=r"(?s)ad0: .*Dense_2/kernel: made for shape \(64, 64\)"):
        lorax_fn.multi.stack_checkpoints([tmp_path / "ad0", tmp_path / "ad1"], base=other)
