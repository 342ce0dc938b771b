"""Parity with PEFT's inits on the same weights: OLoRA, PiSSA, orthogonal.

Each test builds a ``torch.nn.Linear`` holding the same ``W0``, lets PEFT initialise it
(``get_peft_model`` with ``init_lora_weights=...``) and compares ``lora_A.weight`` (our
``Aᵀ``), ``lora_B.weight`` (our ``Bᵀ``) and the base PEFT leaves (our base leaf,
transposed) with :func:`lorax_fn.split`. Multi-axis and stacked kernels are compared
matrix by matrix with a ``Linear`` per layer. PEFT's orthogonal init draws from torch's
generator; the test replays the same draws into :func:`lorax_fn.inits.orthogonal_factors`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_fn
from lorax_fn import Layout, LoraSpec

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

KEY = jax.random.key(0)
# float32 QR/SVD from two LAPACK builds: relative to the largest entry.
RTOL = 5e-5


def spectrum_weight(fan_in: int, fan_out: int, seed: int = 0) -> np.ndarray:
    """A weight with a decaying spectrum (so the top-r directions are well separated)."""
    rng = np.random.default_rng(seed)
    k = min(fan_in, fan_out)
    u, _ = np.linalg.qr(rng.normal(size=(fan_in, k)))
    v, _ = np.linalg.qr(rng.normal(size=(fan_out, k)))
    return ((u * (3.0 * 0.8 ** np.arange(k))) @ v.T).astype(np.float32)


def peft_linear(w0: np.ndarray, rank: int, alpha: float, init, **config):
    """PEFT's LoRA Linear for the (in, out) kernel ``w0``: its layer after the init."""
    model = torch.nn.Sequential(torch.nn.Linear(w0.shape[0], w0.shape[1], bias=False))
    model[0].weight.data = torch.tensor(np.ascontiguousarray(w0.T))
    cfg = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=["0"], init_lora_weights=init, **config
    )
    return peft.get_peft_model(model, cfg).base_model.model[0]


def peft_arrays(layer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PEFT's (A, B, base) in lorax_fn's orientation, float32."""
    a = layer.lora_A["default"].weight.detach().float().numpy().T
    b = layer.lora_B["default"].weight.detach().float().numpy().T
    base = layer.base_layer.weight.detach().float().numpy().T
    return a, b, base


def close(ours, theirs, rtol: float = RTOL) -> None:
    ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
    assert ours.shape == theirs.shape
    err = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    assert err < rtol, f"max error {err:.2e} of the largest entry"


def align_signs(a, b, peft_a):
    """SVD directions are defined up to sign: flip ours to PEFT's, per rank index."""
    sign = np.sign(np.sum(np.asarray(a) * peft_a, axis=0))
    return np.asarray(a) * sign, np.asarray(b) * sign[:, None]


@pytest.mark.parametrize(
    "fan_in, fan_out, rank, alpha, rslora",
    [(48, 32, 4, 8, False), (32, 80, 8, 8, False), (64, 64, 6, 3, True)],
)
def test_olora_matches_peft(fan_in, fan_out, rank, alpha, rslora):
    w0 = spectrum_weight(fan_in, fan_out)
    spec = LoraSpec(
        "w", rank=rank, alpha=alpha, init="olora", scaling="rslora" if rslora else "standard"
    )
    base, lt = lorax_fn.split({"w": jnp.asarray(w0)}, spec, key=KEY)
    a, b, residual = peft_arrays(peft_linear(w0, rank, alpha, "olora", use_rslora=rslora))
    close(lt["w"].a, a)
    close(lt["w"].b, b)
    close(base["w"], residual)
    assert lt["w"].scale == pytest.approx(alpha / (np.sqrt(rank) if rslora else rank))


def test_olora_bfloat16_residual_matches_peft():
    w0 = spectrum_weight(64, 48)
    w_bf16 = jnp.asarray(w0, jnp.bfloat16)
    base, lt = lorax_fn.split({"w": w_bf16}, LoraSpec("w", rank=4, init="olora"), key=KEY)
    model_w0 = np.asarray(w_bf16, np.float32)  # the bfloat16 weight PEFT gets
    layer = peft_linear(model_w0, 4, 4, False)
    layer.base_layer.weight.data = layer.base_layer.weight.data.to(torch.bfloat16)
    layer.olora_init("default")
    a, b, residual = peft_arrays(layer)
    assert base["w"].dtype == jnp.bfloat16
    close(lt["w"].a, a)
    close(lt["w"].b, b)
    # Both round the float32 residual to bfloat16: equal but for ties at one ulp.
    close(base["w"], residual, rtol=2**-7)


@pytest.mark.parametrize("fan_in, fan_out, rank, alpha", [(48, 32, 4, 8), (32, 80, 8, 8)])
def test_pissa_matches_peft(fan_in, fan_out, rank, alpha):
    w0 = spectrum_weight(fan_in, fan_out, seed=1)
    spec = LoraSpec("w", rank=rank, alpha=alpha, init="pissa")
    base, lt = lorax_fn.split({"w": jnp.asarray(w0)}, spec, key=KEY)
    a, b, residual = peft_arrays(peft_linear(w0, rank, alpha, "pissa"))
    ours_a, ours_b = align_signs(lt["w"].a, lt["w"].b, a)
    close(ours_a, a)
    close(ours_b, b)
    close(base["w"], residual)


def test_stacked_and_multi_axis_kernels_match_peft_per_matrix():
    # An nn.scan stack (layers, in, out) and a DenseGeneral query (d, heads, head_dim).
    stack = np.stack([spectrum_weight(32, 24, seed=s) for s in range(3)])
    query = spectrum_weight(32, 4 * 8, seed=7).reshape(32, 4, 8)
    spec = LoraSpec(
        ["stack", "query"],
        rank=4,
        alpha=8,
        init="olora",
        layouts={"stack": Layout((1,), (2,), (0,)), "query": Layout((0,), (1, 2))},
    )
    params = {"stack": jnp.asarray(stack), "query": jnp.asarray(query)}
    base, lt = lorax_fn.split(params, spec, key=KEY)
    for layer in range(3):
        a, b, residual = peft_arrays(peft_linear(stack[layer], 4, 8, "olora"))
        close(lt["stack"].a[layer], a)
        close(lt["stack"].b[layer], b)
        close(base["stack"][layer], residual)
    a, b, residual = peft_arrays(peft_linear(query.reshape(32, 32), 4, 8, "olora"))
    close(lt["query"].a, a)
    close(np.asarray(lt["query"].b).reshape(4, 32), b)
    close(np.asarray(base["query"]).reshape(32, 32), residual)


@pytest.mark.parametrize("fan_in, fan_out, rank", [(40, 24, 8), (16, 96, 2)])
def test_orthogonal_matches_peft_on_the_same_draws(fan_in, fan_out, rank):
    w0 = spectrum_weight(fan_in, fan_out)
    layer = peft_linear(w0, rank, rank, False)
    torch.manual_seed(3)
    layer.orthogonal_init("default")
    a, b, base = peft_arrays(layer)
    torch.manual_seed(3)  # PEFT's draws, in its order
    x, g_in, g_out = (
        torch.randn(rank, rank),
        torch.randn(fan_in, rank // 2),
        torch.randn(rank // 2, fan_out),
    )
    ours_a, ours_b = lorax_fn.inits.orthogonal_factors(
        *(jnp.asarray(t.numpy()) for t in (x, g_in, g_out))
    )
    close(ours_a, a, rtol=1e-5)
    close(ours_b, b, rtol=1e-5)
    np.testing.assert_array_equal(base, w0)  # PEFT leaves the base as it is, as split does
    _, lt = lorax_fn.split(
        {"w": jnp.asarray(w0)}, LoraSpec("w", rank=rank, init="orthogonal"), key=KEY
    )
    # Same law: entries of A and B have std 1/10 (the rows of Q are orthonormal).
    assert lt["w"].a.shape == a.shape and lt["w"].b.shape == b.shape
    np.testing.assert_allclose(float(jnp.std(lt["w"].a)), 0.1, rtol=0.35)


@pytest.mark.parametrize(
    "direction, scaling",
    [("ArB2r", "stable"), ("A2rBr", "weight_svd"), ("ArBr", "gd_scale"), ("ArB2r", "unit")],
)
def test_lora_ga_matches_peft_from_the_same_batch(direction, scaling):
    # 4r = 24 covers the weight's smaller side, so PEFT's svd_lowrank is an exact SVD.
    fan_in, fan_out, rank, alpha = 40, 24, 6, 12
    w0 = spectrum_weight(fan_in, fan_out, seed=5)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(16, fan_in)).astype(np.float32)
    y = rng.normal(size=(16, fan_out)).astype(np.float32)

    model = torch.nn.Sequential(torch.nn.Linear(fan_in, fan_out, bias=False))
    model[0].weight.data = torch.tensor(np.ascontiguousarray(w0.T))
    cfg = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=["0"],
        init_lora_weights="lora_ga",
        lora_ga_config=peft.LoraGAConfig(direction=direction, scale=scaling),
    )

    def train_step():
        loss = torch.mean((model(torch.tensor(x)) - torch.tensor(y)) ** 2)
        loss.backward()

    peft.preprocess_loraga(model, cfg, train_step)
    a, b, residual = peft_arrays(peft.get_peft_model(model, cfg).base_model.model[0])

    spec = LoraSpec("w", rank=rank, alpha=alpha, init="lora_ga")
    params = {"w": jnp.asarray(w0)}

    def loss(p, x, y):
        return jnp.mean((x @ p["w"] - y) ** 2)

    previous = lorax_fn.inits.get("lora_ga")
    lorax_fn.inits.register(
        lorax_fn.inits.lora_ga(loss, params, spec, x, y, direction=direction, scaling=scaling)
    )
    try:
        base, lt = lorax_fn.split(params, spec, key=KEY)
    finally:
        lorax_fn.inits.register(previous)
    # Singular directions are defined up to sign, A's and B's independently here.
    ours_a = np.asarray(lt["w"].a) * np.sign(np.sum(np.asarray(lt["w"].a) * a, axis=0))
    ours_b = np.asarray(lt["w"].b) * np.sign(np.sum(np.asarray(lt["w"].b) * b, axis=1))[:, None]
    close(ours_a, a, rtol=1e-4)
    close(ours_b, b, rtol=1e-4)
    # Both bases are W0 - scale·A·B of their own factors (signs differ, so not each other's).
    np.testing.assert_allclose(
        base["w"], w0 - lt["w"].scale * np.asarray(lt["w"].a) @ np.asarray(lt["w"].b), atol=1e-5
    )
    np.testing.assert_allclose(residual, w0 - lt["w"].scale * a @ b, atol=1e-5)
