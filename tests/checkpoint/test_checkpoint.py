"""lorax_fn.save / restore / LoraCheckpointManager: exact round trips and every refusal."""

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from helpers import randomize_b
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lorax_fn
from lorax_fn import Layout, LoraError, LoraFactors, quantize_base
from lorax_fn.checkpoint import (
    LoraCheckpointManager,
    checkpoint_info,
    restore,
    save,
)
from lorax_fn.checkpoint.format import CheckpointDamaged, seal

STACK = {"params/stack/kernel": Layout(in_axes=(1,), out_axes=(2,), batch_axes=(0,))}
SPEC = lorax_fn.LoraSpec(
    targets=["**/kernel"],
    rank=4,
    alpha=6.0,
    rank_pattern={"**/out/kernel": 2},
    exclude=["**/head/kernel"],
    trainable=["**/head/bias"],
    dropout=0.1,
)


# Base partition specs on a 2x4 ("data", "model") mesh.
MESH_SPECS = {
    "params": {
        "dense": {"kernel": P("data", "model")},
        "attn": {
            "query": {"kernel": P("data", None, None)},
            "out": {"kernel": P(None, None, "model")},
        },
        "stack": {"kernel": P(None, "data", "model")},
        "head": {"kernel": P("data", None), "bias": P()},
    }
}


def make_params(layers: int = 3, d: int = 16, dtype=jnp.float32) -> dict:
    rng = np.random.default_rng(0)  # numpy, so that building test trees compiles nothing
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)  # noqa: E731
    return {
        "params": {
            "dense": {"kernel": normal(d, 32)},
            "attn": {"query": {"kernel": normal(d, 4, 8)}, "out": {"kernel": normal(4, 8, d)}},
            "stack": {"kernel": normal(layers, d, d)},
            "head": {"kernel": normal(d, 3), "bias": jnp.zeros(3, dtype)},
        }
    }


def make_lora(params: dict, spec: lorax_fn.LoraSpec = SPEC) -> tuple[dict, dict]:
    base, lt = lorax_fn.split(params, spec, key=jax.random.key(1), layouts=STACK)
    # B = 0 at init would hide a mixed-up A and B (and a DoRA magnitude left at its
    # init ‖W0‖_c one that is not restored); make every array distinct.
    rng = np.random.default_rng(1)
    noise = lambda x: jnp.asarray(np.asarray(x, np.float32) + rng.random(x.shape), x.dtype)  # noqa: E731
    return base, jax.tree.map(noise, lt)


@pytest.fixture(scope="module")
def model() -> tuple[dict, dict]:
    return make_lora(make_params())


def assert_same_tree(got: dict, want: dict) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)  # includes scale/layout/dropout
    for path in want:
        assert type(got[path]) is type(want[path]), path
        for g, w in zip(jax.tree.leaves(got[path]), jax.tree.leaves(want[path]), strict=True):
            assert g.dtype == w.dtype, path
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=path)


def snapshot(*trees) -> list[np.ndarray]:
    return [np.array(x) for t in trees for x in jax.tree.leaves(t)]


def assert_untouched(before: list[np.ndarray], *trees) -> None:
    for b, a in zip(before, snapshot(*trees), strict=True):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- round trips


def test_round_trip_dense_attention_and_scanned_stack(tmp_path, model):
    base, lt = model
    assert lt["params/stack/kernel"].a.shape == (3, 16, 4)
    assert lt["params/attn/out/kernel"].a.shape == (4, 8, 2)
    save(tmp_path / "ad", lt, SPEC, base=base)
    assert_same_tree(restore(tmp_path / "ad", base=base), lt)
    assert_same_tree(restore(tmp_path / "ad"), lt)
    info = checkpoint_info(tmp_path / "ad")
    assert info.spec == SPEC and info.library_version == lorax_fn.__version__
    assert info.base_leaves["params/stack/kernel"] == ((3, 16, 16), "float32")
    assert info.entries["params/head/bias"] == "array"


def test_round_trip_bfloat16_base_without_base_at_save(tmp_path):
    base, lt = make_lora(make_params(dtype=jnp.bfloat16))
    save(tmp_path / "ad", lt, SPEC)  # no base: the fingerprint has shapes, dtypes of arrays
    assert checkpoint_info(tmp_path / "ad").base_leaves["params/dense/kernel"][1] is None
    assert_same_tree(restore(tmp_path / "ad", base=base), lt)
    assert lt["params/head/bias"].dtype == jnp.bfloat16


def test_restore_onto_replicated_and_sharded_mesh(tmp_path, model):
    base, lt = model
    save(tmp_path / "ad", lt, SPEC, base=base)
    mesh = jax.make_mesh((8,), ("x",))
    replicated = NamedSharding(mesh, P())
    got = restore(tmp_path / "ad", shardings=replicated)
    assert_same_tree(got, lt)
    assert all(x.sharding == replicated for x in jax.tree.leaves(got))

    # A follows the weight's fan-in, B its fan-out: shard the 16/32-sized axes over 8.
    mesh2 = jax.make_mesh((2, 4), ("data", "model"))
    got = restore(
        tmp_path / "ad",
        shardings=lambda abstract: lorax_fn.lora_shardings(abstract, MESH_SPECS, mesh2),
    )
    assert_same_tree(got, lt)
    assert got["params/dense/kernel"].a.sharding.spec == P("data", None)
    assert got["params/dense/kernel"].b.sharding.spec == P(None, "model")
    assert got["params/stack/kernel"].b.sharding.spec == P(None, None, "model")
    # The same shardings given as a dict, built from the tree itself.
    explicit = jax.tree.map(lambda x: x.sharding, got)
    assert_same_tree(restore(tmp_path / "ad", shardings=explicit), lt)


def test_bad_shardings_are_refused_naming_the_path(tmp_path, model):
    base, lt = model
    save(tmp_path / "ad", lt, SPEC, base=base)
    mesh = jax.make_mesh((8,), ("x",))
    with pytest.raises(LoraError, match=r"params/attn/out/kernel: sharding .* does not fit A"):
        restore(tmp_path / "ad", shardings=NamedSharding(mesh, P("x")))  # (4, 8, 2) over 8
    with pytest.raises(LoraError, match="no entry for 'params/attn/out/kernel'"):
        restore(tmp_path / "ad", shardings={"params/head/bias": NamedSharding(mesh, P())})


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda p: p["params"].pop("dense"), r"paths not in the base: \['params/dense/kernel'\]"),
        (
            lambda p: p["params"].update(extra={"kernel": jnp.ones((16, 16))}),
            r"selects but it lacks: \['params/extra/kernel'\]",
        ),
        (
            lambda p: p["params"]["attn"]["query"].update(kernel=jnp.ones((16, 4, 9))),
            r"params/attn/query/kernel: made for shape \(16, 4, 8\), the base has \(16, 4, 9\)",
        ),
        (
            lambda p: p["params"]["head"].update(bias=jnp.zeros(3, jnp.bfloat16)),
            r"params/head/bias: trained in full as float32, the base has bfloat16",
        ),
        (
            lambda p: p["params"]["stack"].update(kernel=jnp.ones((3, 16, 16), jnp.int8)),
            r"params/stack/kernel: adapted weight, the base has non-floating dtype int8",
        ),
    ],
    ids=["missing-path", "extra-path", "shape", "trained-leaf-dtype", "integer-weight"],
)
def test_adapter_for_a_different_base_is_refused(tmp_path, model, change, match):
    base, lt = model
    save(tmp_path / "ad", lt, SPEC, base=base)
    other = jax.tree.map(lambda x: x, base)
    change(other)
    before = snapshot(base, lt, other)
    with pytest.raises(LoraError, match=match):
        restore(tmp_path / "ad", base=other)
    manager = LoraCheckpointManager(tmp_path / "run", SPEC, base=base)
    manager.save(1, lt, optax.adam(1e-3).init(lt))
    with pytest.raises(LoraError, match=match):
        manager.restore(base=other)
    manager.close()
    assert_untouched(before, base, lt, other)


def test_save_refuses_a_tree_that_does_not_fit_the_base_and_writes_nothing(tmp_path, model):
    base, lt = model
    bad = dict(lt, **{"params/head/bias": jnp.zeros(4)})
    with pytest.raises(LoraError, match=r"params/head/bias: trainable array \(4,\)"):
        save(tmp_path / "ad", bad, SPEC, base=base)
    with pytest.raises(LoraError, match="params/nope: not a leaf of the given base"):
        save(tmp_path / "ad", dict(lt, **{"params/nope": jnp.zeros(3)}), SPEC, base=base)
    with pytest.raises(LoraError, match="non-empty LoRA tree"):
        save(tmp_path / "ad", {}, SPEC)
    assert not (tmp_path / "ad").exists()


def lora_data_files(directory: Path) -> list[Path]:
    files = [f for f in (directory / "lora").rglob("*") if f.is_file() and f.parent.name == "d"]
    return sorted(files, key=lambda f: f.stat().st_size)


def corrupt_truncate(directory: Path) -> None:
    f = lora_data_files(directory)[-1]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def corrupt_metadata(directory: Path) -> None:
    (directory / "lorax_fn" / "metadata").write_text('{"format": "lorax_fn.checkpoint", "form')


def drop_metadata(directory: Path) -> None:
    shutil.rmtree(directory / "lorax_fn")


def edit_metadata(directory: Path, edit, *, reseal: bool) -> None:
    """Edit the JSON metadata; ``reseal`` recomputes its digest, as a buggy writer would."""
    meta = json.loads((directory / "lorax_fn" / "metadata").read_text())
    edit(meta)
    if reseal:
        meta = seal({k: v for k, v in meta.items() if k != "metadata_sha256"})
    (directory / "lorax_fn" / "metadata").write_text(json.dumps(meta))


def drop_entries(directory: Path) -> None:
    edit_metadata(directory, lambda meta: meta.pop("entries"), reseal=True)


def future_version(directory: Path) -> None:
    edit_metadata(directory, lambda meta: meta.update(format_version=99), reseal=False)


def drop_arrays(directory: Path) -> None:
    shutil.rmtree(directory / "lora")


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (corrupt_truncate, "truncated or corrupted"),
        (corrupt_metadata, "metadata of the checkpoint .* truncated or corrupted"),
        (drop_metadata, "has no lorax_fn metadata"),
        (drop_entries, "malformed lorax_fn metadata .*'entries'"),
        (future_version, "format version 99; this lorax_fn .* reads up to 4"),
        (drop_arrays, "truncated or corrupted"),
    ],
)
def test_damaged_checkpoint_is_a_clear_error(tmp_path, model, damage, match):
    base, lt = model
    save(tmp_path / "ad", lt, SPEC, base=base)
    damage(tmp_path / "ad")
    with pytest.raises(LoraError, match=match):
        restore(tmp_path / "ad", base=base)


def test_flipped_byte_in_array_data_is_caught_by_the_checksum(tmp_path):
    # tensorstore checksums its index nodes but not array data: this read would succeed.
    params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((256, 256)), jnp.float32)}
    base, lt = lorax_fn.split(params, lorax_fn.LoraSpec(trainable="w"), key=jax.random.key(0))
    save(tmp_path / "ad", lt, None, base=base)
    data_file = lora_data_files(tmp_path / "ad")[-1]
    assert data_file.stat().st_size > 200_000  # the array's chunk, not an index node
    data = bytearray(data_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    data_file.write_bytes(bytes(data))
    with pytest.raises(LoraError, match=r"w is corrupted \(its SHA-256 does not match"):
        restore(tmp_path / "ad", base=base)


def test_missing_directory_and_interrupted_overwrite_are_explained(tmp_path, model):
    _, lt = model
    with pytest.raises(LoraError, match="no checkpoint at"):
        restore(tmp_path / "nothing")
    save(tmp_path / "ad", lt, SPEC)
    (tmp_path / "ad").rename(tmp_path / ".ad.lorax-old")  # as a kill between the renames
    with pytest.raises(LoraError, match=r"previous checkpoint at .*\.ad\.lorax-old"):
        restore(tmp_path / "ad")
    assert_same_tree(restore(tmp_path / ".ad.lorax-old"), lt)


def test_restore_never_unpickles(tmp_path, model, monkeypatch):
    base, lt = model
    save(tmp_path / "ad", lt, SPEC, base=base)

    def forbidden(*args, **kwargs):
        raise AssertionError("restore tried to unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    assert_same_tree(restore(tmp_path / "ad", base=base), lt)


def test_overwrite(tmp_path, model):
    base, lt = model
    save(tmp_path / "ad", lt, SPEC)
    lt2 = jax.tree.map(lambda x: x * 2, lt)
    with pytest.raises(LoraError, match="already exists; pass overwrite=True"):
        save(tmp_path / "ad", lt2, SPEC)
    save(tmp_path / "ad", lt2, SPEC, overwrite=True)
    assert_same_tree(restore(tmp_path / "ad", base=base), lt2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(LoraError, match="not a lorax_fn checkpoint"):
        save(tmp_path / "notes", lt, SPEC, overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_save_and_export_peft_share_one_rule_for_existing_directories(tmp_path):
    spec = lorax_fn.LoraSpec("w", rank=2)
    _, lt = lorax_fn.split({"w": jnp.ones((8, 4))}, spec, key=jax.random.key(0))
    writers = {
        "save": lambda d, **kw: save(d, lt, spec, **kw),
        "export_peft": lambda d, **kw: lorax_fn.export_peft(d, lt, spec, name_map={"w": "w"}, **kw),
    }
    for name, write in writers.items():
        empty = tmp_path / name
        empty.mkdir()
        write(empty)  # an empty directory holds nothing to lose
        with pytest.raises(LoraError, match="already exists; pass overwrite=True"):
            write(empty)
        write(empty, overwrite=True)


def test_callable_filters_save_without_a_spec(tmp_path):
    params = make_params()
    spec = lorax_fn.LoraSpec(targets=lambda path, leaf: path.endswith("dense/kernel"), rank=2)
    base, lt = lorax_fn.split(params, spec, key=jax.random.key(0))
    save(tmp_path / "ad", lt, spec, base=base)
    assert checkpoint_info(tmp_path / "ad").spec is None
    assert_same_tree(restore(tmp_path / "ad", base=base), lt)


# --------------------------------------------------------------------------- training


def test_manager_keeps_last_n_and_best_and_round_trips_optimizer_state(tmp_path, model):
    base, lt = model
    tx = optax.adam(1e-2)
    opt_state = tx.init(lt)
    grads = jax.tree.map(jnp.ones_like, lt)
    losses = [5.0, 1.0, 3.0, 4.0, 6.0, 7.0]
    states = {}
    with LoraCheckpointManager(
        tmp_path / "run", SPEC, base=base, max_to_keep=2, best_metric="loss"
    ) as manager:
        for step, loss in enumerate(losses):
            updates, opt_state = tx.update(grads, opt_state, lt)
            lt = optax.apply_updates(lt, updates)
            states[step] = (lt, opt_state)
            manager.save(
                step,
                lt,
                opt_state,
                metrics={"loss": loss},
                data_state={"epoch": 0, "index": 32 * step},
            )
        assert manager.all_steps() == [1, 4, 5] and manager.latest_step() == 5
        assert manager.best_step() == 1
        with pytest.raises(LoraError, match="step 5 is already saved"):
            manager.save(5, lt, opt_state, metrics={"loss": 0.0})
        with pytest.raises(LoraError, match="lack best_metric 'loss'"):
            manager.save(6, lt, opt_state, metrics={"acc": 0.0})
        with pytest.raises(LoraError, match="not JSON-able"):
            manager.save(6, lt, opt_state, metrics={"loss": 0.0}, data_state=object())

    manager = LoraCheckpointManager(
        tmp_path / "run", SPEC, base=base, max_to_keep=2, best_metric="loss"
    )
    template = jax.eval_shape(tx.init, lt)
    for step in (None, 1):
        state = manager.restore(step, opt_state=template)
        want_lt, want_opt = states[state.step]
        assert state.step == (5 if step is None else 1)
        assert state.data_state == {"epoch": 0, "index": 32 * state.step}
        assert state.metrics == {"loss": losses[state.step]}
        assert_same_tree(state.lora_tree, want_lt)
        assert jax.tree.structure(state.opt_state) == jax.tree.structure(want_opt)
        for g, w in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(want_opt), strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert manager.restore(opt_state=None).opt_state is None
    with pytest.raises(LoraError, match=r"no step 3 .* steps: \[1, 4, 5\]"):
        manager.restore(3)
    manager.close()
    # A step directory is an ordinary adapter checkpoint too.
    assert_same_tree(restore(tmp_path / "run" / "5", base=base), states[5][0])


def test_manager_refuses_a_mismatched_optimizer_template(tmp_path, model):
    base, lt = model
    manager = LoraCheckpointManager(tmp_path / "run", SPEC, base=base)
    manager.save(0, lt, optax.adam(1e-3).init(lt))
    with pytest.raises(LoraError, match="template-only leaves"):
        manager.restore(opt_state=optax.sgd(1e-3, momentum=0.9).init(lt))
    shrunk = {p: v for p, v in lt.items() if p != "params/head/bias"}
    with pytest.raises(LoraError, match=r"saved-only leaves \[.*params/head/bias"):
        manager.restore(opt_state=optax.adam(1e-3).init(shrunk))
    wrong_dtype = jax.tree.map(
        lambda x: x.astype(jnp.float16) if x.ndim else x, optax.adam(1e-3).init(lt)
    )
    with pytest.raises(LoraError, match=r"opt_state.* float32 in the checkpoint, .* float16"):
        manager.restore(opt_state=wrong_dtype)
    manager.close()
    with pytest.raises(LoraError, match="no checkpoint in"):
        LoraCheckpointManager(tmp_path / "empty", SPEC).restore()


def test_manager_async_save_and_interrupted_deletion_is_invisible(tmp_path, model):
    _, lt = model
    tx = optax.sgd(1e-2)  # no optimizer state leaves at all
    with LoraCheckpointManager(tmp_path / "run", SPEC, max_to_keep=1, async_save=True) as m:
        for step in range(3):
            m.save(step, jax.tree.map(lambda x, s=step: x + s, lt), tx.init(lt))
    m = LoraCheckpointManager(tmp_path / "run", SPEC)
    assert m.all_steps() == [2]
    state = m.restore(opt_state=tx.init(lt))
    assert_same_tree(state.lora_tree, jax.tree.map(lambda x: x + 2, lt))
    m.close()
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.is_dir()) == ["2"]


# --------------------------------------------------------------------------- integrity


@pytest.mark.parametrize(
    "edit",
    [
        lambda meta: meta["entries"][0].update(scale=meta["entries"][0]["scale"] * 2),
        lambda meta: meta["entries"][0].update(dropout=0.5),
        lambda meta: meta["spec"].update(rank=2),
        lambda meta: meta.update(step=7),
    ],
    ids=["scale", "dropout", "spec", "step"],
)
def test_edited_metadata_is_refused(tmp_path, model, edit):
    base, lt = model
    save(tmp_path / "ad", lt, SPEC, base=base)
    with LoraCheckpointManager(tmp_path / "run", SPEC, base=base) as manager:
        manager.save(3, lt, optax.sgd(1e-3).init(lt))
    for directory in (tmp_path / "ad", tmp_path / "run" / "3"):
        edit_metadata(directory, edit, reseal=False)
        with pytest.raises(CheckpointDamaged, match="metadata does not match the SHA-256"):
            restore(directory, base=base)
        with pytest.raises(CheckpointDamaged, match="metadata does not match the SHA-256"):
            checkpoint_info(directory)
    manager = LoraCheckpointManager(tmp_path / "run", SPEC, base=base)
    with pytest.raises(CheckpointDamaged, match="metadata does not match the SHA-256"):
        manager.restore()
    manager.close()


def test_stored_spec_must_agree_with_the_tree(tmp_path):
    params = make_params()
    spec4 = lorax_fn.LoraSpec(targets=["**/dense/kernel"], rank=4, trainable=["**/head/bias"])
    _, lt2 = lorax_fn.split(params, dataclasses.replace(spec4, rank=2), key=jax.random.key(0))
    base, lt4 = lorax_fn.split(params, spec4, key=jax.random.key(0))
    contradictions = [
        (
            lorax_fn.LoraSpec(targets=["**/dense/kernel"], rank=8, trainable=["**/head/bias"]),
            r"params/dense/kernel: rank 4, the spec says 8",
        ),
        (dataclasses.replace(spec4, alpha=8.0), r"params/dense/kernel: scale 1, the spec says 2"),
        (dataclasses.replace(spec4, dropout=0.2), r"dropout 0, the spec says 0.2"),
        (dataclasses.replace(spec4, trainable=()), r"params/head/bias: trained in full, but not"),
        (dataclasses.replace(spec4, targets=["**/stack/kernel"]), r"the spec does not target it"),
    ]
    for wrong, match in contradictions:
        with pytest.raises(LoraError, match=match):
            save(tmp_path / "ad", lt4, wrong, base=base)
    assert not (tmp_path / "ad").exists()
    save(tmp_path / "ad", lt4, spec4)  # the right spec, and no spec at all, are accepted
    save(tmp_path / "none", lt4, None)

    # A manager records its spec with every step: a tree or a run made with another
    # rank is refused instead of being restored (and later saved) under the wrong spec.
    with LoraCheckpointManager(tmp_path / "run", spec4) as manager:
        with pytest.raises(LoraError, match=r"rank 2, the spec says 4"):
            manager.save(1, lt2, optax.sgd(1e-3).init(lt2))
        manager.save(1, lt4, optax.sgd(1e-3).init(lt4))
    rank2 = dataclasses.replace(spec4, rank=2)
    manager = LoraCheckpointManager(tmp_path / "run", rank2)
    with pytest.raises(LoraError, match=r"contradicts this manager's spec:\n  .*rank 4"):
        manager.restore()
    manager.close()


def test_restore_accepts_a_base_copy_in_another_dtype_as_merge_does(tmp_path, model):
    base, lt = model
    save(tmp_path / "ad", lt, SPEC, base=base)
    # Factors fit any floating copy of their base (merge computes in float32 and casts
    # back); a leaf trained in full replaces its base leaf, so both refuse a dtype change.
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    bf16["params"]["head"]["bias"] = base["params"]["head"]["bias"]
    got = restore(tmp_path / "ad", base=bf16)
    assert_same_tree(got, lt)
    merged = lorax_fn.merge(bf16, got)
    assert_same_tree(merged, lorax_fn.merge(bf16, lt))
    assert merged["params"]["dense"]["kernel"].dtype == jnp.bfloat16
    all_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    with pytest.raises(LoraError, match="params/head/bias"):
        lorax_fn.merge(all_bf16, lt)
    with pytest.raises(LoraError, match="params/head/bias: trained in full as float32"):
        restore(tmp_path / "ad", base=all_bf16)


def test_unwritable_path_is_a_lora_error_naming_it(tmp_path, model):
    _, lt = model
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(LoraError, match=r"cannot write a checkpoint at .*file/ad"):
        save(tmp_path / "file" / "ad", lt, SPEC)


# --------------------------------------------------------------------------- extra state


class BatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        return nn.Dense(2)(x)


def test_batch_stats_saved_with_extra_restore_the_same_eval_output(tmp_path):
    net = BatchNormNet()
    x = jax.random.normal(jax.random.key(0), (16, 4))
    variables = net.init(jax.random.key(1), x)
    spec = lorax_fn.LoraSpec(targets=["**/kernel"], rank=2)
    base, lt = lorax_fn.split(variables, spec, key=jax.random.key(2))
    lt = randomize_b(lt)
    # "Training": the running statistics move away from their init values.
    fn = lorax_fn.lora(net.apply)
    _, updates = fn(base, lt, 3.0 * x + 1.0, train=True, mutable=["batch_stats"])
    trained = {**base, **updates}
    want = fn(trained, lt, x)
    assert not np.allclose(np.asarray(fn(base, lt, x)), np.asarray(want))  # stats matter

    with pytest.warns(UserWarning, match=r"non-parameter state \['batch_stats/BatchNorm_0/"):
        save(tmp_path / "plain", lt, spec, base=trained)
    with pytest.warns(UserWarning, match=r"also holds base leaves \['batch_stats/BatchNorm_0/"):
        save(tmp_path / "ad", lt, spec, base=trained, extra="batch_stats/**")
        restore(tmp_path / "ad", base=base)
    assert sorted(checkpoint_info(tmp_path / "ad").extra) == [
        "batch_stats/BatchNorm_0/mean",
        "batch_stats/BatchNorm_0/var",
    ]
    fresh = net.init(jax.random.key(1), x)  # a new process: base weights, init statistics
    before = snapshot(fresh)
    got_lt, got_base = restore(tmp_path / "ad", base=fresh, extra=True)
    np.testing.assert_array_equal(np.asarray(fn(got_base, got_lt, x)), np.asarray(want))
    assert_untouched(before, fresh)

    # The same through a training manager: the statistics are taken at each save.
    with LoraCheckpointManager(tmp_path / "run", spec, base=base, extra="batch_stats/**") as m:
        with pytest.raises(LoraError, match="pass base= to save"):
            m.save(1, lt, optax.sgd(1e-3).init(lt))
        m.save(1, lt, optax.sgd(1e-3).init(lt), base=trained)
        state = m.restore(base=fresh, extra=True)
    np.testing.assert_array_equal(np.asarray(fn(state.base, state.lora_tree, x)), np.asarray(want))
    with pytest.raises(LoraError, match="selects no leaf of the base"):
        save(tmp_path / "x", lt, spec, base=trained, extra="cache/**")
    other = jax.tree.map(lambda v: v, fresh)
    other["batch_stats"]["BatchNorm_0"]["mean"] = jnp.zeros(9)
    with pytest.raises(LoraError, match=r"extra leaf batch_stats/BatchNorm_0/mean is \(8,\)"):
        restore(tmp_path / "ad", base=other, extra=True)


# --------------------------------------------------------------------------- placement, errors


def trained_on_a_mesh(lt: dict, tx, shardings: dict, steps: int = 3) -> tuple[dict, Any]:
    """The LoRA tree and optimizer state after real steps, placed by ``shardings``."""
    lt = jax.device_put(lt, shardings)
    opt_state = jax.jit(tx.init)(lt)

    @jax.jit
    def step(lt, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, lt)
        return optax.apply_updates(lt, updates), opt_state

    rng = np.random.default_rng(2)
    for _ in range(steps):  # random gradients: every moment non-zero and different
        grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), lt)
        lt, opt_state = step(lt, opt_state, jax.device_put(grads, shardings))
    return lt, opt_state


def same_place(x: jax.Array, sharding: jax.sharding.Sharding) -> bool:
    return x.sharding.is_equivalent_to(sharding, x.ndim)


def test_resume_on_a_mesh_with_the_readme_template(tmp_path, model):
    # The README's template, jax.eval_shape(tx.init, lt), carries abstract meshes (and no
    # sharding at all for the step count): optimizer leaves follow the LoRA leaves instead.
    # Saved after real steps on a 2x4 mesh, so that zeroed moments or moments placed
    # anywhere but with their factor would show.
    base, lt = model
    tx = optax.adam(1e-2)
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharded = lorax_fn.lora_shardings(lt, MESH_SPECS, mesh)
    lt, opt_state = trained_on_a_mesh(lt, tx, sharded)
    adam = opt_state[0]
    assert int(adam.count) == 3 and all(
        np.all(np.asarray(m) != 0) for m in jax.tree.leaves(adam.mu)
    )
    assert not lt["params/dense/kernel"].a.sharding.is_fully_replicated  # the sharding shows
    with LoraCheckpointManager(tmp_path / "run", SPEC, base=base) as manager:
        manager.save(3, lt, opt_state)
    replicated = NamedSharding(mesh, P())
    for shardings in (
        replicated,
        lambda abstract: lorax_fn.lora_shardings(abstract, MESH_SPECS, mesh),
    ):
        manager = LoraCheckpointManager(tmp_path / "run", SPEC, base=base)
        on_mesh = jax.device_put(lt, replicated if shardings is replicated else sharded)
        template = jax.eval_shape(tx.init, on_mesh)
        state = manager.restore(opt_state=template, shardings=shardings)
        manager.close()
        assert_same_tree(state.lora_tree, lt)
        if shardings is replicated:
            assert all(x.sharding == replicated for x in jax.tree.leaves(state.opt_state))
        else:
            # mu and nu of each factor lie where that factor lies; the step count replicated.
            got = state.opt_state[0]
            for moments in (got.mu, got.nu):
                placed = jax.tree.map(lambda m, x: same_place(m, x.sharding), moments, lt)
                assert all(jax.tree.leaves(placed)), placed
            assert same_place(
                moments["params/dense/kernel"].b, NamedSharding(mesh, P(None, "model"))
            )
            assert got.count.sharding == replicated
        for g, w in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(opt_state), strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        # The restored state trains: no "incompatible devices" between LoRA and optimizer
        # leaves, and the step is the one the saved state would have taken.
        grads = jax.tree.map(jnp.ones_like, state.lora_tree)
        updates, _ = jax.jit(tx.update)(grads, state.opt_state, state.lora_tree)
        want, _ = tx.update(jax.tree.map(jnp.ones_like, lt), opt_state, lt)
        for g, w in zip(jax.tree.leaves(updates), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6)


def test_failures_other_than_damage_are_not_called_corruption(tmp_path, model, monkeypatch):
    base, lt = model
    save(tmp_path / "ad", lt, SPEC, base=base)
    with LoraCheckpointManager(tmp_path / "run", SPEC, base=base) as manager:
        manager.save(1, lt, optax.sgd(1e-3).init(lt))
    dead_peer = RuntimeError("DEADLINE_EXCEEDED: Barrier timed out (a peer process died)")

    def fail(*args, **kwargs):
        if "lora" in kwargs["args"]:  # the metadata is read first, through the same call
            raise dead_peer
        return real(*args, **kwargs)

    for cls, call in [
        (ocp.Checkpointer, lambda: restore(tmp_path / "ad", base=base)),
        (ocp.CheckpointManager, lambda: LoraCheckpointManager(tmp_path / "run", SPEC).restore()),
    ]:
        real = cls.restore
        monkeypatch.setattr(cls, "restore", fail)
        with pytest.raises(LoraError, match=r"not a sign of damaged files.*DEADLINE_EXCEEDED") as e:
            call()
        assert not isinstance(e.value, CheckpointDamaged) and "corrupted" not in str(e.value)
        assert e.value.__cause__ is dead_peer and str(tmp_path) in str(e.value)
        monkeypatch.undo()


def test_damaged_latest_step_error_and_fallback(tmp_path, model):
    base, lt = model
    tx = optax.sgd(1e-3)
    with LoraCheckpointManager(tmp_path / "run", SPEC, base=base, max_to_keep=3) as manager:
        for step in (1, 2, 3):
            manager.save(step, jax.tree.map(lambda x, s=step: x + s, lt), tx.init(lt))
    corrupt_truncate(tmp_path / "run" / "3")
    edit_metadata(tmp_path / "run" / "2", lambda meta: meta.update(step=9), reseal=False)
    manager = LoraCheckpointManager(tmp_path / "run", SPEC, base=base)
    with pytest.raises(CheckpointDamaged, match=r"step 3 .*truncated.*\n\(pass fallback=True"):
        manager.restore()
    with pytest.warns(
        UserWarning,
        match=r"resuming from step 1, skipping damaged newer steps:\n"
        r"  step 3 in .*truncated or corrupted.*\n  step 2 in .*SHA-256",
    ) as w:
        state = manager.restore(opt_state=tx.init(lt), fallback=True)
    assert len(w) == 1 and state.step == 1
    assert_same_tree(state.lora_tree, jax.tree.map(lambda x: x + 1, lt))
    corrupt_truncate(tmp_path / "run" / "1")
    with pytest.raises(CheckpointDamaged, match=r"every step in .* is damaged"):
        manager.restore(fallback=True)
    with pytest.raises(LoraError, match="do not pass step="):
        manager.restore(1, fallback=True)
    manager.close()


FLOOD = """
import shutil, sys
from pathlib import Path
import jax, numpy as np
import lorax_fn
rng = np.random.default_rng(0)
params = {f"l{i}": {"w": jax.numpy.asarray(rng.standard_normal((64, 32)))} for i in range(12)}
_, lt = lorax_fn.split(params, lorax_fn.LoraSpec("**/w", rank=2), key=jax.random.key(0))
d = Path(sys.argv[1])
lorax_fn.save(d, lt, None)
files = [f for f in (d / "lora").rglob("*") if f.parent.name == "d"]
for f in sorted(files, key=lambda f: f.stat().st_size)[len(files) // 2:]:
    f.write_bytes(f.read_bytes()[:10])
for _ in range(10):  # orbax's leftovers print at garbage-collection time, not on every read
    try:
        lorax_fn.restore(d)
    except lorax_fn.LoraError as err:
        print(str(err).split(";")[0])
"""


def test_a_damaged_checkpoint_prints_nothing_but_its_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", FLOOD, str(tmp_path / "ad")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("truncated or corrupted") == 10
    assert out.stderr == ""


# --------------------------------------------------------------------------- DoRA

DORA_SPEC = dataclasses.replace(SPEC, use_dora=True)


@pytest.fixture(scope="module")
def dora_model() -> tuple[dict, dict]:
    return make_lora(make_params(), DORA_SPEC)


def read_meta(directory: Path) -> dict:
    return json.loads((directory / "lorax_fn" / "metadata").read_text())


def test_dora_round_trip_keeps_the_magnitude(tmp_path, dora_model):
    base, lt = dora_model
    dora_paths = sorted(p for p, f in lt.items() if isinstance(f, LoraFactors))
    assert len(dora_paths) == 4 and all(lt[p].variant == "dora" for p in dora_paths)
    assert lt["params/stack/kernel"].magnitude.shape == (3, 16)
    assert lt["params/attn/query/kernel"].magnitude.shape == (4, 8)
    _, init = lorax_fn.split(make_params(), DORA_SPEC, key=jax.random.key(1), layouts=STACK)
    for p in dora_paths:  # perturbed: a magnitude left at its init would not show a bad restore
        assert not np.allclose(lt[p].magnitude, init[p].magnitude), p

    save(tmp_path / "ad", lt, DORA_SPEC, base=base)
    meta = read_meta(tmp_path / "ad")
    assert meta["format_version"] == 3 and meta["spec"]["use_dora"] is True
    assert sorted(e["path"] for e in meta["entries"] if "magnitude" in e) == dora_paths
    for got in (restore(tmp_path / "ad", base=base), restore(tmp_path / "ad")):
        assert_same_tree(got, lt)  # the magnitude included: it is a leaf of the tree
        assert all(got[p].variant == "dora" for p in dora_paths)
    merged = lorax_fn.merge(base, restore(tmp_path / "ad", base=base))
    want = lorax_fn.merge(base, lt)
    for g, w in zip(jax.tree.leaves(merged), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    info = checkpoint_info(tmp_path / "ad")
    assert info.variants == dict.fromkeys(dora_paths, "dora") and info.spec == DORA_SPEC

    # On a mesh, the magnitude is placed like B without its rank axis.
    mesh2 = jax.make_mesh((2, 4), ("data", "model"))
    got = restore(
        tmp_path / "ad",
        shardings=lambda abstract: lorax_fn.lora_shardings(abstract, MESH_SPECS, mesh2),
    )
    assert_same_tree(got, lt)
    assert got["params/dense/kernel"].magnitude.sharding.spec == P("model")
    assert got["params/stack/kernel"].magnitude.sharding.spec == P(None, "model")
    explicit = jax.tree.map(lambda x: x.sharding, got)
    assert_same_tree(restore(tmp_path / "ad", shardings=explicit), lt)
    # Shardings made for a plain tree have no place for the magnitude.
    plain = {p: s.plain() if isinstance(s, LoraFactors) else s for p, s in explicit.items()}
    with pytest.raises(
        LoraError, match=r"kernel: expected a jax.sharding.Sharding for the 'dora' magnitude"
    ):
        restore(tmp_path / "ad", shardings=plain)


def test_dora_manager_round_trips_the_magnitude_and_its_optimizer_state(tmp_path, dora_model):
    base, lt = dora_model
    tx = lorax_fn.optimizer(optax.adam(1e-2), lt)
    opt_state = tx.init(lt)
    grads = jax.tree.map(jnp.ones_like, lt)
    for _ in range(2):
        updates, opt_state = tx.update(grads, opt_state, lt)
        lt = optax.apply_updates(lt, updates)
    flat = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    m_state = [k for k, x in flat if jax.tree_util.keystr(k).endswith(".extras['magnitude']")]
    assert len(m_state) == 2 * 4  # Adam's mu and nu for each DoRA magnitude
    with LoraCheckpointManager(tmp_path / "run", DORA_SPEC, base=base) as manager:
        manager.save(2, lt, opt_state, data_state={"index": 2})

    manager = LoraCheckpointManager(tmp_path / "run", DORA_SPEC, base=base)
    state = manager.restore(opt_state=jax.eval_shape(tx.init, lt))
    assert_same_tree(state.lora_tree, lt)
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(opt_state)
    for g, w in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(opt_state), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))

    # On a mesh, the magnitude's moments go where the magnitude goes, and training resumes.
    mesh2 = jax.make_mesh((2, 4), ("data", "model"))
    state = manager.restore(
        opt_state=jax.eval_shape(tx.init, lt),
        shardings=lambda abstract: lorax_fn.lora_shardings(abstract, MESH_SPECS, mesh2),
    )
    manager.close()
    restored = dict(jax.tree_util.tree_flatten_with_path(state.opt_state)[0])
    for key in m_state:
        path = key[-3].key  # ...[path].extras["magnitude"]
        assert restored[key].sharding == state.lora_tree[path].magnitude.sharding, path
    updates, _ = jax.jit(tx.update)(grads, state.opt_state, state.lora_tree)
    want, _ = tx.update(grads, opt_state, lt)
    for g, w in zip(jax.tree.leaves(updates), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6)


def test_dora_and_plain_lora_are_never_taken_for_each_other(tmp_path, model, dora_model):
    base, plain = model
    _, dora = dora_model
    is_dora = (
        r"params/dense/kernel: a 'dora' adapter \(it has magnitude\), the spec says variant='lora'"
    )
    is_plain = r"params/dense/kernel: plain LoRA, the spec says variant='dora'"
    before = snapshot(base, plain, dora)
    with pytest.raises(LoraError, match=is_dora):
        save(tmp_path / "x", dora, SPEC, base=base)
    with pytest.raises(LoraError, match=is_plain):
        save(tmp_path / "x", plain, DORA_SPEC, base=base)
    assert not (tmp_path / "x").exists()

    for name, tree, spec in (("plain", plain, SPEC), ("dora", dora, DORA_SPEC)):
        with LoraCheckpointManager(tmp_path / name, spec, base=base) as manager:
            manager.save(1, tree, optax.adam(1e-3).init(tree))
    # A manager made with the other spec refuses the run's steps, and the run's trees.
    for tree, name, other_spec, match in (
        (plain, "plain", DORA_SPEC, is_plain),
        (dora, "dora", SPEC, is_dora),
    ):
        manager = LoraCheckpointManager(tmp_path / name, other_spec, base=base)
        with pytest.raises(
            LoraError, match=r"contradicts this manager's spec:\n(  .*\n)*  " + match
        ):
            manager.restore(opt_state=optax.adam(1e-3).init(tree))
        with pytest.raises(LoraError, match=match):
            manager.save(2, tree, optax.adam(1e-3).init(tree))
        manager.close()
    # An optimizer state made for the plain tree lacks the magnitude's moments.
    manager = LoraCheckpointManager(tmp_path / "dora", DORA_SPEC, base=base)
    with pytest.raises(
        LoraError, match=r"saved-only leaves \[.*'params/dense/kernel'\]\.extras\['magnitude'\]"
    ):
        manager.restore(opt_state=optax.adam(1e-3).init(plain))
    manager.close()
    assert_untouched(before, base, plain, dora)


def test_a_misshapen_dora_magnitude_is_refused_naming_the_path(tmp_path, dora_model):
    base, lt = dora_model
    f = lt["params/dense/kernel"]
    bad = {**lt, "params/dense/kernel": f.with_extras(magnitude=jnp.ones(16))}
    match = (
        r"params/dense/kernel: the 'dora' magnitude \(16,\) does not fit a weight of shape "
        r"\(16, 32\) .*\(expected \(32,\)\)"
    )
    with pytest.raises(LoraError, match=match):
        save(tmp_path / "ad", bad, DORA_SPEC, base=base)
    with pytest.raises(LoraError, match=match):
        save(tmp_path / "ad", bad, DORA_SPEC)  # without a base: checked against A and B
    assert not (tmp_path / "ad").exists()
    # Metadata that a buggy writer sealed with a wrong magnitude shape is refused on read.
    save(tmp_path / "ad", lt, DORA_SPEC, base=base)
    entry = next(
        i
        for i, e in enumerate(read_meta(tmp_path / "ad")["entries"])
        if e["path"] == "params/dense/kernel"
    )
    edit_metadata(
        tmp_path / "ad",
        lambda meta: meta["entries"][entry]["magnitude"].update(shape=[16]),
        reseal=True,
    )
    with pytest.raises(LoraError, match=match):
        restore(tmp_path / "ad", base=base)


def test_a_checkpoint_written_before_dora_restores_as_plain_lora(tmp_path, model):
    base, lt = model
    save(tmp_path / "ad", lt, SPEC, base=base)
    tx = optax.adam(1e-3)
    with LoraCheckpointManager(tmp_path / "run", SPEC, base=base) as manager:
        manager.save(1, lt, tx.init(lt))
    for directory in (tmp_path / "ad", tmp_path / "run" / "1"):
        # A plain tree is still written in format 2, with no magnitude anywhere, so that a
        # lorax_fn from before DoRA reads it ...
        meta = read_meta(directory)
        assert meta["format_version"] == 2
        assert not any("magnitude" in e for e in meta["entries"])
        # ... and what such a lorax_fn wrote (format 2, a spec without use_dora) reads here.
        edit_metadata(directory, lambda meta: meta["spec"].pop("use_dora"), reseal=True)
        assert "use_dora" not in read_meta(directory)["spec"]
        got = restore(directory, base=base)
        assert_same_tree(got, lt)
        assert not any(f.variant == "dora" for f in got.values() if isinstance(f, LoraFactors))
        assert checkpoint_info(directory).spec == SPEC and checkpoint_info(directory).variants == {}
    manager = LoraCheckpointManager(tmp_path / "run", SPEC, base=base)
    state = manager.restore(opt_state=jax.eval_shape(tx.init, lt))
    assert_same_tree(state.lora_tree, lt)
    manager.close()
    manager = LoraCheckpointManager(tmp_path / "run", DORA_SPEC, base=base)
    with pytest.raises(
        LoraError, match=r"params/dense/kernel: plain LoRA, the spec says variant='dora'"
    ):
        manager.restore()
    manager.close()


# --------------------------------------------------------------------------- PiSSA

PISSA_SPEC = dataclasses.replace(SPEC, init="pissa")
ORIGINAL = r"(?s)PiSSA adapter.*params/dense/kernel \(it holds the original weights\)"


def relative(got, want) -> float:
    return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


def kernels_in_bf16(params: dict) -> dict:
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim > 1 else x, params)


def test_a_pissa_adapter_is_refused_on_the_original_base(tmp_path, model):
    params = make_params()
    residual, lt = make_lora(params, PISSA_SPEC)
    # Accepting the original weights is no small error: the adapted part counts twice.
    for path in ("dense", "stack"):
        on_original = lorax_fn.merge(params, lt)["params"][path]["kernel"]
        right = lorax_fn.merge(residual, lt)["params"][path]["kernel"]
        assert relative(on_original, right) > 0.25, path

    save(tmp_path / "ad", lt, PISSA_SPEC, base=residual)
    _, gaussian = model
    save(tmp_path / "gauss", gaussian, SPEC)
    for wrong in (params, kernels_in_bf16(params), quantize_base(params, PISSA_SPEC)):
        with pytest.raises(LoraError, match=ORIGINAL):
            restore(tmp_path / "ad", base=wrong)
    with pytest.raises(LoraError, match="adapter 0 is a PiSSA adapter"):
        lorax_fn.stack_adapters([lt, gaussian], base=params)
    with pytest.raises(LoraError, match=r"(?s)ad: .*" + ORIGINAL[4:]):
        lorax_fn.multi.stack_checkpoints([tmp_path / "ad", tmp_path / "gauss"], base=params)
    with pytest.raises(LoraError, match=ORIGINAL):
        save(tmp_path / "new", lt, PISSA_SPEC, base=params)
    assert not (tmp_path / "new").exists()
    # Nor a base that is neither (the residual's sign flipped): it is not the residual.
    flipped = jax.tree.map(lambda x: -x, residual)
    with pytest.raises(LoraError, match=r"dense/kernel \(it differs from the residual by about"):
        restore(tmp_path / "ad", base=flipped)

    # The manager: its own base, or one given to save/restore.
    tx = optax.adam(1e-2)
    with LoraCheckpointManager(tmp_path / "run", PISSA_SPEC, base=params) as manager:
        with pytest.raises(LoraError, match=ORIGINAL):
            manager.save(1, lt, tx.init(lt))
        assert manager.all_steps() == []
        manager.save(1, lt, tx.init(lt), base=residual)
        with pytest.raises(LoraError, match=ORIGINAL):
            manager.restore()
    with LoraCheckpointManager(tmp_path / "run", PISSA_SPEC, base=residual) as manager:
        with pytest.raises(LoraError, match=ORIGINAL):
            manager.restore(base=params)
        assert_same_tree(manager.restore().lora_tree, lt)

    # Copies of the residual are accepted, rounded or quantized.
    for right in (
        residual,
        kernels_in_bf16(residual),
        quantize_base(residual, PISSA_SPEC, format="nf4"),
        quantize_base(residual, PISSA_SPEC, format="int8"),
    ):
        assert_same_tree(restore(tmp_path / "ad", base=right), lt)  # the record included
        lorax_fn.stack_adapters([lt, gaussian], base=right)
    stack = lorax_fn.multi.stack_checkpoints([tmp_path / "ad", tmp_path / "gauss"], base=residual)
    assert_same_tree(stack.entries, lorax_fn.stack_adapters([lt, gaussian]).entries)


def test_pissa_records_travel_with_the_adapter_and_old_checkpoints_warn(tmp_path):
    params = make_params()
    _, lt = make_lora(params, PISSA_SPEC)
    assert all(f.pissa is not None for f in lt.values() if isinstance(f, LoraFactors))
    # Training steps keep the record (a static field), and so does DoRA's magnitude.
    tx = optax.adam(1e-2)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, lt), tx.init(lt), lt)
    trained = optax.apply_updates(lt, updates)
    assert trained["params/dense/kernel"].pissa == lt["params/dense/kernel"].pissa
    _, dora = lorax_fn.split(
        params, dataclasses.replace(PISSA_SPEC, use_dora=True), key=jax.random.key(1), layouts=STACK
    )
    assert dora["params/dense/kernel"].pissa == lt["params/dense/kernel"].pissa
    # The record is the spec's init: saving it under another init is a contradiction.
    with pytest.raises(LoraError, match="dense/kernel: made by init='pissa', the spec says"):
        save(tmp_path / "x", lt, SPEC)
    # A checkpoint whose spec says PiSSA but that holds no record cannot be checked: it warns.
    save(tmp_path / "ad", lt, PISSA_SPEC)
    edit_metadata(
        tmp_path / "ad", lambda m: [e.pop("pissa", None) for e in m["entries"]], reseal=True
    )
    with pytest.warns(UserWarning, match="carry no record of the residual base"):
        got = restore(tmp_path / "ad", base=params)
    assert got["params/dense/kernel"].pissa is None
