"""The on-disk format of lorax_fn checkpoints and its validation.

A checkpoint directory holds orbax items only: ``lora`` (the factor arrays ``a``,
``b`` and each extra array of the adapter's variant under its name (see
:mod:`lorax_fn.variants`), or a layer subset's (:mod:`lorax_fn.subsets`) compact ``a``
and ``b`` by part index, keyed by entry index because LoRA paths contain ``/``),
optionally ``opt_state`` (the optimizer state's leaves, keyed by leaf index),
optionally ``extra`` (chosen base leaves such as ``batch_stats``, keyed by index) and
``lorax_fn`` (JSON metadata: the spec, each entry's static fields and variant, a
fingerprint of the base leaves it was made for, a SHA-256 of every array, the library
version, and a SHA-256 of the metadata itself). Nothing is ever unpickled: arrays go
through orbax's standard (tensorstore) handler, the rest is JSON. orbax checksums
neither array data nor metadata, which is why both carry SHA-256 digests. A digest
covers the whole global array, so any process layout can verify what it reads: an
array that is not fully addressable (sharded over several processes) is gathered to
every process for hashing, which LoRA-sized arrays afford.

This module turns a LoRA tree into those items and back, and validates the
metadata (and, given a base, the adapter's fit to it) before any array is read;
:mod:`lorax_fn.checkpoint.io` and :mod:`lorax_fn.checkpoint.manager` do the I/O,
:mod:`lorax_fn.checkpoint.extra` handles the ``extra`` item and
:mod:`lorax_fn.checkpoint.errors` (below this module) tells damaged files from other
read failures.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from lorax_fn.checkpoint.errors import CheckpointDamaged
from lorax_fn.errors import LoraError
from lorax_fn.factors import Layout, LoraFactors
from lorax_fn.inits import rewrites_base
from lorax_fn.paths import compile_filter
from lorax_fn.pissa import PROBES, PissaRecord, check_base
from lorax_fn.quant.quantized import weight_leaves
from lorax_fn.spec import LoraSpec
from lorax_fn.subsets import LayerGroups, LayerSubset, is_subset
from lorax_fn.variants.base import get
from lorax_fn.version import __version__

FORMAT = "lorax_fn.checkpoint"
# 2: the metadata carries its own SHA-256 and may list `extra` base leaves. Version-1
# checkpoints (no metadata digest) are still read.
# 3: a factors entry may be of an adapter variant other than plain LoRA: it names it
# ("variant") and stores the variant's extra arrays under their names beside A and B.
# Only a tree with such entries is written as 3, so that a lorax_fn that predates
# variants refuses it (it would drop the extra arrays and restore plain LoRA) while
# still reading every plain-LoRA checkpoint.
# 4: an entry may be a layer subset of a stacked weight (kind "subset", lorax_fn.subsets):
# its parts' compact factors with their layer ids. Only a tree with subsets is written as
# 4, so that an older lorax_fn refuses it (it knows no such entry kind).
FORMAT_VERSION = 4
_VARIANTS_VERSION = 3
_PLAIN_VERSION = 2
# The fields of a factors entry in the metadata; every other key is an extra array of
# its variant (which therefore may not use these names).
_FACTORS_FIELDS = frozenset(
    ("path", "kind", "scale", "dropout", "layout", "a", "b", "variant", "pissa")
)
# The names of the orbax items in a checkpoint directory (see the module docstring).
LORA_ITEM, OPT_ITEM, META_ITEM, EXTRA_ITEM = "lora", "opt_state", "lorax_fn", "extra"


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


def entry_variant(entry: Mapping[str, Any]) -> str:
    """The adapter variant of a factors entry of the metadata (``"lora"``: plain LoRA).

    Example:
        >>> entry_variant({"path": "w", "kind": "factors"}), entry_variant({"variant": "x"})
        ('lora', 'x')
    """
    if "variant" in entry:
        return entry["variant"]
    # Compatibility read: format-3 checkpoints written before variants had names hold
    # DoRA, then the only adapter with an extra array, as an entry with a "magnitude".
    return "dora" if "magnitude" in entry else "lora"


def _stored_extras(entry: Mapping[str, Any]) -> list[str]:
    return [k for k in entry if k not in _FACTORS_FIELDS]


def _roles(entry: Mapping[str, Any]) -> tuple[str, ...]:
    """The arrays of a (checked) factors entry in the ``lora`` item: A, B, the extras."""
    return ("a", "b", *get(entry_variant(entry)).extras)


def _describe(variant: str, role: str) -> str:
    return {"a": "A", "b": "B"}.get(role, f"the {variant!r} {role}")


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

    A :class:`lorax_fn.QuantizedArray` is one leaf, described by the float array it
    stands for (as :func:`lorax_fn.merge` checks it), not by its stored codes.

    Example:
        >>> import numpy as np
        >>> leaf_specs({"w": np.zeros((2, 3), np.float32), "n": 1.0})
        {'n': ((), None), 'w': ((2, 3), 'float32')}
        >>> import jax.numpy as jnp, lorax_fn
        >>> leaf_specs({"q": lorax_fn.quant.quantize(jnp.ones((2, 64), jnp.bfloat16))})
        {'q': ((2, 64), 'bfloat16')}
    """
    out = {}
    for path, leaf in weight_leaves(tree):
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
        >>> from lorax_fn.variants.base import Variant, register
        >>> class Gain(Variant):  # a variant with one extra array, a per-column gain
        ...     name, extras = "doc_ckpt_gain", ("gain",)
        >>> _ = register(Gain())
        >>> g = LoraFactors(f.a, f.b, 0.5, f.layout, extras={"gain": np.ones(3, np.float32)},
        ...                 variant="doc_ckpt_gain")
        >>> arrays, meta = encode({"w": g}, None, None)
        >>> sorted(arrays["0"]), meta["entries"][0]["gain"]["shape"], meta["format_version"]
        (['a', 'b', 'gain'], [3], 3)
        >>> meta["entries"][0]["variant"]
        'doc_ckpt_gain'
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
            if clash := sorted(set(entry.extras) & _FACTORS_FIELDS):
                raise LoraError(
                    f"{path}: variant {entry.variant!r} names extra arrays {clash}, which "
                    "checkpoints use for their own fields; rename them"
                )
            arrays[str(i)] = {"a": entry.a, "b": entry.b, **entry.extras}
            info = {
                "path": path,
                "kind": "factors",
                "scale": float(entry.scale),
                "dropout": float(entry.dropout),
                "layout": entry.layout.to_json(),
                "a": array_info(entry.a),
                "b": array_info(entry.b),
            }
            if entry.variant != "lora":  # plain entries have no key, exactly as before
                info["variant"] = entry.variant
            info |= {name: array_info(x) for name, x in entry.extras.items()}
            if entry.pissa is not None:  # nor do entries without a PiSSA record
                info["pissa"] = entry.pissa.to_json()
            entries.append(info)
            shape, dtype = entry.weight_shape, None
        elif is_subset(entry):
            arrays[str(i)], info = _encode_subset(path, entry)
            entries.append(info)
            shape, dtype = entry.weight_shape, None
        elif hasattr(entry, "shape") and hasattr(entry, "dtype"):
            arrays[str(i)] = entry
            entries.append({"path": path, "kind": "array", "array": array_info(entry)})
            shape, dtype = tuple(np.shape(entry)), np.dtype(entry.dtype).name
        else:
            raise LoraError(
                f"{path}: a LoRA tree entry must be LoraFactors, a layer subset or an array, "
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
    if any(e["kind"] == "subset" for e in entries):
        version = FORMAT_VERSION
    else:
        version = _VARIANTS_VERSION if any("variant" in e for e in entries) else _PLAIN_VERSION
    meta = {
        "format": FORMAT,
        "format_version": version,
        "library_version": __version__,
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


def _encode_subset(
    path: str, entry: LayerSubset | LayerGroups
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The arrays (by part index, then ``a``/``b``) and the metadata of a layer subset."""
    parts = entry.parts if isinstance(entry, LayerGroups) else (entry,)
    arrays, infos = {}, []
    for k, part in enumerate(parts):
        f = part.factors
        if f.variant != "lora" or f.extras or f.pissa is not None:
            # select_layers makes plain LoRA only; a hand-built subset of another kind
            # would lose its extras here.
            raise LoraError(f"{path}: a layer subset in a checkpoint holds plain LoRA factors only")
        arrays[str(k)] = {"a": f.a, "b": f.b}
        infos.append(
            {
                "layers": list(part.layers),
                "scale": float(f.scale),
                "dropout": float(f.dropout),
                "layout": f.layout.to_json(),
                "a": array_info(f.a),
                "b": array_info(f.b),
            }
        )
    groups = isinstance(entry, LayerGroups)
    info = {
        "path": path,
        "kind": "subset",
        "groups": groups,
        "num_layers": entry.num_layers,
        "parts": infos,
    }
    return arrays, info


def _factor_infos(entry: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The factors described by an entry: itself, or a subset's parts."""
    return list(entry["parts"]) if entry["kind"] == "subset" else [entry]


def check_spec(meta: dict[str, Any], spec_json: dict[str, Any], where: str, whose: str) -> None:
    """Refuse entries that contradict a spec: targets, trained leaves, rank, scale, dropout,
    the adapter variant, and a PiSSA record under another ``init``.

    A checkpoint stores one spec for its tree, so the two must agree: a rank-2 tree
    saved with ``LoraSpec(rank=8)`` would otherwise restore under a spec it was not
    made with, and a plain adapter under a spec of another variant (or the reverse)
    would resume training a different model.

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
        want_rank = spec.rank_for(path)
        for f in _factor_infos(e):
            # A subset's layers may keep fewer columns than the split (a rank per layer).
            rank = f["a"]["shape"][-1]
            if rank > want_rank or (rank != want_rank and e["kind"] != "subset"):
                problems.append(f"{path}: rank {rank}, the spec says {want_rank}")
            elif not np.isclose(f["scale"], spec.scale_for(path), rtol=1e-6, atol=0):
                problems.append(
                    f"{path}: scale {f['scale']:g}, the spec says {spec.scale_for(path):g}"
                )
            if not np.isclose(f["dropout"], spec.dropout, rtol=1e-6, atol=0):
                problems.append(f"{path}: dropout {f['dropout']:g}, the spec says {spec.dropout:g}")
        if (variant := entry_variant(e)) != spec.variant_name:
            kind = (
                "plain LoRA"
                if variant == "lora"
                else f"a {variant!r} adapter (it has {' and '.join(_stored_extras(e))})"
            )
            problems.append(f"{path}: {kind}, the spec says variant={spec.variant_name!r}")
        if "pissa" in e and spec.init != (made := PissaRecord.from_json(e["pissa"]).init):
            problems.append(f"{path}: made by init={made!r}, the spec says init={spec.init!r}")
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
                f"{meta['format_version']}; this lorax_fn {__version__} reads up to "
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
                _check_extras(e, layout, shape, expected[1])
                if not all(isinstance(e[k], int | float) for k in ("scale", "dropout")):
                    raise LoraError(f"{path}: scale/dropout must be numbers")
                if "pissa" in e:
                    record = PissaRecord.from_json(e["pissa"])
                    if {len(record.original), len(record.residual)} != {PROBES}:
                        raise ValueError(f"{path}: a PiSSA record of {PROBES} probes expected")
            elif e["kind"] == "subset":
                _check_subset(e, shape)
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


def _check_subset(entry: dict[str, Any], shape: tuple[int, ...]) -> None:
    """Raise unless a subset's parts hold disjoint layers of the stack, each part's A and B
    the compact shapes of its layers (so the full-stack expansion fits ``shape``)."""
    path, parts, seen = entry["path"], entry["parts"], set()
    if not parts or (not entry["groups"] and len(parts) != 1):
        raise LoraError(f"{path}: a layer subset of {len(parts)} parts")
    for part in parts:
        layout = Layout(**part["layout"])
        layout.check(path, shape)
        if len(layout.batch_axes) != 1:
            raise LoraError(f"{path}: a layer subset needs one batch (layer) axis, got {layout}")
        n, layers = shape[layout.batch_axes[0]], part["layers"]
        if n != entry["num_layers"]:
            raise LoraError(f"{path}: a subset of {entry['num_layers']} layers, the weight has {n}")
        if (
            not layers
            or layers != sorted(set(layers))
            or not all(isinstance(i, int) and 0 <= i < n for i in layers)
            or seen & set(layers)
        ):
            raise LoraError(f"{path}: layers {layers} are not distinct layers of a stack of {n}")
        seen |= set(layers)
        compact = list(shape)
        compact[layout.batch_axes[0]] = len(layers)
        a, b = tuple(part["a"]["shape"]), tuple(part["b"]["shape"])
        expected = layout.shapes(compact, a[-1] if a else 0)
        if (a, b) != expected:
            raise LoraError(
                f"{path}: A {a} and B {b} of layers {layers} do not fit a weight of shape "
                f"{shape} with {layout} (expected {expected})"
            )
        if not all(isinstance(part[k], int | float) for k in ("scale", "dropout")):
            raise LoraError(f"{path}: scale/dropout must be numbers")


def _check_extras(
    entry: dict[str, Any], layout: Layout, shape: tuple[int, ...], b: tuple[int, ...]
) -> None:
    """Raise unless the entry stores exactly its variant's extras, each a column vector."""
    path, name = entry["path"], entry_variant(entry)
    try:
        variant = get(name)
    except LoraError as err:
        raise LoraError(f"{path}: {err}") from None
    stored = _stored_extras(entry)
    if sorted(stored) != sorted(variant.extras):
        raise LoraError(
            f"{path}: a {name!r} adapter has the extra arrays {list(variant.extras)}, the "
            f"checkpoint stores {stored} for it"
        )
    nb = len(layout.batch_axes)
    column = b[:nb] + b[nb + 1 :]  # B's shape, less the rank
    for extra in variant.extras:
        if (got := tuple(entry[extra]["shape"])) != column:
            raise LoraError(
                f"{path}: {_describe(name, extra)} {got} does not fit a weight of shape "
                f"{shape} with {layout} (expected {column})"
            )


def spec_paths(spec: LoraSpec, leaves: Iterable[str]) -> set[str]:
    """The paths among ``leaves`` that ``spec`` would target or train in full.

    Example:
        >>> sorted(spec_paths(LoraSpec("*/kernel", exclude="head/*"), ["a/kernel", "head/kernel"]))
        ['a/kernel']
    """
    paths = list(leaves)

    def hit(filters: tuple[Any, ...]) -> set[str]:
        predicates = [compile_filter(f) for f in filters]
        return {p for p in paths if any(match(p, None) for match in predicates)}

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
    selected = (
        set() if meta["spec"] is None else spec_paths(LoraSpec.from_json(meta["spec"]), base_leaves)
    )
    if extra := sorted(selected - set(recorded)):
        problems.append(f"base paths its spec selects but it lacks: {extra}")
    if problems:
        raise LoraError(f"{where} was made for a different base:\n  " + "\n  ".join(problems))


def _record(entry: dict[str, Any]) -> PissaRecord | None:
    return PissaRecord.from_json(entry["pissa"]) if "pissa" in entry else None


def check_pissa_base(
    meta: dict[str, Any], base: Any, where: str, *, sketches: bool = False
) -> None:
    """Refuse a base that holds the original weights of the checkpoint's PiSSA factors.

    The rule is :func:`lorax_fn.pissa.check_base`'s, on the records saved with each entry;
    ``base`` is a base tree or, with ``sketches=True``, its sketches by path. Factors
    whose stored spec says ``init="pissa"`` but that carry no record (saved before
    lorax_fn recorded one, or split under a JAX transformation) cannot be checked, and
    a warning names them.

    Example:
        >>> import jax, jax.numpy as jnp, lorax_fn
        >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
        >>> spec = lorax_fn.LoraSpec("w", rank=2, init="pissa")
        >>> residual, lt = lorax_fn.split(params, spec, key=jax.random.key(1))
        >>> _, meta = encode(lt, spec, None)
        >>> check_pissa_base(meta, residual, "the adapter")
        >>> check_pissa_base(meta, params, "the adapter")
        Traceback (most recent call last):
        ...
        lorax_fn.errors.LoraError: the adapter is a PiSSA adapter, made for the residual ...
    """
    factors = [e for e in meta["entries"] if e["kind"] == "factors"]
    pissa_spec = rewrites_base((meta["spec"] or {}).get("init", "gaussian"))
    if pissa_spec and (unchecked := [e["path"] for e in factors if "pissa" not in e]):
        warnings.warn(
            f"PiSSA factors {unchecked} carry no record of the residual base they were "
            "made for (saved by an older lorax_fn, or split under a JAX transformation): "
            "whether the base given is that residual cannot be checked",
            UserWarning,
            stacklevel=3,
        )
    records = {e["path"]: _record(e) for e in factors if "pissa" in e}
    check_base(records, base, where, sketches=sketches)


# ---------------------------------------------------------------------------
# Restoring: abstract trees that tell orbax what to read and where, then verification.


def _sharding(
    shardings: Shardings,
    path: str,
    role: str | None,
    what: str,
    shape: tuple[int, ...],
    part: int | None = None,
) -> jax.sharding.Sharding:
    """Where the array ``role`` of ``path`` (of a subset's ``part``) goes (``what`` names
    it in errors)."""
    if shardings is None:
        return default_sharding()
    if isinstance(shardings, jax.sharding.Sharding):
        s = shardings
    else:
        if path not in shardings:
            raise LoraError(f"shardings has no entry for {path!r}")
        s = shardings[path]
        if part is not None and isinstance(s, LayerGroups | LayerSubset):
            s = s.parts[part].factors if isinstance(s, LayerGroups) else s.factors
        if role in ("a", "b") and not isinstance(s, jax.sharding.Sharding):
            s = getattr(s, role, None)
        elif role is not None and not isinstance(s, jax.sharding.Sharding):
            # By the extras dict, not by attribute: an extra may share a name with a field.
            s = (getattr(s, "extras", None) or {}).get(role)
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


def _factors(entry: dict[str, Any], arrays: Mapping[str, Any]) -> LoraFactors:
    """The factors of a (checked) entry, with ``arrays`` by role (A, B and the extras)."""
    variant = entry_variant(entry)
    return LoraFactors(
        arrays["a"],
        arrays["b"],
        entry["scale"],
        Layout(**entry["layout"]),
        entry["dropout"],
        extras={name: arrays[name] for name in get(variant).extras},
        variant=variant,
        pissa=_record(entry),
    )


def _subset(entry: dict[str, Any], arrays: Mapping[str, Any]) -> LayerSubset | LayerGroups:
    """The layer subset of a (checked) entry, with ``arrays`` by part index, then role."""
    parts = []
    for k, part in enumerate(entry["parts"]):
        layout = Layout(**part["layout"])
        f = LoraFactors(
            arrays[str(k)]["a"], arrays[str(k)]["b"], part["scale"], layout, part["dropout"]
        )
        parts.append(LayerSubset(f, tuple(part["layers"]), entry["num_layers"]))
    return LayerGroups(tuple(parts)) if entry["groups"] else parts[0]


def _abstract_tree(meta: dict[str, Any]) -> dict[str, Any]:
    """The LoRA tree the checkpoint holds, with ``jax.ShapeDtypeStruct`` for arrays."""

    def sds(info: dict[str, Any]) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(tuple(info["shape"]), np.dtype(info["dtype"]))

    tree: dict[str, Any] = {}
    for e in meta["entries"]:
        if e["kind"] == "factors":
            tree[e["path"]] = _factors(e, {r: sds(e[r]) for r in _roles(e)})
        elif e["kind"] == "subset":
            parts = {str(k): {r: sds(p[r]) for r in "ab"} for k, p in enumerate(e["parts"])}
            tree[e["path"]] = _subset(e, parts)
        else:
            tree[e["path"]] = sds(e["array"])
    return tree


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

    def sds(
        path: str, role: str | None, what: str, info: dict[str, Any], part: int | None = None
    ) -> jax.ShapeDtypeStruct:
        shape = tuple(info["shape"])
        sharding = _sharding(shardings, path, role, what, shape, part)
        return jax.ShapeDtypeStruct(shape, np.dtype(info["dtype"]), sharding=sharding)

    out = {}
    for i, e in enumerate(meta["entries"]):
        if e["kind"] == "factors":
            variant = entry_variant(e)
            out[str(i)] = {r: sds(e["path"], r, _describe(variant, r), e[r]) for r in _roles(e)}
        elif e["kind"] == "subset":
            out[str(i)] = {
                str(k): {r: sds(e["path"], r, f"{r.upper()} of part {k}", p[r], k) for r in "ab"}
                for k, p in enumerate(e["parts"])
            }
        else:
            out[str(i)] = sds(e["path"], None, "the array", e["array"])
    return out


def verify_array(path: str, info: dict[str, Any], x: Any, where: str) -> None:
    """Raise unless ``x`` has the shape, dtype and SHA-256 that :func:`array_info` recorded.

    Example:
        >>> import numpy as np
        >>> x = np.zeros((2,), np.float32)
        >>> verify_array("w", array_info(x), x + 1, "the checkpoint")
        Traceback (most recent call last):
        ...
        lorax_fn.checkpoint.errors.CheckpointDamaged: the checkpoint: w is corrupted (its ...
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
            variant = entry_variant(e)
            for role in _roles(e):
                verify_array(f"{path} ({_describe(variant, role)})", e[role], item[role], where)
            tree[path] = _factors(e, item)
        elif e["kind"] == "subset":
            for k, part in enumerate(e["parts"]):
                for role in "ab":
                    what = f"{path} ({role.upper()} of layers {part['layers']})"
                    verify_array(what, part[role], item[str(k)][role], where)
            tree[path] = _subset(e, item)
        else:
            verify_array(path, e["array"], item, where)
            tree[path] = item
    return tree
