"""`combine`: one adapter from a weighted sum of adapters, exact or SVD-truncated.

Both methods target ``ΔW = Σᵢ wᵢ·ΔWᵢ`` with ``ΔWᵢ = sᵢ·Aᵢ·Bᵢ`` (each adapter's own
scale included), per adapted weight and per stacked layer, as PEFT's
``add_weighted_adapter`` with ``combination_type="cat"`` / ``"svd"``:

- ``"cat"`` concatenates the factors along the rank axis, ``A = [A₁ … Aₙ]`` and
  ``B = [w₁s₁B₁; …; wₙsₙBₙ]``: exact, and the ranks add up.
- ``"svd"`` keeps the best rank-``k`` approximation of that sum (Eckart–Young: the
  error is the norm of the dropped singular values) without forming ``ΔW``: with the
  concatenated factors, ``A = Q_A·R_A`` and ``Bᵀ = Q_B·R_B`` (thin QR), the SVD of the
  small ``R_A·R_Bᵀ = U·S·Vᵀ`` gives ``ΔW = (Q_A·U)·S·(Q_B·V)ᵀ``; the result is
  ``A = Q_A·U_k·√S_k``, ``B = √S_k·(Q_B·V_k)ᵀ``. The cost is ``O((fan_in + fan_out)·R²)``
  for a concatenated rank ``R``, where PEFT's SVD of the full ``ΔW`` costs
  ``O(fan_in·fan_out·min(fan_in, fan_out))``; PEFT's optional quantile clamp is not
  applied.

An adapter that does not target a path contributes nothing there, so the result
targets the union of the adapters' paths (as PEFT does). The result has scale 1.0
and, per path, the dropout of the adapters there — they must agree, since one rate
cannot stand for several — and is an ordinary LoRA tree for :func:`lorax_fn.lora`,
:func:`lorax_fn.merge` or :func:`lorax_fn.stack_adapters`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from lorax_fn.errors import LoraError
from lorax_fn.factors import LoraFactors, LoraTree
from lorax_fn.variants.base import refuse_unstackable

_HIGHEST = jax.lax.Precision.HIGHEST


def _truncate(a: jax.Array, b: jax.Array, nb: int, rank: int) -> tuple[jax.Array, jax.Array]:
    """The best rank-``rank`` factors of ``a·b``; both float32, batched over ``nb`` axes."""
    batch, fan_in, fan_out = a.shape[:nb], a.shape[nb:-1], b.shape[nb + 1 :]
    total = a.shape[-1]
    a2 = a.reshape(batch + (math.prod(fan_in), total))
    b2t = jnp.swapaxes(b.reshape(batch + (total, math.prod(fan_out))), -1, -2)
    q_a, r_a = jnp.linalg.qr(a2)
    q_b, r_b = jnp.linalg.qr(b2t)
    u, s, vh = jnp.linalg.svd(
        jnp.matmul(r_a, jnp.swapaxes(r_b, -1, -2), precision=_HIGHEST), full_matrices=False
    )
    # √S on both sides keeps A and B equally scaled, as fresh training would.
    root = jnp.sqrt(s[..., :rank])
    new_a = jnp.matmul(q_a, u[..., :rank], precision=_HIGHEST) * root[..., None, :]
    new_b = root[..., :, None] * jnp.matmul(
        vh[..., :rank, :], jnp.swapaxes(q_b, -1, -2), precision=_HIGHEST
    )
    return new_a.reshape(batch + fan_in + (rank,)), new_b.reshape(batch + (rank,) + fan_out)


def combine(
    trees: Sequence[LoraTree],
    weights: Sequence[float] | jax.Array,
    *,
    method: Literal["cat", "svd"] = "cat",
    rank: int | None = None,
) -> LoraTree:
    """One LoRA tree whose update is ``Σᵢ weights[i]·ΔWᵢ``, exactly or at a chosen rank.

    ``method="cat"`` is exact, at the sum of the ranks (``rank`` must be ``None``).
    ``method="svd"`` truncates the sum to ``rank`` per path (default: the largest rank
    among the adapters at that path): the best rank-``rank`` approximation in Frobenius
    and spectral norm, per stacked layer. ``rank`` must not exceed
    ``min(concatenated rank, fan_in, fan_out)``. ``weights`` may be negative (task
    negation) and may be a traced array (``cat`` is then differentiable in them). The
    adapters must agree on each shared path's layout and weight shape; leaves trained
    in full have no weighted-sum meaning and are refused, and so are adapters of a
    variant other than plain LoRA (a sum of column-scaled updates is not one
    column-scaled update). The module docstring gives
    the derivation. The adapters at a path must also agree on its dropout rate, which
    the result keeps; a disagreement is refused (set the dropout of the inputs first).

    Example:
        >>> import jax.numpy as jnp
        >>> from lorax_fn import Layout, LoraFactors
        >>> from lorax_fn.factors import delta
        >>> t1 = {"w": LoraFactors(jnp.ones((16, 2)), jnp.ones((2, 8)), 1.0, Layout((0,), (1,)))}
        >>> t2 = {"w": LoraFactors(jnp.eye(16, 3), jnp.eye(3, 8), 2.0, Layout((0,), (1,)))}
        >>> both = combine([t1, t2], [0.5, -1.0])
        >>> both["w"].rank, bool(jnp.allclose(delta(both["w"]),
        ...                                   0.5 * delta(t1["w"]) - delta(t2["w"])))
        (5, True)
        >>> combine([t1, t2], [0.5, -1.0], method="svd", rank=1)["w"].a.shape
        (16, 1)
    """
    trees = list(trees)
    if method not in ("cat", "svd"):
        raise LoraError(f"method must be 'cat' or 'svd', got {method!r}")
    if method == "cat" and rank is not None:
        raise LoraError(f"method='cat' keeps every rank (their sum); got rank={rank}")
    if rank is not None and (not isinstance(rank, int | np.integer) or rank < 1):
        raise LoraError(f"rank must be a positive integer, got {rank!r}")
    if not trees or len(weights) != len(trees):
        raise LoraError(
            f"need one weight per adapter: {len(trees)} adapters, {len(weights)} weights"
        )
    paths: dict[str, None] = {}
    for i, tree in enumerate(trees):
        refuse_unstackable(tree, f"combine (adapter {i})")
        for path, entry in tree.items():
            if not isinstance(entry, LoraFactors):
                raise LoraError(
                    f"{path}: adapter {i} trains this leaf in full; a weighted sum of "
                    "replacement values is not a LoRA update. Remove it from the trees first"
                )
            paths.setdefault(path)
    out: LoraTree = {}
    for path in paths:
        column = [(w, tree[path]) for w, tree in zip(weights, trees, strict=True) if path in tree]
        first = column[0][1]
        for _, f in column[1:]:
            if (f.layout, f.weight_shape) != (first.layout, first.weight_shape):
                raise LoraError(
                    f"{path}: adapters disagree: {first.layout} for a weight of "
                    f"{first.weight_shape} vs {f.layout} for {f.weight_shape}"
                )
        dropouts = {i: f.dropout for i, tree in enumerate(trees) if (f := tree.get(path))}
        if len(set(dropouts.values())) > 1:
            rates = ", ".join(f"adapter {i}: {d:g}" for i, d in dropouts.items())
            raise LoraError(
                f"{path}: adapters disagree on dropout ({rates}); the combined adapter has "
                "one rate, so give them the same one first"
            )
        nb = len(first.layout.batch_axes)
        dtype = jnp.result_type(*(x for _, f in column for x in (f.a, f.b)))
        a = jnp.concatenate([f.a.astype(jnp.float32) for _, f in column], axis=-1)
        b = jnp.concatenate([(w * f.scale) * f.b.astype(jnp.float32) for w, f in column], axis=nb)
        if method == "svd":
            k = max(f.rank for _, f in column) if rank is None else int(rank)
            limit = min(
                a.shape[-1],
                first.layout.fan_in(first.weight_shape),
                first.layout.fan_out(first.weight_shape),
            )
            if k > limit:
                raise LoraError(
                    f"{path}: rank {k} > min(concatenated rank, fan_in, fan_out) = {limit}"
                )
            a, b = _truncate(a, b, nb, k)
        out[path] = LoraFactors(a.astype(dtype), b.astype(dtype), 1.0, first.layout, first.dropout)
    return out
