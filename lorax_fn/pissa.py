"""Which base a PiSSA adapter needs: a record taken at split time, checked against a base.

With ``LoraSpec(init="pissa")``, :func:`lorax_fn.split` moves the principal part
``D = scale·A0·B0`` (the top-``r`` singular directions) of each targeted weight ``W0``
into the adapter and returns the residual ``R = W0 - D`` as the base. The adapter is
right on ``R`` only: on the original weights the model counts ``D`` twice, and nothing
about shapes or dtypes tells the two bases apart. So split records, per PiSSA weight, a
:class:`PissaRecord` (a static field of its :class:`lorax_fn.LoraFactors`, saved in
checkpoints), and :func:`check_base` refuses a base that is not the residual.

The record is a sketch of ``W0`` and of ``R``: ``k`` = 64 bilinear probes ``uᵢᵀ X vᵢ``
of the weight viewed as a matrix (all axes but the last, by the last), with fixed ±1
probe vectors drawn from an integer hash (the same on every backend, JAX version and
PRNG setting) and sums in float32. ``E[s(X)·s(Y)] = k·⟨X, Y⟩_F``, so sketches measure
Frobenius distances at the cost of 64 matrix-vector products, computed where the weight
lies (sharded, or quantized and dequantized in float32 one weight at a time), with no
copy to the host.

The rule, per PiSSA weight: a base leaf whose sketch is within ``TOLERANCE`` (a quarter
of the residual's norm) of ``R`` or of ``W0`` is a copy of the nearer one, rounded or
quantized; it is accepted if that is ``R``, refused if ``W0``. A leaf farther from both
is not the residual either (another model, or the residual of another split) and is
refused too. So a copy of the residual cast to bfloat16 or quantized (NF4, int8) is
accepted, and the original weights are refused in any dtype or quantized: ``R`` is
orthogonal to ``D``, and rounding noise is, in effect, orthogonal to both, so it does
not move a leaf towards the other one even when it is larger than ``D``. An exact
digest would do neither: it refuses every copy of the residual that is not bit for
bit, and accepts the original weights after a cast.

Other inits that rewrite the base record it the same way (:mod:`lorax_fn.inits`):
OLoRA's residual, and LoftQ's quantized ``Q`` (``Q + scale·A·B ≈ W0``); the record
names its init (:attr:`PissaRecord.init`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_fn.errors import LoraError
from lorax_fn.factors import LoraFactors
from lorax_fn.quant.quantized import QuantizedArray, weight_leaves

PROBES = 64
# How far (relative to the residual's norm) a base may be from the residual or the original
# and still count as a copy of it: NF4 rounds about 10 %, bfloat16 0.3 %.
TOLERANCE = 0.25
_TITLES = {"pissa": "PiSSA", "olora": "OLoRA", "loftq": "LoftQ"}
# Salts of the row and column probe vectors.
_ROWS, _COLUMNS = 0x2545F491, 0x6C8E9CF5


@dataclasses.dataclass(frozen=True)
class PissaRecord:
    """Sketches of a PiSSA weight's original ``W0`` and of the residual split returned.

    Hashable (it is a static field of :class:`lorax_fn.LoraFactors`) and JSON-able.

    Example:
        >>> import jax.numpy as jnp
        >>> w0 = jnp.arange(12.0).reshape(3, 4)
        >>> rec = record(w0, w0 - 1)
        >>> len(rec.original) == PROBES, PissaRecord.from_json(rec.to_json()) == rec
        (True, True)
    """

    original: tuple[float, ...]
    residual: tuple[float, ...]
    # The init that rewrote the base (lorax_fn.inits): "pissa", "olora", "loftq", ...
    init: str = "pissa"

    def to_json(self) -> dict[str, Any]:
        # PiSSA records keep the JSON of checkpoints saved before other inits recorded one.
        named = {} if self.init == "pissa" else {"init": self.init}
        return {"original": list(self.original), "residual": list(self.residual), **named}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PissaRecord:
        return cls(
            tuple(map(float, data["original"])),
            tuple(map(float, data["residual"])),
            str(data.get("init", "pissa")),
        )

    @property
    def title(self) -> str:
        """How messages name the adapter: "PiSSA", "OLoRA", "init='mine'"."""
        return _TITLES.get(self.init, f"init={self.init!r}")

    def fault(self, sketched: np.ndarray) -> str | None:
        """Why a base leaf with sketch ``sketched`` is not this adapter's base, or ``None``.

        Example:
            >>> import jax.numpy as jnp
            >>> w0 = jnp.arange(64.0).reshape(8, 8)
            >>> rec = record(w0, w0 - jnp.outer(jnp.arange(8.0), jnp.ones(8)))
            >>> rec.fault(sketch(w0)), rec.fault(sketch(2 * w0)) is not None
            ('it holds the original weights', True)
        """
        r = np.asarray(self.residual)
        to_residual = float(np.linalg.norm(np.asarray(sketched) - r))
        to_original = float(np.linalg.norm(np.asarray(sketched) - np.asarray(self.original)))
        size = float(np.linalg.norm(r))
        if min(to_residual, to_original) > TOLERANCE * size:
            return f"it differs from the residual by about {to_residual / max(size, 1e-30):.0%}"
        return "it holds the original weights" if to_original < to_residual else None


def _signs(n: int, salt: int) -> jax.Array:
    """``(n, PROBES)`` of ±1 from murmur3's finalizer: integer ops, exact everywhere."""
    rows = jax.lax.broadcasted_iota(jnp.uint32, (n, PROBES), 0)
    cols = jax.lax.broadcasted_iota(jnp.uint32, (n, PROBES), 1)
    x = rows * jnp.uint32(PROBES) + cols + jnp.uint32(salt)
    for shift, mult in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        x = (x ^ (x >> shift)) * jnp.uint32(mult)
    x = x ^ (x >> 16)
    return jnp.where(x >> 31 == 1, -1.0, 1.0).astype(jnp.float32)


@jax.jit
def _sketch(w: jax.Array | QuantizedArray) -> jax.Array:
    x = w.dequantize(jnp.float32) if isinstance(w, QuantizedArray) else w.astype(jnp.float32)
    x = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    xv = jnp.dot(x, _signs(x.shape[1], _COLUMNS), precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(_signs(x.shape[0], _ROWS) * xv, axis=0)


def sketch(w: Any) -> np.ndarray:
    """The ``PROBES`` bilinear probes of a weight (array or :class:`lorax_fn.QuantizedArray`).

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.ones((64, 16))
        >>> s = sketch(w)
        >>> s.shape == (PROBES,), bool(np.allclose(np.dot(s, s) / PROBES, 64 * 16, rtol=0.5))
        (True, True)
    """
    return np.asarray(_sketch(w), np.float64)


def record(w0: jax.Array, residual: Any, init: str = "pissa") -> PissaRecord | None:
    """The record of a split whose ``init`` rewrote the base ``w0`` to ``residual``.

    ``residual`` is an array or a :class:`lorax_fn.QuantizedArray` (LoftQ's base).
    ``None`` under a JAX transformation (or when either is non-finite).

    Example:
        >>> import jax.numpy as jnp
        >>> w0 = jnp.eye(4)
        >>> record(w0, w0).original == record(w0, w0).residual
        True
    """
    if isinstance(w0, jax.core.Tracer) or isinstance(residual, jax.core.Tracer):
        return None
    original, rest = sketch(w0), sketch(residual)
    if not (np.isfinite(original).all() and np.isfinite(rest).all()):
        return None
    return PissaRecord(tuple(map(float, original)), tuple(map(float, rest)), init)


def tree_records(lora_tree: Mapping[str, Any]) -> dict[str, PissaRecord]:
    """``{path: record}`` of the PiSSA factors of a LoRA tree that carry one.

    Example:
        >>> import jax, jax.numpy as jnp, lorax_fn
        >>> spec = lorax_fn.LoraSpec("w", rank=2, init="pissa")
        >>> _, lt = lorax_fn.split({"w": jnp.ones((8, 4))}, spec, key=jax.random.key(0))
        >>> list(tree_records(lt))
        ['w']
    """
    return {
        p: e.pissa
        for p, e in lora_tree.items()
        if isinstance(e, LoraFactors) and e.pissa is not None
    }


def base_sketches(base: Any, paths: Iterable[str]) -> dict[str, np.ndarray]:
    """Sketches of the floating leaves of ``base`` (at least 2-D) among ``paths``.

    Example:
        >>> import jax.numpy as jnp
        >>> sorted(base_sketches({"w": jnp.ones((4, 4)), "b": jnp.ones(4)}, ["w", "b", "x"]))
        ['w']
    """
    wanted = set(paths)
    out = {}
    for path, leaf in weight_leaves(base):
        dtype = getattr(leaf, "dtype", None)
        if (
            path in wanted
            and dtype is not None
            and jnp.issubdtype(dtype, jnp.floating)
            and len(np.shape(leaf)) >= 2
        ):
            out[path] = sketch(leaf)
    return out


def check_base(
    records: Mapping[str, PissaRecord], base: Any, where: str, *, sketches: bool = False
) -> None:
    """Refuse a base whose leaves are the original weights of these PiSSA adapters.

    ``base`` is a base tree, or with ``sketches=True`` ``{path: sketch}`` from
    :func:`base_sketches`; paths it lacks are left to the shape checks. Nothing is
    modified; the error names every offending path and the base they need.

    Example:
        >>> import jax, jax.numpy as jnp, lorax_fn
        >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
        >>> spec = lorax_fn.LoraSpec("w", rank=2, init="pissa")
        >>> residual, lt = lorax_fn.split(params, spec, key=jax.random.key(1))
        >>> check_base(tree_records(lt), residual, "the adapter")  # the residual: fine
        >>> check_base(tree_records(lt), params, "the adapter")
        Traceback (most recent call last):
        ...
        lorax_fn.errors.LoraError: the adapter is a PiSSA adapter, made for the residual ...
    """
    if not records:
        return
    found = base if sketches else base_sketches(base, records)
    faults = {p: rec.fault(found[p]) for p, rec in sorted(records.items()) if p in found}
    if not (wrong := [p for p, why in faults.items() if why]):
        return
    title = " and ".join(sorted({records[p].title for p in wrong}))
    article = "an" if title[0] in "AEIOUaeiou" else "a"
    made = ", ".join(sorted({f"init={records[p].init!r}" for p in wrong}))
    raise LoraError(
        f"{where} is {article} {title} adapter, made for the residual base W0 - scale·A·B (LoftQ: "
        "its quantized form) that "
        f"lorax_fn.split returned with {made}, and the base given is not that "
        f"residual at {', '.join(f'{p} ({faults[p]})' for p in wrong)}; the model would be "
        "wrong (on the original weights it counts the adapted part twice). Pass that "
        "residual: re-run lorax_fn.split on the original params with the same spec, or "
        "restore the residual base you saved"
    )
