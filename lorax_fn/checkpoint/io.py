"""Save and restore one LoRA adapter in one directory, with orbax-checkpoint.

:func:`save` writes the LoRA tree alone (not the base) in the format of
:mod:`lorax_fn.checkpoint.format`; :func:`restore` validates everything before it
reads an array; :func:`checkpoint_info` reads the metadata only. orbax writes into
a temporary directory and renames it when complete, so a killed save never leaves
a half-written checkpoint under the final name. Overwriting writes the new
checkpoint completely next to the old one and then swaps the two directories, so a
crash mid-save keeps the old one. Resumable training checkpoints (with optimizer
state) are :class:`lorax_fn.checkpoint.manager.LoraCheckpointManager`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, overload

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from lorax_fn.checkpoint.errors import CheckpointDamaged, one_clear_error, read_error
from lorax_fn.checkpoint.extra import (
    abstract_extra,
    apply_extra,
    encode_extra,
    requested_extra,
    select_extra,
    warn_unsaved,
)
from lorax_fn.checkpoint.format import (
    EXTRA_ITEM,
    LORA_ITEM,
    META_ITEM,
    Shardings,
    abstract_lora,
    check_against_base,
    check_entries,
    check_pissa_base,
    checkpoint_path,
    decode,
    encode,
    entry_variant,
    leaf_specs,
    seal,
)
from lorax_fn.errors import LoraError
from lorax_fn.spec import LoraSpec


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What a LoRA checkpoint says about itself, read without loading any array.

    Attributes:
      spec: the :class:`LoraSpec` it was made with (``None`` if it had callable filters).
      library_version: the lorax_fn version that wrote it.
      base_fingerprint: SHA-256 over the targeted base leaves' paths, shapes and dtypes.
      base_leaves: ``{path: (shape, dtype)}`` of those leaves (dtype ``None`` if unknown).
      entries: ``{path: "factors" | "subset" | "array"}`` (``"subset"``: a
        :class:`lorax_fn.subsets.LayerSubset` or ``LayerGroups``).
      extra: ``{path: (shape, dtype)}`` of the base leaves saved beside it (``extra=``).
      variants: ``{path: variant}`` of the factors of an adapter variant other than plain
        LoRA (:mod:`lorax_fn.variants`; ``LoraSpec(variant=...)``).
    """

    spec: LoraSpec | None
    library_version: str
    base_fingerprint: str
    base_leaves: dict[str, tuple[tuple[int, ...], str | None]]
    entries: dict[str, str]
    extra: dict[str, tuple[tuple[int, ...], str]] = dataclasses.field(default_factory=dict)
    variants: dict[str, str] = dataclasses.field(default_factory=dict)


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _swap_names(directory: Path) -> tuple[Path, Path]:
    return (
        directory.with_name(f".{directory.name}.lorax-new"),
        directory.with_name(f".{directory.name}.lorax-old"),
    )


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _load_meta(directory: Path) -> dict[str, Any]:
    where = f"the checkpoint at {directory}"
    if not directory.is_dir():
        old = _swap_names(directory)[1]
        hint = (
            f" (an interrupted overwrite left the previous checkpoint at {old})"
            if old.is_dir()
            else ""
        )
        raise LoraError(f"no checkpoint at {directory}{hint}")
    if not (directory / META_ITEM).is_dir():
        raise LoraError(
            f"{where} has no lorax_fn metadata (no {META_ITEM}/ item): it is not a "
            "lorax_fn checkpoint, or it is incomplete"
        )
    try:
        # The JSON item alone, through its own handler: no array is touched yet.
        with one_clear_error():
            meta = ocp.JsonCheckpointHandler().restore(directory / META_ITEM)
    except Exception as err:  # orbax/tensorstore/json raise many types
        raise read_error(f"the metadata of {where}", err) from err
    if not isinstance(meta, dict):
        raise CheckpointDamaged(f"{where}: malformed lorax_fn metadata (not a JSON object)")
    check_entries(meta, where)
    return meta


def checkpoint_info(directory: str | os.PathLike) -> CheckpointInfo:
    """Read a LoRA checkpoint's metadata (spec, version, base fingerprint); no arrays.

    Works on a directory written by :func:`save` and on one step of a
    :class:`LoraCheckpointManager`.

    Example:
        >>> import jax, jax.numpy as jnp, lorax_fn
        >>> params = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
        >>> spec = lorax_fn.LoraSpec("**/kernel", rank=2, trainable="**/bias")
        >>> base, lt = lorax_fn.split(params, spec, key=jax.random.key(0))
        >>> _ = lorax_fn.save("adapter", lt, spec, base=base)
        >>> info = lorax_fn.checkpoint.checkpoint_info("adapter")
        >>> info.spec == spec, info.entries
        (True, {'dense/bias': 'array', 'dense/kernel': 'factors'})
        >>> info.base_leaves["dense/kernel"], info.library_version == lorax_fn.__version__
        (((8, 4), 'float32'), True)
        >>> # The stored spec is enough to make a tree of the same shape, e.g. a restore target.
        >>> _, fresh = lorax_fn.split(params, info.spec, key=jax.random.key(1))
        >>> fresh["dense/kernel"].a.shape == lt["dense/kernel"].a.shape
        True
    """
    meta = _load_meta(checkpoint_path(directory))
    return CheckpointInfo(
        spec=None if meta["spec"] is None else LoraSpec.from_json(meta["spec"]),
        library_version=meta["library_version"],
        base_fingerprint=meta["base_fingerprint"],
        base_leaves={b["path"]: (tuple(b["shape"]), b["dtype"]) for b in meta["base_leaves"]},
        entries={e["path"]: e["kind"] for e in meta["entries"]},
        extra={x["path"]: (tuple(x["shape"]), x["dtype"]) for x in meta.get("extra", [])},
        variants={
            e["path"]: entry_variant(e)
            for e in meta["entries"]
            if e["kind"] == "factors" and entry_variant(e) != "lora"
        },
    )


def save(
    directory: str | os.PathLike,
    lora_tree: Mapping[str, Any],
    spec: LoraSpec | None,
    *,
    base: Any = None,
    extra: Any = None,
    overwrite: bool = False,
) -> Path:
    """Save the LoRA tree alone (not the base) with orbax, plus JSON metadata.

    The metadata holds ``spec``, each entry's ``scale``/``layout``/``dropout``, a
    fingerprint of the base leaves the adapter targets (paths, shapes and — when
    ``base`` is given — dtypes), a SHA-256 per array, ``lorax_fn.__version__`` and a
    SHA-256 of the metadata itself. The extra arrays of an adapter variant
    (:mod:`lorax_fn.variants`) are saved as more arrays of their entry, under their
    names, and restored with it (a variant defined outside lorax_fn must be registered
    before the restore), a PiSSA adapter's record of the residual
    base it needs (:mod:`lorax_fn.pissa`) as metadata. A layer subset
    (:mod:`lorax_fn.subsets`) is saved compact, with its layer ids, and restored as itself.
    ``spec`` must agree with the tree
    (targets, trained leaves, ranks, scales, dropout, variant, ``init="pissa"``) or
    be ``None``. With ``base``, the tree is first checked to fit it.

    ``extra`` (path filters over ``base``, e.g. ``"batch_stats/**"``) saves those base
    leaves beside the adapter — non-parameter state such as BatchNorm statistics, which
    the LoRA tree does not hold (PEFT's ``modules_to_save``); ``restore(extra=True)``
    puts them back. Saving with a ``base`` that carries such state without ``extra``
    warns, naming the paths left out.

    An existing non-empty ``directory`` is refused unless ``overwrite=True`` (and then
    only if it holds a lorax_fn checkpoint); the new checkpoint is written completely
    next to it before it replaces the old one, so a crash mid-save keeps the old one.
    An existing empty directory is written into, as :func:`lorax_fn.export_peft` does.

    Example:
        >>> import jax, jax.numpy as jnp, lorax_fn
        >>> variables = {"params": {"dense": {"kernel": jnp.ones((8, 4))}},
        ...              "batch_stats": {"mean": jnp.full(4, 0.5)}}
        >>> spec = lorax_fn.LoraSpec("**/kernel", rank=2)
        >>> base, lt = lorax_fn.split(variables, spec, key=jax.random.key(0))
        >>> lorax_fn.save("adapter", lt, spec, base=base, extra="batch_stats/**").name
        'adapter'
        >>> drifted = dict(base, batch_stats={"mean": jnp.zeros(4)})
        >>> lt2, base2 = lorax_fn.restore("adapter", base=drifted, extra=True)
        >>> base2["batch_stats"]["mean"].tolist()  # the statistics saved with the adapter
        [0.5, 0.5, 0.5, 0.5]
        >>> bool((lt2["params/dense/kernel"].a == lt["params/dense/kernel"].a).all())
        True
        >>> lorax_fn.save("adapter", lt, spec)
        Traceback (most recent call last):
        ...
        lorax_fn.errors.LoraError: ...adapter already exists; pass overwrite=True to replace it
    """
    directory = checkpoint_path(directory)
    arrays, meta = encode(lora_tree, spec, None if base is None else leaf_specs(base))
    if base is not None:
        check_pissa_base(meta, base, "the LoRA tree")
    extra_leaves = {} if extra is None else select_extra(base, extra, lora_tree)
    extra_arrays, meta["extra"] = encode_extra(extra_leaves)
    meta = seal(meta)
    # The rule export_peft follows too: an empty directory holds nothing to lose.
    occupied = directory.exists() and (not directory.is_dir() or any(directory.iterdir()))
    if occupied and not overwrite:
        raise LoraError(f"{directory} already exists; pass overwrite=True to replace it")
    if occupied and not (directory / META_ITEM).is_dir():
        raise LoraError(f"refusing to overwrite {directory}: it is not a lorax_fn checkpoint")
    if base is not None:
        warn_unsaved(base, set(extra_leaves), f"the checkpoint at {directory}")
    new, old = _swap_names(directory)
    target = new if occupied else directory
    primary = jax.process_index() == 0
    if primary:
        shutil.rmtree(new, ignore_errors=True)  # left by a save killed before its swap
        if directory.is_dir() and not occupied:
            directory.rmdir()  # orbax writes the directory itself
    _barrier("lorax_fn.save:cleaned")
    items = {LORA_ITEM: ocp.args.StandardSave(arrays), META_ITEM: ocp.args.JsonSave(meta)}
    if extra_arrays:
        items[EXTRA_ITEM] = ocp.args.StandardSave(extra_arrays)
    try:
        _checkpointer().save(target, args=ocp.args.Composite(**items))
    except OSError as err:  # an unwritable path surfaces as orbax's tmp-directory error
        raise LoraError(
            f"cannot write a checkpoint at {directory}: {type(err).__name__}: {err}"
        ) from err
    if target == new:
        _barrier("lorax_fn.save:written")
        if primary:
            # Two renames: POSIX cannot swap directories atomically. A kill between them
            # leaves the old checkpoint at `old`, which restore's error message points to.
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
            new.rename(directory)
            shutil.rmtree(old)
        _barrier("lorax_fn.save:swapped")
    return directory


@overload
def restore(
    directory: str | os.PathLike,
    *,
    base: Any = None,
    shardings: Shardings = None,
    extra: Literal[False] = False,
) -> dict[str, Any]: ...


@overload
def restore(
    directory: str | os.PathLike, *, base: Any, shardings: Shardings = None, extra: Literal[True]
) -> tuple[dict[str, Any], Any]: ...


def restore(
    directory: str | os.PathLike,
    *,
    base: Any = None,
    shardings: Shardings = None,
    extra: bool = False,
) -> dict[str, Any] | tuple[dict[str, Any], Any]:
    """Restore a LoRA tree saved by :func:`save`: the same paths, arrays and static fields.

    Everything is validated before an array is read: the metadata (against its own
    SHA-256, so an edited ``scale`` or ``spec`` is refused), the format version, and —
    with ``base`` — that the adapter was made for this base, by :func:`lorax_fn.merge`'s
    rules: every path present with the recorded shape; factors accept any floating
    base dtype (a float32 adapter fits a bfloat16 copy of its base), a leaf trained in
    full must have its base leaf's dtype; no base leaf that the stored spec selects
    missing from the adapter; a PiSSA adapter's base is its residual, not the original
    weights (:func:`lorax_fn.pissa.check_base`). Every array is then checked against its
    SHA-256. Any
    failure raises :class:`LoraError` (:class:`CheckpointDamaged` for damaged files);
    nothing of the caller's is modified. ``shardings`` places the arrays (see
    :data:`Shardings`; default: this process's first local device).

    With ``extra=True`` this returns ``(lora_tree, base_with_extra)``: a copy of ``base``
    holding the leaves saved with ``save(extra=...)`` (checked, cast to the base leaves'
    dtypes, placed like them). A checkpoint that holds such leaves warns when they are
    not asked for.

    Example:
        >>> import jax, jax.numpy as jnp, lorax_fn
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> spec = lorax_fn.LoraSpec("w", rank=2)
        >>> base, lt = lorax_fn.split({"w": jnp.ones((8, 4))}, spec, key=jax.random.key(0))
        >>> _ = lorax_fn.save("adapter", lt, spec, base=base)
        >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
        >>> got = lorax_fn.restore("adapter", base=base, shardings=NamedSharding(mesh, P()))
        >>> got["w"].a.sharding.is_fully_replicated, bool((got["w"].a == lt["w"].a).all())
        (True, True)
        >>> base_shardings = {"w": NamedSharding(mesh, P("data", None))}
        >>> got = lorax_fn.restore("adapter", base=base,
        ...     shardings=lambda abstract: lorax_fn.lora_shardings(abstract, base_shardings))
        >>> got["w"].a.sharding.spec, got["w"].b.sharding.spec  # A follows the fan-in
        (P('data', None), P(None, None))
        >>> lorax_fn.restore("adapter", base={"w": jnp.ones((8, 5))})
        Traceback (most recent call last):
        ...
        lorax_fn.errors.LoraError: the checkpoint at ... was made for a different base:
          w: made for shape (8, 4), the base has (8, 5)
    """
    directory = checkpoint_path(directory)
    where = f"the checkpoint at {directory}"
    meta = _load_meta(directory)
    if base is not None:
        check_against_base(meta, leaf_specs(base), where)
        check_pissa_base(meta, base, where)
    saved_extra = requested_extra(meta, extra, base, where, stacklevel=3)
    items = {LORA_ITEM: ocp.args.StandardRestore(abstract_lora(meta, shardings))}
    if saved_extra:
        items[EXTRA_ITEM] = ocp.args.StandardRestore(abstract_extra(saved_extra, base, where))
    try:
        with one_clear_error():
            restored = _checkpointer().restore(directory, args=ocp.args.Composite(**items))
    except Exception as err:  # orbax/tensorstore raise many types
        raise read_error(where, err) from err
    lora_tree = decode(meta, restored[LORA_ITEM], where)
    if not extra:
        return lora_tree
    if not saved_extra:
        return lora_tree, base
    return lora_tree, apply_extra(saved_extra, restored[EXTRA_ITEM], base, where)
