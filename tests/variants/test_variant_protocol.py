"""A variant defined outside the library flows through every wing, unchanged.

``Gain`` — a learned per-output-column gain on top of LoRA, ``W = (W0 + s·A·B)·g`` — is
written here against :class:`lorax_fn.variants.Variant` and registered; nothing in
lorax_fn names it. It must work in ``split``, factorized ``lora(fn)`` (no fallback),
``merge``/``unmerge``, the optimizer, ``lora_shardings``, ``save``/``restore`` and the
checkpoint manager, with values and gradients equal to merge-then-call; the wings that
cannot hold it (PEFT export, stacks) refuse it by name.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_matches_merged, randomize_b
from jax.sharding import Mesh, PartitionSpec

import lorax_fn
from lorax_fn import LoraError, LoraSpec
from lorax_fn.variants import Variant, register


class Gain(Variant):
    name = "test_gain"
    title = "Gain"
    extras = ("gain",)
    peft_config = None

    def init(self, w0, factors):
        return {"gain": jnp.ones(factors.column_shape, factors.a.dtype)}

    def column_scale(self, w0, factors):
        return factors.extras["gain"].astype(jnp.float32)

    def inverse_column_scale(self, factors, state):
        g = factors.extras["gain"].astype(jnp.float32)
        return jnp.where(g != 0, 1.0 / jnp.where(g != 0, g, 1.0), 0.0)


register(Gain())


class Model(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(13, 16)(ids)
        x = nn.gelu(nn.Dense(32)(x))
        return nn.Dense(8)(x)


IDS = jnp.array([[1, 4, 12], [0, 7, 3]])
SPEC = LoraSpec(["**/kernel", "**/embedding"], rank=2, variant="test_gain")


@pytest.fixture(scope="module")
def adapted():
    variables = Model().init(jax.random.key(0), IDS)
    base, lt = lorax_fn.split(variables, SPEC, key=jax.random.key(1))
    return base, randomize_b(lt)


def test_split_initialises_the_extras_and_starts_at_the_base():
    variables = Model().init(jax.random.key(0), IDS)
    base, lt = lorax_fn.split(variables, SPEC, key=jax.random.key(1))
    f = lt["params/Dense_0/kernel"]
    assert f.variant == "test_gain" and f.gain.shape == (32,) == f.column_shape
    np.testing.assert_array_equal(f.gain, 1.0)
    np.testing.assert_allclose(
        lorax_fn.lora(Model().apply)(base, lt, IDS), Model().apply(variables, IDS), atol=1e-6
    )


def test_factorized_values_and_gradients_equal_merge_then_call(adapted):
    base, lt = adapted
    assert not np.allclose(lt["params/Dense_1/kernel"].gain, 1.0)  # randomize_b moved it
    # assert_matches_merged runs lora(fn, on_fallback="error"): no weight is formed.
    assert_matches_merged(Model().apply, base, lt, IDS)
    grads = jax.grad(lambda t: jnp.sum(lorax_fn.lora(Model().apply)(base, t, IDS) ** 2))(lt)
    assert np.any(grads["params/Dense_1/kernel"].gain != 0)


def test_merge_folds_the_gain_and_unmerge_takes_it_out(adapted):
    base, lt = adapted
    f = lt["params/Dense_0/kernel"]
    w0 = base["params"]["Dense_0"]["kernel"]
    want = (w0 + f.scale * f.a @ f.b) * f.gain[None, :]
    merged = lorax_fn.merge(base, lt)
    np.testing.assert_allclose(merged["params"]["Dense_0"]["kernel"], want, rtol=1e-5, atol=1e-6)
    back = lorax_fn.unmerge(merged, lt)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(base), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_the_optimizer_trains_the_gain_with_its_own_label(adapted):
    base, lt = adapted
    labels = lorax_fn.optim.lora_labels(lt)
    assert labels["params/Dense_0/kernel"].gain == "lora_gain"
    mask = lorax_fn.weight_decay_mask(lt)
    assert mask["params/Dense_0/kernel"].gain is False  # not in Gain.decayed
    tx = lorax_fn.optimizer(optax.adam(1e-2), lt, lora_plus_ratio=4.0)
    grads = jax.grad(lambda t: jnp.sum(lorax_fn.lora(Model().apply)(base, t, IDS) ** 2))(lt)
    updates, _ = tx.update(grads, tx.init(lt), lt)
    new = optax.apply_updates(lt, updates)
    plain, _ = optax.adam(1e-2).update(grads, optax.adam(1e-2).init(lt), lt)
    # The gain is trained by tx itself (Adam's first step: -lr·sign(g)), never at LoRA+'s ratio.
    np.testing.assert_allclose(
        new["params/Dense_0/kernel"].gain - lt["params/Dense_0/kernel"].gain,
        plain["params/Dense_0/kernel"].gain,
        atol=1e-6,  # a difference of values near 1: float32's spacing there
    )
    assert np.all(np.abs(plain["params/Dense_0/kernel"].gain) > 1e-3)


def test_lora_shardings_place_the_gain_like_b_without_its_rank():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    params = {"w": jnp.ones((8, 16))}
    _, lt = lorax_fn.split(
        params, LoraSpec("w", rank=2, variant="test_gain"), key=jax.random.key(0)
    )
    sh = lorax_fn.lora_shardings(lt, {"w": PartitionSpec("data", "model")}, mesh)
    assert sh["w"].b.spec == PartitionSpec(None, "model")
    assert sh["w"].gain.spec == PartitionSpec("model")
    placed = jax.device_put(lt, sh)
    assert placed["w"].gain.sharding == sh["w"].gain


def test_save_restore_and_the_manager_keep_the_gain(adapted, tmp_path):
    base, lt = adapted
    lorax_fn.save(tmp_path / "adapter", lt, SPEC, base=base)
    back = lorax_fn.restore(tmp_path / "adapter", base=base)
    for p, f in lt.items():
        assert back[p].variant == "test_gain"
        np.testing.assert_array_equal(back[p].gain, f.gain)
        np.testing.assert_array_equal(back[p].b, f.b)
    tx = optax.adam(1e-2)
    with lorax_fn.LoraCheckpointManager(tmp_path / "run", SPEC, base=base) as mngr:
        mngr.save(1, lt, tx.init(lt))
        mngr.wait_until_finished()
        state = mngr.restore(opt_state=jax.eval_shape(tx.init, lt))
    np.testing.assert_array_equal(
        state.lora_tree["params/Dense_1/kernel"].gain, lt["params/Dense_1/kernel"].gain
    )
    # A plain spec contradicts the tree: refused by path, nothing written.
    with pytest.raises(LoraError, match="params/Dense_0/kernel"):
        lorax_fn.save(tmp_path / "plain", lt, dataclasses.replace(SPEC, variant="lora"), base=base)
    assert not (tmp_path / "plain").exists()


def test_wings_that_cannot_hold_it_refuse_it_by_name(adapted, tmp_path):
    _, lt = adapted
    with pytest.raises(LoraError, match="test_gain"):
        lorax_fn.export_peft(tmp_path / "peft", lt, SPEC)
    with pytest.raises(LoraError, match=r"Gain adapters \(variant 'test_gain'\) cannot be stacked"):
        lorax_fn.stack_adapters([lt, lt])


def test_an_unregistered_variant_is_refused_with_the_registered_names():
    with pytest.raises(LoraError, match=r"unknown adapter variant 'nope'.*'dora'.*'lora'"):
        lorax_fn.split(
            {"w": jnp.ones((4, 4))}, LoraSpec("w", rank=2, variant="nope"), key=jax.random.key(0)
        )
    assert isinstance(lorax_fn.variants.get("test_gain"), Gain)
