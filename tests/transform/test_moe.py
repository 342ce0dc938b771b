"""Mixture-of-experts weights: ``lax.ragged_dot`` over experts, einsum dispatch, scan stacks.

The expert axis of a weight ``(E, in, out)`` is stacked: one adapter per expert,
``A: (E, in, r)``, ``B: (E, r, out)``, and ``lora`` computes
``ragged_dot(x, W0, g) + s·ragged_dot(ragged_dot(x, A, g), B, g)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import assert_matches_merged, compiled_flops, randomize_b, tainted_shapes
from jax import lax
from jax.extend import core

import lorax_fn
from lorax_fn import Layout, LoraError, LoraSpec, merge, quantize_base
from lorax_fn.quant import dequantize_base

E, D, F, R = 4, 16, 12, 3


def experts_fn(p, x, sizes):
    return lax.ragged_dot(x, p["w"], sizes)


def _setup(fn, shape, *args, rank=R, dropout=0.0, seed=0):
    params = {"w": jax.random.normal(jax.random.key(seed), shape) / np.sqrt(shape[-2])}
    layouts = lorax_fn.infer_layouts(fn, params, *args)
    spec = LoraSpec("w", rank=rank, dropout=dropout)
    base, lt = lorax_fn.split(params, spec, key=jax.random.key(seed + 1), layouts=layouts)
    return base, randomize_b(lt), layouts


def _grad_x(apply, base, lt, x, *args):
    return jax.grad(lambda x: jnp.sum(jnp.sin(apply(base, lt, x, *args))))(x)


@pytest.mark.parametrize(
    "sizes",
    [(3, 0, 5, 2), (0, 12, 0, 0), (0, 0, 0, 0), "random"],
    ids=["empty-and-short", "one-expert", "all-empty", "random"],
)
def test_ragged_dot_equals_merge_then_call(sizes):
    m = 12
    if sizes == "random":
        sizes = jax.random.multinomial(jax.random.key(7), m - 3, jnp.ones(E) / E, shape=(E,))
    sizes = jnp.asarray(sizes, jnp.int32)
    x = jax.random.normal(jax.random.key(5), (m, D))
    base, lt, layouts = _setup(experts_fn, (E, D, F), x, sizes)
    assert layouts == {"w": Layout(in_axes=(1,), out_axes=(2,), batch_axes=(0,))}
    assert lt["w"].a.shape == (E, D, R) and lt["w"].b.shape == (E, R, F)
    got = assert_matches_merged(experts_fn, base, lt, x, sizes)
    # Rows past sum(group_sizes) belong to no expert: zero in both paths. With all groups
    # empty ("all-empty") both paths are all zeros, so that case checks only that nothing
    # crashes or turns NaN, not the low-rank arithmetic (the other cases do).
    np.testing.assert_array_equal(got[int(sizes.sum()) :], 0)
    assert np.all(np.isfinite(got))
    grad_got = _grad_x(lorax_fn.lora(experts_fn, on_fallback="error"), base, lt, x, sizes)
    grad_want = _grad_x(lorax_fn.lora(experts_fn, factorized=False), base, lt, x, sizes)
    np.testing.assert_allclose(grad_got, grad_want, rtol=2e-5, atol=2e-5)


def test_ragged_dot_general_with_experts_stored_out_by_in():
    # (E, out, in), contracted on axis 2: the roles, not the axis order, decide.
    dn = lax.RaggedDotDimensionNumbers((([1], [2]), ([], [])), [0], [0])

    def fn(p, x, sizes):
        return lax.ragged_dot_general(x, p["w"], sizes, dn)

    sizes = jnp.array([2, 0, 3, 4], jnp.int32)
    x = jax.random.normal(jax.random.key(5), (10, D))
    base, lt, layouts = _setup(fn, (E, F, D), x, sizes)
    assert layouts == {"w": Layout(in_axes=(2,), out_axes=(1,), batch_axes=(0,))}
    assert_matches_merged(fn, base, lt, x, sizes)


def test_precision_and_preferred_element_type_pass_through():
    def fn(p, x, sizes):
        return lax.ragged_dot(
            x, p["w"], sizes, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32
        )

    sizes = jnp.array([3, 1, 0, 4], jnp.int32)
    x = jax.random.normal(jax.random.key(5), (8, D)).astype(jnp.bfloat16)
    params = {"w": jax.random.normal(jax.random.key(0), (E, D, F)).astype(jnp.bfloat16)}
    layouts = lorax_fn.infer_layouts(fn, params, x, sizes)
    base, lt = lorax_fn.split(params, LoraSpec("w", rank=R), key=jax.random.key(1), layouts=layouts)
    lt = randomize_b(lt)
    apply = lorax_fn.lora(fn, on_fallback="error")
    got = apply(base, lt, x, sizes)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, fn(merge(base, lt), x, sizes), rtol=2e-2, atol=2e-2)
    params = _ragged_params(jax.make_jaxpr(apply)(base, lt, x, sizes).jaxpr)
    assert len(params) == 3  # the base product and both low-rank ones
    assert all(p["precision"] == (lax.Precision.HIGHEST,) * 2 for p in params)
    assert [p["preferred_element_type"] for p in params].count(jnp.float32) == 1


def _ragged_params(jaxpr) -> list[dict]:
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "ragged_dot_general":
            found.append(eqn.params)
        for sub in core.jaxprs_in_params(eqn.params):
            found += _ragged_params(sub)
    return found


def test_lora_dropout_masks_the_low_rank_input_only():
    rate = 0.5
    sizes = jnp.array([3, 0, 5, 2], jnp.int32)
    x = jax.random.normal(jax.random.key(5), (12, D))
    base, lt, _ = _setup(experts_fn, (E, D, F), x, sizes, dropout=rate)
    key = jax.random.key(3)
    got = lorax_fn.lora(experts_fn, on_fallback="error")(base, lt, x, sizes, lora_key=key)
    # Documented: the k-th adapted product (k = 1, 2, …) draws its mask from fold_in(key, k).
    keep = jax.random.bernoulli(jax.random.fold_in(key, 1), 1.0 - rate, x.shape)
    f = lt["w"]
    low = lax.ragged_dot(jnp.where(keep, x / (1 - rate), 0), f.a, sizes)
    want = lax.ragged_dot(x, base["w"], sizes) + f.scale * lax.ragged_dot(low, f.b, sizes)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    no_dropout = lorax_fn.lora(experts_fn)(base, lt, x, sizes)
    assert not np.allclose(got, no_dropout, atol=1e-3)


def test_expert_axis_not_stacked_is_a_reported_fallback():
    # A layout that folds the expert axis into the fan-in has no per-expert factors.
    sizes = jnp.array([3, 0, 5, 2], jnp.int32)
    x = jax.random.normal(jax.random.key(5), (10, D))
    params = {"w": jax.random.normal(jax.random.key(0), (E, D, F))}
    spec = LoraSpec("w", rank=R, layouts={"w": Layout((0, 1), (2,))})
    base, lt = lorax_fn.split(params, spec, key=jax.random.key(1))
    lt = randomize_b(lt)
    with pytest.raises(LoraError, match=r"w is consumed by `ragged_dot_general`"):
        lorax_fn.lora(experts_fn, on_fallback="error")(base, lt, x, sizes)
    got = lorax_fn.lora(experts_fn, on_fallback="ignore")(base, lt, x, sizes)
    np.testing.assert_allclose(got, experts_fn(merge(base, lt), x, sizes), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_quantized_experts_are_dequantized_inside_the_consumer(fmt):
    sizes = jnp.array([3, 0, 5, 2], jnp.int32)
    x = jax.random.normal(jax.random.key(5), (12, 64))
    base, lt, layouts = _setup(experts_fn, (E, 64, 32), x, sizes)
    qbase = quantize_base(base, "w", format=fmt, layouts=layouts)
    apply = lorax_fn.lora(experts_fn, on_fallback="error")  # no full dequantization
    want = experts_fn(merge(dequantize_base(qbase), lt), x, sizes)
    np.testing.assert_allclose(apply(qbase, lt, x, sizes), want, rtol=1e-4, atol=1e-4)
    grad = jax.grad(lambda lt: jnp.sum(jnp.sin(apply(qbase, lt, x, sizes))))(lt)
    ref = jax.grad(
        lambda lt: jnp.sum(jnp.sin(experts_fn(merge(dequantize_base(qbase), lt), x, sizes)))
    )(lt)
    for g, w in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(ref), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def _grad_shapes(apply, base, lt, *args):
    grad = jax.grad(lambda lt: jnp.mean(apply(base, lt, *args) ** 2))
    closed = jax.make_jaxpr(grad)(lt)
    return set(tainted_shapes(closed.jaxpr, [True] * len(closed.jaxpr.invars)))


def test_gradient_holds_no_expert_sized_value_from_the_lora_tree():
    sizes = jnp.array([3, 0, 5, 2], jnp.int32)
    x = jax.random.normal(jax.random.key(5), (12, D))
    base, lt, _ = _setup(experts_fn, (E, D, F), x, sizes)
    factorized = lorax_fn.lora(experts_fn, on_fallback="error")
    assert (E, D, F) not in _grad_shapes(factorized, base, lt, x, sizes)
    # The same check catches merge-then-call, so it can fail.
    merged = lorax_fn.lora(experts_fn, factorized=False)
    assert (E, D, F) in _grad_shapes(merged, base, lt, x, sizes)


def test_compiled_flops_below_merge_then_call():
    e, d, m, r = 8, 256, 512, 8
    sizes = jnp.full((e,), m // e, jnp.int32)
    x = jax.random.normal(jax.random.key(5), (m, d))
    base, lt, _ = _setup(experts_fn, (e, d, d), x, sizes, rank=r)

    def step(apply):
        return jax.grad(lambda lt, base, x: jnp.mean(apply(base, lt, x, sizes) ** 2))

    f_lora = compiled_flops(step(lorax_fn.lora(experts_fn, on_fallback="error")), lt, base, x)
    f_merged = compiled_flops(step(lorax_fn.lora(experts_fn, factorized=False)), lt, base, x)
    print(f"ragged_dot gradient step FLOPs: factorized {f_lora:.4g}, merged {f_merged:.4g}")
    assert f_lora < 0.8 * f_merged, (f_lora, f_merged)


def test_einsum_dispatch_over_experts_is_a_batched_dot_general():
    def fn(p, x):  # dense dispatch: x (E, capacity, d)
        return jnp.einsum("ecd,edf->ecf", x, p["w"])

    x = jax.random.normal(jax.random.key(5), (E, 5, D))
    base, lt, layouts = _setup(fn, (E, D, F), x)
    assert layouts == {"w": Layout(in_axes=(1,), out_axes=(2,), batch_axes=(0,))}
    assert_matches_merged(fn, base, lt, x)
    assert (E, D, F) not in _grad_shapes(lorax_fn.lora(fn, on_fallback="error"), base, lt, x)


class MoE(nn.Module):
    """Top-2 routing: sort token copies by expert, two ragged_dots, unsort, combine."""

    experts: int
    hidden: int
    top_k: int = 2

    @nn.compact
    def __call__(self, x):
        tokens, d = x.shape
        init = nn.initializers.lecun_normal(batch_axis=(0,))
        probs = jax.nn.softmax(nn.Dense(self.experts, use_bias=False, name="router")(x))
        weights, chosen = lax.top_k(probs, self.top_k)
        flat = chosen.reshape(-1)
        order = jnp.argsort(flat)
        sizes = jnp.bincount(flat, length=self.experts).astype(jnp.int32)
        routed = jnp.repeat(x, self.top_k, axis=0)[order]
        w_in = self.param("w_in", init, (self.experts, d, self.hidden))
        w_out = self.param("w_out", init, (self.experts, self.hidden, d))
        y = lax.ragged_dot(jnp.tanh(lax.ragged_dot(routed, w_in, sizes)), w_out, sizes)
        y = jnp.zeros_like(y).at[order].set(y)
        return jnp.sum(y.reshape(tokens, self.top_k, d) * weights[..., None], axis=1)


class Block(nn.Module):
    experts: int
    hidden: int

    @nn.compact
    def __call__(self, x, _):
        return x + MoE(self.experts, self.hidden)(x), None


class Stack(nn.Module):
    layers: int
    experts: int
    hidden: int

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.layers,
        )
        return scan(self.experts, self.hidden)(x, None)[0]


def test_scan_stacked_linen_moe_layers_end_to_end():
    layers = 2
    model = Stack(layers, E, 24)
    x = jax.random.normal(jax.random.key(0), (10, D))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    layouts = lorax_fn.infer_layouts(model.apply, variables, x)
    w_in = "params/ScanBlock_0/MoE_0/w_in"
    assert layouts[w_in] == Layout(in_axes=(2,), out_axes=(3,), batch_axes=(0, 1))
    spec = LoraSpec(["**/w_in", "**/w_out", "**/router/kernel"], rank=R)
    base, lt = lorax_fn.split(variables, spec, key=jax.random.key(2), layouts=layouts)
    lt = randomize_b(lt)
    assert lt[w_in].a.shape == (layers, E, D, R)
    assert_matches_merged(model.apply, base, lt, x, rtol=1e-4, atol=1e-4)
    shapes = _grad_shapes(lorax_fn.lora(model.apply, on_fallback="error"), base, lt, x)
    expert_shapes = {tuple(w.shape) for p, w in lorax_fn.paths.leaves_with_paths(base) if "w_" in p}
    assert not shapes & expert_shapes
