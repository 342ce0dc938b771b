"""combine's merging methods (TIES, DARE, magnitude pruning, linear): the rules by hand,
their statistics, the factors they return, one layer at a time, and parity with PEFT."""

from __future__ import annotations

import importlib
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_fn
from lorax_fn import Layout, LoraError, LoraFactors
from lorax_fn.factors import delta
from lorax_fn.multi import combine
from lorax_fn.multi.merging import merge_task_tensors

# A scan-stacked multi-axis kernel: (layers=4, d=6, heads=2, head_dim=5), fan-in d.
STACKED = Layout((1,), (2, 3), (0,))
SHAPE = (4, 6, 2, 5)
WEIGHTS = (0.7, -0.4)


def factors(rank, scale, seed, layout=STACKED, shape=SHAPE):
    rng = np.random.default_rng(seed)
    a_shape, b_shape = layout.shapes(shape, rank)
    return LoraFactors(
        jnp.asarray(rng.normal(size=a_shape), jnp.float32),
        jnp.asarray(rng.normal(size=b_shape), jnp.float32),
        scale,
        layout,
    )


@pytest.fixture(scope="module")
def trees():
    return [{"q": factors(3, 2.0, 0)}, {"q": factors(3, 0.5, 1)}]


def layer_deltas(trees, path="q"):
    """Each adapter's ΔW (scale included) per stacked layer, as (n, layers, fan_in, fan_out)."""
    return np.stack([np.asarray(delta(t[path])).reshape(4, 6, 10) for t in trees])


def matrices(entry):
    return np.asarray(delta(entry), np.float64).reshape(4, 6, 10)


# --------------------------------------------------------------------------- the rules


# Worked by hand, density 0.6 keeps int(0.6·5) = 3 entries per task:
#   t1 = [4, -1, 2, -3, 5]  -> trimmed [4, 0, 0, -3, 5]
#   t2 = [-2, 3, 1, -5, -6] -> trimmed [0, 3, 0, -5, -6]
# "total" elects the sign of t1 + t2 = [4, 3, 0, -8, -1] -> [+, +, +(tie), -, -];
# "frequency" the sign of the sign sum [1, 1, 0, -2, 0] -> [+, +, +, -, +(tie)].
# Weighted by (1, 0.5): [4, 0, 0, -3, 5] and [0, 1.5, 0, -2.5, -3]; each entry averages the
# agreeing ones: entry 3 has two, (-3 - 2.5)/2; entry 4 keeps t2's -3 ("total") or t1's 5.
@pytest.mark.parametrize(
    "sign_method, want",
    [("total", [4.0, 1.5, 0.0, -2.75, -3.0]), ("frequency", [4.0, 1.5, 0.0, -2.75, 5.0])],
)
def test_ties_trims_elects_a_sign_and_averages_the_agreeing_entries(sign_method, want):
    tasks = jnp.array([[4.0, -1.0, 2.0, -3.0, 5.0], [-2.0, 3.0, 1.0, -5.0, -6.0]])
    got = merge_task_tensors(
        tasks, jnp.array([1.0, 0.5]), "ties", density=0.6, majority_sign_method=sign_method
    )
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.9])
def test_magnitude_prune_keeps_exactly_the_top_density_fraction(density):
    rng = np.random.default_rng(0)
    tasks = rng.normal(size=(3, 7, 9)).astype(np.float32)
    weights = np.array([1.0, -2.0, 0.5], np.float32)
    got = np.asarray(
        merge_task_tensors(
            jnp.asarray(tasks), jnp.asarray(weights), "magnitude_prune", density=density
        )
    )
    # One task at a time (weight 1) shows what each keeps.
    for task in tasks:
        kept = np.asarray(
            merge_task_tensors(
                jnp.asarray(task[None]), jnp.ones(1), "magnitude_prune", density=density
            )
        )
        on = kept != 0
        assert on.sum() == int(density * task.size)
        np.testing.assert_array_equal(kept[on], task[on])  # kept entries are unchanged
        assert np.abs(task[on]).min() > np.abs(task[~on]).max()  # and they are the largest
    threshold = np.sort(np.abs(tasks).reshape(3, -1), axis=1)[:, -int(density * 63)]
    pruned = np.where(np.abs(tasks) >= threshold[:, None, None], tasks, 0.0)
    np.testing.assert_allclose(got, np.einsum("n,nij->ij", weights, pruned), rtol=1e-6)


def test_dare_rescaling_keeps_the_expectation():
    # Each entry of one draw is t·m/p with m ~ Bernoulli(p): mean t, variance t²(1-p)/p. The
    # mean of N draws is within 5 standard errors |t|·√((1-p)/(pN)) of t for all 2·64
    # entries (two-sided 5σ: p ≈ 6e-7 each). Without the 1/p rescaling the mean would be
    # p·t, 0.7·|t| off, against a tolerance of 0.12·|t| here.
    p, n_draws = 0.3, 4000
    rng = np.random.default_rng(1)
    tasks = jnp.asarray(rng.normal(size=(2, 64)), jnp.float32)
    weights = jnp.array([1.0, -0.5])
    keys = jax.random.split(jax.random.key(0), n_draws)
    draws = jax.vmap(lambda k: merge_task_tensors(tasks, weights, "dare_linear", density=p, key=k))(
        keys
    )
    want = np.asarray(weights @ tasks)
    err = np.sqrt(np.asarray(weights**2 @ tasks**2) * (1 - p) / (p * n_draws))
    assert np.all(np.abs(np.asarray(draws.mean(0)) - want) <= 5 * err)
    # One task alone shows the mask: every entry is 0 or t/p, a fraction p of them kept.
    one = jax.vmap(
        lambda k: merge_task_tensors(tasks[:1], jnp.ones(1), "dare_linear", density=p, key=k)
    )(keys[:200])
    one = np.asarray(one)
    t = np.broadcast_to(np.asarray(tasks[0]) / p, one.shape)
    assert np.all((one == 0) | np.isclose(one, t, rtol=1e-6))
    # 12 800 Bernoulli(0.3) draws: standard error 0.004, so 0.02 is 5σ.
    assert abs((one != 0).mean() - p) < 0.02


# --------------------------------------------------------------------------- combine


@pytest.mark.parametrize(
    "method, density", [("ties_svd", 0.3), ("magnitude_prune_svd", 0.5), ("ties_svd", 1.0)]
)
def test_delta_methods_return_factors_of_the_rule_on_each_layers_delta(trees, method, density):
    deltas = layer_deltas(trees)
    rule = method.removesuffix("_svd")
    want = np.asarray(
        jax.vmap(
            lambda t: merge_task_tensors(t, jnp.asarray(WEIGHTS), rule, density=density),
            in_axes=1,
        )(jnp.asarray(deltas))
    )
    # Full rank (min(fan_in, fan_out) = 6) reproduces the rule's ΔW exactly...
    full = combine(trees, WEIGHTS, method=method, rank=6, density=density)["q"]
    assert full.scale == 1.0 and full.layout == STACKED and full.a.shape == (4, 6, 6)
    np.testing.assert_allclose(matrices(full), want, rtol=1e-5, atol=1e-5)
    # ...and rank 2 is its best rank-2 approximation (Eckart–Young), per layer.
    u, s, vh = np.linalg.svd(want.astype(np.float64), full_matrices=False)
    best = np.einsum("lik,lk,lkj->lij", u[..., :2], s[..., :2], vh[..., :2, :])
    np.testing.assert_allclose(
        matrices(combine(trees, WEIGHTS, method=method, rank=2, density=density)["q"]),
        best,
        rtol=1e-4,
        atol=1e-4,
    )
    # The default rank is the adapters' largest.
    assert combine(trees, WEIGHTS, method=method, density=density)["q"].rank == 3


@pytest.mark.parametrize(
    "method, density", [("linear", None), ("ties", 0.4), ("magnitude_prune", 0.6)]
)
def test_factor_methods_apply_the_rule_to_the_as_and_to_the_bs(trees, method, density):
    scaled = np.array([w * t["q"].scale for w, t in zip(WEIGHTS, trees, strict=True)])
    w_a, w_b = np.sign(scaled) * np.sqrt(np.abs(scaled)), np.sqrt(np.abs(scaled))
    out = combine(trees, WEIGHTS, method=method, density=density)["q"]
    assert out.rank == 3 and out.scale == 1.0
    for name, w in (("a", w_a), ("b", w_b)):
        stacked = jnp.stack([getattr(t["q"], name) for t in trees])
        want = jax.vmap(
            lambda t, w: merge_task_tensors(t, w, method, density=density), in_axes=(1, None)
        )(stacked, jnp.asarray(w))
        np.testing.assert_allclose(np.asarray(getattr(out, name)), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["dare_linear_svd", "dare_ties_svd"])
def test_dare_on_delta_masks_each_layers_delta(method):
    # One adapter: at full rank every entry of ΔW is 0 or w·ΔW/p (dare_ties: a lone task
    # always agrees with itself), and about 1-p of them are dropped.
    one = [{"q": factors(3, 2.0, 0)}]
    p = 0.4
    got = matrices(
        combine(one, [0.5], method=method, rank=6, density=p, key=jax.random.key(3))["q"]
    )
    full = 0.5 * layer_deltas(one)[0] / p
    kept = np.isclose(got, full, rtol=1e-4, atol=1e-5)
    assert np.all(kept | (np.abs(got) < 1e-5))
    assert abs(kept.mean() - p) < 0.1  # 240 entries: standard error 0.03


def test_dare_masks_are_keyed_and_differ_per_weight_layer_and_factor():
    same = factors(3, 1.0, 0, Layout((1,), (2,), (0,)), (2, 6, 6))
    twin = LoraFactors(  # both layers equal: only the mask can tell them apart
        jnp.stack([same.a[0], same.a[0]]), jnp.stack([same.b[0], same.b[0]]), 1.0, same.layout
    )
    trees = [{"p": twin, "r": twin}, {"p": twin, "r": twin}]

    def run(method, key):
        out = combine(trees, [1.0, 1.0], method=method, density=0.5, key=key)
        return {path: (np.asarray(f.a), np.asarray(f.b)) for path, f in out.items()}

    for method in ("dare_linear", "dare_ties_svd"):
        one, again = run(method, jax.random.key(0)), run(method, jax.random.key(0))
        other = run(method, jax.random.key(1))
        np.testing.assert_array_equal(one["p"][0], again["p"][0])
        assert not np.allclose(one["p"][0], other["p"][0])
        assert not np.allclose(one["p"][0], one["r"][0])  # per weight
        assert not np.allclose(one["p"][0][0], one["p"][0][1])  # per layer
    # On the factors, A and B get their own masks: A's kept pattern is not B's transposed.
    a, b = run("dare_linear", jax.random.key(0))["p"]
    assert not np.array_equal(a[0] != 0, b[0].T != 0)


def test_delta_is_formed_one_layer_at_a_time():
    # 8 layers, 2 adapters: one layer's two ΔWs are 2·6·10 entries, all layers' 8·6·10.
    trees = [{"q": factors(3, 1.0, s, shape=(8, 6, 2, 5))} for s in (0, 1)]
    closed = jax.make_jaxpr(
        lambda ts: combine(ts, WEIGHTS, method="ties_svd", rank=2, density=0.5)
    )(trees)

    def sizes(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (math.prod(v.aval.shape) for v in eqn.outvars)
            for param in eqn.params.values():
                for sub in param if isinstance(param, tuple | list) else (param,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        yield from sizes(inner)

    largest = max(sizes(closed.jaxpr))
    assert 2 * 6 * 10 <= largest < 8 * 6 * 10


def test_combined_adapter_is_an_ordinary_lora_tree(trees):
    params = {"q": jax.random.normal(jax.random.key(0), SHAPE)}
    x = jax.random.normal(jax.random.key(1), (4, 3, 6))

    def fn(p, x):  # a scanned attention-style projection, one layer per step
        return jax.lax.scan(
            lambda c, wx: (c, jnp.einsum("td,dhk->thk", wx[1], wx[0])), 0, (p["q"], x)
        )[1]

    for method in ("ties_svd", "ties"):
        combined = combine(trees, WEIGHTS, method=method, density=0.5)
        got = lorax_fn.lora(fn, on_fallback="error")(params, combined, x)
        want = fn(lorax_fn.merge(params, combined), x)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_refusals(trees):
    uneven = [trees[0], {"q": factors(2, 1.0, 5)}]
    cases = [
        (dict(method="ties"), r"ties needs 0 < density <= 1 \(the fraction kept\), got None"),
        (dict(method="ties_svd", density=1.5), "ties needs 0 < density <= 1"),
        (dict(method="magnitude_prune", density=0.0), "magnitude_prune needs 0 < density"),
        (dict(method="linear", density=0.5), "linear prunes nothing, so density=0.5"),
        (dict(method="svd", density=0.5), "linear prunes nothing"),
        (dict(method="dare_ties", density=0.5), "dare_ties drops entries at random: pass key"),
        (dict(method="ties", density=0.5, key=jax.random.key(0)), "ties is deterministic"),
        (
            dict(method="ties", density=0.5, majority_sign_method="mean"),
            "majority_sign_method must be 'total' or 'frequency'",
        ),
        (dict(method="ties", density=0.5, rank=2), "method='ties' keeps the adapters' common rank"),
        (dict(method="ties_svd", density=0.5, rank=7), r"q: rank 7 > min\(fan_in, fan_out\) = 6"),
    ]
    for kwargs, message in cases:
        with pytest.raises(LoraError, match=message):
            combine(trees, WEIGHTS, **kwargs)
    with pytest.raises(LoraError, match=r"q: method='ties' .* they have \[2, 3\]. Use 'ties_svd'"):
        combine(uneven, WEIGHTS, method="ties", density=0.5)
    with pytest.raises(LoraError, match=r"they have \[2, 3\]. Use 'svd' or 'cat'"):
        combine(uneven, WEIGHTS, method="linear")
    assert combine(uneven, WEIGHTS, method="ties_svd", density=0.5)["q"].rank == 3


# --------------------------------------------------------------------------- PEFT parity

L, IN, OUT, R = 3, 6, 5, 3
ALPHAS = {"one": 6.0, "two": 1.5}  # scales 2 and 0.5
TARGETS = [f"layers.{i}" for i in range(L)] + ["head"]


def parity_modules():
    """torch and peft; where CI installed them (LORAX_FN_REQUIRE_PARITY=1) a failed
    import fails the test instead of skipping it."""
    if os.environ.get("LORAX_FN_REQUIRE_PARITY") == "1":
        return importlib.import_module("torch"), importlib.import_module("peft")
    return pytest.importorskip("torch"), pytest.importorskip("peft")


def parity_trees():
    """Two rank-R adapters: a stack of L Linear(IN, OUT) layers and an unstacked head."""
    rng = np.random.default_rng(7)
    out = []
    for alpha in ALPHAS.values():
        normal = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
        out.append(
            {
                "layers": LoraFactors(
                    normal(L, IN, R), normal(L, R, OUT), alpha / R, Layout((1,), (2,), (0,))
                ),
                "head": LoraFactors(normal(OUT, R), normal(R, IN), alpha / R, Layout((0,), (1,))),
            }
        )
    return out


def peft_model(torch, peft, trees):
    """The same two adapters in PEFT: lora_A is our Aᵀ (r, in), lora_B our Bᵀ (out, r)."""

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(
                torch.nn.Linear(IN, OUT, bias=False) for _ in range(L)
            )
            self.head = torch.nn.Linear(OUT, IN, bias=False)

    names = list(ALPHAS)
    configs = {
        n: peft.LoraConfig(r=R, lora_alpha=a, target_modules=TARGETS) for n, a in ALPHAS.items()
    }
    model = peft.get_peft_model(Model(), configs[names[0]], adapter_name=names[0])
    model.add_adapter(names[1], configs[names[1]])
    inner = model.base_model.model
    modules = {f"layers.{i}": (inner.layers[i], "layers", i) for i in range(L)}
    modules["head"] = (inner.head, "head", None)
    with torch.no_grad():
        for module, path, layer in modules.values():
            for name, tree in zip(names, trees, strict=True):
                a, b = (
                    np.asarray(x if layer is None else x[layer])
                    for x in (tree[path].a, tree[path].b)
                )
                module.lora_A[name].weight.copy_(torch.from_numpy(a.T.copy()))
                module.lora_B[name].weight.copy_(torch.from_numpy(b.T.copy()))
    return model, names, modules


@pytest.mark.parametrize(
    "method, options",
    [
        ("linear", {}),
        ("ties", {"density": 0.5}),
        ("ties", {"density": 0.4, "majority_sign_method": "frequency"}),
        ("magnitude_prune", {"density": 0.5}),
        ("dare_ties", {"density": 1.0}),  # PEFT's only deterministic DARE: nothing dropped
        ("svd", {}),
        ("ties_svd", {"density": 0.4}),
        ("ties_svd", {"density": 0.6, "majority_sign_method": "frequency"}),
        ("magnitude_prune_svd", {"density": 0.6}),
    ],
)
def test_peft_add_weighted_adapter_parity(method, options):
    torch, peft = parity_modules()
    trees = parity_trees()
    model, names, modules = peft_model(torch, peft, trees)
    weights = [0.7, -0.4]
    model.add_weighted_adapter(names, weights, "merged", combination_type=method, **options)
    key = jax.random.key(0) if method.startswith("dare") else None
    ours = combine(trees, weights, method=method, key=key, **options)
    for module, path, layer in modules.values():
        want = module.get_delta_weight("merged").detach().numpy().T  # PEFT's ΔW is (out, in)
        got = np.asarray(delta(ours[path]))
        got = got if layer is None else got[layer]
        # Measured ≤ 1e-7 for the factor methods, ≤ 1e-6 after an SVD (float32).
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want), (method, path)


def test_two_stack_axes_a_path_of_one_adapter_and_the_dtype():
    # Experts × layers stacked (two batch axes), bfloat16 factors, and a path that only the
    # first adapter targets: there the rule merges that adapter alone (as PEFT does).
    layout, shape = Layout((2,), (3,), (0, 1)), (2, 3, 6, 5)
    one = factors(2, 1.5, 0, layout, shape)
    one = LoraFactors(one.a.astype(jnp.bfloat16), one.b.astype(jnp.bfloat16), 1.5, layout)
    two = factors(2, 0.5, 1, layout, shape)
    two = LoraFactors(two.a.astype(jnp.bfloat16), two.b.astype(jnp.bfloat16), 0.5, layout)
    solo = factors(2, 2.0, 2)
    out = combine(
        [{"e": one, "q": solo}, {"e": two}], WEIGHTS, method="ties_svd", rank=5, density=0.5
    )
    assert out["e"].a.dtype == jnp.bfloat16 and out["e"].a.shape == (2, 3, 6, 5)
    # Each (expert, layer) on its own: (2 tasks, 6 pairs, 6, 5).
    deltas = jnp.stack([delta(f) for f in (one, two)]).reshape(2, 6, 6, 5)
    per_pair = jax.vmap(
        lambda t, w: merge_task_tensors(t, w, "ties", density=0.5), in_axes=(1, None)
    )
    want = per_pair(deltas, jnp.asarray(WEIGHTS)).reshape(2, 3, 6, 5)
    np.testing.assert_allclose(delta(out["e"]), want, rtol=2e-2, atol=2e-2)  # bfloat16
    full_q = combine([{"q": solo}, {}], WEIGHTS, method="ties_svd", rank=6, density=0.5)["q"]
    want_q = per_pair(delta(solo).reshape(1, 4, 6, 10), jnp.asarray(WEIGHTS[:1]))
    np.testing.assert_allclose(matrices(full_q), want_q, rtol=1e-5, atol=1e-5)


def test_traced_weights_under_jit(trees):
    run = jax.jit(lambda w: delta(combine(trees, w, method="ties_svd", density=0.5)["q"]))
    np.testing.assert_allclose(
        run(jnp.asarray(WEIGHTS)),
        delta(combine(trees, WEIGHTS, method="ties_svd", density=0.5)["q"]),
        rtol=1e-5,
        atol=1e-5,
    )


def test_a_density_array_and_a_raw_uint32_key_are_accepted(trees):
    # The options become static arguments of jitted kernels: a 0-d array must not break that.
    by_array = combine(trees, WEIGHTS, method="ties", density=jnp.asarray(0.5))
    np.testing.assert_array_equal(
        by_array["q"].a, combine(trees, WEIGHTS, method="ties", density=0.5)["q"].a
    )
    raw = combine(trees, WEIGHTS, method="dare_ties", density=0.5, key=jax.random.PRNGKey(0))
    assert raw["q"].a.shape == (4, 6, 3) and np.isfinite(np.asarray(raw["q"].a)).all()
