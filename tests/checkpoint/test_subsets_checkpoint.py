"""Layer subsets (lorax_fn.subsets) in lorax_fn checkpoints: exact round trips and refusals."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import randomize_b
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lorax_fn
from lorax_fn import Layout, LoraError, LoraSpec
from lorax_fn.checkpoint import LoraCheckpointManager, checkpoint_info, restore, save
from lorax_fn.checkpoint import format as ckfmt
from lorax_fn.checkpoint.format import seal
from lorax_fn.subsets import LayerGroups, LayerSubset, select_layers

L, D = 6, 8
STACKED = Layout(in_axes=(1,), out_axes=(2,), batch_axes=(0,))
SPEC = LoraSpec(
    ["**/kernel"], rank=4, alpha=6.0, trainable="head/bias", layouts={"stack*/kernel": STACKED}
)


def make_params(layers: int = L) -> dict:
    keys = jax.random.split(jax.random.key(0), 3)
    return {
        "stack": {"kernel": jax.random.normal(keys[0], (layers, D, D))},
        "stack2": {"kernel": jax.random.normal(keys[1], (layers, D, D), jnp.bfloat16)},
        "head": {"kernel": jax.random.normal(keys[2], (D, 5)), "bias": jnp.zeros(5)},
    }


def subset_tree() -> tuple[dict, dict]:
    """A tree with a LayerSubset (layers 1, 4), a LayerGroups (ranks 4/2/1) and plain entries."""
    params = make_params()
    base, lt = lorax_fn.split(params, SPEC, key=jax.random.key(1))
    lt = randomize_b(lt, std=0.3)
    f = lt["stack2/kernel"]  # bfloat16 factors: dtypes survive the checkpoint
    lt["stack2/kernel"] = dataclasses.replace(
        f, a=f.a.astype(jnp.bfloat16), b=f.b.astype(jnp.bfloat16)
    )
    lt = select_layers(lt, {"stack/kernel": [1, -2], "stack2/kernel": {0: 4, 2: 2, 5: 1}})
    assert isinstance(lt["stack/kernel"], LayerSubset)
    assert isinstance(lt["stack2/kernel"], LayerGroups)
    return base, lt


def assert_identical(got: dict, want: dict) -> None:
    """Same paths, same static fields (layers, ranks, scales, layouts), bit-identical arrays."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_save_restore_round_trips_subsets_exactly(tmp_path):
    base, lt = subset_tree()
    save(tmp_path / "ck", lt, SPEC, base=base)
    got = restore(tmp_path / "ck", base=base)
    assert_identical(got, lt)
    assert got["stack/kernel"].layers == (1, 4) and got["stack/kernel"].num_layers == L
    assert got["stack2/kernel"].ranks == (4, 2, 1)
    assert got["stack2/kernel"].parts[0].factors.a.dtype == jnp.bfloat16
    # The reference: the restored adapter merges to what the saved one merges to.
    want, merged = lorax_fn.merge(base, lt), lorax_fn.merge(base, got)
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    info = checkpoint_info(tmp_path / "ck")
    assert info.entries["stack/kernel"] == "subset" and info.entries["head/kernel"] == "factors"
    meta = json.loads((tmp_path / "ck" / "lorax_fn" / "metadata").read_text())
    assert meta["format_version"] == 4


def test_restore_places_subsets_by_sharding_tree(tmp_path):
    _, lt = subset_tree()
    save(tmp_path / "ck", lt, SPEC)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    replicated = NamedSharding(mesh, P())
    shardings = jax.tree.map(lambda x: replicated, lt)
    got = restore(tmp_path / "ck", shardings=shardings)
    assert_identical(got, lt)
    assert got["stack2/kernel"].parts[1].factors.b.sharding == replicated
    # A function of the abstract tree: the restore target holds the subsets' compact shapes.
    seen = {}

    def place(abstract: dict) -> dict:
        seen.update(abstract)
        return jax.tree.map(lambda x: replicated, abstract)

    assert_identical(restore(tmp_path / "ck", shardings=place), lt)
    assert seen["stack/kernel"].factors.a.shape == (2, D, 4)
    assert seen["stack2/kernel"].layers == (0, 2, 5)


def test_manager_round_trips_subsets_and_their_optimizer_state(tmp_path):
    base, lt = subset_tree()
    tx = optax.adam(1e-2)
    grads = jax.tree.map(jnp.ones_like, lt)
    _, opt_state = tx.update(grads, tx.init(lt), lt)
    with LoraCheckpointManager(tmp_path / "run", SPEC, base=base) as mngr:
        mngr.save(3, lt, opt_state, base=base)
        mngr.wait_until_finished()
        state = mngr.restore(opt_state=jax.eval_shape(tx.init, lt), base=base)
        # Sharded: B's fan-out over the devices; the abstract optimizer state (no
        # shardings of its own) follows the LoRA leaf it mirrors, part by part.
        n = jax.device_count()
        mesh = jax.make_mesh((n,), ("d",))

        def place(x: jax.Array) -> NamedSharding:
            split = x.ndim == 3 and x.shape[-1] % n == 0
            return NamedSharding(mesh, P(None, None, "d") if split else P())

        shardings = jax.tree.map(place, lt)
        sharded = mngr.restore(opt_state=jax.eval_shape(tx.init, lt), shardings=shardings)
    assert state.step == 3
    assert_identical(state.lora_tree, lt)
    assert_identical(state.opt_state, opt_state)
    assert float(jnp.abs(state.opt_state[0].mu["stack2/kernel"].parts[2].factors.b).sum()) > 0
    assert_identical(sharded.opt_state, opt_state)
    for path in ("stack/kernel", "stack2/kernel"):
        got = jax.tree.map(lambda x: x.sharding.spec, sharded.opt_state[0].nu[path])
        assert got == jax.tree.map(lambda x: x.sharding.spec, sharded.lora_tree[path])
    assert sharded.opt_state[0].nu["stack2/kernel"].parts[1].factors.b.sharding.spec[-1] == "d"


@pytest.mark.parametrize("layers", [L + 1, L - 1])
def test_restore_onto_a_stack_of_another_length_is_refused(tmp_path, layers):
    base, lt = subset_tree()
    save(tmp_path / "ck", lt, SPEC, base=base)
    other, _ = lorax_fn.split(make_params(layers), SPEC, key=jax.random.key(1))
    with pytest.raises(LoraError, match=r"different base:\n.*stack/kernel: made for shape"):
        restore(tmp_path / "ck", base=other)
    with pytest.raises(LoraError, match="stack/kernel"):
        save(tmp_path / "other", lt, SPEC, base=other)


def edit(directory: Path, change) -> None:
    """Edit the metadata and reseal it, as a buggy writer would: only validation catches it."""
    path = directory / "lorax_fn" / "metadata"
    meta = json.loads(path.read_text())
    change(next(e for e in meta["entries"] if e["path"] == "stack2/kernel"))
    meta = seal({k: v for k, v in meta.items() if k != "metadata_sha256"})
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda e: e["parts"][1].update(layers=[0]), r"layers \[0\] are not distinct"),
        (lambda e: e["parts"][2].update(layers=[L]), "are not distinct layers of a stack of 6"),
        (lambda e: e["parts"][0].update(layers=[0, 1]), r"A \(1, 8, 4\) .* do not fit"),
        (lambda e: e.update(num_layers=L + 1), "a subset of 7 layers, the weight has 6"),
        (lambda e: e.update(groups=False), "a layer subset of 3 parts"),
    ],
)
def test_inconsistent_subset_metadata_is_refused(tmp_path, change, match):
    base, lt = subset_tree()
    save(tmp_path / "ck", lt, SPEC, base=base)
    edit(tmp_path / "ck", change)
    with pytest.raises(LoraError, match=match):
        restore(tmp_path / "ck", base=base)


def test_spec_checks_each_part(tmp_path):
    _, lt = subset_tree()
    with pytest.raises(LoraError, match="stack/kernel: rank 4, the spec says 2"):
        save(tmp_path / "ck", lt, dataclasses.replace(SPEC, rank=2))


def test_plain_checkpoints_keep_their_version_and_an_older_reader_refuses_subsets(
    tmp_path, monkeypatch
):
    base, lt = subset_tree()
    plain = {p: e for p, e in lt.items() if p.startswith("head")}
    save(tmp_path / "plain", plain, None, base=base)
    meta = json.loads((tmp_path / "plain" / "lorax_fn" / "metadata").read_text())
    assert meta["format_version"] == 2
    save(tmp_path / "ck", lt, SPEC, base=base)
    monkeypatch.setattr(ckfmt, "FORMAT_VERSION", 3)  # a lorax_fn from before subsets
    assert_identical(restore(tmp_path / "plain", base=base), plain)
    with pytest.raises(LoraError, match=r"format version 4; this lorax_fn .* reads up to 3"):
        restore(tmp_path / "ck", base=base)


def test_a_subset_of_another_variant_is_refused(tmp_path):
    _, lt = subset_tree()
    part = lt["stack/kernel"]
    dora = dataclasses.replace(part.factors, extras={"magnitude": jnp.ones((2, D))}, variant="dora")
    lt["stack/kernel"] = LayerSubset(dora, part.layers, part.num_layers)
    # select_layers makes plain LoRA only; a hand-built DoRA subset would lose its magnitude.
    with pytest.raises(LoraError, match="stack/kernel: a layer subset in a checkpoint holds plain"):
        save(tmp_path / "ck", lt, None)
