"""Trainable tokens (lorax_fn.tokens): chosen embedding rows trained as a sparse delta."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import TiedLM, assert_matches_merged, randomize_b

import lorax_fn
from lorax_fn import LoraError, LoraSpec
from lorax_fn.tokens import add_trainable_tokens, token_factors, token_indices

EMBED = "params/Embed_0/embedding"
IDS = jnp.array([[1, 2, 10], [0, 5, 7]])
ROWS = [7, 10, 3]  # 3 is never looked up: only the tied head reaches it


def tied():
    model = TiedLM()
    return model, model.init(jax.random.key(0), IDS)


def adapted(with_lora: bool = True):
    model, params = tied()
    spec = LoraSpec("**/Dense_0/kernel", rank=2)
    base, lt = lorax_fn.split(params, spec, key=jax.random.key(1))
    if not with_lora:
        lt = {}
    return model, base, add_trainable_tokens(base, lt, {EMBED: ROWS})


def test_lookup_and_tied_head_match_merge_then_call_in_values_and_gradients():
    model, base, lt = adapted()
    lt = randomize_b(lt)
    assert_matches_merged(model.apply, base, lt, IDS)
    # The delta reaches the logits through both the lookup and the tied head.
    plain = lorax_fn.lora(model.apply)(base, {**lt, EMBED: token_factors(11, 8, ROWS)}, IDS)
    assert float(jnp.abs(lorax_fn.lora(model.apply)(base, lt, IDS) - plain).max()) > 1e-3


def test_merge_changes_the_chosen_rows_only_by_the_delta():
    _, base, lt = adapted(with_lora=False)
    delta = jax.random.normal(jax.random.key(3), lt[EMBED].b.shape)
    lt = {EMBED: dataclasses.replace(lt[EMBED], b=delta)}
    got = np.asarray(lorax_fn.merge(base, lt)["params"]["Embed_0"]["embedding"])
    want = np.array(base["params"]["Embed_0"]["embedding"])
    want[ROWS] += np.asarray(delta)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_training_changes_only_the_chosen_rows_and_keeps_no_state_for_the_selection():
    model, base, lt = adapted()
    tx = lorax_fn.optimizer(optax.adamw(1e-2, weight_decay=0.1), lt)
    state = tx.init(lt)
    target = jax.random.normal(jax.random.key(4), (2, 3, 11))

    @jax.jit
    def step(lt, state):
        loss = lambda lt: jnp.mean((lorax_fn.lora(model.apply)(base, lt, IDS) - target) ** 2)  # noqa: E731
        grads = jax.grad(loss)(lt)
        updates, state = tx.update(grads, state, lt)
        return optax.apply_updates(lt, updates), state

    selection = np.asarray(lt[EMBED].a)
    for _ in range(5):
        lt, state = step(lt, state)
    assert np.array_equal(np.asarray(lt[EMBED].a), selection)  # P never moves
    merged = np.asarray(lorax_fn.merge(base, lt)["params"]["Embed_0"]["embedding"])
    original = np.asarray(base["params"]["Embed_0"]["embedding"])
    others = np.setdiff1d(np.arange(11), ROWS)
    assert np.array_equal(merged[others], original[others])  # bit-identical
    assert (np.abs(merged[ROWS] - original[ROWS]).max(axis=1) > 1e-4).all()
    # Adam keeps moments for D and the Dense factors only: none the size of P.
    moments = [x.shape for x in jax.tree.leaves(state) if np.ndim(x) > 0]
    assert selection.shape not in moments
    assert lt[EMBED].b.shape in moments


def test_count_params_counts_the_delta_not_the_selection():
    _, base, lt = adapted(with_lora=False)
    count = lorax_fn.count_params(base, lt)
    assert count.trainable == len(ROWS) * 8
    assert count.total == sum(x.size for x in jax.tree.leaves(base)) + 11 * len(ROWS) + len(ROWS) * 8


@pytest.mark.parametrize(
    ("rows", "match"),
    [([3, 3], "repeated"), ([11], "outside"), ([], "non-empty"), ([1.5], "ints")],
)
def test_bad_indices_are_refused(rows, match):
    _, params = tied()
    with pytest.raises(LoraError, match=match):
        add_trainable_tokens(params, {}, {EMBED: rows})


def test_refusals():
    model, base, lt = adapted()
    with pytest.raises(LoraError, match="already in the LoRA tree"):
        add_trainable_tokens(base, {**lt, EMBED: lt["params/Dense_0/kernel"]}, {EMBED: [1]})
    with pytest.raises(LoraError, match="no such leaf"):
        add_trainable_tokens(base, {}, {"params/Embed_1/embedding": [1]})
    with pytest.raises(LoraError, match="vocab, features"):
        add_trainable_tokens(base, {}, {"params/Dense_0/bias": [1]})
    with pytest.raises(LoraError, match="add_trainable_tokens"):
        lorax_fn.split(base, LoraSpec("**/Dense_0/kernel", variant="tokens"), key=jax.random.key(0))
    trained_selection = dataclasses.replace(lt[EMBED], a=lt[EMBED].a + 0.1)
    with pytest.raises(LoraError, match="no longer one-hot"):
        token_indices(trained_selection)
    assert token_indices(lt[EMBED]) == tuple(ROWS)
