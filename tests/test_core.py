"""split / merge / unmerge / accounting / LoraSpec: properties and refusals."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from helpers import randomize_b
from hypothesis import given, settings
from hypothesis import strategies as st

import lorax_fn
from lorax_fn import Layout, LoraError, LoraFactors, LoraSpec

KEY = jax.random.key(0)


# ------------------------------------------------------------------ properties


@st.composite
def adapted_weights(draw):
    n_weights = draw(st.integers(1, 3))
    params, ranks = {}, {}
    dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]))
    for i in range(n_weights):
        stacked = draw(st.booleans())
        shape = (draw(st.integers(1, 3)),) if stacked else ()
        shape += (draw(st.integers(1, 12)), draw(st.integers(1, 12)))
        # NumPy on the host: a jax.random draw compiles once per shape, which made input
        # generation slow enough on a loaded machine to fail Hypothesis' health check.
        kernel = np.random.default_rng(i).standard_normal(shape, np.float32)
        params[f"layer_{i}"] = {
            "kernel": jnp.asarray(kernel.astype(dtype)),
            "bias": jnp.asarray(np.zeros(shape[-1], dtype)),
        }
        ranks[f"layer_{i}/kernel"] = draw(st.integers(1, min(shape[-2:])))
    return params, ranks, draw(st.booleans())


@settings(max_examples=12, deadline=None)
@given(adapted_weights())
def test_merge_unmerge_and_counts(case):
    params, ranks, train_bias = case
    layouts = {
        p: Layout((w.ndim - 2,), (w.ndim - 1,), tuple(range(w.ndim - 2)))
        for p, w in lorax_fn.paths.leaves_with_paths(params)
        if p.endswith("kernel")
    }
    spec = LoraSpec(
        "**/kernel",
        rank_pattern=ranks,
        trainable="**/bias" if train_bias else (),
        init="kaiming_uniform",
    )
    base, lt = lorax_fn.split(params, spec, key=KEY, layouts=layouts)
    # The same arrays, untouched, in a fresh container (so updating one never touches the other).
    assert base is not params and jax.tree.structure(base) == jax.tree.structure(params)
    assert all(b is w for b, w in zip(jax.tree.leaves(base), jax.tree.leaves(params), strict=True))

    merged0 = lorax_fn.merge(base, lt)
    jax.tree_util.tree_map(np.testing.assert_array_equal, merged0, params)  # B = 0

    lt = randomize_b(lt, std=0.5)
    merged = lorax_fn.merge(base, lt)
    restored = lorax_fn.unmerge(merged, lt)
    for path, w in lorax_fn.paths.leaves_with_paths(params):
        got = np.asarray(dict(lorax_fn.paths.leaves_with_paths(restored))[path], np.float32)
        want = np.asarray(w, np.float32)
        if w.dtype == jnp.float32:
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
        else:  # two roundings to the weight's precision (documented in unmerge)
            if isinstance(lt.get(path), LoraFactors):
                d = np.asarray(lorax_fn.factors.delta(lt[path]))
                bound = 2 * float(jnp.finfo(w.dtype).eps) * (np.abs(want) + np.abs(d) + 1e-3)
                assert np.all(np.abs(got - want) <= bound)

    count = lorax_fn.count_params(base, lt)
    expected = sum(
        math.prod(w.shape[:-2]) * ranks[p] * (w.shape[-2] + w.shape[-1])
        for p, w in lorax_fn.paths.leaves_with_paths(params)
        if p.endswith("kernel")
    )
    if train_bias:
        expected += sum(w.size for p, w in lorax_fn.paths.leaves_with_paths(params) if "bias" in p)
    assert count.trainable == expected
    assert count.total == sum(w.size for w in jax.tree_util.tree_leaves(params)) + sum(
        lt[p].a.size + lt[p].b.size for p in lt if isinstance(lt[p], LoraFactors)
    )


# --------------------------------------------------------------- factor shapes


def _split(variables, targets, rank=2, layouts=None, **kw):
    return lorax_fn.split(variables, LoraSpec(targets, rank=rank, **kw), key=KEY, layouts=layouts)


def test_factor_shapes_dense_and_attention_by_convention():
    x = jnp.ones((1, 3, 16))
    attn = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32, out_features=16)
    _, lt = _split(attn.init(KEY, x), "**/kernel", rank=4)
    for name in ("query", "key", "value"):
        assert lt[f"params/{name}/kernel"].a.shape == (16, 4)
        assert lt[f"params/{name}/kernel"].b.shape == (4, 4, 8)
    assert lt["params/out/kernel"].a.shape == (4, 8, 4)
    assert lt["params/out/kernel"].b.shape == (4, 16)
    _, lt = _split(nn.Dense(7).init(KEY, x), "**/kernel", rank=3)
    assert (lt["params/kernel"].a.shape, lt["params/kernel"].b.shape) == ((16, 3), (3, 7))


def test_factor_shapes_einsum_conv_embed_and_scan_by_inference():
    x = jnp.ones((2, 5, 6))
    einsum = nn.Einsum((6, 4, 3), "bti,ihd->bthd")
    v = einsum.init(KEY, x)
    _, lt = _split(v, "**/kernel", layouts=lorax_fn.infer_layouts(einsum.apply, v, x))
    assert (lt["params/kernel"].a.shape, lt["params/kernel"].b.shape) == ((6, 2), (2, 4, 3))

    conv = nn.Conv(8, (3, 3))
    img = jnp.ones((1, 7, 7, 5))
    v = conv.init(KEY, img)
    _, lt = _split(v, "**/kernel", layouts=lorax_fn.infer_layouts(conv.apply, v, img))
    assert (lt["params/kernel"].a.shape, lt["params/kernel"].b.shape) == ((3, 3, 5, 2), (2, 8))

    embed = nn.Embed(50, 12)
    ids = jnp.ones((2, 3), jnp.int32)
    _, lt = _split(embed.init(KEY, ids), "**/embedding", rank=4)
    assert (lt["params/embedding"].a.shape, lt["params/embedding"].b.shape) == ((50, 4), (4, 12))

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            layers = nn.scan(
                _Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=4
            )
            return layers()(x, None)[0]

    stack = Stack()
    v = stack.init(KEY, x)
    layouts = lorax_fn.infer_layouts(stack.apply, v, x)
    _, lt = _split(v, "**/kernel", layouts=layouts)
    (entry,) = lt.values()
    assert entry.layout == Layout((1,), (2,), (0,))
    assert (entry.a.shape, entry.b.shape) == ((4, 6, 2), (4, 2, 6))


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.Dense(6)(x), None


def test_ambiguous_nd_weight_is_an_error_not_a_guess():
    params = {"stack": {"kernel": jnp.ones((4, 6, 6))}}
    with pytest.raises(LoraError, match=r"stack/kernel: cannot tell the fan-in axes of shape"):
        _split(params, "**/kernel")
    spec = LoraSpec("**/kernel", rank=2, layouts={"stack/*": Layout((1,), (2,), (0,))})
    _, lt = lorax_fn.split(params, spec, key=KEY)
    assert lt["stack/kernel"].a.shape == (4, 6, 2)


# -------------------------------------------------------------------- the spec


def test_filters_glob_regex_callable_exclude_and_overrides():
    params = {
        "enc": {
            f"layer_{i}": {
                "query": {"kernel": jnp.ones((8, 8))},
                "value": {"kernel": jnp.ones((8, 8))},
                "bias": jnp.zeros(8),
            }
            for i in range(3)
        },
        "head": {"kernel": jnp.ones((8, 2)), "bias": jnp.zeros(2)},
    }
    spec = LoraSpec(
        targets=[
            "enc/*/query/kernel",
            re.compile(r".*value/kernel"),
            lambda path, leaf: path == "head/kernel",
        ],
        exclude="re:enc/layer_2/.*",
        rank=2,
        alpha=4.0,
        rank_pattern={"**/layer_0/**": 4},
        alpha_pattern={"**/value/kernel": 1.0},
        scaling="rslora",
        trainable=["enc/*/bias"],
    )
    _, lt = lorax_fn.split(params, spec, key=KEY)
    assert sorted(lt) == sorted(
        [
            "enc/layer_0/query/kernel",
            "enc/layer_0/value/kernel",
            "enc/layer_1/query/kernel",
            "enc/layer_1/value/kernel",
            "head/kernel",
            "enc/layer_0/bias",
            "enc/layer_1/bias",
            "enc/layer_2/bias",
        ]
    )
    assert lt["enc/layer_0/query/kernel"].rank == 4
    assert lt["enc/layer_0/query/kernel"].scale == pytest.approx(4.0 / 2.0)
    assert lt["enc/layer_1/value/kernel"].scale == pytest.approx(1.0 / math.sqrt(2))
    assert LoraSpec.from_json(LoraSpec("**/k", rank_pattern={"a/*": 2}).to_json()) == LoraSpec(
        "**/k", rank_pattern={"a/*": 2}
    )


def test_inits():
    w = jax.random.normal(KEY, (64, 32))
    _, lt = lorax_fn.split({"w": w}, LoraSpec("w", rank=8), key=KEY)
    assert float(jnp.std(lt["w"].a)) == pytest.approx(1 / 8, rel=0.15)
    _, lt = lorax_fn.split({"w": w}, LoraSpec("w", rank=8, init_std=0.5), key=KEY)
    assert float(jnp.std(lt["w"].a)) == pytest.approx(0.5, rel=0.15)
    _, lt = lorax_fn.split({"w": w}, LoraSpec("w", rank=8, init="kaiming_uniform"), key=KEY)
    assert float(jnp.max(jnp.abs(lt["w"].a))) <= 1 / math.sqrt(64)
    assert float(jnp.max(jnp.abs(lt["w"].a))) > 0.9 / math.sqrt(64)
    assert not jnp.any(lt["w"].b)


def test_pissa_rewrites_the_base_and_keeps_the_model():
    w = jax.random.normal(KEY, (3, 16, 12))
    params = {"w": w}
    base, lt = lorax_fn.split(
        params,
        LoraSpec("w", rank=4, alpha=8, init="pissa", layouts={"w": Layout((1,), (2,), (0,))}),
        key=KEY,
    )
    assert base is not params and params["w"] is w
    np.testing.assert_allclose(lorax_fn.merge(base, lt)["w"], w, rtol=1e-5, atol=1e-5)
    for layer in range(3):
        s = np.linalg.svd(np.asarray(w[layer]), compute_uv=False)
        s_adapter = np.linalg.svd(
            np.asarray(lorax_fn.factors.delta(lt["w"])[layer]), compute_uv=False
        )
        np.testing.assert_allclose(s_adapter[:4], s[:4], rtol=1e-4)
        s_residual = np.linalg.svd(np.asarray(base["w"][layer]), compute_uv=False)
        np.testing.assert_allclose(s_residual[:8], s[4:12], rtol=1e-4)


def test_nnx_state_paths_read_like_linen():
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    _, state = nnx.split(model)
    assert [p for p, _ in lorax_fn.paths.leaves_with_paths(state)] == ["bias", "kernel"]
    linen_params = nn.Dense(3).init(KEY, jnp.ones((1, 4)))["params"]
    assert [p for p, _ in lorax_fn.paths.leaves_with_paths(linen_params)] == ["bias", "kernel"]
    base, lt = lorax_fn.split(state, LoraSpec("kernel", rank=2), key=KEY)
    merged = lorax_fn.merge(base, randomize_b(lt))
    assert type(merged) is type(state)


def test_describe_and_summary():
    params = {"params": {"Dense_0": {"kernel": jnp.ones((4, 6)), "bias": jnp.zeros(6)}}}
    table = lorax_fn.describe(params)
    assert "params/Dense_0/kernel  (4, 6)  float32" in table
    base, lt = lorax_fn.split(params, LoraSpec("**/kernel", rank=2, trainable="**/bias"), key=KEY)
    text = lorax_fn.summary(base, lt)
    assert "params/Dense_0/kernel" in text and "(4, 2)" in text and "(2, 6)" in text
    assert text.splitlines()[-1] == str(lorax_fn.count_params(base, lt))
    assert lorax_fn.count_params(base, lt).trainable == 2 * (4 + 6) + 6


def test_merge_donate_and_safe():
    params = {"w": jax.random.normal(KEY, (8, 8)), "v": jnp.ones((8, 8))}
    base, lt = lorax_fn.split(params, LoraSpec("w", rank=2), key=KEY)
    lt = randomize_b(lt)
    want = lorax_fn.merge(base, lt)
    donor = jax.tree_util.tree_map(jnp.copy, base)
    got = lorax_fn.merge(donor, lt, donate=True)
    np.testing.assert_array_equal(got["w"], want["w"])
    # Donation hands the adapted leaf's buffer to XLA; a leaf with no adapter stays the
    # caller's (it is not part of the fold).
    assert donor["w"].is_deleted() and not donor["v"].is_deleted()
    kept = jax.tree_util.tree_map(jnp.copy, base)
    np.testing.assert_array_equal(lorax_fn.merge(kept, lt)["w"], want["w"])
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(kept))
    bad = {
        "w": LoraFactors(lt["w"].a, lt["w"].b.at[0, 3].set(jnp.inf), lt["w"].scale, lt["w"].layout)
    }
    keep = jax.tree_util.tree_map(jnp.copy, base)
    with pytest.raises(LoraError, match=r"merge would produce NaN/Inf at \['w'\]"):
        lorax_fn.merge(keep, bad, donate=True, safe=True)
    assert not keep["w"].is_deleted()
    np.testing.assert_array_equal(keep["w"], base["w"])  # nothing was donated or changed
    with pytest.raises(LoraError, match=r"unmerge would produce NaN/Inf"):
        lorax_fn.unmerge(want, bad, safe=True)


# -------------------------------------------------------------------- refusals


PARAMS = {
    "params": {
        "dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)},
        "ids": jnp.zeros((8, 4), jnp.int32),
    }
}


@pytest.mark.parametrize(
    "spec_kw, message",
    [
        (
            dict(targets="**/kernal"),
            r"target filter '\*\*/kernal' matches no parameter. "
            r"Nearest paths:\n  params/dense/kernel",
        ),
        (dict(targets="**/kernel", exclude="**/nothing"), "exclude filter '.*nothing' matches"),
        (dict(targets="**/kernel", trainable="**/nothing"), "trainable filter"),
        (dict(targets="**/kernel", rank_pattern={"**/nothing": 2}), "rank_pattern filter"),
        (
            dict(targets="**/kernel", rank=5),
            r"params/dense/kernel: rank 5 > min\(fan_in, "
            r"fan_out\) = min\(8, 4\)",
        ),
        (dict(targets="**/ids"), r"params/ids: cannot adapt a non-floating leaf \(dtype int32"),
        (
            dict(targets="**/kernel", trainable="**/dense/*"),
            r"paths both targeted and trainable: \['params/dense/kernel'\]",
        ),
        (dict(targets="**/kernel", exclude="**/kernel"), "every target was excluded"),
    ],
)
def test_split_refusals(spec_kw, message):
    with pytest.raises(LoraError, match=message):
        lorax_fn.split(PARAMS, LoraSpec(**spec_kw), key=KEY)


@pytest.mark.parametrize(
    "spec_kw, message",
    [
        (dict(rank=0), "rank must be a positive int, got 0"),
        (dict(rank=2.5), "rank must be a positive int, got 2.5"),
        (dict(alpha=0), "alpha must be > 0, got 0"),
        (dict(alpha_pattern={"a": -1.0}), r"alpha_pattern\['a'\] must be > 0, got -1.0"),
        (dict(rank_pattern={"a": 0}), r"rank_pattern\['a'\] must be a positive int"),
        (dict(init="xavier"), "unknown init 'xavier'"),
        (dict(scaling="sqrt"), "unknown scaling 'sqrt'"),
        (dict(dropout=1.0), "dropout must be in"),
        (dict(factor_dtype=jnp.int8), "factor_dtype must be a floating dtype"),
    ],
)
def test_spec_refusals(spec_kw, message):
    with pytest.raises(LoraError, match=message):
        LoraSpec("**/kernel", **spec_kw)


@pytest.mark.parametrize(
    "spec_kw, message",
    [
        (dict(targets="re:("), r"path filter 're:\(' is not a valid pattern: missing \)"),
        (dict(targets="**/kernel", exclude=["re:a[", "x"]), r"path filter 're:a\[' is not a"),
        (dict(targets="**/kernel", rank_pattern={"re:*": 2}), r"path filter 're:\*' is not a"),
        (dict(targets="**/[z-a]"), r"path filter '\*\*/\[z-a\]' is not a valid pattern"),
        (dict(targets=[3]), "a path filter must be a str, re.Pattern or callable, got 3"),
        (dict(), "no targets and no trainable leaves, so it would train nothing"),
        (dict(rank=4, alpha=8.0), "no targets and no trainable leaves"),
    ],
)
def test_spec_refuses_bad_filters_and_an_empty_spec_at_construction(spec_kw, message):
    with pytest.raises(LoraError, match=message):
        LoraSpec(**spec_kw)


def test_trainable_only_spec_is_fine():  # BitFit / full fine-tuning
    _, lt = lorax_fn.split(PARAMS, LoraSpec(trainable="**/bias"), key=KEY)
    assert sorted(lt) == [
        p for p, _ in lorax_fn.paths.leaves_with_paths(PARAMS) if p.endswith("bias")
    ]


def test_merge_refuses_a_tree_that_does_not_fit_and_changes_nothing():
    base, lt = lorax_fn.split(PARAMS, LoraSpec("**/kernel", rank=2, trainable="**/bias"), key=KEY)
    other_shape = {
        "params": {
            "dense": {"kernel": jnp.ones((8, 5)), "bias": jnp.zeros(4)},
            "ids": PARAMS["params"]["ids"],
        }
    }
    with pytest.raises(
        LoraError,
        match=r"params/dense/kernel: the adapter was made for a "
        r"weight of shape \(8, 4\), the base has \(8, 5\)",
    ):
        lorax_fn.merge(other_shape, lt)
    with pytest.raises(
        LoraError,
        match=r"LoRA paths not in the base: \['params/dense/bias', 'params/dense/kernel'\]",
    ):
        lorax_fn.merge({"params": {"x": jnp.ones(3)}}, lt)
    wrong_bias = dict(lt, **{"params/dense/bias": jnp.zeros(4, jnp.bfloat16)})
    with pytest.raises(LoraError, match=r"params/dense/bias: trainable leaf \(4,\) bfloat16"):
        lorax_fn.unmerge(base, wrong_bias)
    f = lt["params/dense/kernel"]
    broken = dict(lt, **{"params/dense/kernel": LoraFactors(f.a, f.b[:1], f.scale, f.layout)})
    with pytest.raises(LoraError, match=r"params/dense/kernel: A \(8, 2\) and B \(1, 4\)"):
        lorax_fn.merge(base, broken)
    with pytest.raises(LoraError, match="must be a dict"):
        lorax_fn.merge(base, [f])


# ------------------------------------------------------------------------ DoRA


def _dora_reference(w0, a, b, scale, m, in_axes):
    """DoRA by its definition, in NumPy-style jnp on the full weight (2-D or stacked)."""
    v = w0.astype(jnp.float32) + scale * (a @ b)
    norm = jnp.sqrt(jnp.sum(v * v, axis=in_axes, keepdims=True))
    return v * m[..., None, :] / jax.lax.stop_gradient(norm)


@pytest.mark.parametrize("stacked", [False, True])
def test_dora_merge_equals_the_definition_in_value_and_gradient(stacked):
    shape = (3, 10, 6) if stacked else (10, 6)
    w0 = jax.random.normal(KEY, shape)
    layouts = {"w": Layout((1,), (2,), (0,))} if stacked else None
    base, lt = lorax_fn.split(
        {"w": w0}, LoraSpec("w", rank=2, alpha=4, use_dora=True), key=KEY, layouts=layouts
    )
    assert lt["w"].magnitude.shape == shape[:-2] + shape[-1:]
    np.testing.assert_allclose(lorax_fn.merge(base, lt)["w"], w0, rtol=1e-5, atol=1e-6)
    lt = randomize_b(lt, std=0.5)

    def via_merge(f):
        return jnp.sum(jnp.sin(lorax_fn.merge(base, {"w": f})["w"]))

    def by_definition(f):
        return jnp.sum(jnp.sin(_dora_reference(w0, f.a, f.b, f.scale, f.magnitude, -2)))

    f = lt["w"]
    np.testing.assert_allclose(via_merge(f), by_definition(f), rtol=1e-5)
    got, want = jax.grad(via_merge)(f), jax.grad(by_definition)(f)
    for name in ("a", "b", "magnitude"):
        np.testing.assert_allclose(
            getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-5, err_msg=name
        )
    # The column norms of the merged weight are the magnitudes.
    merged = lorax_fn.merge(base, lt)["w"]
    np.testing.assert_allclose(
        lorax_fn.variants.dora.column_norms(merged, f.layout), f.magnitude, rtol=1e-5
    )


def test_dora_norms_without_the_merged_weight_and_on_transposed_layouts():
    # A torch-style (out, in) kernel with the stack axis in the middle.
    w0 = jax.random.normal(KEY, (6, 3, 10))
    layout = Layout(in_axes=(2,), out_axes=(0,), batch_axes=(1,))
    base, lt = lorax_fn.split(
        {"w": w0}, LoraSpec("w", rank=3, use_dora=True), key=KEY, layouts={"w": layout}
    )
    f = randomize_b(lt, std=0.7)["w"]
    v = w0 + lorax_fn.factors.delta(f)
    want = jnp.sqrt(jnp.sum(v * v, axis=2)).T  # (stack, out)
    np.testing.assert_allclose(lorax_fn.variants.dora.weight_norms(w0, f), want, rtol=1e-5)
    np.testing.assert_allclose(lorax_fn.variants.dora.column_norms(v, layout), want, rtol=1e-6)
    merged = lorax_fn.merge(base, {"w": f})["w"]
    np.testing.assert_allclose(merged, v * (f.magnitude / want).T[:, :, None], rtol=1e-5, atol=1e-6)


def test_dora_unmerge_needs_the_norms_and_then_returns_the_base():
    params = {"a": {"kernel": jax.random.normal(KEY, (8, 5))}, "b": {"kernel": jnp.ones((5, 4))}}
    spec = LoraSpec("**/kernel", rank=2, use_dora=True)
    base, lt = lorax_fn.split(params, spec, key=KEY)
    lt = randomize_b(lt, std=0.5)
    norms = lorax_fn.dora_norms(base, lt)
    merged = lorax_fn.merge(base, lt)
    with pytest.raises(LoraError, match=r"'a/kernel', 'b/kernel'.*dora_norms"):
        lorax_fn.unmerge(merged, lt)
    with pytest.raises(LoraError, match="a/kernel: norms have shape"):
        lorax_fn.unmerge(merged, lt, norms={**norms, "a/kernel": jnp.ones(3)})
    back = lorax_fn.unmerge(merged, lt, norms=norms, safe=True)
    jax.tree_util.tree_map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), back, base
    )
    with pytest.raises(LoraError, match="no DoRA entries"):
        lorax_fn.dora_norms(*lorax_fn.split(params, LoraSpec("**/kernel", rank=2), key=KEY))


def test_dora_refusals_and_spec_round_trip():
    base, lt = lorax_fn.split(
        {"w": jnp.ones((8, 4))}, LoraSpec("w", rank=2, use_dora=True), key=KEY
    )
    bad = {"w": lt["w"].with_extras(magnitude=jnp.ones(8))}
    with pytest.raises(LoraError, match=r"w: DoRA magnitude has shape \(8,\).*\(4,\)"):
        lorax_fn.merge(base, bad)
    with pytest.raises(LoraError, match="use_dora must be True or False"):
        LoraSpec("w", use_dora="yes")
    spec = LoraSpec("w", rank=2, use_dora=True)
    assert LoraSpec.from_json(spec.to_json()) == spec
    old = {k: v for k, v in spec.to_json().items() if k != "use_dora"}
    assert LoraSpec.from_json(old).use_dora is False


def test_dora_zero_column_stays_zero():
    w0 = jnp.zeros((4, 3)).at[:, 1].set(1.0)
    base, lt = lorax_fn.split({"w": w0}, LoraSpec("w", rank=1, use_dora=True), key=KEY)
    merged = lorax_fn.merge(base, lt, safe=True)["w"]
    np.testing.assert_array_equal(merged, w0)


def _dora_model():
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(jnp.tanh(nn.Dense(16)(x)))

    x = jax.random.normal(KEY, (5, 8))
    variables = MLP().init(KEY, x)
    spec = LoraSpec("**/kernel", rank=2, use_dora=True)
    base, lt = lorax_fn.split(variables, spec, key=KEY)
    return MLP().apply, base, randomize_b(lt, std=0.5), spec, x


def test_lora_on_a_dora_tree_equals_merge_then_call_factorized():
    apply, base, lt, _, x = _dora_model()
    g = lorax_fn.lora(apply, on_fallback="error")  # no weight is formed
    ref = lorax_fn.lora(apply, factorized=False)
    np.testing.assert_allclose(g(base, lt, x), ref(base, lt, x), rtol=1e-5, atol=1e-6)
    grads = [jax.grad(lambda t, f=f: jnp.sum(jnp.sin(f(base, t, x))))(lt) for f in (g, ref)]
    for got, want in zip(*(jax.tree_util.tree_leaves(gr) for gr in grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # The magnitude is trained: its gradient is not zero, and it changes the output.
    assert float(jnp.abs(grads[0]["params/Dense_1/kernel"].magnitude).max()) > 0
    plain = {p: f.plain() for p, f in lt.items()}
    assert not np.allclose(g(base, lt, x), g(base, plain, x), atol=1e-3)


def test_parts_that_cannot_hold_dora_refuse_it():
    _, _, lt, _, _ = _dora_model()
    # A weighted sum of DoRA adapters is not a DoRA adapter (the norms do not add).
    with pytest.raises(
        LoraError, match=r"combine \(adapter 0\): .*DoRA adapters \(variant 'dora'\) cannot be"
    ):
        lorax_fn.multi.combine([lt, lt], [0.5, 0.5])
    with pytest.raises(LoraError, match="DoRA"):
        lorax_fn.stack_adapters([lt, lt])


def test_dora_magnitude_is_counted_and_trained_without_lora_plus():
    _, base, lt, _, _ = _dora_model()
    counts = lorax_fn.count_params(base, lt)
    assert counts.trainable == 2 * (8 + 16) + 2 * (16 + 4) + 16 + 4
    assert "dora" in lorax_fn.summary(base, lt)
    labels = lorax_fn.optim.lora_labels(lt)
    assert labels["params/Dense_0/kernel"].magnitude == "lora_magnitude"
