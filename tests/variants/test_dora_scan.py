"""DoRA over a scanned stack of layers: column norms one layer at a time, inside the loop.

A stacked weight ``(layers, in, out)`` sliced by ``nn.scan`` / ``lax.scan`` has its column
norms ``‖W0[l] + scale·A[l]·B[l]‖_c`` taken inside the scan body, from that layer's slice,
so no float32 copy of the whole stack exists; and the backward pass keeps each product's
output for the magnitude's gradient instead of a float32 pre-scale sum per layer. The
reference is merge-then-call, in values and in gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import assert_matches_merged, randomize_b, tainted_shapes
from jax import lax

import lorax_fn
from lorax_fn import Layout, LoraSpec

KEY = jax.random.key(0)
# bfloat16 weights: merge-then-call rounds the merged weight to bfloat16, the factorized
# rule rounds each product's output; both differ from exact by a few bfloat16 steps.
TOL = {jnp.float32: 2e-4, jnp.bfloat16: 3e-2}


class Block(nn.Module):
    """``h + gelu(h @ W)``, the block of ``benchmarks/dora.py``, in ``dtype``."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, _: None) -> tuple[jax.Array, None]:
        dense = nn.Dense(h.shape[-1], use_bias=False, dtype=self.dtype, param_dtype=self.dtype)
        return h + nn.gelu(dense(h)), None


class Stack(nn.Module):
    layers: int
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        block = nn.remat(Block) if self.remat else Block
        scanned = nn.scan(
            block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers
        )
        return scanned(self.dtype)(x, None)[0]


def _split(model: nn.Module, x: jax.Array, use_dora: bool, rank: int = 4):
    params = model.init(KEY, x)
    layouts = lorax_fn.infer_layouts(model.apply, params, x)
    spec = LoraSpec("**/kernel", rank=rank, use_dora=use_dora)
    base, lt = lorax_fn.split(params, spec, key=jax.random.key(1), layouts=layouts)
    return base, randomize_b(lt, std=0.3)


@pytest.mark.parametrize("remat", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nn_scan_stack_equals_merge_then_call(dtype, remat):
    model = Stack(layers=3, dtype=dtype, remat=remat)
    x = jax.random.normal(KEY, (4, 32)).astype(dtype)
    base, lt = _split(model, x, use_dora=True)
    (entry,) = lt.values()
    assert entry.magnitude.shape == (3, 32)  # one magnitude per layer and column
    tol = TOL[dtype]
    assert_matches_merged(model.apply, base, lt, x, rtol=tol, atol=tol)


def _lax_stack(p: dict, x: jax.Array) -> jax.Array:
    def layer(h, w):
        return h + jnp.tanh(h @ w["w_in"]) @ w["w_out"], None

    return lax.scan(layer, x, p)[0]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lax_scan_stack_equals_merge_then_call(dtype):
    k1, k2 = jax.random.split(KEY)
    params = {
        "w_in": (jax.random.normal(k1, (4, 32, 48)) / 6).astype(dtype),
        "w_out": (jax.random.normal(k2, (4, 48, 32)) / 7).astype(dtype),
    }
    layouts = {p: Layout((1,), (2,), (0,)) for p in params}
    spec = LoraSpec("re:w_.*", rank=3, use_dora=True)
    base, lt = lorax_fn.split(params, spec, key=jax.random.key(1), layouts=layouts)
    lt = randomize_b(lt, std=0.3)
    x = jax.random.normal(KEY, (5, 32)).astype(dtype)
    tol = TOL[dtype]
    assert_matches_merged(_lax_stack, base, lt, x, rtol=tol, atol=tol)


def test_a_stack_read_by_every_step_of_a_loop_equals_merge_then_call():
    # The stack is a constant of the scan over time steps (each step runs every layer):
    # its norms are taken once, outside that loop, for the whole stack.
    def fn(p, xs):
        def step(h, x):
            for i in range(p["w"].shape[0]):
                h = jnp.tanh((h + x) @ p["w"][i])
            return h, h

        return lax.scan(step, jnp.zeros(xs.shape[1:]), xs)[1]

    params = {"w": jax.random.normal(KEY, (3, 16, 16)) / 4}
    spec = LoraSpec("w", rank=2, use_dora=True)
    base, lt = lorax_fn.split(
        params, spec, key=jax.random.key(1), layouts={"w": Layout((1,), (2,), (0,))}
    )
    xs = jax.random.normal(KEY, (6, 2, 16))
    assert_matches_merged(fn, base, randomize_b(lt, std=0.3), xs, rtol=1e-4, atol=1e-4)


def test_no_float32_copy_of_the_whole_stack():
    # A bfloat16 stack: a norm taken whole would cast all of it to float32 first.
    model = Stack(layers=4, dtype=jnp.bfloat16)
    x = jnp.ones((2, 64), jnp.bfloat16)
    base, lt = _split(model, x, use_dora=True)
    g = lorax_fn.lora(model.apply, on_fallback="error")
    step = jax.grad(lambda b, t: jnp.sum(g(b, t, x).astype(jnp.float32)), argnums=1)
    closed = jax.make_jaxpr(step)(base, lt)
    n_base = len(jax.tree_util.tree_leaves(base))
    tainted = [True] * n_base + [False] * (len(closed.jaxpr.invars) - n_base)
    shapes = tainted_shapes(closed.jaxpr, tainted)
    assert (64, 64) in shapes  # each layer's weight is read
    assert (4, 64, 64) not in shapes


def _step_temp_bytes(model: nn.Module, x: jax.Array, use_dora: bool) -> int:
    base, lt = _split(model, x, use_dora, rank=8)
    g = lorax_fn.lora(model.apply, on_fallback="error")

    def loss(lt, base, x):
        return jnp.mean(g(base, lt, x).astype(jnp.float32) ** 2)

    compiled = jax.jit(jax.value_and_grad(loss)).lower(lt, base, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dora_step_over_a_scan_stack_needs_lora_memory(dtype):
    # 16 layers, d = 256: before, the norms of the whole stack (float32) and a float32
    # pre-scale sum per layer made DoRA's step 1.2x LoRA's temporary memory.
    model = Stack(layers=16, dtype=dtype)
    x = jnp.ones((256, 256), dtype)
    lora, dora = (_step_temp_bytes(model, x, use_dora) for use_dora in (False, True))
    print(f"{jnp.dtype(dtype).name}: DoRA/LoRA step temp memory {dora / lora:.3f}")
    assert dora <= 1.05 * lora, (dora, lora)


def test_a_magnitude_of_exactly_zero_gets_a_nan_gradient_not_a_wrong_one():
    # The magnitude's gradient is read off the output (Σ g·y / m): where m = 0 and the
    # column of V is not zero, the output says nothing, and the gradient is NaN (loud),
    # never a finite wrong value; every other entry equals merge-then-call.
    params = {"w": jax.random.normal(KEY, (8, 4))}
    spec = LoraSpec("w", rank=2, use_dora=True)
    base, lt = lorax_fn.split(params, spec, key=KEY, layouts={"w": Layout((0,), (1,))})
    entry = randomize_b(lt)["w"]
    lt = {"w": entry.with_extras(magnitude=entry.magnitude.at[1].set(0.0))}
    x = jax.random.normal(KEY, (3, 8))

    def grad(**kw):
        g = lorax_fn.lora(lambda p, x: x @ p["w"], **kw)
        return jax.grad(lambda t: jnp.sum(jnp.sin(g(base, t, x))))(lt)["w"].magnitude

    got, want = grad(on_fallback="error"), grad(factorized=False)
    assert bool(jnp.isnan(got[1])) and bool(jnp.isfinite(want[1]))
    keep = jnp.array([0, 2, 3])
    np.testing.assert_allclose(got[keep], want[keep], rtol=1e-5, atol=1e-6)
