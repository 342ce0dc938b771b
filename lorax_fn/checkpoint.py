"""Save and restore LoRA trees with orbax-checkpoint, alone or with optimizer state.

A checkpoint directory holds orbax items only: ``lora`` (the factor arrays, keyed
by entry index because LoRA paths contain ``/``), optionally ``opt_state`` (the
optimizer state's leaves, keyed by leaf index) and ``lorax_fn`` (JSON metadata:
the spec, each entry's static fields, a fingerprint of the base leaves it was
made for, a SHA-256 of every array and the library version). Nothing is ever
unpickled: arrays go through orbax's standard (tensorstore) handler, the rest is
JSON. orbax writes into a temporary directory and renames it when complete, so a
killed save never leaves a half-written checkpoint under the final name; orbax
does not checksum array data, which is why the metadata carries SHA-256 digests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

import lorax_fn
from lorax_fn.errors import LoraError
from lorax_fn.factors import Layout, LoraFactors
from lorax_fn.paths import compile_filter, leaves_with_paths
from lorax_fn.spec import LoraSpec

FORMAT = "lorax_fn.checkpoint"
FORMAT_VERSION = 1
_LORA, _OPT, _META = "lora", "opt_state", "lorax_fn"
# orbax deletes old steps with a plain rmtree, so a kill mid-delete would leave a broken
# step under its final name; renaming it here first (atomic) and purging later avoids that.
_DELETED = "_lorax_deleted"

Shardings = (
    jax.sharding.Sharding | Mapping[str, Any] | Callable[[dict[str, Any]], Mapping[str, Any]] | None
)
"""Where restored arrays go: ``None`` (the default device); one ``Sharding`` for every
array; ``{path: Sharding | LoraFactors-of-Shardings}`` covering every entry (what
:func:`lorax_fn.lora_shardings` and ``jax.tree.map(lambda x: x.sharding, lora_tree)``
return); or a function from the abstract LoRA tree (``LoraFactors`` of
``jax.ShapeDtypeStruct``) to such a dict, e.g.
``lambda lt: lorax_fn.lora_shardings(lt, base_shardings)``."""


# ---------------------------------------------------------------------------
# Metadata: built from a LoRA tree at save time, checked before anything is read.


def _digest(x: Any) -> str | None:
    # A non-fully-addressable array (multi-host) cannot be hashed on one process.
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    return hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()


def _array_info(x: Any) -> dict[str, Any]:
    return {"shape": list(np.shape(x)), "dtype": np.dtype(x.dtype).name, "sha256": _digest(x)}


def _leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], str | None]]:
    """``{path: (shape, dtype)}`` of every leaf; concrete or abstract leaves both work."""
    out = {}
    for path, leaf in leaves_with_paths(tree):
        dtype = getattr(leaf, "dtype", None)
        out[path] = (tuple(np.shape(leaf)), None if dtype is None else np.dtype(dtype).name)
    return out


def _fingerprint(base_leaves: list[dict[str, Any]]) -> str:
    canonical = json.dumps(base_leaves, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _encode(
    lora_tree: Mapping[str, Any],
    spec: LoraSpec | None,
    base_leaves: Mapping[str, tuple[tuple[int, ...], str | None]] | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The orbax array tree and the JSON metadata of ``lora_tree``."""
    if not isinstance(lora_tree, Mapping) or not lora_tree:
        raise LoraError(
            f"expected a non-empty LoRA tree {{path: factors | array}}, got "
            f"{type(lora_tree).__name__} {lora_tree!r:.80}"
        )
    arrays: dict[str, Any] = {}
    entries, fingerprint = [], []
    for i, path in enumerate(sorted(lora_tree)):
        entry = lora_tree[path]
        if isinstance(entry, LoraFactors):
            arrays[str(i)] = {"a": entry.a, "b": entry.b}
            entries.append(
                {
                    "path": path,
                    "kind": "factors",
                    "scale": float(entry.scale),
                    "dropout": float(entry.dropout),
                    "layout": entry.layout.to_json(),
                    "a": _array_info(entry.a),
                    "b": _array_info(entry.b),
                }
            )
            shape, dtype = entry.weight_shape, None
        elif hasattr(entry, "shape") and hasattr(entry, "dtype"):
            arrays[str(i)] = entry
            entries.append({"path": path, "kind": "array", "array": _array_info(entry)})
            shape, dtype = tuple(np.shape(entry)), np.dtype(entry.dtype).name
        else:
            raise LoraError(
                f"{path}: a LoRA tree entry must be LoraFactors or an array, "
                f"got {type(entry).__name__}"
            )
        if base_leaves is not None:
            if path not in base_leaves:
                raise LoraError(f"{path}: not a leaf of the given base")
            shape, dtype = base_leaves[path]
        fingerprint.append({"path": path, "shape": list(shape), "dtype": dtype})
    try:
        spec_json = None if spec is None else spec.to_json()
    except LoraError:
        spec_json = None  # callable filters: the adapter is still usable, the spec is not stored
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": lorax_fn.__version__,
        "spec": spec_json,
        "entries": entries,
        "base_leaves": fingerprint,
        "base_fingerprint": _fingerprint(fingerprint),
    }
    _check_entries(meta, "the LoRA tree")
    if base_leaves is not None:
        _check_against_base(meta, base_leaves, "the LoRA tree")
    return arrays, meta


def _check_entries(meta: dict[str, Any], where: str) -> None:
    """Raise unless the metadata is well formed and each entry's shapes agree."""
    try:
        if meta.get("format") != FORMAT:
            raise LoraError(f"not a lorax_fn checkpoint (format {meta.get('format')!r})")
        if int(meta["format_version"]) > FORMAT_VERSION:
            raise LoraError(
                f"written by lorax_fn {meta.get('library_version')} in format version "
                f"{meta['format_version']}; this lorax_fn {lorax_fn.__version__} reads up to "
                f"{FORMAT_VERSION}"
            )
        base = {b["path"]: b for b in meta["base_leaves"]}
        if sorted(base) != sorted(e["path"] for e in meta["entries"]):
            raise LoraError("base_leaves and entries name different paths")
        for e in meta["entries"]:
            path = e["path"]
            shape = tuple(base[path]["shape"])
            if e["kind"] == "factors":
                layout = Layout(**e["layout"])
                layout.check(path, shape)
                a, b = tuple(e["a"]["shape"]), tuple(e["b"]["shape"])
                expected = layout.shapes(shape, a[-1] if a else 0)
                if (a, b) != expected:
                    raise LoraError(
                        f"{path}: A {a} and B {b} do not fit a weight of shape "
                        f"{shape} with {layout} (expected {expected})"
                    )
                if not all(isinstance(e[k], int | float) for k in ("scale", "dropout")):
                    raise LoraError(f"{path}: scale/dropout must be numbers")
            elif e["kind"] == "array":
                info, dtype = e["array"], base[path]["dtype"]
                if tuple(info["shape"]) != shape or dtype not in (None, info["dtype"]):
                    raise LoraError(
                        f"{path}: trainable array {tuple(info['shape'])} "
                        f"{info['dtype']} does not match the base leaf {shape} "
                        f"{dtype}"
                    )
            else:
                raise LoraError(f"{path}: unknown entry kind {e['kind']!r}")
        if meta["spec"] is not None:
            LoraSpec.from_json(meta["spec"])
    except LoraError as err:
        raise LoraError(f"{where}: {err}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise LoraError(
            f"{where}: malformed lorax_fn metadata ({type(err).__name__}: {err})"
        ) from None


def _spec_paths(spec_json: dict[str, Any], leaves: Mapping[str, Any]) -> set[str]:
    """The paths of ``leaves`` that the stored spec would target or train in full."""
    spec = LoraSpec.from_json(spec_json)

    def hit(filters: tuple[Any, ...]) -> set[str]:
        predicates = [compile_filter(f) for f in filters]
        return {p for p in leaves if any(match(p, None) for match in predicates)}

    return (hit(spec.targets) | hit(spec.trainable)) - hit(spec.exclude)


def _check_against_base(
    meta: dict[str, Any],
    base_leaves: Mapping[str, tuple[tuple[int, ...], str | None]],
    where: str,
) -> None:
    """Refuse an adapter made for a different base, naming every offending path."""
    problems = []
    recorded = {b["path"]: b for b in meta["base_leaves"]}
    if missing := sorted(set(recorded) - set(base_leaves)):
        problems.append(f"paths not in the base: {missing}")
    for path in sorted(set(recorded) & set(base_leaves)):
        shape, dtype = base_leaves[path]
        want_shape, want_dtype = tuple(recorded[path]["shape"]), recorded[path]["dtype"]
        if shape != want_shape:
            problems.append(f"{path}: made for shape {want_shape}, the base has {shape}")
        elif want_dtype is not None and dtype != want_dtype:
            problems.append(f"{path}: made for dtype {want_dtype}, the base has {dtype}")
    selected = set() if meta["spec"] is None else _spec_paths(meta["spec"], base_leaves)
    if extra := sorted(selected - set(recorded)):
        problems.append(f"base paths its spec selects but it lacks: {extra}")
    if problems:
        raise LoraError(f"{where} was made for a different base:\n  " + "\n  ".join(problems))


def _sharding(
    shardings: Shardings, path: str, role: str | None, shape: tuple[int, ...]
) -> jax.sharding.Sharding:
    if shardings is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    what = "the array" if role is None else role.upper()
    if isinstance(shardings, jax.sharding.Sharding):
        s = shardings
    else:
        if path not in shardings:
            raise LoraError(f"shardings has no entry for {path!r}")
        s = shardings[path]
        if role is not None and not isinstance(s, jax.sharding.Sharding):
            s = getattr(s, role, None)
    if not isinstance(s, jax.sharding.Sharding):
        raise LoraError(f"{path}: expected a jax.sharding.Sharding for {what}, got {s!r}")
    try:
        s.shard_shape(shape)
    except ValueError as err:
        raise LoraError(
            f"{path}: sharding {s} does not fit {what} of shape {shape}: {err}"
        ) from None
    return s


def _abstract_tree(meta: dict[str, Any]) -> dict[str, Any]:
    """The LoRA tree the checkpoint holds, with ``jax.ShapeDtypeStruct`` for arrays."""

    def sds(info: dict[str, Any]) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(tuple(info["shape"]), np.dtype(info["dtype"]))

    return {
        e["path"]: LoraFactors(
            sds(e["a"]), sds(e["b"]), e["scale"], Layout(**e["layout"]), e["dropout"]
        )
        if e["kind"] == "factors"
        else sds(e["array"])
        for e in meta["entries"]
    }


def _abstract_lora(meta: dict[str, Any], shardings: Shardings) -> dict[str, Any]:
    if callable(shardings) and not isinstance(shardings, jax.sharding.Sharding):
        shardings = shardings(_abstract_tree(meta))
    if isinstance(shardings, Mapping) and (
        extra := sorted(set(shardings) - {e["path"] for e in meta["entries"]})
    ):
        raise LoraError(f"shardings name paths the checkpoint does not have: {extra}")

    def sds(path: str, role: str | None, info: dict[str, Any]) -> jax.ShapeDtypeStruct:
        shape = tuple(info["shape"])
        return jax.ShapeDtypeStruct(
            shape, np.dtype(info["dtype"]), sharding=_sharding(shardings, path, role, shape)
        )

    out = {}
    for i, e in enumerate(meta["entries"]):
        if e["kind"] == "factors":
            out[str(i)] = {r: sds(e["path"], r, e[r]) for r in ("a", "b")}
        else:
            out[str(i)] = sds(e["path"], None, e["array"])
    return out


def _verify(path: str, info: dict[str, Any], x: Any, where: str) -> None:
    if tuple(np.shape(x)) != tuple(info["shape"]) or np.dtype(x.dtype).name != info["dtype"]:
        raise LoraError(
            f"{where}: {path} restored as {np.shape(x)} {x.dtype}, the metadata "
            f"says {tuple(info['shape'])} {info['dtype']}"
        )
    if info.get("sha256") is not None and _digest(x) != info["sha256"]:
        raise LoraError(
            f"{where}: {path} is corrupted (its SHA-256 does not match the one "
            "recorded at save time)"
        )


def _decode(meta: dict[str, Any], arrays: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Rebuild the exact LoRA tree (same static fields) and verify every array."""
    tree: dict[str, Any] = {}
    for i, e in enumerate(meta["entries"]):
        path, item = e["path"], arrays[str(i)]
        if e["kind"] == "factors":
            _verify(f"{path} (A)", e["a"], item["a"], where)
            _verify(f"{path} (B)", e["b"], item["b"], where)
            tree[path] = LoraFactors(
                item["a"], item["b"], e["scale"], Layout(**e["layout"]), e["dropout"]
            )
        else:
            _verify(path, e["array"], item, where)
            tree[path] = item
    return tree


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _read_error(where: str, err: BaseException) -> LoraError:
    return LoraError(
        f"{where} is truncated or corrupted; could not read it: "
        f"{type(err).__name__}: {str(err)[:500]}"
    )


# ---------------------------------------------------------------------------
# One adapter in one directory.


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What a LoRA checkpoint says about itself, read without loading any array.

    Attributes:
      spec: the :class:`LoraSpec` it was made with (``None`` if it had callable filters).
      library_version: the lorax_fn version that wrote it.
      base_fingerprint: SHA-256 over the targeted base leaves' paths, shapes and dtypes.
      base_leaves: ``{path: (shape, dtype)}`` of those leaves (dtype ``None`` if unknown).
      entries: ``{path: "factors" | "array"}``.
    """

    spec: LoraSpec | None
    library_version: str
    base_fingerprint: str
    base_leaves: dict[str, tuple[tuple[int, ...], str | None]]
    entries: dict[str, str]


def _as_path(directory: str | os.PathLike) -> Path:
    return Path(directory).expanduser().absolute()


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _swap_names(directory: Path) -> tuple[Path, Path]:
    return (
        directory.with_name(f".{directory.name}.lorax-new"),
        directory.with_name(f".{directory.name}.lorax-old"),
    )


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
    if not (directory / _META).is_dir():
        raise LoraError(
            f"{where} has no lorax_fn metadata (no {_META}/ item): it is not a "
            "lorax_fn checkpoint, or it is incomplete"
        )
    try:
        # The JSON item alone, through its own handler: no array is touched yet.
        meta = ocp.JsonCheckpointHandler().restore(directory / _META)
    except Exception as err:  # orbax/tensorstore/json raise many types; all mean unreadable
        raise _read_error(f"the metadata of {where}", err) from err
    if not isinstance(meta, dict):
        raise LoraError(f"{where}: malformed lorax_fn metadata (not a JSON object)")
    _check_entries(meta, where)
    return meta


def checkpoint_info(directory: str | os.PathLike) -> CheckpointInfo:
    """Read a LoRA checkpoint's metadata (spec, version, base fingerprint); no arrays.

    Works on a directory written by :func:`save` and on one step of a
    :class:`LoraCheckpointManager`.

    Example:
        >>> info = lorax_fn.checkpoint_info("/tmp/adapter")  # doctest: +SKIP
        >>> base, lt = lorax_fn.split(params, info.spec, key=key)  # doctest: +SKIP
    """
    meta = _load_meta(_as_path(directory))
    return CheckpointInfo(
        spec=None if meta["spec"] is None else LoraSpec.from_json(meta["spec"]),
        library_version=meta["library_version"],
        base_fingerprint=meta["base_fingerprint"],
        base_leaves={b["path"]: (tuple(b["shape"]), b["dtype"]) for b in meta["base_leaves"]},
        entries={e["path"]: e["kind"] for e in meta["entries"]},
    )


def save(
    directory: str | os.PathLike,
    lora_tree: Mapping[str, Any],
    spec: LoraSpec | None,
    *,
    base: Any = None,
    overwrite: bool = False,
) -> Path:
    """Save the LoRA tree alone (not the base) with orbax, plus JSON metadata.

    The metadata holds ``spec``, each entry's ``scale``/``layout``/``dropout``, a
    fingerprint of the base leaves the adapter targets (paths, shapes and — when
    ``base`` is given — dtypes), a SHA-256 per array and ``lorax_fn.__version__``.
    With ``base``, the tree is first checked to fit it. An existing ``directory`` is
    refused unless ``overwrite=True``; then the new checkpoint is written completely
    next to it before it replaces the old one, so a crash mid-save keeps the old one.

    Example:
        >>> base, lt = lorax_fn.split(params, spec, key=jax.random.key(0))  # doctest: +SKIP
        >>> lorax_fn.save("/tmp/adapter", lt, spec, base=base)  # doctest: +SKIP
        >>> lt2 = lorax_fn.restore("/tmp/adapter", base=base)  # doctest: +SKIP
    """
    directory = _as_path(directory)
    arrays, meta = _encode(lora_tree, spec, None if base is None else _leaf_specs(base))
    if directory.exists() and not overwrite:
        raise LoraError(f"{directory} already exists; pass overwrite=True to replace it")
    if directory.exists() and not (directory / _META).is_dir():
        raise LoraError(f"refusing to overwrite {directory}: it is not a lorax_fn checkpoint")
    new, old = _swap_names(directory)
    target = new if directory.exists() else directory
    primary = jax.process_index() == 0
    if primary:
        shutil.rmtree(new, ignore_errors=True)  # left by a save killed before its swap
    _barrier("lorax_fn.save:cleaned")
    args = ocp.args.Composite(
        **{_LORA: ocp.args.StandardSave(arrays), _META: ocp.args.JsonSave(meta)}
    )
    _checkpointer().save(target, args=args)
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


def restore(
    directory: str | os.PathLike,
    *,
    base: Any = None,
    shardings: Shardings = None,
) -> dict[str, Any]:
    """Restore a LoRA tree saved by :func:`save`: the same paths, arrays and static fields.

    Everything is validated before an array is read: the metadata, the format
    version, and — with ``base`` — that the adapter was made for this base (every path
    present with the recorded shape and dtype, and no base leaf that the stored spec
    selects missing from the adapter). Arrays are then checked against their SHA-256.
    Any failure raises :class:`LoraError`; nothing of the caller's is modified.
    ``shardings`` places the arrays (see :data:`Shardings`): replicated over a mesh, or
    each factor following its base weight's sharding.

    Example:
        >>> lt = lorax_fn.restore("/tmp/adapter", base=base,  # doctest: +SKIP
        ...                       shardings=NamedSharding(mesh, P()))  # replicated
        >>> lt = lorax_fn.restore("/tmp/adapter", base=base,  # doctest: +SKIP
        ...     shardings=lambda abstract: lorax_fn.lora_shardings(abstract, base_shardings))
    """
    directory = _as_path(directory)
    where = f"the checkpoint at {directory}"
    meta = _load_meta(directory)
    if base is not None:
        _check_against_base(meta, _leaf_specs(base), where)
    abstract = _abstract_lora(meta, shardings)
    try:
        arrays = _checkpointer().restore(
            directory, args=ocp.args.Composite(**{_LORA: ocp.args.StandardRestore(abstract)})
        )[_LORA]
    except Exception as err:  # orbax/tensorstore raise many types; all mean unreadable
        raise _read_error(where, err) from err
    return _decode(meta, arrays, where)


# ---------------------------------------------------------------------------
# Training checkpoints: LoRA tree + optimizer state + step (+ data position).


@dataclasses.dataclass(frozen=True)
class TrainState:
    """What :meth:`LoraCheckpointManager.restore` returns."""

    step: int
    lora_tree: dict[str, Any]
    opt_state: Any
    data_state: Any
    metrics: dict[str, float] | None


def _opt_leaves(opt_state: Any) -> tuple[list[str], list[Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(opt_state)
    # Python scalars in custom states become 0-d arrays, which orbax and JSON both describe.
    leaves = [leaf if hasattr(leaf, "dtype") else np.asarray(leaf) for _, leaf in flat]
    return [jax.tree_util.keystr(k) for k, _ in flat], leaves


class LoraCheckpointManager:
    """Resumable training checkpoints on orbax's ``CheckpointManager``.

    Each step directory holds the LoRA tree, the optimizer state (any optax state
    pytree), the step, optional metrics and an optional JSON-able data-iterator state.
    It keeps the last ``max_to_keep`` steps and, with ``best_metric``, also the
    ``keep_best`` best ones. Steps are committed atomically (orbax writes a temporary
    directory and renames it), so a process killed mid-save leaves the previous step
    loadable; what such a save leaves behind is invisible and removed by the next save.
    Old steps are renamed aside before they are deleted, so a kill mid-delete (orbax
    deletes with a plain ``rmtree``) never leaves a half-deleted step listed.
    A step directory is also a valid :func:`restore` / :func:`checkpoint_info` target.

    Example:
        >>> mngr = lorax_fn.LoraCheckpointManager("/tmp/run", spec, base=base,  # doctest: +SKIP
        ...                                       max_to_keep=2, best_metric="loss")
        >>> if mngr.latest_step() is not None:  # doctest: +SKIP
        ...     state = mngr.restore(opt_state=opt_state)
        ...     lt, opt_state, start = state.lora_tree, state.opt_state, state.step
        >>> mngr.save(step, lt, opt_state, metrics={"loss": 0.3},  # doctest: +SKIP
        ...           data_state={"epoch": 1, "index": 512})
        >>> mngr.close()  # doctest: +SKIP
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        spec: LoraSpec | None,
        *,
        base: Any = None,
        max_to_keep: int = 3,
        best_metric: str | None = None,
        best_mode: Literal["min", "max"] = "min",
        keep_best: int = 1,
        async_save: bool = False,
    ) -> None:
        if max_to_keep < 1 or keep_best < 1:
            raise LoraError(
                f"max_to_keep and keep_best must be >= 1, got {max_to_keep}, {keep_best}"
            )
        if best_mode not in ("min", "max"):
            raise LoraError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        self.directory = _as_path(directory)
        self._spec = spec
        self._base_leaves = None if base is None else _leaf_specs(base)
        self._best_metric = best_metric
        policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
        best_fn: Callable[[Any], float] | None = None
        if best_metric is not None:
            best_fn = lambda metrics: float(metrics[best_metric])  # noqa: E731
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=best_fn,
                    reverse=best_mode == "min",
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            best_fn=best_fn,
            best_mode=best_mode,
            cleanup_tmp_directories=True,
            todelete_subdir=_DELETED,
            enable_async_checkpointing=async_save,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                _LORA: ocp.StandardCheckpointHandler(),
                _OPT: ocp.StandardCheckpointHandler(),
                _META: ocp.JsonCheckpointHandler(),
            },
        )
        self._purge_deleted()

    def _purge_deleted(self) -> None:
        # Only called with no save in flight: orbax renames into this folder while saving.
        if jax.process_index() == 0:
            shutil.rmtree(self.directory / _DELETED, ignore_errors=True)

    def latest_step(self) -> int | None:
        """The newest step, or ``None`` (with ``async_save``, possibly one still being written).

        Example:
            >>> mngr.latest_step()  # doctest: +SKIP
            1200
        """
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the best ``best_metric`` (the latest step without one).

        Example:
            >>> mngr.best_step()  # doctest: +SKIP
            800
        """
        return self._manager.best_step()

    def all_steps(self) -> list[int]:
        """Every committed step still kept, ascending.

        Example:
            >>> mngr.all_steps()  # doctest: +SKIP
            [800, 1100, 1200]
        """
        return sorted(self._manager.all_steps())

    def save(
        self,
        step: int,
        lora_tree: Mapping[str, Any],
        opt_state: Any,
        *,
        metrics: Mapping[str, float] | None = None,
        data_state: Any = None,
    ) -> None:
        """Save one step. ``data_state`` must be JSON-able (e.g. an iterator position).

        Everything is validated (and, with ``base``, checked to fit it) before any
        file is written. With ``async_save=True`` this returns once the arrays are
        copied to host memory; call :meth:`wait_until_finished` or :meth:`close`.

        Example:
            >>> mngr.save(100, lt, opt_state, metrics={"loss": 1.7},  # doctest: +SKIP
            ...           data_state={"index": 3200})
        """
        step = int(step)
        if step in self._manager.all_steps():
            raise LoraError(f"step {step} is already saved in {self.directory}")
        arrays, meta = _encode(lora_tree, self._spec, self._base_leaves)
        if metrics is not None:
            metrics = {str(k): float(v) for k, v in metrics.items()}
        if self._best_metric is not None and self._best_metric not in (metrics or {}):
            raise LoraError(
                f"step {step}: metrics {metrics} lack best_metric {self._best_metric!r}"
            )
        try:
            json.dumps(data_state)
        except (TypeError, ValueError) as err:
            raise LoraError(f"step {step}: data_state is not JSON-able: {err}") from None
        names, leaves = _opt_leaves(opt_state)
        meta |= {
            "step": step,
            "metrics": metrics,
            "data_state": data_state,
            "opt_state": [{"path": n} | _array_info(x) for n, x in zip(names, leaves, strict=True)],
        }
        self._manager.wait_until_finished()  # orbax's save would wait for it anyway
        self._purge_deleted()
        items = {_LORA: ocp.args.StandardSave(arrays), _META: ocp.args.JsonSave(meta)}
        if leaves:
            items[_OPT] = ocp.args.StandardSave({str(i): x for i, x in enumerate(leaves)})
        self._manager.save(
            step,
            args=ocp.args.Composite(**items),
            metrics=metrics if self._best_metric is not None else None,
        )

    def restore(
        self,
        step: int | None = None,
        *,
        opt_state: Any = None,
        base: Any = None,
        shardings: Shardings = None,
    ) -> TrainState:
        """Restore ``step`` (default: the latest) after validating it.

        ``opt_state`` is a template of the optimizer state (concrete, or abstract from
        ``jax.eval_shape(optimizer.init, lora_tree)``): its structure, shapes and dtypes
        must match the checkpoint, and its leaves' shardings (if any) place the restored
        leaves. With ``opt_state=None`` only the LoRA tree is read. ``base`` (default:
        the manager's) and ``shardings`` work as in :func:`restore`.

        Example:
            >>> state = mngr.restore(opt_state=jax.eval_shape(tx.init, lt))  # doctest: +SKIP
            >>> state.step, state.data_state  # doctest: +SKIP
            (1200, {'index': 38400})
        """
        self._manager.wait_until_finished()  # an async save of the step asked for may be pending
        if step is None:
            step = self.latest_step()
            if step is None:
                raise LoraError(f"no checkpoint in {self.directory}")
        if step not in self._manager.all_steps():
            raise LoraError(f"no step {step} in {self.directory}; steps: {self.all_steps()}")
        where = f"step {step} in {self.directory}"
        try:
            meta = self._manager.restore(
                step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
            )[_META]
        except Exception as err:  # orbax/tensorstore/json raise many types
            raise _read_error(f"the metadata of {where}", err) from err
        if not isinstance(meta, dict) or "opt_state" not in meta:
            raise LoraError(f"{where}: malformed metadata (not a training checkpoint)")
        _check_entries(meta, where)
        base_leaves = self._base_leaves if base is None else _leaf_specs(base)
        if base_leaves is not None:
            _check_against_base(meta, base_leaves, where)
        items = {_LORA: ocp.args.StandardRestore(_abstract_lora(meta, shardings))}
        if opt_state is not None:
            abstract_opt = self._abstract_opt(meta["opt_state"], opt_state, where)
            if abstract_opt:
                items[_OPT] = ocp.args.StandardRestore(abstract_opt)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as err:  # orbax/tensorstore raise many types; all mean unreadable
            raise _read_error(where, err) from err
        lora_tree = _decode(meta, restored[_LORA], where)
        new_opt = None
        if opt_state is not None:
            leaves = []
            for i, info in enumerate(meta["opt_state"]):
                x = restored[_OPT][str(i)]
                _verify(f"opt_state{info['path']}", info, x, where)
                leaves.append(x)
            new_opt = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(opt_state), leaves)
        return TrainState(
            step=int(meta["step"]),
            lora_tree=lora_tree,
            opt_state=new_opt,
            data_state=meta["data_state"],
            metrics=meta["metrics"],
        )

    @staticmethod
    def _abstract_opt(saved: list[dict[str, Any]], template: Any, where: str) -> dict[str, Any]:
        names, leaves = _opt_leaves(template)
        if names != [s["path"] for s in saved]:
            missing = sorted(set(s["path"] for s in saved) - set(names))
            extra = sorted(set(names) - set(s["path"] for s in saved))
            raise LoraError(
                f"{where}: the opt_state template does not match the saved "
                f"optimizer state: saved-only leaves {missing}, template-only "
                f"leaves {extra} (same optimizer and LoRA tree?)"
            )
        out = {}
        for i, (name, leaf, info) in enumerate(zip(names, leaves, saved, strict=True)):
            shape, dtype = tuple(np.shape(leaf)), np.dtype(leaf.dtype).name
            if shape != tuple(info["shape"]) or dtype != info["dtype"]:
                raise LoraError(
                    f"{where}: opt_state{name} is {tuple(info['shape'])} "
                    f"{info['dtype']} in the checkpoint, {shape} {dtype} in the "
                    "template"
                )
            sharding = getattr(leaf, "sharding", None) or jax.sharding.SingleDeviceSharding(
                jax.devices()[0]
            )
            out[str(i)] = jax.ShapeDtypeStruct(shape, np.dtype(dtype), sharding=sharding)
        return out

    def wait_until_finished(self) -> None:
        """Block until an async save has been committed.

        Example:
            >>> mngr.wait_until_finished()  # doctest: +SKIP
        """
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release orbax's resources.

        Example:
            >>> mngr.close()  # doctest: +SKIP
        """
        self._manager.close()
        self._purge_deleted()

    def __enter__(self) -> LoraCheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
