"""lorax_fn.optimizer: what it trains, what it keeps state for, LoRA+, weight-decay masks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import randomize_b

import lorax_fn
from lorax_fn import LoraError, LoraFactors, LoraSpec
from lorax_fn.variants import get, names

KEY = jax.random.key(1)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm()(nn.relu(nn.Dense(16)(x)))
        return nn.Dense(3)(x)


@pytest.fixture(scope="module")
def setup():
    variables = MLP().init(jax.random.key(0), jnp.ones((1, 8)))
    spec = LoraSpec(targets="**/kernel", rank=2, trainable="params/Dense_1/bias")
    base, lt = lorax_fn.split(variables, spec, key=jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (32, 8))
    y = jax.random.normal(jax.random.key(3), (32, 3))
    return base, lt, x, y


def mse(variables, x, y):
    return jnp.mean((MLP().apply(variables, x) - y) ** 2)


def nbytes(tree) -> int:
    return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


def train(tx, base, lt, x, y, steps):
    @jax.jit
    def step(lt, state):
        loss, grads = jax.value_and_grad(lorax_fn.lora(mse), argnums=1)(base, lt, x, y)
        updates, state = tx.update(grads, state, lt)
        return optax.apply_updates(lt, updates), state, loss

    state = tx.init(lt)
    losses = []
    for _ in range(steps):
        lt, state, loss = step(lt, state)
        losses.append(float(loss))
    return lt, state, losses


def test_adam_trains_lora_only_and_state_is_two_copies_of_the_lora_tree(setup):
    base, lt, x, y = setup
    before = jax.tree.map(np.array, base)
    tx = lorax_fn.optimizer(optax.adam(1e-2), lt)
    new_lt, state, losses = train(tx, base, lt, x, y, steps=5)

    assert losses[-1] < losses[0]
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(base), strict=True):
        assert old.tobytes() == np.asarray(new).tobytes()
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(lt), jax.tree.leaves(new_lt), strict=True)
    )

    # Adam keeps mu and nu per trained element, plus one int32 `count` per label present:
    # lora_a, lora_b and trainable (the Dense_1 bias).
    labels = set(jax.tree.leaves(lorax_fn.optim.lora_labels(lt)))
    assert labels == {"lora_a", "lora_b", "trainable"}
    counts = [c for c in jax.tree.leaves(state) if np.ndim(c) == 0]
    assert [np.asarray(c).dtype for c in counts] == [np.int32] * 3
    assert nbytes(state) == 2 * nbytes(lt) + 3 * 4
    base_bytes = nbytes(base)
    assert nbytes(state) < base_bytes  # a full fine-tune's Adam state would be 2 × base


def test_labels_cover_factors_trainable_and_non_float_leaves():
    f = LoraFactors(jnp.ones((4, 2)), jnp.zeros((2, 4)), 1.0, lorax_fn.Layout((0,), (1,)))
    tree = {"w": f, "head": jnp.ones(3), "step": jnp.zeros((), jnp.int32), "scale": 0.5}
    labels = lorax_fn.optim.lora_labels(tree)
    assert (labels["w"].a, labels["w"].b) == ("lora_a", "lora_b")
    assert labels["w"].layout == f.layout  # static fields kept: same treedef as the params
    assert (labels["head"], labels["step"], labels["scale"]) == ("trainable", "frozen", "trainable")


def test_lora_plus_sgd_step_scales_b_exactly():
    key_a, key_b, key_ga, key_gb, key_h = jax.random.split(jax.random.key(0), 5)
    layout = lorax_fn.Layout((0,), (1,))
    lt = {
        "w": LoraFactors(
            jax.random.normal(key_a, (6, 2)), jax.random.normal(key_b, (2, 5)), 1.0, layout
        ),
        "head": jnp.arange(3.0),
    }
    grads = {
        "w": LoraFactors(
            jax.random.normal(key_ga, (6, 2)), jax.random.normal(key_gb, (2, 5)), 1.0, layout
        ),
        "head": jax.random.normal(key_h, (3,)),
    }
    lr, ratio = 0.1, 16.0
    tx = lorax_fn.optimizer(optax.sgd(lr), lt, lora_plus_ratio=ratio)
    updates, _ = tx.update(grads, tx.init(lt), lt)
    new = optax.apply_updates(lt, updates)

    # optax.sgd's update is -lr·g; LoRA+ multiplies B's by the ratio afterwards.
    step = lambda g, s=1.0: np.float32(s) * (np.float32(-lr) * np.asarray(g))  # noqa: E731
    np.testing.assert_array_equal(new["w"].a, np.asarray(lt["w"].a) + step(grads["w"].a))
    np.testing.assert_array_equal(new["w"].b, np.asarray(lt["w"].b) + step(grads["w"].b, ratio))
    np.testing.assert_array_equal(new["head"], np.asarray(lt["head"]) + step(grads["head"]))


def test_lora_plus_with_adam_equals_b_at_ratio_times_the_learning_rate(setup):
    base, lt, x, y = setup
    lt = randomize_b(lt)  # B ≠ 0, so ∂L/∂A ≠ 0 and A's step shows which rate it got
    lr, ratio = 1e-2, 16.0
    plus, _, _ = train(
        lorax_fn.optimizer(optax.adam(lr), lt, lora_plus_ratio=ratio), base, lt, x, y, steps=1
    )
    plain, _, _ = train(lorax_fn.optimizer(optax.adam(lr), lt), base, lt, x, y, steps=1)
    fast, _, _ = train(lorax_fn.optimizer(optax.adam(lr * ratio), lt), base, lt, x, y, steps=1)
    for path, f in plus.items():
        if isinstance(f, LoraFactors):
            # Adam's moments never see the ratio; only the final step is scaled: B moves
            # at ratio·lr, A at lr.
            np.testing.assert_allclose(f.b, fast[path].b, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(f.a, plain[path].a, rtol=1e-6, atol=1e-7)
            assert not np.allclose(f.a, lt[path].a)
            assert not np.allclose(f.a, fast[path].a)


def test_trainable_tx_is_used_for_full_leaves_only(setup):
    base, lt, x, y = setup
    tx = lorax_fn.optimizer(optax.sgd(0.0), lt, trainable_tx=optax.sgd(0.5))
    new, _, _ = train(tx, base, lt, x, y, steps=1)
    for path, entry in lt.items():
        if isinstance(entry, LoraFactors):
            np.testing.assert_array_equal(new[path].a, entry.a)
            np.testing.assert_array_equal(new[path].b, entry.b)
        else:
            assert not np.array_equal(new[path], entry)


def test_weight_decay_mask_spares_biases_and_norms_and_decays_kernels_and_factors():
    layout = lorax_fn.Layout((1,), (2,), (0,))
    tree = {
        "params/Dense_0/kernel": LoraFactors(jnp.ones((2, 4, 1)), jnp.ones((2, 1, 4)), 1.0, layout),
        "params/head/kernel": jnp.ones((4, 3)),
        "params/head/bias": jnp.ones(3),
        "params/layers/bias": jnp.ones((2, 4)),  # scan-stacked: 2-D but still a bias
        "params/layers/LayerNorm_0/scale": jnp.ones((2, 4)),
        "params/ln_f/weight": jnp.ones((2, 4)),
        "params/RMSNorm/kernel": jnp.ones((2, 4)),
        "params/embed/embedding": jnp.ones((10, 4)),
        "params/gate": jnp.ones(4),  # 1-D
    }
    mask = lorax_fn.weight_decay_mask(tree)
    assert mask["params/Dense_0/kernel"].a is True and mask["params/Dense_0/kernel"].b is True
    assert {p: m for p, m in mask.items() if not isinstance(m, LoraFactors)} == {
        "params/head/kernel": True,
        "params/head/bias": False,
        "params/layers/bias": False,
        "params/layers/LayerNorm_0/scale": False,
        "params/ln_f/weight": False,
        "params/RMSNorm/kernel": False,
        "params/embed/embedding": True,
        "params/gate": False,
    }


def test_adamw_with_the_decay_mask_inside_the_optimizer(setup):
    _, lt, _, _ = setup
    # B ≠ 0, or B's decay (0·(1 - lr·wd) = 0) could not be told from no decay.
    lt = {**randomize_b(lt), "params/LayerNorm_0/scale": jnp.ones(16) * 2.0}
    lr, wd = 0.1, 0.5
    tx = lorax_fn.optimizer(optax.adamw(lr, weight_decay=wd, mask=lorax_fn.weight_decay_mask), lt)
    zeros = jax.tree.map(jnp.zeros_like, lt)
    updates, _ = tx.update(zeros, tx.init(lt), lt)
    new = optax.apply_updates(lt, updates)
    # Zero gradients make Adam's step 0, leaving exactly the decoupled decay -lr·wd·p.
    for path, entry in lt.items():
        if isinstance(entry, LoraFactors):
            np.testing.assert_allclose(new[path].a, entry.a * (1 - lr * wd), rtol=1e-6)
            np.testing.assert_allclose(new[path].b, entry.b * (1 - lr * wd), rtol=1e-6)
            assert not np.allclose(new[path].b, entry.b)
        else:  # the Dense_1 bias and the norm scale
            np.testing.assert_array_equal(new[path], entry)


def test_combined_tree_freezes_the_base_with_no_state(setup):
    base, lt, x, y = setup
    tree = {"base": base, "lora": lt}

    def loss(tree):
        return lorax_fn.lora(mse)(tree["base"], tree["lora"], x, y)

    tx = lorax_fn.optimizer(optax.adam(1e-2), tree, frozen="base/**")
    state = tx.init(tree)
    assert nbytes(state) == 2 * nbytes(lt) + 3 * 4
    before = jax.tree.map(np.array, tree)

    @jax.jit
    def step(tree, state):
        grads = jax.grad(loss)(tree)
        updates, state = tx.update(grads, state, tree)
        return optax.apply_updates(tree, updates), state, grads, updates

    for _ in range(3):
        tree, state, grads, updates = step(tree, state)

    assert any(np.any(g != 0) for g in jax.tree.leaves(grads["base"]))
    assert all(not np.any(u) for u in jax.tree.leaves(updates["base"]))
    for old, new in zip(
        jax.tree.leaves(before["base"]), jax.tree.leaves(tree["base"]), strict=True
    ):
        np.testing.assert_array_equal(old, new)
    assert not np.array_equal(
        before["lora"]["params/Dense_0/kernel"].b, tree["lora"]["params/Dense_0/kernel"].b
    )


def test_full_params_tree_with_frozen_filters():
    params = MLP().init(jax.random.key(0), jnp.ones((1, 8)))
    tx = lorax_fn.optimizer(optax.adam(1e-2), params, frozen=["**/kernel", "re:.*LayerNorm.*"])
    state = tx.init(params)
    biases = [
        v
        for p, v in lorax_fn.paths.leaves_with_paths(params)
        if p.endswith("bias") and "LayerNorm" not in p
    ]
    assert nbytes(state) == 2 * nbytes(biases) + 4


def test_errors_name_the_problem(setup):
    _, lt, _, _ = setup
    with pytest.raises(LoraError, match=r"frozen filter 'base/\*\*' matches no leaf"):
        lorax_fn.optimizer(optax.sgd(1.0), lt, frozen="base/**")
    with pytest.raises(LoraError, match="lora_plus_ratio must be a number > 0, got -1"):
        lorax_fn.optimizer(optax.sgd(1.0), lt, lora_plus_ratio=-1)
    tx = lorax_fn.optimizer(optax.sgd(1.0), lt)
    with pytest.raises(LoraError, match=r"missing \['params/Dense_1/bias'\]"):
        tx.init({p: v for p, v in lt.items() if p != "params/Dense_1/bias"})


def test_optimizer_built_for_another_tree_names_the_first_differing_path(setup):
    _, lt, _, _ = setup
    variables = MLP().init(jax.random.key(0), jnp.ones((1, 8)))
    other = lorax_fn.split(variables, LoraSpec("**/Dense_0/kernel", rank=2), key=KEY)[1]
    rescaled = lorax_fn.split(
        variables,
        LoraSpec("**/kernel", rank=2, alpha=4.0, trainable="params/Dense_1/bias"),
        key=KEY,
    )[1]
    tx = lorax_fn.optimizer(optax.adam(1e-2), lt)
    state = tx.init(lt)
    with pytest.raises(LoraError, match=r"init: .*first difference at 'params/Dense_1/bias'"):
        tx.init(other)
    with pytest.raises(
        LoraError,
        match=r"init: .*first difference at 'params/Dense_0/kernel': LoraFactors\(scale=2",
    ):
        tx.init(rescaled)
    grads = jax.tree.map(jnp.ones_like, other)
    with pytest.raises(LoraError, match=r"update \(the updates\): .*'params/Dense_1/bias'"):
        tx.update(grads, state, other)


def test_optimizer_without_a_tree_trains_exactly_like_with_one(setup):
    base, lt, x, y = setup
    with_tree, _, _ = train(lorax_fn.optimizer(optax.adam(1e-2), lt), base, lt, x, y, steps=2)
    without, _, _ = train(lorax_fn.optimizer(optax.adam(1e-2)), base, lt, x, y, steps=2)
    for a, b in zip(jax.tree.leaves(with_tree), jax.tree.leaves(without), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(LoraError, match=r"frozen filter 'base/\*\*' matches no leaf"):
        lorax_fn.optimizer(optax.sgd(1.0), frozen="base/**").init(lt)


@pytest.mark.parametrize("with_tree", [True, False])
def test_composes_with_optax_tree_map_params(setup, with_tree):
    _, lt, _, _ = setup
    tx = lorax_fn.optimizer(optax.adam(1e-2), lt if with_tree else None, lora_plus_ratio=4.0)
    state = tx.init(lt)
    # Mark each copy of the params in the state (Adam's mu and nu) and everything else.
    marked = optax.tree_map_params(
        tx, lambda p: jnp.full_like(p, 7.0), state, transform_non_params=lambda v: v - 1
    )
    assert jax.tree.structure(marked) == jax.tree.structure(state)
    moments = [v for v in jax.tree.leaves(marked) if v.dtype == jnp.float32]
    assert len(moments) == 2 * len(jax.tree.leaves(lt)) and all(np.all(v == 7.0) for v in moments)
    counts = [v for v in jax.tree.leaves(marked) if v.dtype == jnp.int32]
    # One count per label present (given a tree) or per trained label without one:
    # lora_a, lora_b, trainable and each registered variant's extra arrays' labels
    # (DoRA's lora_magnitude; other test modules register variants of their own).
    extras = {get(v).label(e) for v in names() for e in get(v).extras}
    assert "lora_magnitude" in extras
    assert [int(c) for c in counts] == [-1] * (3 if with_tree else 3 + len(extras))


def test_dora_magnitude_is_trained_at_the_plain_rate_and_never_decayed():
    variables = MLP().init(jax.random.key(0), jnp.ones((1, 8)))
    spec = LoraSpec(targets="**/kernel", rank=2, use_dora=True)
    base, lt = lorax_fn.split(variables, spec, key=KEY)
    lt = jax.tree.map(lambda x: x + 0.05, lt)  # B ≠ 0: every leaf gets a gradient
    x = jax.random.normal(jax.random.key(2), (32, 8))
    y = jax.random.normal(jax.random.key(3), (32, 3))
    grads = jax.grad(lambda t: lorax_fn.lora(mse)(base, t, x, y))(lt)
    path = "params/Dense_0/kernel"
    assert float(jnp.abs(grads[path].magnitude).max()) > 0

    labels = lorax_fn.optim.lora_labels(lt)[path]
    assert (labels.a, labels.b, labels.magnitude) == ("lora_a", "lora_b", "lora_magnitude")
    # The magnitude is the adapter's: trainable_tx (a head's rate) never reaches it.
    head_only = lorax_fn.optimizer(optax.sgd(1.0), lt, trainable_tx=optax.sgd(0.0))
    moved = head_only.update(grads, head_only.init(lt), lt)[0][path].magnitude
    np.testing.assert_allclose(moved, -grads[path].magnitude, rtol=1e-6)
    mask = lorax_fn.weight_decay_mask(lt)[path]
    assert (mask.a, mask.b, mask.magnitude) == (True, True, False)

    lr, wd, ratio = 0.1, 0.5, 4.0
    adamw = optax.adamw(lr, weight_decay=wd, mask=lorax_fn.weight_decay_mask)
    tx = lorax_fn.optimizer(adamw, lt, lora_plus_ratio=ratio)
    updates, _ = tx.update(grads, tx.init(lt), lt)
    # Reference, leaf by leaf: AdamW on A, ratio·AdamW on B, Adam without decay on m.
    plain = optax.adamw(lr, weight_decay=wd)
    no_decay = optax.adamw(lr, weight_decay=0.0)
    for p, f in lt.items():
        g = grads[p]
        ref = {
            "a": plain.update(g.a, plain.init(f.a), f.a)[0],
            "b": ratio * plain.update(g.b, plain.init(f.b), f.b)[0],
            "magnitude": no_decay.update(g.magnitude, no_decay.init(f.magnitude), f.magnitude)[0],
        }
        for field, want in ref.items():
            got = getattr(updates[p], field)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=f"{p}.{field}")
    # With zero gradients only the decay is left: A and B shrink, m stays bit-for-bit.
    zeros = jax.tree.map(jnp.zeros_like, lt)
    new = optax.apply_updates(lt, tx.update(zeros, tx.init(lt), lt)[0])
    np.testing.assert_allclose(new[path].a, lt[path].a * (1 - lr * wd), rtol=1e-6)
    np.testing.assert_array_equal(new[path].magnitude, lt[path].magnitude)
    # A plain tree's mask has no magnitude leaf (optax needs the same structure).
    _, plain_lt = lorax_fn.split(variables, LoraSpec("**/kernel", rank=2), key=KEY)
    assert "magnitude" not in lorax_fn.weight_decay_mask(plain_lt)[path].extras
