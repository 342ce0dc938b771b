"""Structural facts of the factorized transform: no full-size weight in the gradient,
and fewer compiled FLOPs than merge-then-call."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from helpers import compiled_flops, tainted_shapes

import lorax_fn
from lorax_fn import LoraSpec


class Block(nn.Module):
    d: int
    heads: int

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h)
        h = nn.LayerNorm()(x)
        return x + nn.Dense(self.d)(nn.gelu(nn.Dense(4 * self.d)(h)))


def _setup(d, heads, targets, tokens=(4, 32)):
    model = Block(d, heads)
    x = jax.random.normal(jax.random.key(0), (*tokens, d))
    variables = model.init(jax.random.key(1), x)
    base, lt = lorax_fn.split(variables, LoraSpec(targets, rank=8), key=jax.random.key(2))
    return model, x, base, lt


def _loss(apply):
    return lambda base, lt, x: jnp.mean(apply(base, lt, x) ** 2)


def test_gradient_jaxpr_holds_no_full_size_adapted_weight():
    targets = ["**/query/kernel", "**/key/kernel", "**/value/kernel", "**/out/kernel"]
    model, x, base, lt = _setup(64, 4, targets)
    grad = jax.grad(_loss(lorax_fn.lora(model.apply, on_fallback="error")), argnums=1)
    closed = jax.make_jaxpr(grad)(base, lt, x)
    n_base = len(jax.tree_util.tree_leaves(base))
    n_lora = len(jax.tree_util.tree_leaves(lt))
    tainted = [False] * n_base + [True] * n_lora + [False]
    shapes = set(tainted_shapes(closed.jaxpr, tainted))
    weight_shapes = {tuple(w.shape) for p, w in lorax_fn.paths.leaves_with_paths(base) if p in lt}
    assert weight_shapes == {(64, 4, 16), (4, 16, 64)}
    assert not shapes & weight_shapes

    # The same check catches merge-then-call, so it can fail.
    merged_grad = jax.grad(_loss(lorax_fn.lora(model.apply, factorized=False)), argnums=1)
    merged_shapes = set(tainted_shapes(jax.make_jaxpr(merged_grad)(base, lt, x).jaxpr, tainted))
    assert merged_shapes & weight_shapes


def test_compiled_flops_below_merge_then_call_and_frozen_backward():
    model, x, base, lt = _setup(512, 8, "**/kernel", tokens=(2, 128))
    factorized = jax.grad(_loss(lorax_fn.lora(model.apply, on_fallback="error")), argnums=1)
    merged = jax.grad(_loss(lorax_fn.lora(model.apply, factorized=False)), argnums=1)

    def frozen(variables, x):  # the frozen model's forward plus backward to its inputs
        return jax.grad(lambda x: jnp.mean(model.apply(variables, x) ** 2))(x)

    f_lora = compiled_flops(factorized, base, lt, x)
    f_merged = compiled_flops(merged, base, lt, x)
    f_frozen = compiled_flops(frozen, base, x)
    assert f_lora < 0.8 * f_merged, (f_lora, f_merged)
    assert f_lora <= f_frozen, (f_lora, f_frozen)


def test_custom_jvp_activations_keep_the_gradient_free_of_full_weights():
    def fn(p, x):  # relu and softplus are custom_jvp functions; they see activations only
        return jax.nn.softplus(jax.nn.relu(x @ p["w1"])) @ p["w2"]

    params = {
        "w1": jax.random.normal(jax.random.key(0), (64, 96)),
        "w2": jax.random.normal(jax.random.key(1), (96, 64)),
    }
    base, lt = lorax_fn.split(params, LoraSpec(["w1", "w2"], rank=4), key=jax.random.key(2))
    x = jax.random.normal(jax.random.key(3), (8, 64))
    closed = jax.make_jaxpr(jax.grad(_loss(lorax_fn.lora(fn, on_fallback="error")), argnums=1))(
        base, lt, x
    )
    assert "custom_jvp_call" in str(closed)
    n_base, n_lora = len(jax.tree_util.tree_leaves(base)), len(jax.tree_util.tree_leaves(lt))
    shapes = set(tainted_shapes(closed.jaxpr, [False] * n_base + [True] * n_lora + [False]))
    assert not shapes & {(64, 96), (96, 64)}
