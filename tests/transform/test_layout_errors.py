"""Where split cannot place a weight, it says why and what to do (issue #17 items 3, 8, 9)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from helpers import assert_matches_merged, randomize_b

import lorax_fn
from lorax_fn import LoraError, LoraSpec

KEY = jax.random.key(0)
ATTENTION_KERNELS = ["**/query/kernel", "**/key/kernel", "**/value/kernel", "**/out/kernel"]


# ------------------------------------ item 3: the attention default needs attention shapes


class ScanCell(nn.Module):
    """One layer of plain Dense projections that happen to be named like attention's."""

    @nn.compact
    def __call__(self, x: jax.Array, _: None) -> tuple[jax.Array, None]:
        q, k, v = (nn.Dense(64, name=n)(x) for n in ("query", "key", "value"))
        mix = jax.nn.softmax(q @ k.swapaxes(-1, -2) / 8.0) @ v
        return jnp.tanh(x + nn.Dense(64, name="out")(mix)), None  # bounded over 12 layers


class ScanStack(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        stack = nn.scan(
            ScanCell, variable_axes={"params": 0}, split_rngs={"params": True}, length=12
        )
        return stack(name="layers")(x, None)[0]


def test_scan_stack_named_like_attention_is_refused_then_split_by_inferred_layouts():
    model = ScanStack()
    x = jax.random.normal(KEY, (2, 5, 64))
    variables = model.init(KEY, x)
    assert variables["params"]["layers"]["query"]["kernel"].shape == (12, 64, 64)
    spec = LoraSpec(ATTENTION_KERNELS, rank=4)
    with pytest.raises(
        LoraError, match=r"params/layers/\w+/kernel: .*shape \(12, 64, 64\).*infer_layouts"
    ):
        lorax_fn.split(variables, spec, key=KEY)

    layouts = lorax_fn.infer_layouts(model.apply, variables, x)
    base, lt = lorax_fn.split(variables, spec, key=KEY, layouts=layouts)
    for name in ("query", "key", "value", "out"):
        f = lt[f"params/layers/{name}/kernel"]
        assert f.layout == lorax_fn.Layout((1,), (2,), (0,))  # one rank-4 adapter per layer
        assert (f.a.shape, f.b.shape) == ((12, 64, 4), (12, 4, 64))
    assert_matches_merged(model.apply, base, randomize_b(lt), x, rtol=1e-4, atol=1e-4)


class CrossAttention(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        return nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=24, out_features=10)(
            x, context
        )


def _normal(*shape: int, seed: int = 1) -> jax.Array:
    # Random tokens: with equal ones the key gradient is zero up to rounding noise.
    return jax.random.normal(jax.random.key(seed), shape)


def _linen(model: nn.Module, *args: jax.Array):
    return model.apply, model.init(KEY, *args), args


def _nnx(in_features: int, heads: int, x: jax.Array):
    attn = nnx.MultiHeadAttention(heads, in_features, decode=False, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(attn)

    def apply(state, x):
        return nnx.merge(graphdef, state)(x)

    return apply, state, (x,)


@pytest.mark.parametrize(
    "make",
    [
        # Flax's defaults: qkv_features = out_features = d.
        lambda: _linen(nn.MultiHeadDotProductAttention(num_heads=4), _normal(2, 5, 32)),
        lambda: _nnx(32, 4, _normal(2, 5, 32)),
        # Features set apart from d, and cross-attention with another width for key/value.
        lambda: _linen(
            nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, out_features=6),
            _normal(2, 4, 6),
        ),
        lambda: _linen(CrossAttention(), _normal(2, 4, 16), _normal(2, 3, 7, seed=2)),
    ],
    ids=["linen-defaults", "nnx-defaults", "linen-features", "linen-cross"],
)
def test_flax_attention_still_splits_by_default_as_it_is_used(make):
    apply, variables, args = make()
    spec = LoraSpec(ATTENTION_KERNELS, rank=2)
    base, lt = lorax_fn.split(variables, spec, key=KEY)
    inferred = lorax_fn.infer_layouts(apply, variables, *args)
    assert len(lt) == 4
    assert {p: f.layout for p, f in lt.items()} == {p: inferred[p] for p in lt}
    assert_matches_merged(apply, base, randomize_b(lt), *args, rtol=1e-4, atol=1e-4)


# ------------------------- item 8: infer_layouts says why it placed no layout, split quotes it


def kv_shared(params: dict, x: jax.Array) -> jax.Array:
    """Two layers; the second reads the first's kv projection (Gemma-style KV sharing)."""
    kv = jnp.einsum("btd,cdhk->cbthk", x, params["layer_0"]["kv_einsum"]["w"])
    for name in ("layer_0", "layer_1"):
        q = jnp.einsum("btd,dhk->bthk", x, params[name]["q_einsum"]["w"])
        att = jax.nn.softmax(jnp.einsum("bthk,bshk->bhts", q, kv[0]))
        x = x + jnp.einsum("bhts,bshk->bthk", att, kv[1]).reshape(x.shape)
    return x


def _kv_params() -> dict:
    w = lambda seed, *shape: jax.random.normal(jax.random.key(seed), shape) / 4  # noqa: E731
    return {
        f"layer_{i}": {
            "q_einsum": {"w": w(2 * i, 8, 2, 4)},
            "kv_einsum": {"w": w(2 * i + 1, 2, 8, 2, 4)},
        }
        for i in range(2)
    }


def test_a_target_the_function_never_reads_is_named_with_exclude():
    params, x = _kv_params(), jax.random.normal(KEY, (2, 3, 8))
    layouts = lorax_fn.infer_layouts(kv_shared, params, x)
    assert "layer_0/kv_einsum/w" in layouts and "layer_1/kv_einsum/w" not in layouts
    spec = LoraSpec(["**/q_einsum/w", "**/kv_einsum/w"], rank=2)
    with pytest.raises(
        LoraError,
        match=r"layer_1/kv_einsum/w: infer_layouts found no layout for shape \(2, 8, 2, 4\): "
        r"the function never reads it.*exclude",
    ):
        lorax_fn.split(params, spec, key=KEY, layouts=layouts)
    # The advice works: without the unread weight the rest splits and equals merge-then-call.
    spec = LoraSpec(["**/q_einsum/w", "**/kv_einsum/w"], rank=2, exclude="layer_1/kv_einsum/w")
    base, lt = lorax_fn.split(params, spec, key=KEY, layouts=layouts)
    assert_matches_merged(kv_shared, base, randomize_b(lt), x, rtol=1e-4, atol=1e-4)


def test_a_target_read_through_an_op_layouts_cannot_follow_names_the_op():
    model = nn.ConvTranspose(6, (3, 3), transpose_kernel=True)  # flips the kernel with `rev`
    x = jax.random.normal(KEY, (1, 5, 5, 4))
    variables = model.init(KEY, x)
    layouts = lorax_fn.infer_layouts(model.apply, variables, x)
    with pytest.raises(
        LoraError,
        match=r"params/kernel: infer_layouts found no layout for shape \(3, 3, 6, 4\): the "
        r"function reads it through `rev`.*Give its layout",
    ):
        lorax_fn.split(variables, LoraSpec("**/kernel", rank=2), key=KEY, layouts=layouts)
    assert "`rev`" in layouts.unplaced["params/kernel"]
    # The advice works: given its layout (features out: axis 2), the kernel is adapted.
    given = {"params/kernel": lorax_fn.Layout(in_axes=(0, 1, 3), out_axes=(2,))}
    base, lt = lorax_fn.split(variables, LoraSpec("**/kernel", rank=2), key=KEY, layouts=given)
    lt = randomize_b(lt)
    with pytest.warns(UserWarning, match="rev"):
        got = lorax_fn.lora(model.apply)(base, lt, x)
    np.testing.assert_allclose(got, model.apply(lorax_fn.merge(base, lt), x), rtol=1e-5, atol=1e-5)


# ------------------------------------------ item 9: split of an already-quantized base


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_split_of_a_quantized_base_says_split_comes_first(fmt):
    params = {
        "params": {
            "mlp": {"kernel": jax.random.normal(KEY, (64, 64)), "bias": jnp.zeros(64)},
            "head": {"kernel": jax.random.normal(KEY, (64, 2))},
        }
    }
    qbase = lorax_fn.quantize_base(params, "**/mlp/kernel", format=fmt)
    for spec in (
        LoraSpec("**/mlp/kernel", rank=2),  # was: "matches no parameter", nearest …/codes
        LoraSpec("**/kernel", rank=2),  # was: only head/kernel adapted, silently
        LoraSpec("**/head/kernel", rank=2, trainable="**/mlp/*"),
        LoraSpec("**/mlp/kernel/*", rank=2),  # a stored array of it
    ):
        with pytest.raises(LoraError) as err:
            lorax_fn.split(qbase, spec, key=KEY)
        message = str(err.value)
        assert re.match(
            rf"params/mlp/kernel is already quantized \({fmt}\), .*split comes before "
            r"quantize_base",
            message,
        ), message
        assert "Nearest paths" not in message and "codes" not in message
    # Weights left unquantized can still be adapted on it, and the order the error gives works.
    _, lt = lorax_fn.split(qbase, LoraSpec("**/head/kernel", rank=2), key=KEY)
    assert set(lt) == {"params/head/kernel"}
    base, lt = lorax_fn.split(params, LoraSpec("**/mlp/kernel", rank=2), key=KEY)
    kernel = lorax_fn.quantize_base(base, lt, format=fmt)["params"]["mlp"]["kernel"]
    assert isinstance(kernel, lorax_fn.QuantizedArray)
