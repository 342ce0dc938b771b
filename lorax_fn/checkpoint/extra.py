"""Base leaves saved beside an adapter: non-parameter state such as BatchNorm statistics.

The LoRA tree holds no such state, so a restored model would silently use whatever its
base holds then. ``save(..., extra=filters)`` stores the chosen base leaves as the
checkpoint's ``extra`` item (verified by SHA-256 like every array), ``restore(...,
extra=True)`` puts them back into a copy of the base, and saving a base that carries
such state without ``extra`` warns, naming it (PEFT's ``modules_to_save``, for state).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from lorax_fn.checkpoint.format import array_info, default_sharding, verify_array
from lorax_fn.errors import LoraError
from lorax_fn.paths import compile_filter, path_str
from lorax_fn.quant.quantized import QuantizedArray, weight_leaves


def select_extra(base: Any, filters: Any, lora_tree: Mapping[str, Any]) -> dict[str, Any]:
    """``{path: leaf}`` of the base leaves that ``filters`` select, to save beside the adapter.

    ``filters`` are path filters as in :class:`LoraSpec` (``"batch_stats/**"``, a list...).
    Selecting nothing, a leaf the LoRA tree already holds, or a quantized weight (frozen
    parameters, not state) is refused.

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
    leaves = weight_leaves(base)
    chosen = {p: x for p, x in leaves if any(match(p, x) for match in predicates)}
    if not chosen:
        raise LoraError(
            f"extra={list(filters)!r} selects no leaf of the base; its paths: "
            f"{[p for p, _ in leaves][:20]}"
        )
    if both := sorted(set(chosen) & set(lora_tree)):
        raise LoraError(f"extra= selects leaves the LoRA tree already holds: {both}")
    if quantized := sorted(p for p, x in chosen.items() if isinstance(x, QuantizedArray)):
        raise LoraError(
            f"extra= selects quantized weights {quantized}: it saves state such as "
            "BatchNorm statistics, not the frozen base; narrow the filters"
        )
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
    differ; the value is cast to the base leaf's dtype, as :func:`lorax_fn.merge` casts),
    and not a quantized weight, which a saved float array cannot replace.

    Example:
        >>> import numpy as np
        >>> _, infos = encode_extra({"s": np.zeros(2, np.float32)})
        >>> abstract_extra(infos, {"s": np.ones(3)}, "the checkpoint")
        Traceback (most recent call last):
        ...
        lorax_fn.errors.LoraError: the checkpoint: its extra leaf s is (2,), the base has (3,)
    """
    leaves = dict(weight_leaves(base))
    out = {}
    for i, info in enumerate(infos):
        path, shape = info["path"], tuple(info["shape"])
        if path not in leaves:
            raise LoraError(f"{where}: its extra leaf {path} is not in the base")
        if isinstance(leaves[path], QuantizedArray):
            raise LoraError(
                f"{where}: its extra leaf {path} is a quantized weight of the base; restore "
                "into the float base and quantize after"
            )
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
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        base, is_leaf=lambda x: isinstance(x, QuantizedArray)
    )
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
        return [p for p, _ in weight_leaves(base) if not p.startswith("params/") and p not in saved]
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
