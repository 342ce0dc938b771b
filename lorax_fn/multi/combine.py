"""`combine`: one adapter from several, by PEFT's ``add_weighted_adapter`` methods.

The exact methods target ``ΔW = Σᵢ wᵢ·ΔWᵢ`` with ``ΔWᵢ = sᵢ·Aᵢ·Bᵢ`` (each adapter's own
scale included), per adapted weight and per stacked layer, as PEFT's
``combination_type="cat"`` / ``"svd"``:

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

The pruning methods apply a rule of :mod:`lorax_fn.multi.merging` (TIES, DARE,
magnitude pruning) in one of PEFT's two places:

- on ``ΔW`` (``"ties_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``,
  ``"magnitude_prune_svd"``): each adapter's ``sᵢ·Aᵢ·Bᵢ`` is formed for one weight and
  one stacked layer at a time (a ``lax.map`` over the layers, so the peak is one layer's
  ``n`` ΔWs), merged by the rule, and cut back to rank ``k`` by its SVD. Pruning makes
  the merged ΔW full-rank, so this SVD is of the dense ``fan_in × fan_out`` matrix.
- on the factors (``"linear"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"``,
  ``"magnitude_prune"``): the rule merges the A's with weights ``sign(wᵢsᵢ)·√|wᵢsᵢ|``
  and the B's with ``√|wᵢsᵢ|`` separately, per layer, at the adapters' common rank.
  Cheap, but ``(Σ A)(Σ B)`` has cross terms: this is not the rule applied to ΔW (PEFT
  calls ``linear`` "a very rough approximation").

An adapter that does not target a path contributes nothing there, so the result
targets the union of the adapters' paths (as PEFT does). The result has scale 1.0
and, per path, the dropout of the adapters there — they must agree, since one rate
cannot stand for several — and is an ordinary LoRA tree for :func:`lorax_fn.lora`,
:func:`lorax_fn.merge` or :func:`lorax_fn.stack_adapters`.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from lorax_fn.errors import LoraError
from lorax_fn.factors import LoraFactors, LoraTree
from lorax_fn.multi.merging import SignMethod, check_rule_options, merge_task_tensors
from lorax_fn.variants.base import refuse_unstackable

_HIGHEST = jax.lax.Precision.HIGHEST
Method = Literal[
    "cat",
    "svd",
    "linear",
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "ties_svd",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune_svd",
]
_ON_FACTORS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_ON_DELTA = ("ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS: tuple[str, ...] = ("cat", "svd", *_ON_FACTORS, *_ON_DELTA)
_Column = list[tuple[Any, LoraFactors]]


def _balanced(u: jax.Array, s: jax.Array, vh: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    # √S on both sides keeps A and B equally scaled, as fresh training would.
    root = jnp.sqrt(s[..., :rank])
    return u[..., :rank] * root[..., None, :], root[..., :, None] * vh[..., :rank, :]


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
    new_a, new_b = _balanced(
        jnp.matmul(q_a, u, precision=_HIGHEST),
        s,
        jnp.matmul(vh, jnp.swapaxes(q_b, -1, -2), precision=_HIGHEST),
        rank,
    )
    return new_a.reshape(batch + fan_in + (rank,)), new_b.reshape(batch + (rank,) + fan_out)


def _per_layer(fn: Callable[[Any], Any], xs: Any, nb: int) -> Any:
    """``fn`` on one stacked layer at a time (``lax.map`` over the ``nb`` batch axes).

    The leaves of ``xs`` share their ``nb`` leading axes; the outputs get them back.
    Sequential on purpose: the peak memory is what one layer needs.
    """
    batch = jax.tree.leaves(xs)[0].shape[:nb]
    flat = jax.tree.map(lambda x: x.reshape((math.prod(batch),) + x.shape[nb:]), xs)
    out = jax.lax.map(fn, flat)
    return jax.tree.map(lambda y: y.reshape(batch + y.shape[1:]), out)


def _layer_keys(key: jax.Array | None, path: str, batch: tuple[int, ...]) -> jax.Array | None:
    """One key per stacked layer of ``path``: independent masks per weight and per layer."""
    if key is None:
        return None
    # A hash of the path, not its position, so a weight's masks do not depend on which
    # other weights the trees hold.
    per_path = jax.random.fold_in(key, zlib.crc32(path.encode()))
    return jax.random.split(per_path, batch) if batch else per_path


# Jitted with the options static, so that paths of one shape share one compilation
# (a fresh lax.map would compile again for every path).
@functools.partial(jax.jit, static_argnames=("nb", "rule", "density", "majority_sign_method"))
def _rule_on_factors(
    a: jax.Array,
    b: jax.Array,
    scaled: jax.Array,
    keys: jax.Array | None,
    *,
    nb: int,
    rule: str,
    density: float | None,
    majority_sign_method: SignMethod,
) -> tuple[jax.Array, jax.Array]:
    options = {"density": density, "majority_sign_method": majority_sign_method}
    root = jnp.sqrt(jnp.abs(scaled))
    # The sign goes on one side only, or it would cancel in A·B.
    w_a, w_b = jnp.where(scaled >= 0, root, -root), root

    def layer(x: tuple[jax.Array, jax.Array, jax.Array | None]) -> tuple[jax.Array, jax.Array]:
        a, b, key = x
        key_a, key_b = (None, None) if key is None else jax.random.split(key)
        return (
            merge_task_tensors(a, w_a, rule, key=key_a, **options),
            merge_task_tensors(b, w_b, rule, key=key_b, **options),
        )

    return _per_layer(layer, (a, b, keys), nb)


def _on_factors(
    column: _Column, nb: int, options: dict[str, Any], keys: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """PEFT's rule on the A's and on the B's, one layer at a time, at the common rank."""
    scaled = jnp.stack([jnp.asarray(w, jnp.float32) * f.scale for w, f in column])
    # Tasks stacked after the batch axes, so each layer sees its own n factors.
    a = jnp.stack([f.a.astype(jnp.float32) for _, f in column], axis=nb)
    b = jnp.stack([f.b.astype(jnp.float32) for _, f in column], axis=nb)
    return _rule_on_factors(a, b, scaled, keys, nb=nb, **options)


@functools.partial(
    jax.jit, static_argnames=("nb", "rule", "density", "majority_sign_method", "rank")
)
def _rule_on_delta(
    a_s: list[jax.Array],
    b_s: list[jax.Array],
    weights: jax.Array,
    keys: jax.Array | None,
    *,
    nb: int,
    rank: int,
    rule: str,
    density: float | None,
    majority_sign_method: SignMethod,
) -> tuple[jax.Array, jax.Array]:
    options = {"density": density, "majority_sign_method": majority_sign_method}

    def layer(x: tuple[list, list, jax.Array | None]) -> tuple[jax.Array, jax.Array]:
        a_l, b_l, key = x
        deltas = jnp.stack(
            [jnp.matmul(a, b, precision=_HIGHEST) for a, b in zip(a_l, b_l, strict=True)]
        )
        merged = merge_task_tensors(deltas, weights, rule, key=key, **options)
        return _balanced(*jnp.linalg.svd(merged, full_matrices=False), rank)

    return _per_layer(layer, (a_s, b_s, keys), nb)


def _on_delta(
    column: _Column, nb: int, options: dict[str, Any], keys: jax.Array | None, rank: int
) -> tuple[jax.Array, jax.Array]:
    """PEFT's rule on each layer's n ΔWs, then the best rank-``rank`` factors of the result."""
    first = column[0][1]
    batch, fan_in, fan_out = first.a.shape[:nb], first.a.shape[nb:-1], first.b.shape[nb + 1 :]
    n_in, n_out = math.prod(fan_in), math.prod(fan_out)
    weights = jnp.stack([jnp.asarray(w, jnp.float32) for w, _ in column])
    a_s = [f.a.astype(jnp.float32).reshape(batch + (n_in, f.rank)) for _, f in column]
    b_s = [f.scale * f.b.astype(jnp.float32).reshape(batch + (f.rank, n_out)) for _, f in column]
    new_a, new_b = _rule_on_delta(a_s, b_s, weights, keys, nb=nb, rank=rank, **options)
    return new_a.reshape(batch + fan_in + (rank,)), new_b.reshape(batch + (rank,) + fan_out)


def _check_method(method: str, rank: int | None) -> None:
    if method not in METHODS:
        raise LoraError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if method in ("cat", *_ON_FACTORS) and rank is not None:
        what = "every rank (their sum)" if method == "cat" else "the adapters' common rank"
        raise LoraError(f"method={method!r} keeps {what}; got rank={rank}")
    if rank is not None and (not isinstance(rank, int | np.integer) or rank < 1):
        raise LoraError(f"rank must be a positive integer, got {rank!r}")


def _check_column(path: str, trees: list[LoraTree], column: _Column, method: str) -> None:
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
    ranks = {f.rank for _, f in column}
    if method in _ON_FACTORS and len(ranks) > 1:
        on_delta = "svd" if method == "linear" else f"{method}_svd"
        raise LoraError(
            f"{path}: method={method!r} merges the factors entry by entry, so the adapters "
            f"need one rank; they have {sorted(ranks)}. Use {on_delta!r} or 'cat'"
        )


def _rank_at(path: str, column: _Column, method: str, rank: int | None) -> int:
    first = column[0][1]
    k = max(f.rank for _, f in column) if rank is None else int(rank)
    fans = (first.layout.fan_in(first.weight_shape), first.layout.fan_out(first.weight_shape))
    if method == "svd":
        limit = min(sum(f.rank for _, f in column), *fans)
        if k > limit:
            raise LoraError(f"{path}: rank {k} > min(concatenated rank, fan_in, fan_out) = {limit}")
    elif k > min(fans):
        raise LoraError(f"{path}: rank {k} > min(fan_in, fan_out) = {min(fans)}")
    return k


def combine(
    trees: Sequence[LoraTree],
    weights: Sequence[float] | jax.Array,
    *,
    method: Method = "cat",
    rank: int | None = None,
    density: float | None = None,
    majority_sign_method: SignMethod = "total",
    key: jax.Array | None = None,
) -> LoraTree:
    """One LoRA tree from ``trees`` weighted by ``weights``, by one of PEFT's methods.

    ``method`` is a PEFT ``combination_type`` and gives PEFT's result (the module
    docstring has the details):

    - ``"cat"``: exactly ``Σᵢ weights[i]·ΔWᵢ``, at the sum of the ranks (``rank`` must
      be ``None``).
    - ``"svd"``: the best rank-``rank`` approximation of that sum per path and stacked
      layer, in Frobenius and spectral norm (default rank: the largest among the
      adapters at that path; at most ``min(concatenated rank, fan_in, fan_out)``).
    - ``"ties_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``,
      ``"magnitude_prune_svd"``: the rule of :mod:`lorax_fn.multi.merging` on the
      adapters' ΔWs, one weight and one stacked layer at a time, then its best
      rank-``rank`` factors (at most ``min(fan_in, fan_out)``; full rank is exact).
    - ``"linear"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"``,
      ``"magnitude_prune"``: the rule on the A's and B's separately, at the adapters'
      common rank (``rank`` must be ``None``); an approximation of the rule on ΔW.

    ``density`` (the fraction kept, ``0 < density ≤ 1``) is for the pruning rules,
    ``majority_sign_method`` (``"total"`` or ``"frequency"``) for TIES, and ``key`` for
    DARE, whose masks differ per weight, layer and factor. ``weights`` may be negative
    (task negation) and may be a traced array (``cat`` is then differentiable in them).
    The adapters must agree on each shared path's layout, weight shape and dropout rate
    (which the result keeps); leaves trained in full and variants other than plain LoRA
    are refused (a sum of column-scaled updates is not one column-scaled update).

    Example:
        >>> import jax, jax.numpy as jnp
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
        >>> combine([t1, t2], [0.5, 0.5], method="ties_svd", rank=4, density=0.2)["w"].rank
        4
        >>> combine([t1, t2], [1.0, 1.0], method="dare_ties_svd", density=0.5,
        ...         key=jax.random.key(0))["w"].rank
        3
    """
    trees = list(trees)
    _check_method(method, rank)
    rule = method.removesuffix("_svd")
    if method in ("cat", "svd"):
        check_rule_options("linear", density, majority_sign_method, key)
    else:
        check_rule_options(rule, density, majority_sign_method, key)
    # A plain float: the options are static arguments of the jitted per-layer kernels.
    density = None if density is None else float(density)
    options = {"rule": rule, "density": density, "majority_sign_method": majority_sign_method}
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
        _check_column(path, trees, column, method)
        first = column[0][1]
        nb = len(first.layout.batch_axes)
        dtype = jnp.result_type(*(x for _, f in column for x in (f.a, f.b)))
        keys = _layer_keys(key, path, first.a.shape[:nb])
        if method in _ON_FACTORS:
            a, b = _on_factors(column, nb, options, keys)
        elif method in _ON_DELTA:
            k = _rank_at(path, column, method, rank)
            a, b = _on_delta(column, nb, options, keys, k)
        else:
            a = jnp.concatenate([f.a.astype(jnp.float32) for _, f in column], axis=-1)
            b = jnp.concatenate(
                [(w * f.scale) * f.b.astype(jnp.float32) for w, f in column], axis=nb
            )
            if method == "svd":
                a, b = _truncate(a, b, nb, _rank_at(path, column, method, rank))
        out[path] = LoraFactors(a.astype(dtype), b.astype(dtype), 1.0, first.layout, first.dropout)
    return out
