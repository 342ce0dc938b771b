"""EVA and CorDA: the inputs each adapted weight sees, collected in one pass of the function.

(a) the collected ``Σ xᵀx`` equals the one computed by hand (linen Dense, nn.scan stack);
(b) EVA's A spans the inputs' top principal directions and PEFT's rank redistribution;
(c) split keeps the model at init, and lora(fn) equals merge-then-call;
(d) parity with PEFT: CorDA's A, B and residual; EVA's ranks and subspaces.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_fn
from lorax_fn.errors import LoraError
from lorax_fn.inits import corda, eva, register
from lorax_fn.inits.eva import collect_inputs, rank_distribution


def _dense():
    model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(5)])
    xs = [jax.random.normal(jax.random.key(i), (7, 6)) for i in range(3)]
    return model, model.init(jax.random.key(9), xs[0]), xs


class _Block(nn.Module):
    @nn.compact
    def __call__(self, c, _):
        return nn.tanh(nn.Dense(6)(c)), None


class _Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return scan()(x, None)[0]


def _stack():
    model = _Stack()
    xs = [jax.random.normal(jax.random.key(10 + i), (2, 4, 6)) for i in range(2)]
    return model, model.init(jax.random.key(8), xs[0]), xs


SPEC = lorax_fn.LoraSpec("**/kernel", rank=2)


def test_dense_covariance_is_xtx_by_hand():
    model, v, xs = _dense()
    stats = collect_inputs(model.apply, v, SPEC, xs)
    p = v["params"]
    hidden = [jax.nn.relu(x @ p["layers_0"]["kernel"] + p["layers_0"]["bias"]) for x in xs]
    for path, inputs in (("params/layers_0/kernel", xs), ("params/layers_2/kernel", hidden)):
        st = stats[path]
        np.testing.assert_allclose(st.xtx, sum(x.T @ x for x in inputs), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(st.total, sum(x.sum(0) for x in inputs), rtol=1e-5, atol=1e-4)
        assert float(st.rows) == 21 and float(st.calls) == 3


def test_scan_covariance_per_layer_by_hand():
    model, v, xs = _stack()
    st = collect_inputs(model.apply, v, SPEC, xs)["params/Scan_Block_0/Dense_0/kernel"]
    p = v["params"]["Scan_Block_0"]["Dense_0"]
    want = np.zeros((3, 6, 6))
    for x in xs:
        c = x.reshape(-1, 6)
        for layer in range(3):
            want[layer] += np.asarray(c.T @ c)
            c = jnp.tanh(c @ p["kernel"][layer] + p["bias"][layer])
    np.testing.assert_allclose(st.xtx, want, rtol=1e-5, atol=1e-4)
    assert st.in_axes == (1,) and st.batch_axes == (0,)


def test_weight_read_otherwise_is_refused():
    params = {"w": jnp.ones((4, 4))}
    with pytest.raises(LoraError, match="reaches `transpose`"):
        collect_inputs(
            lambda p, x: x @ p["w"].T, params, lorax_fn.LoraSpec("w"), [jnp.ones((2, 4))]
        )


def test_eva_a_spans_the_top_principal_directions():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(12, 12)))[0]
    x = (rng.normal(size=(400, 12)) * np.geomspace(8, 0.1, 12)) @ basis.T
    params = {"w": jnp.asarray(rng.normal(size=(12, 6)), jnp.float32)}
    spec = lorax_fn.LoraSpec("w", rank=3, init="eva")
    init = eva(lambda p, x: x @ p["w"], params, spec, [jnp.asarray(x[:200]), jnp.asarray(x[200:])])
    register(init)
    _, lt = lorax_fn.split(params, init.adjusted(spec), key=jax.random.key(0))
    a = np.asarray(lt["w"].a)  # a single weight: it keeps its whole budget
    centered = x - x.mean(0)
    top = np.linalg.svd(centered, full_matrices=False)[2][:3].T
    np.testing.assert_allclose(a @ a.T, top @ top.T, atol=1e-4)
    assert float(jnp.abs(lt["w"].b).max()) == 0.0


def test_rank_redistribution_follows_peft_rule():
    ratios = {"a": np.array([0.7, 0.5, 0.4, 0.1]), "b": np.array([0.3, 0.1, 0.05, 0.01])}
    assert rank_distribution(ratios, {"a": 2, "b": 2}, rho=2.0) == {"a": 3, "b": 1}
    assert rank_distribution(ratios, {"a": 2, "b": 2}, rho=1.0) == {"a": 2, "b": 2}


def test_eva_redistributes_to_the_richer_input():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 8)) * np.array([5, 4, 3, 2, 1, 1, 1, 1])
    flat = rng.normal(size=(300, 8)) * np.array([9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    params = {"u": jnp.ones((8, 8)), "v": jnp.ones((8, 8))}
    fn = lambda p, x, y: x @ p["u"] + y @ p["v"]  # noqa: E731
    spec = lorax_fn.LoraSpec(("u", "v"), rank=2, init="eva")
    init = eva(fn, params, spec, [(jnp.asarray(x), jnp.asarray(flat))], rho=2.0)
    # v's input has one direction with ~100 % of its variance: the budget of 4 goes
    # u: 4 offered (ratios ~.45 .29 .16 .07), v: 1 big then tiny ones.
    assert int(init.ranks["u"]) == 3 and int(init.ranks["v"]) == 1
    register(init)
    with pytest.raises(LoraError, match=r"init\.adjusted"):
        lorax_fn.split(params, spec, key=jax.random.key(0))
    adjusted = init.adjusted(spec)
    _, lt = lorax_fn.split(params, adjusted, key=jax.random.key(0))
    assert lt["u"].a.shape == (8, 3) and lt["v"].a.shape == (8, 1)
    # the scale stays alpha/rank of the spec asked for (PEFT's adjust_scaling_factors)
    assert lt["u"].scale == lt["v"].scale == spec.scale_for("u")
    assert adjusted.rank_for("u") == 3 and adjusted.rank_for("v") == 1


@pytest.mark.parametrize("which", ["eva", "corda"])
@pytest.mark.parametrize("make", [_dense, _stack])
def test_model_at_init_and_lora_equals_merge(which, make):
    model, v, xs = make()
    spec = lorax_fn.LoraSpec("**/kernel", rank=2, init=which)
    init = register((eva if which == "eva" else corda)(model.apply, v, spec, xs))
    if which == "eva":
        spec = init.adjusted(spec)
    base, lt = lorax_fn.split(v, spec, key=jax.random.key(0), fn=model.apply, example_args=(xs[0],))
    merged = lorax_fn.merge(base, lt)
    for path, w in lorax_fn.paths.leaves_with_paths(v):
        got = dict(lorax_fn.paths.leaves_with_paths(merged))[path]
        np.testing.assert_allclose(got, w, atol=1e-5)
    if which == "corda":  # the base is the residual, the factors are not zero
        assert float(jnp.abs(lt[next(iter(lt))].b).max()) > 0
    # after a step away from init, lora(fn) is merge-then-call in values and gradients
    lt = jax.tree_util.tree_map(lambda a: a + 0.01, lt)

    def loss(lt, f):
        return jnp.sum(f(base, lt, xs[1]) ** 2)

    fact = lambda b, lt, x: lorax_fn.lora(model.apply)(b, lt, x)  # noqa: E731
    ref = lambda b, lt, x: model.apply(lorax_fn.merge(b, lt), x)  # noqa: E731
    np.testing.assert_allclose(loss(lt, fact), loss(lt, ref), rtol=1e-5)
    g1, g2 = jax.grad(loss)(lt, fact), jax.grad(loss)(lt, ref)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- PEFT


def parity_modules():
    """torch and peft; where CI installed them (LORAX_FN_REQUIRE_PARITY=1) a failed
    import fails the test instead of skipping it."""
    if os.environ.get("LORAX_FN_REQUIRE_PARITY") == "1":
        return importlib.import_module("torch"), importlib.import_module("peft")
    return pytest.importorskip("torch"), pytest.importorskip("peft")


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_matches_peft(method, monkeypatch):
    torch, peft = parity_modules()
    try:
        importlib.import_module("attr")
    except ImportError:  # PEFT's corda.py takes only attrs' dataclass (3 plain fields)
        monkeypatch.setitem(
            sys.modules, "attr", types.SimpleNamespace(dataclass=dataclasses.dataclass)
        )
    from peft.tuners.lora.corda import preprocess_corda

    rng = np.random.default_rng(3)
    w = rng.normal(size=(12, 10)).astype(np.float32)  # ours: (in, out)
    batches = [rng.normal(size=(16, 12)).astype(np.float32) * (1 + i) for i in range(3)]
    rank, alpha = 3, 6
    lin = torch.nn.Sequential(torch.nn.Linear(12, 10, bias=False))
    lin[0].weight.data = torch.tensor(w.T.copy())
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=["0"],
        init_lora_weights="corda",
        corda_config=peft.tuners.lora.config.CordaConfig(corda_method=method),
    )
    with torch.no_grad():
        preprocess_corda(
            lin, config, run_model=lambda: [lin(torch.tensor(b)[None]) for b in batches]
        )
        model = peft.get_peft_model(lin, config)
    layer = model.base_model.model[0]
    peft_a = layer.lora_A["default"].weight.detach().numpy().T
    peft_b = layer.lora_B["default"].weight.detach().numpy().T
    peft_base = layer.base_layer.weight.detach().numpy().T

    spec = lorax_fn.LoraSpec("w", rank=rank, alpha=alpha, init="corda")
    register(corda(lambda p, x: x @ p["w"], {"w": jnp.asarray(w)}, spec, batches, method=method))
    base, lt = lorax_fn.split({"w": jnp.asarray(w)}, spec, key=jax.random.key(0))
    top = np.abs(w).max()
    # each direction up to its sign (A's column and B's row flip together)
    signs = np.sign(np.sum(np.asarray(lt["w"].a) * peft_a, axis=0))
    np.testing.assert_allclose(
        np.asarray(lt["w"].a) * signs, peft_a, atol=1e-4 * max(1, np.abs(peft_a).max())
    )
    np.testing.assert_allclose(
        signs[:, None] * np.asarray(lt["w"].b), peft_b, atol=1e-4 * max(1, np.abs(peft_b).max())
    )
    np.testing.assert_allclose(base["w"], peft_base, atol=1e-4 * top)


def test_eva_matches_peft_ranks_and_subspaces():
    torch, peft = parity_modules()
    from peft.tuners.lora.eva import get_eva_state_dict

    rng = np.random.default_rng(4)
    w1 = rng.normal(size=(8, 8)).astype(np.float32)
    w2 = rng.normal(size=(8, 8)).astype(np.float32)
    scales = np.array([16, 8, 4, 2, 0.2, 0.1, 0.05, 0.05], np.float32)
    batches = [(rng.normal(size=(1024, 8)) * scales).astype(np.float32) for _ in range(6)]
    net = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False))
    net[0].weight.data, net[1].weight.data = torch.tensor(w1.T.copy()), torch.tensor(w2.T.copy())
    config = peft.LoraConfig(
        r=2,
        target_modules=["0", "1"],
        init_lora_weights="eva",
        eva_config=peft.tuners.lora.config.EvaConfig(rho=2.0),
    )
    loader = [torch.tensor(b)[None] for b in batches]
    state = get_eva_state_dict(
        net,
        loader,
        config,
        forward_fn=lambda m, x: m(x),
        prepare_model_inputs_fn=None,
        prepare_layer_inputs_fn=None,
        show_progress_bar=False,
    )

    params = {"0": jnp.asarray(w1), "1": jnp.asarray(w2)}
    fn = lambda p, x: (x @ p["0"]) @ p["1"]  # noqa: E731
    init = eva(fn, params, lorax_fn.LoraSpec(("0", "1"), rank=2), batches, rho=2.0)
    for name in ("0", "1"):
        theirs = state[name].numpy().T  # (in, r)
        ours = init.a[name][:, : int(init.ranks[name])]
        assert ours.shape == theirs.shape, name
        # the same subspace: projections agree (IPCA converges to the exact PCA)
        np.testing.assert_allclose(ours @ ours.T, theirs @ theirs.T, atol=0.05)
