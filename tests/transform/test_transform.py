"""lora(fn) computed factorized equals fn(merge(base, lora)) — values and gradients."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from helpers import TiedLM, assert_matches_merged, randomize_b

import lorax_fn
from lorax_fn import Layout, LoraSpec


def adapt(variables, targets, fn=None, *args, rank=2, layouts=None, **spec_kw):
    if layouts is None and fn is not None:
        layouts = lorax_fn.infer_layouts(fn, variables, *args)
    base, lt = lorax_fn.split(
        variables, LoraSpec(targets, rank=rank, **spec_kw), key=jax.random.key(1), layouts=layouts
    )
    return base, randomize_b(lt)


def init(model, *args, **kw):
    return model.init(jax.random.key(0), *args, **kw)


def test_dense():
    model = nn.Dense(6)
    x = jax.random.normal(jax.random.key(2), (3, 5))
    base, lt = adapt(init(model, x), "**/kernel")
    assert_matches_merged(model.apply, base, lt, x)


def test_multi_head_attention_q_k_v_out():
    model = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, out_features=6)
    x = jax.random.normal(jax.random.key(2), (2, 4, 6))
    variables = init(model, x)
    base, lt = adapt(variables, "**/kernel")
    assert {p.split("/")[-2] for p in lt} == {"query", "key", "value", "out"}
    assert lt["params/query/kernel"].a.shape == (6, 2)
    assert lt["params/query/kernel"].b.shape == (2, 2, 4)
    assert lt["params/out/kernel"].a.shape == (2, 4, 2)
    assert_matches_merged(model.apply, base, lt, x)


def test_einsum():
    model = nn.Einsum((5, 3, 4), "bti,ihd->bthd")
    x = jax.random.normal(jax.random.key(2), (2, 6, 5))
    base, lt = adapt(init(model, x), "**/kernel", model.apply, x)
    assert lt["params/kernel"].layout == Layout((0,), (1, 2))
    assert_matches_merged(model.apply, base, lt, x)


@pytest.mark.parametrize(
    "shape, kernel, kw",
    [
        ((2, 11, 4), (3,), dict(strides=2, padding="SAME")),
        ((2, 11, 4), (3,), dict(kernel_dilation=2, padding="VALID")),
        ((2, 9, 8, 4), (3, 3), dict(strides=(2, 1), padding=((1, 2), (0, 1)))),
        ((2, 9, 8, 4), (2, 3), dict(kernel_dilation=(2, 1), padding=((1, 1), (2, 0)))),
    ],
)
def test_conv(shape, kernel, kw):
    model = nn.Conv(5, kernel, **kw)
    x = jax.random.normal(jax.random.key(2), shape)
    base, lt = adapt(init(model, x), "**/kernel", model.apply, x)
    entry = lt["params/kernel"]
    assert entry.layout.out_axes == (len(kernel) + 1,)
    assert entry.a.shape == (*kernel, shape[-1], 2)
    assert_matches_merged(model.apply, base, lt, x)


def test_embed_lookup_attend_and_tied_weight():
    model = TiedLM()
    ids = jnp.array([[1, 2, 10], [0, 5, 5]])
    variables = init(model, ids)
    base, lt = adapt(variables, ["**/embedding", "**/kernel"], model.apply, ids)
    assert lt["params/Embed_0/embedding"].layout == Layout((0,), (1,))
    assert_matches_merged(model.apply, base, lt, ids)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2)(h, h)
        h = nn.LayerNorm()(x)
        return x + nn.Dense(8)(nn.gelu(nn.Dense(16)(h))), None


class ScannedLM(nn.Module):
    remat: bool = False

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(13, 8)
        block = nn.remat(Block) if self.remat else Block
        stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        x, _ = stack()(embed(ids), None)
        return embed.attend(nn.LayerNorm()(x))


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_transformer(remat):
    model = ScannedLM(remat=remat)
    ids = jnp.array([[1, 2, 3, 4], [5, 6, 7, 12]])
    variables = init(model, ids)
    base, lt = adapt(variables, ["**/kernel", "**/embedding"], model.apply, ids)
    query = next(v for p, v in lt.items() if p.endswith("query/kernel"))
    assert query.layout == Layout((1,), (2, 3), (0,))
    assert query.a.shape == (3, 8, 2) and query.b.shape == (3, 2, 2, 4)
    assert_matches_merged(model.apply, base, lt, ids, rtol=1e-4, atol=1e-4)


def test_remat_outside_scan():
    model = nn.remat(nn.Dense)(4)
    x = jax.random.normal(jax.random.key(2), (3, 5))
    base, lt = adapt(init(model, x), "**/kernel")
    assert_matches_merged(model.apply, base, lt, x)


def test_bfloat16_base_with_float32_factors():
    model = nn.Dense(8, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(2), (4, 16)).astype(jnp.bfloat16)
    variables = init(model, x)
    base, lt = adapt(variables, "**/kernel")
    assert lt["params/kernel"].a.dtype == jnp.float32
    out = assert_matches_merged(model.apply, base, lt, x, rtol=3e-2, atol=3e-2)
    assert out.dtype == jnp.bfloat16


def test_preferred_element_type_and_precision():
    def fn(p, x):
        return jax.lax.dot_general(
            x,
            p["w"],
            (((1,), (0,)), ((), ())),
            precision=jax.lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )

    params = {"w": jax.random.normal(jax.random.key(0), (16, 8)).astype(jnp.bfloat16)}
    x = jax.random.normal(jax.random.key(2), (4, 16)).astype(jnp.bfloat16)
    base, lt = adapt(params, "w")
    out = assert_matches_merged(fn, base, lt, x, rtol=3e-2, atol=3e-2)
    assert out.dtype == jnp.float32


def test_weight_on_the_left_with_batch_dims():
    def fn(p, x):  # (L, out, in) weight contracted on the left, batched over L
        return jnp.einsum("loi,lbi->lbo", p["w"], x)

    params = {"w": jax.random.normal(jax.random.key(0), (3, 6, 5))}
    x = jax.random.normal(jax.random.key(2), (3, 4, 5))
    base, lt = adapt(params, "w", fn, x)
    assert lt["w"].layout == Layout((2,), (1,), (0,))
    assert_matches_merged(fn, base, lt, x)


def test_control_flow_cond_while_and_dynamic_layer_index():
    def fn(p, x):
        w = p["w"]
        y = jax.lax.cond(x.sum() > 0, lambda: x @ w[0], lambda: -(x @ w[1]))

        def body(i, h):
            return jnp.tanh(h @ w[i % 2])

        return jax.lax.fori_loop(0, 3, body, y)

    params = {"w": jax.random.normal(jax.random.key(0), (2, 5, 5)) / 3}
    x = jax.random.normal(jax.random.key(2), (4, 5))
    base, lt = adapt(params, "w", layouts={"w": Layout((1,), (2,), (0,))})
    assert_matches_merged(fn, base, lt, x)
    assert_matches_merged(fn, base, lt, -x)


@jax.custom_vjp
def _straight_through(x, w):
    return x @ w


# A backward pass that ignores the weight, as a straight-through estimator may.
_straight_through.defvjp(
    lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, jnp.zeros_like(res[1]))
)


@jax.custom_jvp
def _doubled(x, w):
    return x @ w


@_doubled.defjvp
def _doubled_jvp(primals, tangents):  # twice the true derivative in w
    (x, w), (tx, tw) = primals, tangents
    return x @ w, tx @ w + 2.0 * (x @ tw)


def _grads(g, base, lt, x):
    return jax.grad(lambda lt: jnp.sum(jnp.sin(g(base, lt, x))))(lt)


@pytest.mark.parametrize("op", [_straight_through, _doubled])
def test_custom_derivative_rule_of_a_weight_is_kept(op):
    def fn(p, x):
        return jnp.tanh(op(x, p["w"])) @ p["v"]

    params = {
        "w": jax.random.normal(jax.random.key(0), (5, 4)),
        "v": jax.random.normal(jax.random.key(1), (4, 3)),
    }
    x = jax.random.normal(jax.random.key(2), (3, 5))
    base, lt = adapt(params, ["w", "v"])
    g = lorax_fn.lora(fn)
    kind = "vjp" if op is _straight_through else "jvp"
    with pytest.warns(UserWarning, match=rf"w is consumed by `custom_{kind}_call`, the custom-"):
        got = _grads(g, base, lt, x)
    want = _grads(lorax_fn.lora(fn, factorized=False), base, lt, x)
    for path in lt:
        for a, b in zip(jax.tree.leaves(got[path]), jax.tree.leaves(want[path]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=path)
    # The rule really changes the gradient: autodiff of the primal body differs.
    plain = _grads(lorax_fn.lora(lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]), base, lt, x)
    assert not np.allclose(plain["w"].b, want["w"].b, atol=1e-3)
    if op is _straight_through:
        np.testing.assert_array_equal(want["w"].b, 0.0)


def test_custom_jvp_activations_stay_factorized():
    def fn(p, x):  # jax.nn's custom_jvp functions applied to activations, not weights
        h = jax.nn.relu(x @ p["w1"])
        h = jax.nn.gelu(h, approximate=False) + jax.nn.softplus(h) + jax.nn.silu(h)
        return jax.nn.softmax(h @ p["w2"])

    params = {
        "w1": jax.random.normal(jax.random.key(0), (5, 6)),
        "w2": jax.random.normal(jax.random.key(1), (6, 3)),
    }
    base, lt = adapt(params, ["w1", "w2"])
    assert_matches_merged(fn, base, lt, jax.random.normal(jax.random.key(2), (4, 5)))


class BatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(6)(x)
        return nn.BatchNorm(use_running_average=not train)(x)


def test_mutable_collections_and_static_kwargs():
    model = BatchNormNet()
    x = jax.random.normal(jax.random.key(2), (4, 5))
    variables = init(model, x, train=False)
    base, lt = adapt(variables, "**/kernel")
    out, updates = lorax_fn.lora(model.apply)(base, lt, x, train=True, mutable=["batch_stats"])
    ref_out, ref_updates = model.apply(
        lorax_fn.merge(base, lt), x, train=True, mutable=["batch_stats"]
    )
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), updates, ref_updates
    )
    assert_matches_merged(model.apply, base, lt, x, train=False)


class NNXModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.attn = nnx.MultiHeadAttention(2, 8, 8, decode=False, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(self.attn(x))


def test_nnx_function():
    graphdef, state = nnx.split(NNXModel(nnx.Rngs(0)))

    def fn(state, x):
        return nnx.merge(graphdef, state)(x)

    x = jax.random.normal(jax.random.key(2), (2, 3, 8))
    base, lt = adapt(state, ["**/kernel"], exclude="head/**", trainable="head/**")
    assert "attn/query/kernel" in lt and isinstance(lt["head/kernel"], jax.Array)
    assert_matches_merged(fn, base, lt, x)


def test_composes_with_jit_vmap_pmap():
    model = nn.Dense(4)
    x = jax.random.normal(jax.random.key(2), (8, 3, 5))
    base, lt = adapt(init(model, x[0]), "**/kernel")
    g = lorax_fn.lora(model.apply)
    want = jax.vmap(lambda xi: model.apply(lorax_fn.merge(base, lt), xi))(x)
    np.testing.assert_allclose(jax.jit(g)(base, lt, x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        jax.vmap(g, in_axes=(None, None, 0))(base, lt, x), want, rtol=1e-5, atol=1e-5
    )
    n = jax.local_device_count()
    pmapped = jax.pmap(g, in_axes=(None, None, 0))(base, lt, x[:n])
    np.testing.assert_allclose(pmapped, want[:n], rtol=1e-5, atol=1e-5)


def test_traced_once_per_signature():
    calls = []

    def fn(p, x):
        calls.append(x.shape)
        return x @ p["w"]

    base, lt = adapt({"w": jnp.ones((5, 4))}, "w")
    g = lorax_fn.lora(fn)
    for _ in range(3):
        g(base, lt, jnp.ones((2, 5)))
    g(base, lt, jnp.ones((3, 5)))
    assert calls == [(2, 5), (3, 5)]


def test_fallback_is_reported_and_still_correct():
    def fn(p, x):
        return (x @ p["w"]) / jnp.linalg.norm(p["w"])

    base, lt = adapt({"w": jax.random.normal(jax.random.key(0), (5, 4))}, "w")
    x = jnp.ones((2, 5))
    want = fn(lorax_fn.merge(base, lt), x)
    with pytest.warns(UserWarning, match=r"w is consumed by `(mul|integer_pow|pow|abs)"):
        got = lorax_fn.lora(fn)(base, lt, x)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    with pytest.raises(lorax_fn.LoraError, match="w is consumed by"):
        lorax_fn.lora(fn, on_fallback="error")(base, lt, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(
            lorax_fn.lora(fn, on_fallback="ignore")(base, lt, x), want, rtol=1e-5
        )


def test_bad_on_fallback_and_mismatched_tree_are_refused():
    with pytest.raises(lorax_fn.LoraError, match="on_fallback"):
        lorax_fn.lora(lambda p: p, on_fallback="loud")
    _, lt = adapt({"w": jnp.ones((5, 4))}, "w")
    with pytest.raises(lorax_fn.LoraError, match="w: the adapter was made for"):
        lorax_fn.lora(lambda p, x: x @ p["w"])({"w": jnp.ones((6, 4))}, lt, jnp.ones((1, 6)))


def test_weight_on_the_left_without_batch_dims():
    def fn(p, x):  # (in, h, o) weight as lhs, contracted with (b, t, in): output (h, o, b, t)
        return jax.lax.dot_general(p["w"], x, (((0,), (2,)), ((), ())))

    params = {"w": jax.random.normal(jax.random.key(0), (5, 2, 3))}
    x = jax.random.normal(jax.random.key(2), (4, 6, 5))
    base, lt = adapt(params, "w", fn, x)
    assert lt["w"].layout == Layout((0,), (1, 2))
    assert_matches_merged(fn, base, lt, x)


def test_fn_that_reads_none_of_its_weights_is_refused():
    x = jnp.ones((2, 4))
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    base, lt = adapt(nnx.split(model)[1], "kernel")
    with pytest.raises(
        lorax_fn.LoraError, match=r"never reads any weight of the LoRA tree \(kernel\)"
    ):
        lorax_fn.lora(lambda state, x: model(x))(base, lt, x)  # NNX model captured by closure

    dense = nn.Dense(3)
    variables = init(dense, x)
    base, lt = adapt(variables, "**/kernel")
    with pytest.raises(lorax_fn.LoraError, match="params/kernel"):
        lorax_fn.lora(lambda v, x: dense.apply(variables, x))(base, lt, x)  # linen closure


def test_unread_weight_is_warned_by_path_once_per_signature():
    def fn(p, x):
        # "ignored" goes into a jit that never uses it: still unread.
        return jax.jit(lambda x, w, _: x @ w)(x, p["used"], p["ignored"])

    params = {"used": jnp.ones((5, 4)), "ignored": jnp.ones((5, 4))}
    base, lt = adapt(params, ["used", "ignored"])
    g = lorax_fn.lora(fn)
    with pytest.warns(UserWarning, match=r"fn never reads ignored") as record:
        g(base, lt, jnp.ones((2, 5)))
    assert [str(w.message) for w in record if "never reads" in str(w.message)] == [
        "lorax_fn: fn never reads ignored (inputs (float32[2,5])); its adapter has no effect "
        "and a zero gradient"
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g(base, lt, jnp.ones((2, 5)))
    with pytest.warns(UserWarning, match=r"never reads ignored \(inputs \(float32\[3,5\]\)\)"):
        g(base, lt, jnp.ones((3, 5)))


def test_weights_read_inside_sub_jaxprs_or_returned_count_as_read():
    def fn(p, x):
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["stack"])
        h = jax.lax.cond(x.sum() > 0, lambda: h @ p["cond"], lambda: h)
        h = jax.jit(lambda h, w: h @ w)(h, p["jit"])
        h = jax.checkpoint(lambda h, w: h @ w)(h, p["remat"])
        return h, p["out"]

    w = jnp.eye(4) / 2
    params = {"stack": jnp.stack([w, w]), "cond": w, "jit": w, "remat": w, "out": w}
    layouts = {"stack": Layout((1,), (2,), (0,))}
    base, lt = adapt(params, list(params), layouts=layouts)
    x = jnp.ones((3, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = lorax_fn.lora(fn, on_fallback="ignore")(base, lt, x)
    want = fn(lorax_fn.merge(base, lt), x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)


def test_fallbacks_are_reported_per_input_signature():
    def fn(p, x):
        return (x @ p["w"]) / jnp.linalg.norm(p["w"])

    base, lt = adapt({"w": jax.random.normal(jax.random.key(0), (5, 4))}, "w")
    g = lorax_fn.lora(fn)
    with pytest.warns(UserWarning, match=r"w is consumed by .*\(inputs \(float32\[2,5\]\)\)"):
        g(base, lt, jnp.ones((2, 5)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g(base, lt, jnp.ones((2, 5)))
    with pytest.warns(UserWarning, match=r"w is consumed by .*\(inputs \(float32\[3,5\]\)\)"):
        g(base, lt, jnp.ones((3, 5)))


def test_unhashable_static_argument_is_refused_by_name():
    def fn(p, x, flags, mode=None):
        return x @ p["w"]

    base, lt = adapt({"w": jnp.ones((5, 4))}, "w")
    g = lorax_fn.lora(fn)
    x = jnp.ones((2, 5))
    with pytest.raises(
        lorax_fn.LoraError, match=r"static argument args\[1\] \(a set\) is not hashable"
    ):
        g(base, lt, x, {"a", "b"})
    with pytest.raises(lorax_fn.LoraError, match=r"kwargs\['mode'\]\[0\] \(a set\)"):
        g(base, lt, x, "flags", mode=[{"a"}])


def test_trace_cache_is_a_bounded_lru():
    calls = []

    def fn(p, x):
        calls.append(x.shape[0])
        return x @ p["w"]

    base, lt = adapt({"w": jnp.ones((5, 4))}, "w")
    g = lorax_fn.lora(fn, cache_size=2)
    for n in [1, 2, 1, 3, 1, 2]:
        g(base, lt, jnp.ones((n, 5)))
    # 1 and 2 traced; 1 is reused; 3 evicts 2 (least recently used); 1 is kept; 2 again.
    assert calls == [1, 2, 3, 2]
    with pytest.raises(lorax_fn.LoraError, match="cache_size must be an int >= 1, got 0"):
        lorax_fn.lora(fn, cache_size=0)


def test_optimization_barrier_keeps_the_weight_factorized_and_its_layout():
    def fn(p, x):
        w, x = jax.lax.optimization_barrier((p["w"], x))
        return jnp.einsum("bi,iho->bho", x, w)

    params = {"w": jax.random.normal(jax.random.key(0), (5, 2, 3))}
    x = jax.random.normal(jax.random.key(2), (4, 5))
    base, lt = adapt(params, "w", fn, x)  # layouts inferred through the barrier
    assert lt["w"].layout == Layout((0,), (1, 2))
    assert_matches_merged(fn, base, lt, x)


def _values_and_grads(g, base, lt, x):
    def loss(lt):
        return jnp.sum(jnp.sin(g(base, lt, x).astype(jnp.float32)))

    return g(base, lt, x), jax.grad(loss)(lt)


NOT_A_ROUNDING = [
    pytest.param(lambda w: jax.lax.reduce_precision(w, 8, 1), "reduce_precision", id="fake-quant"),
    pytest.param(lambda w: w.astype(jnp.int32), "convert_element_type", id="int32"),
    pytest.param(lambda w: w.astype(bool), "convert_element_type", id="bool"),
    pytest.param(
        lambda w: w.astype(jnp.float8_e4m3fn).astype(jnp.float32),
        "convert_element_type",
        id="float8",
    ),
]


@pytest.mark.parametrize("cast, primitive", NOT_A_ROUNDING)
def test_a_cast_that_is_not_a_rounding_forms_the_weight_and_is_reported(cast, primitive):
    # Applied to W0 alone (factors kept) these were 1-15 % off, dB wrong, and unreported.
    def fn(p, x):
        return x @ cast(p["w"])

    base, lt = adapt({"w": 2 * jax.random.normal(jax.random.key(0), (5, 4))}, "w")
    x = jax.random.normal(jax.random.key(2), (3, 5))
    with pytest.raises(lorax_fn.LoraError, match=rf"w is consumed by `{primitive}"):
        lorax_fn.lora(fn, on_fallback="error")(base, lt, x)
    with pytest.warns(UserWarning, match=rf"w is consumed by `{primitive}"):
        lorax_fn.lora(fn)(base, lt, x)
    got, grad_got = _values_and_grads(lorax_fn.lora(fn, on_fallback="ignore"), base, lt, x)
    want, grad_want = _values_and_grads(lorax_fn.lora(fn, factorized=False), base, lt, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for name in ("a", "b"):  # an int or bool weight has no gradient: dB is 0 there
        g, w = getattr(grad_got["w"], name), getattr(grad_want["w"], name)
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_a_float_rounding_cast_and_a_no_op_reduce_precision_stay_factorized(dtype):
    def fn(p, x):  # an identity reduce_precision, as jax.checkpoint inserts them
        w = jax.lax.reduce_precision(p["w"], 8, 23).astype(dtype)
        return x.astype(dtype) @ w

    base, lt = adapt({"w": jax.random.normal(jax.random.key(0), (16, 8))}, "w")
    x = jax.random.normal(jax.random.key(2), (4, 16))
    assert_matches_merged(fn, base, lt, x, rtol=3e-2, atol=3e-2)  # on_fallback="error"


LOOKUPS = [
    pytest.param(lambda e, ids: jnp.take(e, ids, axis=0, fill_value=1.0), id="take-fill-1"),
    pytest.param(lambda e, ids: e.at[ids].get(mode="fill", fill_value=2.0), id="get-fill-2"),
    pytest.param(lambda e, ids: jnp.take(e, ids, axis=0, fill_value=0.0), id="fill-0"),
    pytest.param(lambda e, ids: jnp.take(e, ids, axis=0), id="fill-nan"),  # nn.Embed's
    pytest.param(lambda e, ids: jnp.take(e, ids, axis=0, mode="clip"), id="clip"),
]


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("lookup", LOOKUPS)
def test_an_embedding_row_out_of_range_is_the_fill(lookup, use_dora):
    # The fill leaked into A's rows: fill + s·(fill·1)·B; a NaN fill made dB NaN.
    def fn(p, ids):
        return lookup(p["e"], ids)

    params = {"e": jax.random.normal(jax.random.key(0), (7, 4))}
    ids = jnp.array([[0, 6, 7], [-9, 3, 40]])  # 7, -9 and 40 are out of range
    base, lt = adapt(params, "e", fn, ids, use_dora=use_dora)
    assert lt["e"].layout == Layout((0,), (1,))
    assert_matches_merged(fn, base, lt, ids)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("fill", [1.5, 0.0, float("nan")])
def test_a_stacked_layer_out_of_range_is_the_fill(fill, use_dora):
    def fn(p, x, layer):
        return x @ jnp.take(p["w"], layer, axis=0, fill_value=fill)

    params = {"w": jax.random.normal(jax.random.key(0), (3, 5, 4))}
    x = jax.random.normal(jax.random.key(2), (2, 5))
    base, lt = adapt(params, "w", layouts={"w": Layout((1,), (2,), (0,))}, use_dora=use_dora)
    for layer in (1, 3):
        assert_matches_merged(fn, base, lt, x, jnp.array(layer))


EMPTY_BATCHES = [
    pytest.param(nn.Dense(4), (1, 5), (0, 5), id="dense-no-rows"),
    pytest.param(nn.Dense(4), (1, 5), (2, 0, 5), id="dense-no-tokens"),
    pytest.param(nn.Einsum((5, 3, 4), "bti,ihd->bthd"), (1, 2, 5), (0, 2, 5), id="einsum"),
    pytest.param(nn.MultiHeadDotProductAttention(num_heads=2), (1, 3, 4), (2, 0, 4), id="mha"),
]


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("model, example, empty", EMPTY_BATCHES)
def test_an_empty_batch_gives_the_empty_result(model, example, empty, use_dora):
    # Flattening the rows of an empty batch was reshape(0, -1): ZeroDivisionError.
    example = jnp.ones(example)
    variables = init(model, example)
    base, lt = adapt(variables, "**/kernel", model.apply, example, use_dora=use_dora)
    out = assert_matches_merged(model.apply, base, lt, jnp.ones(empty))  # gradients: zeros
    assert out.shape == model.apply(variables, jnp.ones(empty)).shape


@pytest.mark.parametrize("ids_shape", [(0,), (2, 0)])
def test_an_embedding_lookup_of_no_ids_gives_the_empty_result(ids_shape):
    # jnp.take of no ids never reads the table: that is an empty batch, not an fn that
    # reads its weights from somewhere else, so it is neither refused nor warned about.
    model = nn.Embed(7, 4)
    variables = init(model, jnp.zeros((1,), jnp.int32))
    base, lt = adapt(variables, "**/embedding")
    ids = jnp.zeros(ids_shape, jnp.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = assert_matches_merged(model.apply, base, lt, ids)
    assert out.shape == (*ids_shape, 4)
