"""Parameter accounting: what PEFT's ``print_trainable_parameters`` says, per module."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from lorax_fn.factors import LoraFactors
from lorax_fn.quant.quantized import QuantizedArray, weight_leaves
from lorax_fn.subsets import LayerGroups, LayerSubset, is_subset
from lorax_fn.variants.base import get


@dataclasses.dataclass(frozen=True)
class ParamCount:
    """Trainable and total parameter counts and bytes.

    ``total`` counts the base plus the factors (the trainable leaves are already in
    the base), as PEFT does.
    """

    trainable: int
    total: int
    trainable_bytes: int
    total_bytes: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.percent:.4f}"
        )


def _size(x: Any) -> tuple[int, int]:
    """Parameters and bytes held; a quantized weight counts its original parameters and
    its stored bytes."""
    n = math.prod(np.shape(x))
    if isinstance(x, QuantizedArray):
        return n, x.nbytes
    return n, n * np.dtype(getattr(x, "dtype", np.float32)).itemsize


def _frozen_factors(entry: Any) -> list[Any]:
    """The factors an adapter holds fixed (trainable tokens' row selection), not trained."""
    if not isinstance(entry, LoraFactors):
        return []
    return [getattr(entry, n) for n in getattr(get(entry.variant), "frozen_factors", ())]


def count_params(base: Any, lora: dict[str, Any]) -> ParamCount:
    """Count trainable vs total parameters (and bytes) of a base and its LoRA tree.

    Every array of an adapter is trainable: A, B and its variant's extra arrays
    (:mod:`lorax_fn.variants`), except a factor its variant holds fixed (trainable
    tokens' row selection, :mod:`lorax_fn.tokens`), which counts in the total only. A
    quantized base weight (:func:`lorax_fn.quantize_base`) counts its original
    parameters and the bytes it is stored in.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lorax_fn import LoraSpec, split
        >>> base, lora = split({"w": jnp.ones((64, 32))}, LoraSpec("w", rank=4),
        ...                    key=jax.random.key(0))
        >>> count_params(base, lora).trainable  # r·(fan_in + fan_out)
        384
    """
    sizes = [_size(x) for _, x in weight_leaves(base)]
    base_n, base_b = (sum(n for n, _ in sizes), sum(b for _, b in sizes))
    train_n = train_b = factor_n = factor_b = 0
    for entry in lora.values():
        fixed = _frozen_factors(entry)
        for x in jax.tree_util.tree_leaves(entry):
            n, b = _size(x)
            if not any(x is f for f in fixed):
                train_n, train_b = train_n + n, train_b + b
            if isinstance(entry, LoraFactors) or is_subset(entry):
                factor_n, factor_b = factor_n + n, factor_b + b
    return ParamCount(train_n, base_n + factor_n, train_b, base_b + factor_b)


def summary(base: Any, lora: dict[str, Any]) -> str:
    """A per-target table (shape, kind, rank, scale, factor shapes, parameters) and the totals.

    ``kind`` is the adapter's variant (``lora`` or another :mod:`lorax_fn.variants` name)
    or ``full`` for a leaf trained in full; ``params`` counts its extra arrays too.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lorax_fn import LoraSpec, split
        >>> base, lora = split({"w": jnp.ones((64, 32))}, LoraSpec("w", rank=4),
        ...                    key=jax.random.key(0))
        >>> print(summary(base, lora).splitlines()[-1])
        trainable params: 384 || all params: 2,432 || trainable%: 15.7895
    """
    shapes = {p: tuple(np.shape(x)) for p, x in weight_leaves(base)}
    rows = [("path", "weight", "kind", "rank", "scale", "A", "B", "params")]
    # A layer subset is a row of its chosen layers' factors, one per rank (lorax_fn.subsets).
    entries = [
        (path, part)
        for path, entry in lora.items()
        for part in (entry.parts if isinstance(entry, LayerGroups) else (entry,))
    ]
    for path, entry in entries:
        kind = f"layers {list(entry.layers)}" if isinstance(entry, LayerSubset) else None
        if isinstance(entry, LayerSubset):
            entry = entry.factors
        if isinstance(entry, LoraFactors):
            fixed = _frozen_factors(entry)
            leaves = jax.tree_util.tree_leaves(entry)
            n = sum(math.prod(np.shape(x)) for x in leaves if not any(x is f for f in fixed))
            rows.append(
                (
                    path,
                    str(shapes.get(path)),
                    kind or entry.variant,
                    str(entry.rank),
                    f"{entry.scale:g}",
                    str(tuple(entry.a.shape)),
                    str(tuple(entry.b.shape)),
                    f"{n:,}",
                )
            )
        else:
            rows.append(
                (
                    path,
                    str(shapes.get(path)),
                    "full",
                    "",
                    "",
                    "",
                    "",
                    f"{math.prod(np.shape(entry)):,}",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join([*lines, str(count_params(base, lora))])
