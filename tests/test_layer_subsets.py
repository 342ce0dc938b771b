"""Layer subsets of scanned stacks (lorax_fn.subsets): adapt chosen layers of an nn.scan stack."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_matches_merged, randomize_b

import lorax_fn
from lorax_fn import LoraError, LoraSpec
from lorax_fn.subsets import LayerSubset, expand_subsets, select_layers

L, D = 6, 8
KERNEL = "params/ScanBlock_0/Dense_0/kernel"
CHOSEN = (4, 5)  # the last two of six


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + jnp.tanh(nn.Dense(D)(x)), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
        x, _ = scan(name="ScanBlock_0")(x, None)
        return nn.Dense(3)(x)


X = jax.random.normal(jax.random.key(2), (4, D))


def adapted(layers=(-2, -1), rank: int = 2):
    model = Stack()
    params = model.init(jax.random.key(0), X)
    spec = LoraSpec("**/kernel", rank=rank)
    base, lt = lorax_fn.split(
        params, spec, key=jax.random.key(1), fn=model.apply, example_args=(X,)
    )
    full = randomize_b(lt, std=0.3)
    return model, base, full, select_layers(full, {"**/ScanBlock_0/**": layers})


def zeros_elsewhere(full: dict) -> dict:
    """The reference: the full stack's factors with every unchosen layer zeroed by hand."""
    f = full[KERNEL]
    keep = np.isin(np.arange(L), CHOSEN)[:, None, None]
    return {**full, KERNEL: dataclasses.replace(f, a=f.a * keep, b=f.b * keep)}


def test_subset_holds_the_chosen_layers_compactly():
    _, _, full, lt = adapted()
    entry = lt[KERNEL]
    assert isinstance(entry, LayerSubset) and entry.layers == CHOSEN and entry.num_layers == L
    assert entry.factors.a.shape == (2, D, 2) and entry.factors.b.shape == (2, 2, D)
    np.testing.assert_array_equal(entry.factors.a, full[KERNEL].a[np.asarray(CHOSEN)])
    assert not isinstance(lt["params/Dense_0/kernel"], LayerSubset)  # not stacked


def test_matches_merge_then_call_and_the_zeroed_full_stack():
    model, base, full, lt = adapted()
    assert_matches_merged(model.apply, base, lt, X, rtol=1e-5, atol=1e-5)
    reference = model.apply(lorax_fn.merge(base, zeros_elsewhere(full)), X)
    got = lorax_fn.lora(model.apply)(base, lt, X)
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(got - model.apply(base, X)).max()) > 1e-3

    def loss(tree):
        return jnp.sum(jnp.sin(lorax_fn.lora(model.apply)(base, tree, X)))

    grads = jax.grad(loss)(lt)[KERNEL].factors
    want = jax.grad(loss)(zeros_elsewhere(full))[KERNEL]
    np.testing.assert_allclose(grads.b, want.b[np.asarray(CHOSEN)], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads.a, want.a[np.asarray(CHOSEN)], rtol=1e-5, atol=1e-6)


def test_training_moves_the_chosen_layers_only_and_keeps_state_for_them_only():
    model, base, _, lt = adapted()
    tx = lorax_fn.optimizer(optax.adam(1e-2), lt)
    state = tx.init(lt)
    target = jax.random.normal(jax.random.key(3), (4, 3))

    @jax.jit
    def step(lt, state):
        loss = lambda t: jnp.mean((lorax_fn.lora(model.apply)(base, t, X) - target) ** 2)  # noqa: E731
        updates, state = tx.update(jax.grad(loss)(lt), state, lt)
        return optax.apply_updates(lt, updates), state

    for _ in range(3):
        lt, state = step(lt, state)
    merged = np.asarray(lorax_fn.merge(base, lt)["params"]["ScanBlock_0"]["Dense_0"]["kernel"])
    original = np.asarray(base["params"]["ScanBlock_0"]["Dense_0"]["kernel"])
    others = [i for i in range(L) if i not in CHOSEN]
    assert np.array_equal(merged[others], original[others])  # bit-identical
    assert (np.abs(merged[list(CHOSEN)] - original[list(CHOSEN)]).max(axis=(1, 2)) > 1e-4).all()
    shapes = {x.shape for x in jax.tree.leaves(state) if np.ndim(x) > 0}
    assert (len(CHOSEN), D, 2) in shapes and (L, D, 2) not in shapes


def test_trainable_parameters_are_the_chosen_layers():
    _, base, full, lt = adapted()
    stack = full[KERNEL].a.size + full[KERNEL].b.size
    saved = stack - stack * len(CHOSEN) // L
    count = lorax_fn.count_params(base, lt).trainable
    assert count == lorax_fn.count_params(base, full).trainable - saved


def test_expand_is_identity_without_subsets_and_the_list_form_takes_every_stack():
    _, _, full, _ = adapted()
    assert expand_subsets(full) is full
    every = select_layers(full, [0, -1])
    assert every[KERNEL].layers == (0, L - 1)


@pytest.mark.parametrize(
    ("layers", "match"),
    [([6], "outside"), ([1, -5], "twice"), ([], "no layers")],
)
def test_bad_layers_are_refused(layers, match):
    with pytest.raises(LoraError, match=match):
        adapted(layers)


def test_refusals():
    _, _, full, _ = adapted()
    with pytest.raises(LoraError, match="match no stacked"):
        select_layers(full, {"**/Dense_0/kernel": [0]} | {"nothing/**": [0]})
    dora = {KERNEL: dataclasses.replace(full[KERNEL], variant="dora")}
    with pytest.raises(LoraError, match="plain LoRA"):
        select_layers(dora, [0])
