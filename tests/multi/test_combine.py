"""combine: a weighted sum of adapters, exact ("cat") or truncated by SVD ("svd")."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_fn
from lorax_fn import Layout, LoraError, LoraFactors

# A scan-stacked multi-axis kernel: (layers=3, d=6, heads=2, head_dim=4), fan-in d.
STACKED = Layout((1,), (2, 3), (0,))
SHAPE = (3, 6, 2, 4)


def factors(rank, scale, seed, layout=STACKED, shape=SHAPE):
    rng = np.random.default_rng(seed)
    a_shape, b_shape = layout.shapes(shape, rank)
    return LoraFactors(
        jnp.asarray(rng.normal(size=a_shape), jnp.float32),
        jnp.asarray(rng.normal(size=b_shape), jnp.float32),
        scale,
        layout,
    )


def matrices(delta):
    """ΔW per stacked layer as (fan_in, fan_out) matrices."""
    return np.asarray(delta, np.float64).reshape(3, 6, 8)


@pytest.fixture(scope="module")
def trees():
    return [
        {"q": factors(1, 2.0, 0), "v": factors(2, 0.5, 1, Layout((0,), (1,)), (5, 7))},
        {"q": factors(2, 1.5, 2)},
        {"q": factors(3, 1.0, 3), "v": factors(1, 4.0, 4, Layout((0,), (1,)), (5, 7))},
    ]


WEIGHTS = (0.7, -0.4, 1.3)


def weighted_sum(trees, path):
    return sum(
        w * lorax_fn.factors.delta(t[path])
        for w, t in zip(WEIGHTS, trees, strict=True)
        if path in t
    )


def test_cat_is_exact_and_ranks_add_up(trees):
    out = lorax_fn.multi.combine(trees, WEIGHTS)
    assert out["q"].rank == 6 and out["v"].rank == 3  # "v" only in adapters 0 and 2
    assert out["q"].scale == 1.0 and out["q"].layout == STACKED
    for path in ("q", "v"):
        np.testing.assert_allclose(
            lorax_fn.factors.delta(out[path]), weighted_sum(trees, path), rtol=1e-5, atol=1e-5
        )


def test_cat_is_differentiable_in_the_weights(trees):
    def total(w):
        return jnp.sum(lorax_fn.factors.delta(lorax_fn.multi.combine(trees, w)["q"]))

    grad = jax.grad(total)(jnp.asarray(WEIGHTS))
    want = [float(jnp.sum(lorax_fn.factors.delta(t["q"]))) for t in trees]
    np.testing.assert_allclose(grad, want, rtol=1e-5)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_svd_is_the_best_rank_k_approximation_per_layer(trees, rank):
    out = lorax_fn.multi.combine([{"q": t["q"]} for t in trees], WEIGHTS, method="svd", rank=rank)
    assert out["q"].a.shape == (3, 6, rank) and out["q"].b.shape == (3, rank, 2, 4)
    got = matrices(lorax_fn.factors.delta(out["q"]))
    full = matrices(weighted_sum(trees, "q"))
    u, s, vh = np.linalg.svd(full, full_matrices=False)
    best = np.einsum("lik,lk,lkj->lij", u[..., :rank], s[..., :rank], vh[..., :rank, :])
    np.testing.assert_allclose(got, best, rtol=1e-4, atol=1e-4)
    # Eckart–Young: the error is exactly the dropped singular values.
    np.testing.assert_allclose(
        np.linalg.norm(full - got, axis=(1, 2)),
        np.sqrt((s[:, rank:] ** 2).sum(-1)),
        rtol=1e-3,
        atol=1e-4,
    )
    # Balanced factors: A and B carry √σ each.
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(out["q"].a), axis=1) ** 2, s[:, :rank], rtol=1e-4
    )


def test_svd_default_rank_is_the_largest_adapter_rank(trees):
    out = lorax_fn.multi.combine(trees, WEIGHTS, method="svd")
    assert out["q"].rank == 3 and out["v"].rank == 2


def test_combined_adapter_is_an_ordinary_lora_tree(trees):
    params = {"q": jax.random.normal(jax.random.key(0), SHAPE)}
    x = jax.random.normal(jax.random.key(1), (3, 5, 6))

    def fn(p, x):  # a scanned attention-style projection, one layer per step
        return jax.lax.scan(
            lambda c, wx: (c, jnp.einsum("td,dhk->thk", wx[1], wx[0])), 0, (p["q"], x)
        )[1]

    only_q = [{"q": t["q"]} for t in trees]
    combined = lorax_fn.multi.combine(only_q, WEIGHTS)
    got = lorax_fn.lora(fn, on_fallback="error")(params, combined, x)
    want = fn({"q": params["q"] + weighted_sum(trees, "q")}, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    stack = lorax_fn.stack_adapters([combined, only_q[0]])
    assert stack.entries["q"].a.shape == (2, 3, 6, 6)


def test_refusals(trees):
    with pytest.raises(LoraError, match="one weight per adapter: 3 adapters, 2 weights"):
        lorax_fn.multi.combine(trees, [1.0, 1.0])
    with pytest.raises(LoraError, match="method must be"):
        lorax_fn.multi.combine(trees, WEIGHTS, method="mean")
    with pytest.raises(LoraError, match="method='cat' keeps every rank"):
        lorax_fn.multi.combine(trees, WEIGHTS, rank=2)
    with pytest.raises(
        LoraError, match=r"v: rank 4 > min\(concatenated rank, fan_in, fan_out\) = 3"
    ):
        lorax_fn.multi.combine(trees, WEIGHTS, method="svd", rank=4)
    with pytest.raises(LoraError, match="rank must be a positive integer"):
        lorax_fn.multi.combine(trees, WEIGHTS, method="svd", rank=0)
    with pytest.raises(LoraError, match="bias: adapter 1 trains this leaf in full"):
        lorax_fn.multi.combine([trees[0], {**trees[1], "bias": jnp.zeros(3)}], [1.0, 1.0])
    other = {"q": factors(2, 1.0, 5, Layout((1,), (2, 3), (0,)), (3, 6, 4, 2))}
    with pytest.raises(LoraError, match=r"q: adapters disagree: .* for a weight of \(3, 6, 2, 4\)"):
        lorax_fn.multi.combine([trees[1], other], [1.0, 1.0])


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_dropout_is_kept_when_the_adapters_agree_and_refused_when_not(trees, method):
    with_dropout = [{p: dataclasses.replace(f, dropout=0.1) for p, f in t.items()} for t in trees]
    out = lorax_fn.multi.combine(with_dropout, WEIGHTS, method=method)
    assert {p: f.dropout for p, f in out.items()} == {"q": 0.1, "v": 0.1}
    mixed = [with_dropout[0], trees[1], with_dropout[2]]
    with pytest.raises(
        LoraError, match=r"q: adapters disagree on dropout \(adapter 0: 0.1, adapter 1: 0, "
    ):
        lorax_fn.multi.combine(mixed, WEIGHTS, method=method)
    # Per path, only the adapters that target it count.
    per_path = [{"v": with_dropout[0]["v"]}, {"q": trees[1]["q"]}, {"v": with_dropout[2]["v"]}]
    out = lorax_fn.multi.combine(per_path, WEIGHTS, method=method)
    assert {p: f.dropout for p, f in out.items()} == {"q": 0.0, "v": 0.1}
