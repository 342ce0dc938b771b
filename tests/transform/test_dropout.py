"""LoRA dropout: on the low-rank path's input only, keyed, and off without a key."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from helpers import randomize_b

import lorax_fn
from lorax_fn import LoraSpec


def _setup(rate=0.5):
    params = {"w": jax.random.normal(jax.random.key(0), (6, 5))}
    base, lt = lorax_fn.split(params, LoraSpec("w", rank=3, dropout=rate), key=jax.random.key(1))
    return base, randomize_b(lt)


def fn(p, x):
    return x @ p["w"]


def test_dropout_equals_reference_masked_computation():
    rate = 0.5
    base, lt = _setup(rate)
    x = jax.random.normal(jax.random.key(2), (4, 6))
    key = jax.random.key(3)
    got = lorax_fn.lora(fn)(base, lt, x, lora_key=key)
    # Documented: the k-th adapted product (k = 1, 2, …) draws its mask from fold_in(key, k).
    keep = jax.random.bernoulli(jax.random.fold_in(key, 1), 1.0 - rate, x.shape)
    f = lt["w"]
    want = x @ base["w"] + f.scale * ((jnp.where(keep, x / (1 - rate), 0) @ f.a) @ f.b)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, lorax_fn.merge(base, lt)["w"].T.dot(x.T).T, atol=1e-3)


def test_dropout_is_deterministic_given_a_key_and_off_in_evaluation():
    base, lt = _setup()
    x = jax.random.normal(jax.random.key(2), (4, 6))
    g = jax.jit(lorax_fn.lora(fn))
    a = g(base, lt, x, lora_key=jax.random.key(7))
    np.testing.assert_array_equal(a, g(base, lt, x, lora_key=jax.random.key(7)))
    assert not np.allclose(a, g(base, lt, x, lora_key=jax.random.key(8)))
    np.testing.assert_allclose(
        g(base, lt, x), fn(lorax_fn.merge(base, lt), x), rtol=1e-5, atol=1e-5
    )


def test_dropout_masks_differ_between_scanned_layers():
    params = {"w": jax.random.normal(jax.random.key(0), (2, 6, 6))}
    base, lt = lorax_fn.split(
        params,
        LoraSpec("w", rank=2, dropout=0.5),
        key=jax.random.key(1),
        layouts={"w": lorax_fn.Layout((1,), (2,), (0,))},
    )
    # Identical layers with W0 = 0: outputs differ only through the dropout masks.
    base = {"w": jnp.zeros_like(base["w"])}
    f = lt["w"]
    lt = {
        "w": lorax_fn.LoraFactors(
            jnp.stack([f.a[0]] * 2), jnp.ones_like(f.b), f.scale, f.layout, f.dropout
        )
    }

    def stacked(p, x):
        return jax.lax.scan(lambda h, w: (h, h @ w), x, p["w"])[1]

    ys = lorax_fn.lora(stacked)(base, lt, jnp.ones((3, 6)), lora_key=jax.random.key(0))
    assert not np.allclose(ys[0], ys[1])
