"""The inits of lorax_fn.inits: each against merge-then-call and its own defining property.

- every init keeps the model at split (``lora(fn)(base, lt, x) == fn(params, x)``) on a
  plain, a stacked and a multi-axis kernel, and ``lora(fn)`` equals merge-then-call;
- OLoRA's B is orthonormal and A triangular (a QR); orthogonal's A·B is zero with A, B ≠ 0;
- LoftQ: one iteration is QLoRA's ``Q`` plus the best rank-r correction (Eckart–Young),
  more iterations lower ``‖W0 - (Q + s·A·B)‖``, the base is what ``quantize_base`` stores;
- base-rewriting inits travel through checkpoints with their record and refuse the
  original weights; the registry refuses unknown names and serves registered ones.
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_matches_merged, randomize_b

import lorax_fn
from lorax_fn import Layout, LoraError, LoraSpec, QuantizedArray
from lorax_fn.factors import delta
from lorax_fn.inits import Init, LoftQ, get, loftq_iterates, register, rewrites_base
from lorax_fn.quant import dequantize_base, quantize, quantize_base

KEY = jax.random.key(0)
LAYOUTS = {"stack": Layout((1,), (2,), (0,)), "query": Layout((0,), (1, 2))}
TARGETS = ["dense", "stack", "query"]


def spectrum(shape: tuple[int, ...], seed: int = 0) -> jax.Array:
    """Random matrices (the last two axes) with a decaying spectrum, like trained weights."""
    rng = np.random.default_rng(seed)
    m, n = shape[-2], shape[-1]
    k = min(m, n)
    u, _ = np.linalg.qr(rng.normal(size=(*shape[:-2], m, k)))
    v, _ = np.linalg.qr(rng.normal(size=(*shape[:-2], n, k)))
    s = 2.0 * np.arange(1, k + 1) ** -0.7
    return jnp.asarray((u * s) @ np.swapaxes(v, -1, -2), jnp.float32)


def make_params() -> dict:
    return {
        "dense": spectrum((32, 48)),
        "stack": spectrum((3, 48, 48), seed=1),
        "query": spectrum((48, 64), seed=2).reshape(48, 4, 16),
    }


def model(params: dict, x: jax.Array) -> jax.Array:
    h = x @ params["dense"]

    def layer(h, w):
        return jnp.tanh(h @ w), None

    h, _ = jax.lax.scan(layer, h, params["stack"])
    return jnp.einsum("bd,dhk->bhk", h, params["query"])


X = jax.random.normal(jax.random.key(9), (5, 32))


@pytest.mark.parametrize("init", ["gaussian", "kaiming_uniform", "orthogonal", "pissa", "olora"])
def test_every_init_starts_at_the_model_and_matches_merge_then_call(init):
    params = make_params()
    spec = LoraSpec(TARGETS, rank=4, alpha=8, init=init, layouts=LAYOUTS)
    base, lt = lorax_fn.split(params, spec, key=KEY)
    np.testing.assert_allclose(
        lorax_fn.lora(model)(base, lt, X), model(params, X), rtol=2e-5, atol=2e-5
    )
    merged = lorax_fn.merge(base, lt)
    for path in TARGETS:
        np.testing.assert_allclose(merged[path], params[path], rtol=1e-5, atol=1e-5)
        assert (base[path] is params[path]) is not get(init).rewrites_base, path
    assert_matches_merged(model, base, randomize_b(lt), X)


def test_olora_factors_are_a_thin_qr_per_matrix():
    params = make_params()
    spec = LoraSpec(TARGETS, rank=6, init="olora", layouts=LAYOUTS)
    base, lt = lorax_fn.split(params, spec, key=KEY)
    for layer in range(3):
        a, b = lt["stack"].a[layer], lt["stack"].b[layer]
        np.testing.assert_allclose(b @ b.T, jnp.eye(6), atol=2e-6)  # Q's columns
        assert float(jnp.abs(jnp.triu(a, 1)).max()) == 0.0  # A = R_rᵀ, R upper triangular
        # The residual is orthogonal to the part moved out: W0's other QR columns.
        moved = delta(lt["stack"])[layer]
        assert abs(float(jnp.vdot(moved, base["stack"][layer]))) < 1e-4 * float(
            jnp.linalg.norm(moved) * jnp.linalg.norm(base["stack"][layer])
        )
    b = np.asarray(lt["query"].b).reshape(6, 64)
    np.testing.assert_allclose(b @ b.T, np.eye(6), atol=2e-6)


def test_orthogonal_product_is_zero_with_both_factors_nonzero_per_layer():
    params = make_params()
    spec = LoraSpec(TARGETS, rank=6, init="orthogonal", layouts=LAYOUTS)
    base, lt = lorax_fn.split(params, spec, key=KEY)
    for path in TARGETS:
        f = lt[path]
        d = delta(f)
        assert float(jnp.abs(d).max()) < 1e-6 * float(jnp.abs(f.a).max() * jnp.abs(f.b).max())
        assert float(jnp.abs(f.a).max()) > 0.01 and float(jnp.abs(f.b).max()) > 0.01
        assert base[path] is params[path]
    # A stack gets its own orthogonal matrix per layer, as PEFT's per-layer Linears do.
    assert not np.allclose(lt["stack"].a[0], lt["stack"].a[1])
    with pytest.raises(LoraError, match=r"dense: init='orthogonal' needs an even rank"):
        lorax_fn.split(params, LoraSpec("dense", rank=3, init="orthogonal"), key=KEY)


# --------------------------------------------------------------------------- LoftQ


def frobenius(x) -> float:
    return float(jnp.linalg.norm(jnp.ravel(x)))


def test_loftq_one_iteration_is_qlora_plus_the_best_rank_r_correction():
    w = spectrum((64, 128))
    register(LoftQ(name="test_loftq_1", iters=1))
    spec = LoraSpec("w", rank=8, alpha=16, init="test_loftq_1")  # scale 2: A·B is divided
    qbase, lt = lorax_fn.split({"w": w}, spec, key=KEY)
    qlora = quantize(w, "nf4")
    np.testing.assert_array_equal(qbase["w"].codes, qlora.codes)
    residual = w - qlora.dequantize()
    tail = np.linalg.svd(np.asarray(residual), compute_uv=False)[8:]
    error = frobenius(w - lorax_fn.merge(qbase, lt)["w"])
    assert error == pytest.approx(float(np.sqrt(np.sum(tail**2))), rel=1e-4)
    assert error < 0.97 * frobenius(residual)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_loftq_error_falls_per_iteration_below_qlora(fmt):
    w = spectrum((128, 192), seed=3)
    layout = Layout((0,), (1,))
    quantizer = LoftQ(format=fmt).quantizer(layout)
    qlora = frobenius(w - quantizer(w).dequantize())
    steps = itertools.islice(loftq_iterates(w, layout, 16, 1.0, quantizer), 4)
    errors = [frobenius(w - q.dequantize() - a @ b) for q, a, b in steps]
    assert errors[0] < 0.97 * qlora
    assert all(later < earlier for earlier, later in itertools.pairwise(errors)), errors


def test_loftq_split_returns_the_quantized_base_quantize_base_would_store():
    params = make_params()
    register(LoftQ(name="test_loftq_int8", format="int8", iters=2))
    for init, fmt in (("loftq", "nf4"), ("test_loftq_int8", "int8")):
        spec = LoraSpec(TARGETS, rank=4, init=init, layouts=LAYOUTS)
        qbase, lt = lorax_fn.split(params, spec, key=KEY)
        plain = quantize_base(params, TARGETS, format=fmt, layouts=LAYOUTS)
        for path in TARGETS:
            q, want = qbase[path], plain[path]
            assert isinstance(q, QuantizedArray)
            assert (q.format, q.block_size, q.double_quant, q.scale.shape, q.codes.shape) == (
                want.format,
                want.block_size,
                want.double_quant,
                want.scale.shape,
                want.codes.shape,
            )
            loftq = frobenius(params[path] - lorax_fn.merge(qbase, lt)[path])
            assert loftq < 0.95 * frobenius(params[path] - want.dequantize()), (init, path)
        # The model on the quantized base, factorized, equals merge-then-call ...
        assert_matches_merged(model, qbase, randomize_b(lt), X, rtol=1e-4, atol=1e-4)
        # ... and starts nearer the float model than QLoRA's Q + 0.
        float_out = model(params, X)
        ours = lorax_fn.lora(model)(qbase, lt, X)
        qlora = model(dequantize_base(plain), X)
        assert frobenius(ours - float_out) < frobenius(qlora - float_out)


def test_loftq_with_dora_starts_at_q_plus_the_correction():
    params = make_params()
    spec = LoraSpec("dense", rank=4, init="loftq", use_dora=True)
    qbase, lt = lorax_fn.split(params, spec, key=KEY)
    want = qbase["dense"].dequantize() + delta(lt["dense"])
    np.testing.assert_allclose(lorax_fn.merge(qbase, lt)["dense"], want, rtol=1e-5, atol=1e-6)


def test_loftq_refusals_name_the_path():
    with pytest.raises(LoraError, match=r"w: init='loftq' quantizes the weight, and .*block_size"):
        lorax_fn.split({"w": jnp.ones((10, 6))}, LoraSpec("w", rank=2, init="loftq"), key=KEY)
    bad = jnp.ones((64, 64)).at[3, 3].set(jnp.nan)
    with pytest.raises(LoraError, match=r"w: has NaN or Inf values"):
        lorax_fn.split({"w": bad}, LoraSpec("w", rank=2, init="loftq"), key=KEY)
    with pytest.raises(LoraError, match=r"iters must be an int >= 1, got 0"):
        LoftQ(iters=0)
    with pytest.raises(LoraError, match=r"unknown format 'int4'"):
        LoftQ(format="int4")


# --------------------------------------------------------------------------- base records


@pytest.mark.parametrize("init, title", [("olora", "an OLoRA"), ("loftq", "a LoftQ")])
def test_base_rewriting_inits_refuse_the_original_weights(tmp_path, init, title):
    params = {"w": spectrum((64, 128))}
    spec = LoraSpec("w", rank=4, init=init)
    base, lt = lorax_fn.split(params, spec, key=KEY)
    assert lt["w"].pissa.init == init and rewrites_base(init)
    lorax_fn.save(tmp_path / "ad", lt, spec, base=base)
    restored = lorax_fn.restore(tmp_path / "ad", base=base)
    assert restored["w"].pissa == lt["w"].pissa
    for wrong in (params, quantize_base(params, "w")):
        with pytest.raises(LoraError, match=rf"is {title} adapter.*w \(it holds the original"):
            lorax_fn.restore(tmp_path / "ad", base=wrong)
    with pytest.raises(
        LoraError, match=rf"w: made by init='{init}', the spec says init='gaussian'"
    ):
        lorax_fn.save(tmp_path / "other", lt, LoraSpec("w", rank=4))
    with pytest.raises(LoraError, match=rf"an init='{init}' adapter is relative to the residual"):
        lorax_fn.export_peft(tmp_path / "peft", lt, spec)


def test_inits_that_keep_the_base_export_to_peft(tmp_path):
    params = {"w": spectrum((64, 128))}
    spec = LoraSpec("w", rank=4, init="orthogonal")
    _, lt = lorax_fn.split(params, spec, key=KEY)
    assert not rewrites_base("orthogonal") and lt["w"].pissa is None
    out = lorax_fn.export_peft(tmp_path / "peft", lt, spec, name_map={"w": "proj"})
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True  # PEFT's fresh layers are loaded over


# --------------------------------------------------------------------------- registry


def test_unknown_inits_are_refused_and_registered_ones_are_used():
    with pytest.raises(LoraError, match=r"unknown init 'xavier'; expected one of .*'olora'"):
        LoraSpec("w", init="xavier")
    with pytest.raises(LoraError, match=r"unknown init 'nope'; registered: \["):
        get("nope")

    @dataclasses.dataclass(frozen=True)
    class Constant(Init):
        name: str = "test_constant"

        def __call__(self, path, w, layout, rank, scale, spec, key):
            a_shape, b_shape = layout.shapes(w.shape, rank)
            a, b = jnp.full(a_shape, 0.5), jnp.zeros(b_shape)
            return lorax_fn.LoraFactors(a, b, scale, layout), w

    register(Constant())
    _, lt = lorax_fn.split(
        {"w": jnp.ones((8, 4))}, LoraSpec("w", init="test_constant", rank=2), key=KEY
    )
    np.testing.assert_array_equal(lt["w"].a, jnp.full((8, 2), 0.5))
    assert not rewrites_base("test_constant") and rewrites_base("never_registered")
    with pytest.raises(LoraError, match=r"expected a lorax_fn\.inits\.Init"):
        register(lambda *a: None)


# --------------------------------------------------------------------------- LoRA-GA


def test_lora_ga_starts_at_the_model_with_a_on_the_gradients_top_directions():
    params = make_params()
    spec = LoraSpec(TARGETS, rank=4, alpha=8, init="lora_ga", layouts=LAYOUTS)
    target = jax.random.normal(jax.random.key(3), (5, 4, 16))

    def loss(p, x):
        return jnp.mean((model(p, x) - target) ** 2)

    init = lorax_fn.inits.lora_ga(loss, params, spec, X)
    grads = jax.grad(loss)(params, X)  # merge-then-call: the full model's gradient
    for path in TARGETS:
        np.testing.assert_allclose(init.grads[path], grads[path], rtol=1e-5, atol=1e-8)
    register(init)
    try:
        base, lt = lorax_fn.split(params, spec, key=KEY)
    finally:
        register(lorax_fn.inits.LoraGA())
    np.testing.assert_allclose(lorax_fn.lora(model)(base, lt, X), model(params, X), atol=2e-5)
    assert lt["dense"].pissa.init == "lora_ga" and rewrites_base("lora_ga")
    for layer in range(3):  # per matrix of the stack: A = the top-4 left singular vectors
        a, g = lt["stack"].a[layer], grads["stack"][layer]
        np.testing.assert_allclose(a.T @ a, jnp.eye(4), atol=1e-5)
        top = np.linalg.svd(np.asarray(g), compute_uv=False)[:4]
        assert frobenius(g.T @ a) == pytest.approx(float(np.sqrt(np.sum(top**2))), rel=1e-4)
    assert_matches_merged(model, base, randomize_b(lt), X)


def test_lora_ga_refusals_name_the_path():
    params = {"w": spectrum((16, 8))}
    with pytest.raises(LoraError, match=r"w: init='lora_ga' needs this weight's gradient"):
        lorax_fn.split(params, LoraSpec("w", rank=2, init="lora_ga"), key=KEY)
    init = lorax_fn.inits.lora_ga(lambda p: jnp.sum(p["w"] ** 3), params, LoraSpec("w"))
    register(init)
    try:
        with pytest.raises(LoraError, match=r"w: init='lora_ga' takes 2·rank = 10 singular"):
            lorax_fn.split(params, LoraSpec("w", rank=5, init="lora_ga"), key=KEY)
    finally:
        register(lorax_fn.inits.LoraGA())
    with pytest.raises(LoraError, match=r"unknown direction 'AB'"):
        lorax_fn.inits.LoraGA(direction="AB")
