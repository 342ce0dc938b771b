"""Shared-input fusion (lora(fuse_shared_inputs=...)): the products reading one activation
share x·[A_1|A_2|…]; fused and unfused both equal merge-then-call, values and gradients."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import randomize_b
from jax import lax
from jax.extend import core

import lorax_fn
from lorax_fn import LoraSpec

D, HIDDEN = 16, 24


def block(p, x):
    """q, k, v read x (k with the weight on the left); gate and up read h."""
    q = x @ p["q"]
    k = lax.dot_general(p["k"], x, (((0,), (2,)), ((), ()))).transpose(1, 2, 0)
    v = jnp.einsum("bti,io->bto", x, p["v"])
    att = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k) / 4.0, axis=-1)
    h = x + jnp.einsum("bts,bsd->btd", att, v) @ p["o"]
    return h + (jax.nn.silu(h @ p["gate"]) * (h @ p["up"])) @ p["down"]


def block_params(seed: int = 0) -> dict[str, jax.Array]:
    shapes = {"q": (D, D), "k": (D, D), "v": (D, D), "o": (D, D)}
    shapes |= {"gate": (D, HIDDEN), "up": (D, HIDDEN), "down": (HIDDEN, D)}
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return {
        n: 0.3 * jax.random.normal(k, s) for (n, s), k in zip(shapes.items(), keys, strict=True)
    }


def adapted(params, spec: LoraSpec, layouts=None):
    base, lt = lorax_fn.split(params, spec, key=jax.random.key(1), layouts=layouts)
    return base, randomize_b(lt)


def _dot_generals(jaxpr: core.Jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "dot_general"
        for sub in core.jaxprs_in_params(eqn.params):
            n += _dot_generals(sub)
    return n


def products(fn, base, lt, *args, **kw) -> int:
    """dot_general equations in the jaxpr of lora(fn, **kw)'s value and full gradient."""

    def loss(lt, args):
        return jnp.sum(jnp.sin(lorax_fn.lora(fn, **kw)(base, lt, *args)))

    return _dot_generals(jax.make_jaxpr(jax.value_and_grad(loss, (0, 1)))(lt, args).jaxpr)


def assert_equal_to_merged(fn, base, lt, *args, fuse: bool, rtol: float = 2e-5):
    """lora(fn) equals fn(merge(...)) in value and gradients w.r.t. the factors and args."""

    def loss(apply):
        return lambda lt, args: jnp.sum(jnp.sin(apply(base, lt, *args)))

    got = jax.value_and_grad(loss(lorax_fn.lora(fn, fuse_shared_inputs=fuse)), (0, 1))(lt, args)
    want = jax.value_and_grad(loss(lorax_fn.lora(fn, factorized=False)), (0, 1))(lt, args)
    flat_got, flat_want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(flat_got) == len(flat_want)
    for g, w in zip(flat_got, flat_want, strict=True):
        scale = float(jnp.max(jnp.abs(w))) + 1e-6
        np.testing.assert_allclose(np.asarray(g) / scale, np.asarray(w) / scale, rtol, rtol)


@pytest.mark.parametrize("fuse", [True, False])
def test_shared_inputs_equal_merge_then_call(fuse):
    base, lt = adapted(block_params(), LoraSpec(["q", "k", "v", "o", "gate", "up", "down"], rank=3))
    x = jax.random.normal(jax.random.key(2), (2, 5, D))
    assert_equal_to_merged(block, base, lt, x, fuse=fuse)


def test_fusion_computes_one_low_rank_product_per_shared_input():
    base, lt = adapted(block_params(), LoraSpec(["q", "k", "v", "o", "gate", "up", "down"], rank=3))
    x = jax.random.normal(jax.random.key(2), (2, 5, D))
    fused, unfused = (products(block, base, lt, x, fuse_shared_inputs=f) for f in (True, False))
    # q, k, v: 3 forward x·A -> 1, 3 dt·Aᵀ into dx -> 1, 3 xᵀ·dt -> 1; gate, up: 2 -> 1 each.
    assert unfused - fused == 3 * 2 + 3 * 1


def test_ranks_and_dtypes_differ_within_a_group():
    # q and k (rank 2 and 4) share x·A; v's bfloat16 factors keep their own product.
    spec = LoraSpec(["q", "k", "v"], rank=2, rank_pattern={"k": 4})
    base, lt = adapted(block_params(), spec)
    v = lt["v"]
    lt["v"] = dataclasses.replace(v, a=v.a.astype(jnp.bfloat16), b=v.b.astype(jnp.bfloat16))
    x = jax.random.normal(jax.random.key(2), (2, 5, D))
    assert lt["k"].a.shape == (D, 4)
    assert_equal_to_merged(block, base, lt, x, fuse=True, rtol=2e-2)
    fused, unfused = (products(block, base, lt, x, fuse_shared_inputs=f) for f in (True, False))
    assert unfused - fused == 3  # q and k only


def test_weights_with_their_own_input_are_not_fused():
    # DoRA's column scale, and dropout under a key, change each weight's product: each
    # keeps its own, and the dropout masks are those of the unfused path.
    dora = LoraSpec(["q", "k", "v"], rank=2, use_dora=True)
    base, lt = adapted(block_params(), dora)
    x = jax.random.normal(jax.random.key(2), (2, 5, D))
    assert_equal_to_merged(block, base, lt, x, fuse=True, rtol=1e-4)
    assert products(block, base, lt, x) == products(block, base, lt, x, fuse_shared_inputs=False)

    base, lt = adapted(block_params(), LoraSpec(["q", "k", "v", "gate", "up"], rank=2, dropout=0.5))
    key = jax.random.key(7)
    outs = [
        lorax_fn.lora(block, fuse_shared_inputs=f)(base, lt, x, lora_key=key) for f in (True, False)
    ]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    # Without a key there is no dropout: those products are fused again.
    assert products(block, base, lt, x) < products(block, base, lt, x, fuse_shared_inputs=False)


def test_scanned_layers_fuse_inside_the_body():
    layers = 3
    stacked = jax.tree.map(lambda *w: jnp.stack(w), *(block_params(i) for i in range(layers)))

    def stack(p, x):
        return lax.scan(lambda h, layer: (jnp.tanh(block(layer, h)), None), x, p)[0]

    x = jax.random.normal(jax.random.key(2), (2, 5, D))
    layouts = lorax_fn.infer_layouts(stack, stacked, x)
    base, lt = adapted(stacked, LoraSpec(["q", "k", "v", "gate", "up"], rank=2), layouts)
    assert_equal_to_merged(stack, base, lt, x, fuse=True, rtol=1e-4)
    fused, unfused = (products(stack, base, lt, x, fuse_shared_inputs=f) for f in (True, False))
    assert unfused - fused == 3 * 2 + 3 * 1  # once in the scan body, once in its transpose


class Decoder(nn.Module):
    """Flax attention (DenseGeneral q/k/v kernels (d, heads, head_dim)) and an MLP."""

    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(x, x)
        h = nn.LayerNorm()(x)
        gated = nn.silu(nn.Dense(HIDDEN, name="gate")(h)) * nn.Dense(HIDDEN, name="up")(h)
        return x + nn.Dense(D, name="down")(gated)


def test_flax_attention_and_mlp():
    model = Decoder()
    x = jax.random.normal(jax.random.key(2), (2, 5, D))
    variables = model.init(jax.random.key(0), x)
    base, lt = adapted(variables, LoraSpec(["**/kernel"], rank=2))
    assert lt["params/attn/query/kernel"].b.shape == (2, 2, D // 2)
    assert_equal_to_merged(model.apply, base, lt, x, fuse=True, rtol=1e-4)
    fused, unfused = (
        products(model.apply, base, lt, x, fuse_shared_inputs=f) for f in (True, False)
    )
    assert unfused - fused == 3 * 2 + 3 * 1
