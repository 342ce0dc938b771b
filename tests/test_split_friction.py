"""One call instead of two on model-zoo weights: split infers layouts from the function,
an ``AnyOf`` target serves several variants of a model family, an nnx.Module is input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import lorax_fn
from lorax_fn import AnyOf, LoraError, LoraSpec


class EinsumAttention(nn.Module):
    """Gemma-style attention: 3-D einsum kernels named ``w``, fused qkv or separate q/kv."""

    heads: int = 2
    head_dim: int = 4
    fused: bool = True

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        init = nn.initializers.normal(0.3)
        if self.fused:
            w = self.param("w", init, (3, self.heads, d, self.head_dim))
            q, k, v = jnp.einsum("btd,shdk->sbthk", x, w)
        else:
            wq = self.param("q_w", init, (self.heads, d, self.head_dim))
            wkv = self.param("kv_w", init, (2, self.heads, d, self.head_dim))
            q = jnp.einsum("btd,hdk->bthk", x, wq)
            k, v = jnp.einsum("btd,shdk->sbthk", x, wkv)
        att = jax.nn.softmax(jnp.einsum("bthk,bshk->bhts", q, k), axis=-1)
        out = jnp.einsum("bhts,bshk->bthk", att, v)
        wo = self.param("out_w", init, (self.heads, self.head_dim, d))
        return jnp.einsum("bthk,hkd->btd", out, wo)


class Block(nn.Module):
    fused: bool = True

    @nn.compact
    def __call__(self, x):
        x = x + EinsumAttention(fused=self.fused, name="attn")(x)
        return x + nn.Dense(x.shape[-1], name="mlp")(jnp.tanh(x))


def _model(fused: bool):
    model = Block(fused=fused)
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    return model, model.init(jax.random.key(0), x), x


ANY_ATTENTION = AnyOf("**/attn/w", "**/attn/q_w", "**/attn/kv_w")
TARGETS = [ANY_ATTENTION, "**/attn/out_w", "**/mlp/kernel"]


def _randomised(lt):
    # B = 0 at init would hide a wrong factorisation: give B values.
    keys = iter(jax.random.split(jax.random.key(7), 64))
    return jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), lt)


@pytest.mark.parametrize("fused", [True, False])
def test_split_with_fn_equals_the_two_call_form_and_merge_then_call(fused):
    model, variables, x = _model(fused)
    spec = LoraSpec(targets=TARGETS, rank=2)
    key = jax.random.key(2)
    base, lt = lorax_fn.split(variables, spec, key=key, fn=model.apply, example_args=(x,))
    layouts = lorax_fn.infer_layouts(model.apply, variables, x)
    _, lt_two = lorax_fn.split(variables, spec, key=key, layouts=layouts)
    assert jax.tree.structure(lt) == jax.tree.structure(lt_two)
    for got, want in zip(jax.tree.leaves(lt), jax.tree.leaves(lt_two), strict=True):
        np.testing.assert_array_equal(got, want)
    # The kernels' shapes alone cannot be placed: without fn it is an error.
    with pytest.raises(LoraError, match="cannot tell the fan-in axes"):
        lorax_fn.split(variables, spec, key=key)

    lt = _randomised(lt)
    apply = lorax_fn.lora(model.apply, on_fallback="error")
    np.testing.assert_allclose(
        apply(base, lt, x), model.apply(lorax_fn.merge(base, lt), x), rtol=1e-5, atol=1e-5
    )
    loss = lambda lt, f: jnp.sum(f(lt) ** 2)  # noqa: E731
    got = jax.grad(loss)(lt, lambda t: apply(base, t, x))
    want = jax.grad(loss)(lt, lambda t: model.apply(lorax_fn.merge(base, t), x))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_split_with_fn_refuses_layouts_too_and_inputs_without_fn():
    model, variables, x = _model(True)
    spec = LoraSpec(targets=TARGETS, rank=2)
    layouts = lorax_fn.infer_layouts(model.apply, variables, x)
    with pytest.raises(LoraError, match="both layouts= and fn="):
        lorax_fn.split(
            variables, spec, key=jax.random.key(0), layouts=layouts, fn=model.apply,
            example_args=(x,),
        )  # fmt: skip
    with pytest.raises(LoraError, match="example inputs but no fn="):
        lorax_fn.split(variables, spec, key=jax.random.key(0), example_args=(x,))


def test_split_with_fn_reports_what_inference_found():
    params = {"w": jnp.ones((3, 4, 5)), "unused": jnp.ones((2, 4, 4))}
    fn = lambda p, x: jnp.einsum("bi,hio->bho", x, p["w"])  # noqa: E731
    spec = LoraSpec(targets=["w", "unused"], rank=2)
    with pytest.raises(LoraError, match="unused: infer_layouts found no layout"):
        lorax_fn.split(params, spec, key=jax.random.key(0), fn=fn, example_args=(jnp.ones((2, 4)),))


def test_any_of_needs_only_one_alternative_to_match_per_family():
    for fused, adapted in [(True, {"attn/w"}), (False, {"attn/q_w", "attn/kv_w"})]:
        model, variables, x = _model(fused)
        _, lt = lorax_fn.split(
            variables, LoraSpec(targets=TARGETS, rank=2), key=jax.random.key(0),
            fn=model.apply, example_args=(x,),
        )  # fmt: skip
        assert {p.removeprefix("params/") for p in lt} == adapted | {"attn/out_w", "mlp/kernel"}


def test_any_of_matching_nothing_names_every_alternative():
    _, variables, _ = _model(True)
    spec = LoraSpec(targets=[AnyOf("**/qkv_einsum/w", "**/q_einsum/w"), "**/mlp/kernel"])
    with pytest.raises(LoraError) as err:
        lorax_fn.split(variables, spec, key=jax.random.key(0))
    message = str(err.value)
    assert "AnyOf('**/qkv_einsum/w', '**/q_einsum/w')" in message
    assert "none of its alternatives matches any parameter" in message
    assert "params/attn/w" in message  # the nearest paths
    # A plain list keeps its rule: every filter must match something.
    with pytest.raises(LoraError, match="'\\*\\*/q_einsum/w' matches no parameter"):
        lorax_fn.split(
            variables, LoraSpec(targets=["**/attn/w", "**/q_einsum/w"]), key=jax.random.key(0)
        )


def test_any_of_is_a_filter_everywhere_and_round_trips_through_json():
    nested = AnyOf("a/*", AnyOf("re:b/.*", "c"))
    match = lorax_fn.paths.compile_filter(nested)
    assert [match(p, None) for p in ["a/x", "b/y/z", "c", "d"]] == [True, True, True, False]
    spec = LoraSpec(
        targets=nested, exclude=AnyOf("a/skip"), trainable=[AnyOf("head/*")],
        rank_pattern={AnyOf("c"): 4}, alpha_pattern=[(AnyOf("a/*"), 2.0)],
    )  # fmt: skip
    assert LoraSpec.from_json(spec.to_json()) == spec
    with pytest.raises(LoraError, match="at least one alternative"):
        AnyOf()
    with pytest.raises(LoraError, match="not a valid pattern"):
        AnyOf("a", "re:(")
    with pytest.raises(LoraError, match="cannot serialise the callable"):
        LoraSpec(targets=AnyOf(lambda p, x: True)).to_json()

    params = {"a": {"x": jnp.ones((8, 8)), "skip": jnp.ones((8, 8))}, "c": jnp.ones((8, 12))}
    params["head"] = {"k": jnp.ones((8, 2))}
    _, lt = lorax_fn.split(params, spec, key=jax.random.key(0))
    assert sorted(lt) == ["a/x", "c", "head/k"]
    assert lt["c"].a.shape == (8, 4) and lt["a/x"].scale == 2.0 / 8
    # The optimizer's frozen filters take an AnyOf too.
    tx = lorax_fn.optimizer(optax.sgd(1.0), lt, frozen=AnyOf("head/*", "nothing/*"))
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, lt), tx.init(lt), lt)
    np.testing.assert_array_equal(updates["head/k"], 0.0)
    assert np.all(np.asarray(updates["c"].a) != 0.0)


class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(0.3 * jax.random.normal(rngs.params(), (2, 8, 4)))  # (h, d, k)
        self.out = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x):
        h = jnp.einsum("bd,hdk->bhk", x, self.w[...])
        return self.out(jnp.tanh(h.reshape(x.shape[0], -1)))


def test_split_takes_an_nnx_module_and_infers_from_a_function_of_the_module():
    model = NnxBlock(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 8))
    call = lambda m, x: m(x)  # noqa: E731
    spec = LoraSpec(targets=["w", "out/kernel"], rank=2)
    base, lt = lorax_fn.split(model, spec, key=jax.random.key(0), fn=call, example_args=(x,))
    assert isinstance(base, NnxBlock) and sorted(lt) == ["out/kernel", "w"]
    assert lt["w"].layout == lorax_fn.Layout(in_axes=(1,), out_axes=(0, 2))
    lt = _randomised(lt)
    np.testing.assert_allclose(
        lorax_fn.lora(call, on_fallback="error")(base, lt, x),
        call(lorax_fn.merge(base, lt), x),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip
