"""DoRA in ``lora(fn)``: the factorized rule equals merge-then-call on every consumer.

Each test runs with ``on_fallback="error"``, so a DoRA weight that is formed in full
anywhere fails it; the reference is ``fn(merge(base, lora_tree))`` with merge folding
``m·V/‖V‖_c`` (:func:`lorax_fn.variants.dora.dora_weight`). B and the magnitudes are random
(``randomize_b``), so every term of the rule is exercised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import TiedLM, assert_matches_merged, compiled_flops, randomize_b, tainted_shapes
from jax import lax

import lorax_fn
from lorax_fn import Layout, LoraSpec, merge, quantize_base
from lorax_fn.quant import dequantize_base

KEY = jax.random.key(0)


class MLP(nn.Module):
    hidden: int
    out: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.out)(jnp.tanh(nn.Dense(self.hidden)(x)))


def _dora(variables, targets, fn=None, *args, rank=2, layouts=None, **spec_kw):
    if layouts is None and fn is not None:
        layouts = lorax_fn.infer_layouts(fn, variables, *args)
    spec = LoraSpec(targets, rank=rank, use_dora=True, **spec_kw)
    base, lt = lorax_fn.split(variables, spec, key=jax.random.key(1), layouts=layouts)
    assert all(f.variant == "dora" for f in lt.values() if isinstance(f, lorax_fn.LoraFactors))
    return base, randomize_b(lt, std=0.5)


def test_dense_mlp_and_the_magnitude_is_trained():
    x = jax.random.normal(KEY, (5, 8))
    model = MLP(16, 4)
    base, lt = _dora(model.init(KEY, x), "**/kernel")
    assert_matches_merged(model.apply, base, lt, x)
    g = lorax_fn.lora(model.apply, on_fallback="error")
    grad = jax.grad(lambda t: jnp.sum(jnp.sin(g(base, t, x))))(lt)
    assert float(jnp.abs(grad["params/Dense_1/kernel"].magnitude).max()) > 0
    # At init (B = 0, m = ‖W0‖_c) the model is the base model.
    _, fresh = lorax_fn.split(
        model.init(KEY, x), LoraSpec("**/kernel", rank=2, use_dora=True), key=KEY
    )
    np.testing.assert_allclose(g(base, fresh, x), model.apply(base, x), rtol=1e-5, atol=1e-6)


def test_multi_axis_fan_in_and_fan_out_kernels_of_attention():
    model = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, out_features=6)
    x = jax.random.normal(KEY, (2, 5, 6))
    base, lt = _dora(model.init(KEY, x, x), "**/kernel", model.apply, x, x)
    assert lt["params/query/kernel"].magnitude.shape == (2, 4)  # (heads, head_dim)
    assert lt["params/out/kernel"].magnitude.shape == (6,)
    assert_matches_merged(model.apply, base, lt, x, x, rtol=1e-4, atol=1e-4)


def test_weight_read_transposed_contracts_fan_out():
    # x·Wᵀ contracts the weight's fan-out axis: DoRA scales the input, not the output.
    def fn(p, x):
        return jnp.tanh(x @ p["w"]) @ p["w"].T

    params = {"w": jax.random.normal(KEY, (6, 9))}
    base, lt = _dora(params, "w", layouts={"w": Layout((0,), (1,))})
    assert_matches_merged(fn, base, lt, jax.random.normal(KEY, (4, 6)))


def test_embedding_lookup_and_tied_output_projection():
    model = TiedLM()
    ids = jnp.array([[1, 2, 10], [0, 5, 5]])
    variables = model.init(KEY, ids)
    base, lt = _dora(variables, ["**/embedding", "**/kernel"], model.apply, ids)
    # PEFT's embedding DoRA normalises each feature over the vocabulary: our layout.
    assert lt["params/Embed_0/embedding"].magnitude.shape == (8,)
    assert_matches_merged(model.apply, base, lt, ids)


@pytest.mark.parametrize("kernel, kw", [((3,), dict(strides=2)), ((2, 3), dict(padding="VALID"))])
def test_conv(kernel, kw):
    model = nn.Conv(5, kernel, **kw)
    x = jax.random.normal(KEY, (2, 9, 8, 4)[: len(kernel) + 1] + (4,))
    base, lt = _dora(model.init(KEY, x), "**/kernel", model.apply, x)
    assert lt["params/kernel"].magnitude.shape == (5,)
    assert_matches_merged(model.apply, base, lt, x)


class HeadsCell(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.DenseGeneral((2, 4))(x)  # a multi-axis fan-out, as attention's query
        return x + nn.DenseGeneral(8, axis=(-2, -1))(jnp.tanh(h)), None


class ScannedHeads(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(13, 8)
        stack = nn.scan(
            HeadsCell, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        return embed.attend(stack()(embed(ids), None)[0])


def test_scan_stacked_layers_keep_a_magnitude_per_layer():
    model = ScannedHeads()
    ids = jnp.array([[1, 2, 3, 4], [5, 6, 7, 12]])
    base, lt = _dora(model.init(KEY, ids), ["**/kernel", "**/embedding"], model.apply, ids)
    heads = lt["params/ScanHeadsCell_0/DenseGeneral_0/kernel"]
    assert heads.magnitude.shape == (3, 2, 4)  # (layers, heads, head_dim)
    assert_matches_merged(model.apply, base, lt, ids, rtol=1e-4, atol=1e-4)


def experts_fn(p, x, sizes):
    return lax.ragged_dot(x, p["w"], sizes)


@pytest.mark.parametrize("sizes", [(3, 0, 5, 2), (0, 0, 0, 0), (12, 0, 0, 0)])
def test_ragged_dot_experts_scale_each_row_by_its_expert(sizes):
    sizes = jnp.asarray(sizes, jnp.int32)
    x = jax.random.normal(KEY, (12, 16))
    params = {"w": jax.random.normal(KEY, (4, 16, 12)) / 4}
    base, lt = _dora(params, "w", experts_fn, x, sizes, rank=3)
    assert lt["w"].magnitude.shape == (4, 12)
    got = assert_matches_merged(experts_fn, base, lt, x, sizes)
    np.testing.assert_array_equal(got[int(sizes.sum()) :], 0)


def test_ragged_dot_general_in_another_form_is_formed_and_reported():
    def fn(p, x, sizes):  # experts stored (E, out, in)
        dn = lax.RaggedDotDimensionNumbers((([1], [2]), ([], [])), [0], [0])
        return lax.ragged_dot_general(x, p["w"], sizes, dn)

    sizes = jnp.array([3, 0, 5, 4], jnp.int32)
    x = jax.random.normal(KEY, (12, 16))
    base, lt = _dora({"w": jax.random.normal(KEY, (4, 12, 16))}, "w", fn, x, sizes)
    with pytest.raises(lorax_fn.LoraError, match="w is consumed by `ragged_dot_general`"):
        lorax_fn.lora(fn, on_fallback="error")(base, lt, x, sizes)
    want = lorax_fn.lora(fn, factorized=False)(base, lt, x, sizes)
    got = lorax_fn.lora(fn, on_fallback="ignore")(base, lt, x, sizes)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_fallback_forms_the_dora_weight_not_plain_lora():
    def fn(p, x):  # cumsum has no factorized rule: the weight is formed there
        return x @ jnp.cumsum(p["w"], axis=0)

    params = {"w": jax.random.normal(KEY, (6, 5))}
    base, lt = _dora(params, "w", layouts={"w": Layout((0,), (1,))})
    x = jax.random.normal(KEY, (3, 6))
    want = lorax_fn.lora(fn, factorized=False)(base, lt, x)
    got = lorax_fn.lora(fn, on_fallback="ignore")(base, lt, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_quantized_base_equals_merge_on_the_dequantized_base(fmt):
    x = jax.random.normal(KEY, (4, 64))
    model = MLP(128, 64)
    base, lt = _dora(model.init(KEY, x), "**/kernel")
    qbase = quantize_base(base, "**/kernel", format=fmt)
    g = lorax_fn.lora(model.apply, on_fallback="error")
    deq = dequantize_base(qbase)

    def want(t):
        return model.apply(merge(deq, t), x)

    np.testing.assert_allclose(g(qbase, lt, x), want(lt), rtol=1e-4, atol=1e-4)
    grads = [
        jax.grad(lambda t, f=f: jnp.sum(jnp.sin(f(t))))(lt)
        for f in (want, lambda t: g(qbase, t, x))
    ]
    for w, got in zip(*map(jax.tree_util.tree_leaves, grads), strict=True):
        np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-4)


def test_a_zero_column_stays_zero():
    params = {"w": jax.random.normal(KEY, (6, 5)).at[:, 2].set(0.0)}
    spec = LoraSpec("w", rank=2, use_dora=True)
    base, lt = lorax_fn.split(params, spec, key=KEY, layouts={"w": Layout((0,), (1,))})
    g = lorax_fn.lora(lambda p, x: x @ p["w"], on_fallback="error")
    x = jax.random.normal(KEY, (3, 6))
    out, grad = jax.value_and_grad(lambda t: jnp.sum(g(base, t, x)))(lt)
    assert np.isfinite(out) and all(np.isfinite(v).all() for v in jax.tree_util.tree_leaves(grad))
    np.testing.assert_array_equal(g(base, lt, x)[:, 2], 0.0)


def _dense_stack(d, n, layers=2, rank=8, use_dora=True):
    def fn(p, x):
        for i in range(layers):
            x = jnp.tanh(x @ p[f"w{i}"])
        return x

    keys = jax.random.split(KEY, layers + 1)
    params = {f"w{i}": jax.random.normal(keys[i], (d, d)) / np.sqrt(d) for i in range(layers)}
    spec = LoraSpec("re:w\\d", rank=rank, use_dora=use_dora)
    layouts = {p: Layout((0,), (1,)) for p in params}
    base, lt = lorax_fn.split(params, spec, key=keys[-1], layouts=layouts)
    x = jax.random.normal(keys[-1], (n, d))
    return fn, base, randomize_b(lt), x


def _loss(apply):
    return lambda base, lt, x: jnp.mean(apply(base, lt, x) ** 2)


def test_gradient_holds_no_full_size_weight():
    fn, base, lt, x = _dense_stack(64, 16)
    grad = jax.grad(_loss(lorax_fn.lora(fn, on_fallback="error")), argnums=1)
    closed = jax.make_jaxpr(grad)(base, lt, x)
    n_base, n_lora = len(jax.tree_util.tree_leaves(base)), len(jax.tree_util.tree_leaves(lt))
    tainted = [False] * n_base + [True] * n_lora + [False]
    assert (64, 64) not in set(tainted_shapes(closed.jaxpr, tainted))
    # The same check sees the weight merge-then-call forms, so it can fail.
    merged = jax.grad(_loss(lorax_fn.lora(fn, factorized=False)), argnums=1)
    assert (64, 64) in set(tainted_shapes(jax.make_jaxpr(merged)(base, lt, x).jaxpr, tainted))


def test_compiled_flops_near_lora_and_below_merge_then_call():
    fn, base, lt, x = _dense_stack(1024, 1024)
    _, plain_base, plain, _ = _dense_stack(1024, 1024, use_dora=False)
    step = {
        "dora": jax.grad(_loss(lorax_fn.lora(fn, on_fallback="error")), argnums=1),
        "merged": jax.grad(_loss(lorax_fn.lora(fn, factorized=False)), argnums=1),
    }
    f_dora = compiled_flops(step["dora"], base, lt, x)
    f_merged = compiled_flops(step["merged"], base, lt, x)
    f_lora = compiled_flops(step["dora"], plain_base, plain, x)
    print(f"DoRA step FLOPs: LoRA {f_lora:.4g}, DoRA {f_dora:.4g}, merge-then-call {f_merged:.4g}")
    # DoRA adds the column norms (one pass over W0, W0ᵀA: 2·d²·r) and a per-column scale.
    assert f_dora < 1.05 * f_lora, (f_dora, f_lora)
    assert f_dora < 0.8 * f_merged, (f_dora, f_merged)


def test_quantized_stack_norms_are_computed_one_layer_at_a_time():
    def fn(p, x):
        def layer(h, w):
            return jnp.tanh(h @ w), None

        return lax.scan(layer, x, p["w"])[0]

    params = {"w": jax.random.normal(KEY, (3, 64, 64)) / 8}
    base, lt = _dora(params, "w", fn, jnp.ones((2, 64)))
    assert lt["w"].layout == Layout((1,), (2,), (0,))
    qbase = quantize_base(base, "w", layouts={"w": lt["w"].layout})
    x = jax.random.normal(KEY, (2, 64))
    g = lorax_fn.lora(fn, on_fallback="error")
    want = fn(merge(dequantize_base(qbase), lt), x)
    np.testing.assert_allclose(g(qbase, lt, x), want, rtol=1e-4, atol=1e-4)
    # No value of the whole stack's float size is computed.
    closed = jax.make_jaxpr(lambda q, t: g(q, t, x))(qbase, lt)
    n_q = len(jax.tree_util.tree_leaves(qbase))
    tainted = [True] * n_q + [False] * (len(closed.jaxpr.invars) - n_q)
    assert (3, 64, 64) not in tainted_shapes(closed.jaxpr, tainted)


def test_qdora_init_magnitudes_start_from_the_quantized_model():
    x = jax.random.normal(KEY, (4, 64))
    model = MLP(128, 64)
    spec = LoraSpec("**/kernel", rank=4, use_dora=True)
    base, lt = lorax_fn.split(model.init(KEY, x), spec, key=KEY)
    qbase = quantize_base(base, spec)
    g = lorax_fn.lora(model.apply, on_fallback="error")
    quantized_model = model.apply(dequantize_base(qbase), x)
    # split's magnitudes are the float weights' norms: the quantized model is rescaled.
    assert not np.allclose(g(qbase, lt, x), quantized_model, atol=1e-4)
    fixed = lorax_fn.init_magnitudes(qbase, lt)
    np.testing.assert_allclose(g(qbase, fixed, x), quantized_model, rtol=1e-5, atol=1e-5)
    # Nothing but the magnitudes changed.
    for p in lt:
        np.testing.assert_array_equal(fixed[p].a, lt[p].a)
        np.testing.assert_array_equal(fixed[p].b, lt[p].b)
    with pytest.raises(lorax_fn.LoraError, match=r"^init_magnitudes: .*no DoRA entries"):
        lorax_fn.init_magnitudes(
            base, lorax_fn.split(base, LoraSpec("**/kernel", rank=2), key=KEY)[1]
        )
