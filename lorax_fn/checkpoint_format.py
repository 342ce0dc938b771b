"""The on-disk format of lorax_fn checkpoints and its validation.

A checkpoint directory holds orbax items only: ``lora`` (the factor arrays, keyed
by entry index because LoRA paths contain ``/``), optionally ``opt_state`` (the
optimizer state's leaves, keyed by leaf index), optionally ``extra`` (chosen base
leaves such as ``batch_stats``, keyed by index) and ``lorax_fn`` (JSON metadata:
the spec, each entry's static fields, a fingerprint of the base leaves it was
made for, a SHA-256 of every array, the library version, and a SHA-256 of the
metadata itself). Nothing is ever unpickled: arrays go through orbax's standard
(tensorstore) handler, the rest is JSON. orbax checksums neither array data nor
metadata, which is why both carry SHA-256 digests. A digest covers the whole
global array, so any process layout can verify what it reads: an array that is
not fully addressable (sharded over several processes) is gathered to every
process for hashing, which LoRA-sized arrays afford.

This module turns a LoRA tree into those items and back, and validates the
metadata (and, given a base, the adapter's fit to it) before any array is read;
:mod:`lorax_fn.checkpoint` and :mod:`lorax_fn.checkpoint_manager` do the I/O.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

import lorax_fn
from lorax_fn.errors import LoraError
from lorax_fn.factors import Layout, LoraFactors
from lorax_fn.paths import compile_filter, leaves_with_paths, path_str
from lorax_fn.spec import LoraSpec

FORMAT = "lorax_fn.checkpoint"
# 2: the metadata carries its own SHA-256 and may list `extra` base leaves. Version-1
# checkpoints (no metadata digest) are still read.
FORMAT_VERSION = 2
# The names of the orbax items in a checkpoint directory (see the module docstring).
LORA_ITEM, OPT_ITEM, META_ITEM, EXTRA_ITEM = "lora", "opt_state", "lorax_fn", "extra"


class CheckpointDamaged(LoraError):
    """A checkpoint whose files are truncated, corrupted or edited (not a caller error).

    :meth:`lorax_fn.LoraCheckpointManager.restore` with ``fallback=True`` skips steps
    that raise it.

    Example:
        >>> issubclass(CheckpointDamaged, LoraError)
        True
    """


Shardings = (
    jax.sharding.Sharding | Mapping[str, Any] | Callable[[dict[str, Any]], Mapping[str, Any]] | None
)
"""Where restored arrays go: ``None`` (this process's first local device); one ``Sharding``
for every array; ``{path: Sharding | LoraFactors-of-Shardings}`` covering every entry (what
:func:`lorax_fn.lora_shardings` and ``jax.tree.map(lambda x: x.sharding, lora_tree)``
return); or a function from the abstract LoRA tree (``LoraFactors`` of
``jax.ShapeDtypeStruct``) to such a dict, e.g.
``lambda lt: lorax_fn.lora_shardings(lt, base_shardings)``."""


def checkpoint_path(directory: str | os.PathLike) -> Path:
    """The absolute path of a checkpoint directory, with ``~`` expanded.

    Example:
        >>> checkpoint_path("~/adapter").is_absolute()
        True
    """
    return Path(directory).expanduser().absolute()


# ---------------------------------------------------------------------------
# Metadata: built from a LoRA tree at save time, checked before anything is read.


def _digest(x: Any) -> str:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        # Every process takes part (save and restore run on all of them, in the same
        # order), so each one hashes the whole global array and verifies all of it.
        x = multihost_utils.process_allgather(x, tiled=True)
    return hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()


def array_info(x: Any) -> dict[str, Any]:
    """The metadata recorded for one array: shape, dtype name and SHA-256.

    Example:
        >>> import numpy as np
        >>> array_info(np.zeros((2, 3), np.float32))
        {'shape': [2, 3], 'dtype': 'float32', 'sha256': '...'}
    """
    return {"shape": list(np.shape(x)), "dtype": np.dtype(x.dtype).name, "sha256": _digest(x)}


def leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], str | None]]:
    """``{path: (shape, dtype)}`` of every leaf; concrete or abstract leaves both work.

    Example:
        >>> import numpy as np
        >>> leaf_specs({"w": np.zeros((2, 3), np.float32), "n": 1.0})
        {'n': ((), None), 'w': ((2, 3), 'float32')}
    """
    out = {}
    for path, leaf in leaves_with_paths(tree):
        dtype = getattr(leaf, "dtype", None)
        out[path] = (tuple(np.shape(leaf)), None if dtype is None else np.dtype(dtype).name)
    return out


def _fingerprint(base_leaves: list[dict[str, Any]]) -> str:
    canonical = json.dumps(base_leaves, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _meta_digest(meta: dict[str, Any]) -> str:
    rest = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    return hashlib.sha256(
        json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def seal(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` as it will read back from JSON, with the SHA-256 of everything else added.

    Call it last, once every field is set; :func:`check_entries` refuses metadata whose
    digest does not match (an edited ``scale``, ``spec``, ``step`` ...).

    Example:
        >>> sealed = seal({"scale": 2.0, "key": (1, 2)})
        >>> sealed["key"], len(sealed["metadata_sha256"])
        ([1, 2], 64)
    """
    meta = json.loads(json.dumps(meta))  # the digest must be of what is read back
    return meta | {"metadata_sha256": _meta_digest(meta)}


def encode(
    lora_tree: Mapping[str, Any],
    spec: LoraSpec | None,
    base_leaves: Mapping[str, tuple[tuple[int, ...], str | None]] | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The orbax array tree and the JSON metadata of ``lora_tree``, validated.

    ``base_leaves`` (from :func:`leaf_specs`) supplies the dtypes for the fingerprint
    and checks that the tree fits that base; ``None`` records dtypes as unknown.

    Example:
        >>> import numpy as np
        >>> from lorax_fn import Layout, LoraFactors
        >>> f = LoraFactors(np.ones((4, 2), np.float32), np.zeros((2, 3), np.float32),
        ...                 0.5, Layout((0,), (1,)))
        >>> arrays, meta = encode({"w": f}, None, None)
        >>> sorted(arrays["0"]), meta["base_leaves"]
        (['a', 'b'], [{'path': 'w', 'shape': [4, 3], 'dtype': None}])
    """
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
                    "a": array_info(entry.a),
                    "b": array_info(entry.b),
                }
            )
            shape, dtype = entry.weight_shape, None
        elif hasattr(entry, "shape") and hasattr(entry, "dtype"):
            arrays[str(i)] = entry
            entries.append({"path": path, "kind": "array", "array": array_info(entry)})
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
    check_entries(meta, "the LoRA tree", sealed=False)
    if spec_json is not None:
        check_spec(meta, spec_json, "the LoRA tree", "the spec given with it")
    if base_leaves is not None:
        check_against_base(meta, base_leaves, "the LoRA tree")
    return arrays, meta


def check_spec(meta: dict[str, Any], spec_json: dict[str, Any], where: str, whose: str) -> None:
    """Refuse entries that contradict a spec: targets, trained-in-full leaves, rank, scale, dropout.

    A checkpoint stores one spec for its tree, so the two must agree: a rank-2 tree
    saved with ``LoraSpec(rank=8)`` would otherwise restore under a spec it was not
    made with.

    Example:
        >>> import numpy as np
        >>> from lorax_fn import Layout, LoraFactors
        >>> f = LoraFactors(np.ones((4, 2), np.float32), np.zeros((2, 3), np.float32),
        ...                 1.0, Layout((0,), (1,)))
        >>> _, meta = encode({"w": f}, None, None)
        >>> check_spec(meta, LoraSpec("w", rank=1).to_json(), "the tree", "its spec")
        Traceback (most recent call last):
        ...
        lorax_fn.errors.LoraError: the tree contradicts its spec:
          w: rank 2, the spec says 1
    """
    spec = LoraSpec.from_json(spec_json)

    def selects(filters: tuple[Any, ...], path: str) -> bool:
        return any(compile_filter(f)(path, None) for f in filters)

    problems = []
    for e in meta["entries"]:
        path = e["path"]
        if e["kind"] == "array":
            if not selects(spec.trainable, path):
                problems.append(f"{path}: trained in full, but not in the spec's trainable")
            continue
        if not selects(spec.targets, path) or selects(spec.exclude, path):
            problems.append(f"{path}: has factors, but the spec does not target it")
            continue
        rank, want_rank = e["a"]["shape"][-1], spec.rank_for(path)
        if rank != want_rank:
            problems.append(f"{path}: rank {rank}, the spec says {want_rank}")
        elif not np.isclose(e["scale"], spec.scale_for(path), rtol=1e-6, atol=0):
            problems.append(f"{path}: scale {e['scale']:g}, the spec says {spec.scale_for(path):g}")
        if not np.isclose(e["dropout"], spec.dropout, rtol=1e-6, atol=0):
            problems.append(f"{path}: dropout {e['dropout']:g}, the spec says {spec.dropout:g}")
    if problems:
        raise LoraError(f"{where} contradicts {whose}:\n  " + "\n  ".join(problems))


def check_entries(meta: dict[str, Any], where: str, *, sealed: bool = True) -> None:
    """Raise unless the metadata is well formed, untouched and each entry's shapes agree.

    ``where`` names the checkpoint in the error message; ``sealed=False`` skips the
    metadata digest (for metadata being built, before :func:`seal`). Damage raises
    :class:`CheckpointDamaged`.

    Example:
        >>> check_entries({"format": "other"}, "/tmp/x")
        Traceback (most recent call last):
        ...
        lorax_fn.errors.LoraError: /tmp/x: not a lorax_fn checkpoint (format 'other')
    """
    try:
        if meta.get("format") != FORMAT:
            raise LoraError(f"not a lorax_fn checkpoint (format {meta.get('format')!r})")
        if int(meta["format_version"]) > FORMAT_VERSION:
            raise LoraError(
                f"written by lorax_fn {meta.get('library_version')} in format version "
                f"{meta['format_version']}; this lorax_fn {lorax_fn.__version__} reads up to "
                f"{FORMAT_VERSION}"
            )
        if (
            sealed
            and ("metadata_sha256" in meta or int(meta["format_version"]) >= 2)
            and meta.get("metadata_sha256") != _meta_digest(meta)
        ):
            raise CheckpointDamaged(
                "its metadata does not match the SHA-256 recorded with it: it was edited "
                "or corrupted after it was written"
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
        raise type(err)(f"{where}: {err}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointDamaged(
            f"{where}: malformed lorax_fn metadata ({type(err).__name__}: {err})"
        ) from None


def _spec_paths(spec_json: dict[str, Any], leaves: Mapping[str, Any]) -> set[str]:
    """The paths of ``leaves`` that the stored spec would target or train in full."""
    spec = LoraSpec.from_json(spec_json)

    def hit(filters: tuple[Any, ...]) -> set[str]:
        predicates = [compile_filter(f) for f in filters]
        return {p for p in leaves if any(match(p, None) for match in predicates)}

    return (hit(spec.targets) | hit(spec.trainable)) - hit(spec.exclude)


def check_against_base(
    meta: dict[str, Any],
    base_leaves: Mapping[str, tuple[tuple[int, ...], str | None]],
    where: str,
) -> None:
    """Refuse an adapter made for a different base, naming every offending path.

    The rules are :func:`lorax_fn.merge`'s: every path must be in the base with the
    recorded shape. Factors are dtype-agnostic (the base weight only has to be
    floating: an adapter trained on a float32 base fits its bfloat16 copy), while a
    leaf trained in full replaces its base leaf and must have its dtype. No base leaf
    that the stored spec selects may be missing from the adapter.

    Example:
        >>> import numpy as np
        >>> from lorax_fn import Layout, LoraFactors
        >>> f = LoraFactors(np.ones((4, 2), np.float32), np.zeros((2, 3), np.float32),
        ...                 0.5, Layout((0,), (1,)))
        >>> _, meta = encode({"w": f}, None, None)
        >>> check_against_base(meta, {"w": ((4, 5), "float32")}, "the adapter")
        Traceback (most recent call last):
        ...
        lorax_fn.errors.LoraError: the adapter was made for a different base:
          w: made for shape (4, 3), the base has (4, 5)
    """
    problems = []
    recorded = {b["path"]: b for b in meta["base_leaves"]}
    entries = {e["path"]: e for e in meta["entries"]}
    if missing := sorted(set(recorded) - set(base_leaves)):
        problems.append(f"paths not in the base: {missing}")
    for path in sorted(set(recorded) & set(base_leaves)):
        shape, dtype = base_leaves[path]
        want_shape = tuple(recorded[path]["shape"])
        if shape != want_shape:
            problems.append(f"{path}: made for shape {want_shape}, the base has {shape}")
        elif entries[path]["kind"] == "array":
            if dtype != entries[path]["array"]["dtype"]:
                problems.append(
                    f"{path}: trained in full as {entries[path]['array']['dtype']}, "
                    f"the base has {dtype}"
                )
        elif dtype is None or not jnp.issubdtype(np.dtype(dtype), jnp.floating):
            problems.append(f"{path}: adapted weight, the base has non-floating dtype {dtype}")
    selected = set() if meta["spec"] is None else _spec_paths(meta["spec"], base_leaves)
    if extra := sorted(selected - set(recorded)):
        problems.append(f"base paths its spec selects but it lacks: {extra}")
    if problems:
        raise LoraError(f"{where} was made for a different base:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------
# Restoring: abstract trees that tell orbax what to read and where, then verification.


def _sharding(
    shardings: Shardings, path: str, role: str | None, shape: tuple[int, ...]
) -> jax.sharding.Sharding:
    if shardings is None:
        return default_sharding()
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


def default_sharding() -> jax.sharding.Sharding:
    """Where arrays go when no sharding is given: this process's first local device.

    (``jax.devices()[0]`` would be process 0's device, which other processes cannot hold.)

    Example:
        >>> default_sharding().device_set == {jax.local_devices()[0]}
        True
    """
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


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


def abstract_lora(meta: dict[str, Any], shardings: Shardings) -> dict[str, Any]:
    """The orbax restore target for the ``lora`` item: placed ``jax.ShapeDtypeStruct`` s.

    Example:
        >>> import numpy as np
        >>> from lorax_fn import Layout, LoraFactors
        >>> f = LoraFactors(np.ones((4, 2), np.float32), np.zeros((2, 3), np.float32),
        ...                 0.5, Layout((0,), (1,)))
        >>> _, meta = encode({"w": f}, None, None)
        >>> target = abstract_lora(meta, None)  # None: a local device
        >>> target["0"]["a"].shape, target["0"]["b"].shape
        ((4, 2), (2, 3))
    """
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


def verify_array(path: str, info: dict[str, Any], x: Any, where: str) -> None:
    """Raise unless ``x`` has the shape, dtype and SHA-256 that :func:`array_info` recorded.

    Example:
        >>> import numpy as np
        >>> x = np.zeros((2,), np.float32)
        >>> verify_array("w", array_info(x), x + 1, "the checkpoint")
        Traceback (most recent call last):
        ...
        lorax_fn.checkpoint_format.CheckpointDamaged: the checkpoint: w is corrupted (its ...
    """
    if tuple(np.shape(x)) != tuple(info["shape"]) or np.dtype(x.dtype).name != info["dtype"]:
        raise CheckpointDamaged(
            f"{where}: {path} restored as {np.shape(x)} {x.dtype}, the metadata "
            f"says {tuple(info['shape'])} {info['dtype']}"
        )
    # Format 1 wrote no digest for arrays sharded over several processes.
    if info.get("sha256") is not None and _digest(x) != info["sha256"]:
        raise CheckpointDamaged(
            f"{where}: {path} is corrupted (its SHA-256 does not match the one "
            "recorded at save time)"
        )


def decode(meta: dict[str, Any], arrays: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Rebuild the exact LoRA tree (same static fields) and verify every array.

    Example:
        >>> import numpy as np
        >>> from lorax_fn import Layout, LoraFactors
        >>> f = LoraFactors(np.ones((4, 2), np.float32), np.zeros((2, 3), np.float32),
        ...                 0.5, Layout((0,), (1,)))
        >>> arrays, meta = encode({"w": f}, None, None)
        >>> decode(meta, arrays, "the checkpoint")
        {'w': LoraFactors(a=float32[4, 2], b=float32[2, 3], scale=0.5, layout=...)}
    """
    tree: dict[str, Any] = {}
    for i, e in enumerate(meta["entries"]):
        path, item = e["path"], arrays[str(i)]
        if e["kind"] == "factors":
            verify_array(f"{path} (A)", e["a"], item["a"], where)
            verify_array(f"{path} (B)", e["b"], item["b"], where)
            tree[path] = LoraFactors(
                item["a"], item["b"], e["scale"], Layout(**e["layout"]), e["dropout"]
            )
        else:
            verify_array(path, e["array"], item, where)
            tree[path] = item
    return tree


# ---------------------------------------------------------------------------
# Extra base leaves (e.g. BatchNorm statistics) saved beside the adapter.


def select_extra(base: Any, filters: Any, lora_tree: Mapping[str, Any]) -> dict[str, Any]:
    """``{path: leaf}`` of the base leaves that ``filters`` select, to save beside the adapter.

    ``filters`` are path filters as in :class:`LoraSpec` (``"batch_stats/**"``, a list...).
    Selecting nothing, or a leaf the LoRA tree already holds, is refused.

    Example:
        >>> import numpy as np
        >>> base = {"params": {"w": np.ones(2)}, "batch_stats": {"mean": np.zeros(2)}}
        >>> sorted(select_extra(base, "batch_stats/**", {}))
        ['batch_stats/mean']
    """
    if base is None:
        raise LoraError("extra= saves leaves of the base: pass base= too")
    filters = (filters,) if isinstance(filters, str) or callable(filters) else tuple(filters)
    predicates = [compile_filter(f) for f in filters]
    leaves = leaves_with_paths(base)
    chosen = {p: x for p, x in leaves if any(match(p, x) for match in predicates)}
    if not chosen:
        raise LoraError(
            f"extra={list(filters)!r} selects no leaf of the base; its paths: "
            f"{[p for p, _ in leaves][:20]}"
        )
    if both := sorted(set(chosen) & set(lora_tree)):
        raise LoraError(f"extra= selects leaves the LoRA tree already holds: {both}")
    return chosen


def encode_extra(leaves: Mapping[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The orbax ``extra`` item (keyed by index) and its metadata, one entry per path.

    Example:
        >>> import numpy as np
        >>> arrays, infos = encode_extra({"batch_stats/mean": np.zeros(2, np.float32)})
        >>> list(arrays), infos[0]["path"], infos[0]["shape"]
        (['0'], 'batch_stats/mean', [2])
    """
    paths = sorted(leaves)
    arrays = {str(i): leaves[p] for i, p in enumerate(paths)}
    return arrays, [{"path": p} | array_info(leaves[p]) for p in paths]


def _placement(leaf: Any) -> jax.sharding.Sharding:
    s = getattr(leaf, "sharding", None)
    if isinstance(s, jax.sharding.Sharding) and not isinstance(
        getattr(s, "mesh", None), jax.sharding.AbstractMesh
    ):
        return s
    return default_sharding()


def requested_extra(
    meta: dict[str, Any], extra: bool, base: Any, where: str, stacklevel: int = 2
) -> list[dict]:
    """The saved extra leaves to restore: all of them with ``extra=True`` (which needs a
    ``base`` to put them into), none otherwise — with a warning that some were saved.

    Example:
        >>> requested_extra({"extra": []}, True, None, "ckpt")
        Traceback (most recent call last):
        ...
        lorax_fn.errors.LoraError: restore(extra=True) puts saved leaves into a base: pass base= too
    """
    if extra and base is None:
        raise LoraError("restore(extra=True) puts saved leaves into a base: pass base= too")
    saved = meta.get("extra", [])
    if saved and not extra:
        warnings.warn(
            f"{where} also holds base leaves {[x['path'] for x in saved]} (saved with "
            "extra=); pass extra=True to restore them into the base",
            UserWarning,
            stacklevel=stacklevel,
        )
    return saved if extra else []


def abstract_extra(infos: list[dict[str, Any]], base: Any, where: str) -> dict[str, Any]:
    """The orbax restore target for the ``extra`` item, placed like the base leaves.

    Each saved path must be a leaf of ``base`` with the saved shape (the dtype may
    differ; the value is cast to the base leaf's dtype, as :func:`lorax_fn.merge` casts).

    Example:
        >>> import numpy as np
        >>> _, infos = encode_extra({"s": np.zeros(2, np.float32)})
        >>> abstract_extra(infos, {"s": np.ones(3)}, "the checkpoint")
        Traceback (most recent call last):
        ...
        lorax_fn.errors.LoraError: the checkpoint: its extra leaf s is (2,), the base has (3,)
    """
    leaves = dict(leaves_with_paths(base))
    out = {}
    for i, info in enumerate(infos):
        path, shape = info["path"], tuple(info["shape"])
        if path not in leaves:
            raise LoraError(f"{where}: its extra leaf {path} is not in the base")
        if tuple(np.shape(leaves[path])) != shape:
            raise LoraError(
                f"{where}: its extra leaf {path} is {shape}, the base has "
                f"{tuple(np.shape(leaves[path]))}"
            )
        out[str(i)] = jax.ShapeDtypeStruct(
            shape, np.dtype(info["dtype"]), sharding=_placement(leaves[path])
        )
    return out


def apply_extra(
    infos: list[dict[str, Any]], arrays: Mapping[str, Any], base: Any, where: str
) -> Any:
    """A copy of ``base`` with the verified extra leaves put in; ``base`` is not modified.

    Example:
        >>> import numpy as np
        >>> arrays, infos = encode_extra({"s": np.full(2, 7.0, np.float32)})
        >>> apply_extra(infos, arrays, {"s": np.zeros(2), "w": np.ones(1)}, "ckpt")["s"]
        array([7., 7.])
    """
    saved = {}
    for i, info in enumerate(infos):
        verify_array(f"extra {info['path']}", info, arrays[str(i)], where)
        saved[info["path"]] = arrays[str(i)]
    flat, treedef = jax.tree_util.tree_flatten_with_path(base)
    leaves = []
    for key, leaf in flat:
        x = saved.get(path_str(key), leaf)
        dtype = getattr(leaf, "dtype", None)
        leaves.append(x.astype(dtype) if x is not leaf and dtype is not None else x)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def unsaved_state(base: Any, saved: set[str]) -> list[str]:
    """Paths of the base's non-parameter state (mutable collections) not in ``saved``.

    Linen: every leaf outside the ``params`` collection of a ``{"params": ...}`` dict;
    NNX: every variable that is not an ``nnx.Param`` (RNG state aside).

    Example:
        >>> import numpy as np
        >>> unsaved_state({"params": {"w": 1.0}, "batch_stats": {"mean": 0.0}}, set())
        ['batch_stats/mean']
    """
    if isinstance(base, Mapping) and "params" in base:
        return [
            p for p, _ in leaves_with_paths(base) if not p.startswith("params/") and p not in saved
        ]
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a dependency
        return []
    flat, _ = jax.tree_util.tree_flatten_with_path(
        base, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    return [
        path_str(k)
        for k, v in flat
        if isinstance(v, nnx.Variable)
        and not isinstance(v, nnx.Param | nnx.RngState)
        and path_str(k) not in saved
    ]


def warn_unsaved(base: Any, saved: set[str], what: str) -> None:
    """Warn, naming the paths, when ``base`` carries state that ``what`` will not hold.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_unsaved({"params": {}, "batch_stats": {"m": 0.0}}, set(), "the checkpoint")
        >>> "batch_stats/m" in str(caught[0].message)
        True
    """
    if paths := unsaved_state(base, saved):
        shown = paths[:8] + [f"... {len(paths) - 8} more"] * (len(paths) > 8)
        warnings.warn(
            f"{what} does not hold the base's non-parameter state {shown} (e.g. BatchNorm "
            "statistics): a model restored from it uses whatever values its base has then. "
            "Pass extra=[filters] (e.g. extra='batch_stats/**') to save them with the adapter.",
            UserWarning,
            stacklevel=3,
        )


# ---------------------------------------------------------------------------
# Read failures: damaged files versus everything else, told once.

# tensorstore/orbax texts that mean the files are missing, short or unparsable.
_DAMAGE_MARKERS = (
    "OUT_OF_RANGE",
    "NOT_FOUND",
    "DATA_LOSS",
    "not compatible with the stored shape",
    "was not found in the checkpoint",
)


def _chain(err: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    todo = [err]
    while todo:
        e = todo.pop()
        if e is None or any(e is seen for seen in out):
            continue
        out.append(e)
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return out


def read_error(where: str, err: BaseException) -> LoraError:
    """The :class:`LoraError` to raise when orbax fails to read (part of) a checkpoint.

    Missing, short or unparsable files give :class:`CheckpointDamaged` ("truncated or
    corrupted"); any other failure (a placement error, a dead peer process) names its
    cause instead. Raise it ``from err``: the chained cause keeps its type and message
    but not orbax's traceback, whose frames keep failed reads alive.

    Example:
        >>> print(read_error("/x", OSError("DATA_LOSS: short read")))
        /x is truncated or corrupted; could not read it: OSError: DATA_LOSS: short read
        >>> print(read_error("/x", RuntimeError("DEADLINE_EXCEEDED: barrier")))
        could not restore /x (not a sign of damaged files): RuntimeError: DEADLINE_EXCEEDED: barrier
    """
    chain = _chain(err)
    for e in chain:
        e.__traceback__ = None
    cause = f"{type(err).__name__}: {str(err)[:500]}"
    if any(
        isinstance(e, FileNotFoundError | json.JSONDecodeError)
        or any(marker in str(e) for marker in _DAMAGE_MARKERS)
        for e in chain
    ):
        return CheckpointDamaged(f"{where} is truncated or corrupted; could not read it: {cause}")
    return LoraError(f"could not restore {where} (not a sign of damaged files): {cause}")


class _DropOrbaxLeftovers(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage() + repr(record.exc_info)
        return not ("never retrieved" in text and ("tensorstore" in text or "orbax" in text))


def _from_orbax(unraisable: Any) -> bool:
    files = [getattr(getattr(unraisable.object, "cr_code", None), "co_filename", "")]
    tb = unraisable.exc_traceback
    while tb is not None:
        files.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    return any(f"{os.sep}orbax{os.sep}" in f for f in files)


def _closed_loop_leftover(exc_type: type, exc: BaseException, tb: Any) -> bool:
    if not (exc_type is RuntimeError and str(exc) == "Event loop is closed"):
        return False
    names = []
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return "call_soon_threadsafe" in names


def _mute_orbax_leftovers() -> None:
    """Install (once) filters for exactly what orbax's abandoned reads print, nothing else."""
    if getattr(sys.unraisablehook, "lorax_fn_filter", False):
        return
    unraisablehook = sys.unraisablehook

    def unraisable_hook(u: Any) -> None:
        if not (_from_orbax(u) or _closed_loop_leftover(u.exc_type, u.exc_value, u.exc_traceback)):
            unraisablehook(u)

    unraisable_hook.lorax_fn_filter = True  # type: ignore[attr-defined]
    sys.unraisablehook = unraisable_hook
    logging.getLogger("asyncio").addFilter(_DropOrbaxLeftovers())


@contextlib.contextmanager
def one_clear_error() -> Iterator[None]:
    """Keep a failed orbax read from printing anything besides the LoraError raised for it.

    When a read fails, orbax abandons the others: their coroutines, futures and
    tensorstore callbacks finish or are garbage-collected later, each printing a
    traceback ("Future exception was never retrieved", "Exception ignored in
    <coroutine ...>", "RuntimeError: Event loop is closed"), possibly after the error
    has been raised. So the first failure installs filters for exactly those messages
    (orbax coroutines, tensorstore errors nobody retrieved, asyncio's closed-loop error
    in ``call_soon_threadsafe``) in front of ``sys.unraisablehook`` and the ``asyncio``
    logger; everything else passes through.

    Example:
        >>> with one_clear_error():
        ...     pass
    """
    try:
        yield
    except BaseException:
        _mute_orbax_leftovers()
        with warnings.catch_warnings():  # the abandoned coroutines orbax never started
            warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
            gc.collect()
        raise
