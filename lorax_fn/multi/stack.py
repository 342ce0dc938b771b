"""Many adapters for one base: a stack, mixed-adapter batches and hot swap.

An :class:`AdapterStack` holds N LoRA trees made for the same targets as arrays with a
leading adapter axis. Each adapter's scale is folded into its B (the stack's ``scale``
is 1.0) and ranks are zero-padded to the largest of each path. Both are exact, and they
make every static field the same for all adapters, so replacing one adapter changes
array values only: a jitted function of the stack never retraces.

:func:`multi_lora` runs a batch in which every example picks its own adapter, or the
base alone. Each example's factors are gathered from the stack and the factorized
:func:`lorax_fn.lora` is vmapped over (factors, example): ``x·W0`` stays one matmul
shared by the whole batch and the low-rank path becomes batched matmuls, so the cost
grows with the batch size, not with the number of distinct adapters (the gather of
S-LoRA / Punica, where PEFT's ``adapter_names=`` loops over adapters in Python).
:func:`select_adapters` does that gather once, for a batch that many calls reuse.
Adapters of a variant other than plain LoRA (:mod:`lorax_fn.variants`) are refused: the
stack carries A and B only.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from lorax_fn.errors import LoraError
from lorax_fn.factors import LoraFactors, LoraTree
from lorax_fn.merge import check_fits
from lorax_fn.paths import leaves_with_paths
from lorax_fn.pissa import check_base, tree_records
from lorax_fn.quant.quantized import weight_leaves
from lorax_fn.subsets import is_subset
from lorax_fn.transform import routing
from lorax_fn.transform.apply import FallbackMode, lora
from lorax_fn.transform.routing import RoutedFactors
from lorax_fn.variants.base import refuse_unstackable


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdapterStack:
    """N adapters for one base, stacked along a leading adapter axis.

    ``entries`` maps each path to ``LoraFactors`` with ``a: (N, *batch, *in, R)`` and
    ``b: (N, *batch, R, *out)`` — R the largest rank of that path, each adapter's scale
    folded into its B, ``scale == 1.0`` and ``dropout == 0.0`` (the stack is for
    inference) — or, for a leaf trained in full, to an array ``(N, *shape)``. Every
    field is an array, so the stack is a pytree whose structure does not depend on
    which adapters it holds. Build it with :func:`stack_adapters`.

    Example:
        >>> import jax, jax.numpy as jnp, lorax_fn
        >>> params = {"w": jnp.ones((8, 4))}
        >>> trees = [lorax_fn.split(params, lorax_fn.LoraSpec("w", rank=r),
        ...                         key=jax.random.key(r))[1] for r in (1, 3)]
        >>> stack = stack_adapters(trees)
        >>> stack.size, stack.entries["w"].a.shape, stack.entries["w"].b.shape
        (2, (2, 8, 3), (2, 3, 4))
    """

    entries: dict[str, Any]

    @property
    def size(self) -> int:
        """The number of adapters N."""
        return int(jax.tree_util.tree_leaves(self.entries)[0].shape[0])

    def adapter(self, k: int) -> LoraTree:
        """Adapter ``k`` as a LoRA tree: the same ``ΔW``, with scale 1.0 and padded rank.

        Example:
            >>> import jax, jax.numpy as jnp, lorax_fn
            >>> base, lt = lorax_fn.split({"w": jnp.ones((8, 4))},
            ...                           lorax_fn.LoraSpec("w", rank=2, alpha=4.0),
            ...                           key=jax.random.key(0))
            >>> one = stack_adapters([lt]).adapter(0)["w"]
            >>> from lorax_fn.factors import delta
            >>> one.scale, bool(jnp.allclose(delta(one), delta(lt["w"])))
            (1.0, True)
        """
        _check_index(k, self.size)
        return {
            path: (
                LoraFactors(e.a[k], e.b[k], e.scale, e.layout)
                if isinstance(e, LoraFactors)
                else e[k]
            )
            for path, e in self.entries.items()
        }


def _check_index(k: int, n: int) -> None:
    if not isinstance(k, int | np.integer) or not 0 <= k < n:
        raise LoraError(f"adapter index {k!r} is not in range(0, {n})")


def _describe(path: str, entry: Any) -> tuple:
    """What two adapters must agree on at one path (ranks and dtypes of factors may differ)."""
    if not isinstance(entry, LoraFactors):
        return ("a leaf trained in full", tuple(np.shape(entry)), getattr(entry, "dtype", None))
    try:
        return ("low-rank factors", entry.layout, entry.weight_shape)
    except ValueError:
        raise LoraError(
            f"{path}: A {np.shape(entry.a)} and B {np.shape(entry.b)} do not fit {entry.layout}"
        ) from None


def _mismatch(path: str, this: str, entry: Any, that: str, other: Any) -> LoraError:
    return LoraError(
        f"{path}: {this} holds {', '.join(map(str, _describe(path, entry)))}; "
        f"{that} holds {', '.join(map(str, _describe(path, other)))}"
    )


def _check_alike(trees: Sequence[LoraTree]) -> None:
    first = trees[0]
    for i, tree in enumerate(trees[1:], 1):
        if set(tree) != set(first):
            raise LoraError(
                f"adapters 0 and {i} target different paths: only in adapter 0: "
                f"{sorted(set(first) - set(tree))}; only in adapter {i}: "
                f"{sorted(set(tree) - set(first))}. A stack needs the same targets"
            )
        for path, entry in first.items():
            if _describe(path, tree[path]) != _describe(path, entry):
                raise _mismatch(path, "adapter 0", entry, f"adapter {i}", tree[path])


def _fold(entry: LoraFactors, rank: int, dtype: Any) -> LoraFactors:
    """Scale folded into B and zero-padded to ``rank``: the same ``ΔW``."""
    nb = len(entry.layout.batch_axes)
    pad = rank - entry.rank
    a = jnp.pad(entry.a, [(0, 0)] * (entry.a.ndim - 1) + [(0, pad)])
    b = entry.b.astype(jnp.float32) * entry.scale
    b = jnp.pad(b, [(0, 0)] * nb + [(0, pad)] + [(0, 0)] * (b.ndim - nb - 1))
    return LoraFactors(a.astype(dtype), b.astype(dtype), 1.0, entry.layout)


def _strip_leading(entries: dict[str, Any]) -> LoraTree:
    """Shapes and dtypes without the leading (adapter or example) axis, arrays untouched."""

    def sds(x: jax.Array) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)

    return {
        path: (
            LoraFactors(sds(e.a), sds(e.b), e.scale, e.layout)
            if isinstance(e, LoraFactors)
            else sds(e)
        )
        for path, e in entries.items()
    }


def _per_adapter(stack: AdapterStack) -> LoraTree:
    """One adapter's shapes and dtypes, without touching the arrays."""
    return _strip_leading(stack.entries)


def stack_adapters(trees: Sequence[LoraTree], *, base: Any = None) -> AdapterStack:
    """Stack N LoRA trees made for one base into an :class:`AdapterStack`.

    The trees must target the same paths with the same layouts and weight shapes;
    ranks, scales and factor dtypes may differ (factors are stored in their common
    dtype). A leaf trained in full must be trained in full by every adapter, with the
    same shape and dtype: it is stacked and selected per example like the factors,
    so it costs N copies of that leaf. With ``base``, every tree is first checked to
    fit it (a PiSSA adapter to find its residual there, not the original weights: see
    :mod:`lorax_fn.pissa`). Errors name the adapter and the path.

    Example:
        >>> import jax, jax.numpy as jnp, lorax_fn
        >>> params = {"w": jnp.ones((8, 4)), "v": jnp.ones((4, 4))}
        >>> a = lorax_fn.split(params, lorax_fn.LoraSpec("w", rank=2), key=jax.random.key(0))[1]
        >>> b = lorax_fn.split(params, lorax_fn.LoraSpec(["w", "v"], rank=2),
        ...                    key=jax.random.key(0))[1]
        >>> stack_adapters([a, b])
        Traceback (most recent call last):
        ...
        lorax_fn.errors.LoraError: adapters 0 and 1 target different paths: ...
    """
    trees = list(trees)
    if not trees:
        raise LoraError("stack_adapters needs at least one adapter")
    for i, tree in enumerate(trees):
        if not isinstance(tree, dict) or not tree:
            raise LoraError(f"adapter {i} is not a non-empty LoRA tree {{path: entry}}")
        if subsets := sorted(p for p, e in tree.items() if is_subset(e)):
            # Adapters' subsets may name different layers: only full stacks line up.
            raise LoraError(
                f"adapter {i}: {subsets} are layer subsets (lorax_fn.subsets): "
                "expand_subsets first (lorax_fn.subsets.expand_subsets(tree))"
            )
        refuse_unstackable(tree, f"adapter {i}")
        if base is not None:
            try:
                check_fits(base, tree)
            except LoraError as err:
                raise LoraError(f"adapter {i}: {err}") from None
            check_base(tree_records(tree), base, f"adapter {i}")
    _check_alike(trees)
    entries: dict[str, Any] = {}
    for path, first in trees[0].items():
        column = [tree[path] for tree in trees]
        if isinstance(first, LoraFactors):
            rank = max(f.rank for f in column)
            dtype = jnp.result_type(*(x for f in column for x in (f.a, f.b)))
            folded = [_fold(f, rank, dtype) for f in column]
            entries[path] = LoraFactors(
                jnp.stack([f.a for f in folded]),
                jnp.stack([f.b for f in folded]),
                1.0,
                first.layout,
            )
        else:
            entries[path] = jnp.stack(column)
    return AdapterStack(entries)


def stack_checkpoints(
    directories: Sequence[str | os.PathLike], *, base: Any = None
) -> AdapterStack:
    """:func:`stack_adapters` over adapters saved with :func:`lorax_fn.save`.

    Each directory is restored (and, with ``base``, checked against it) before any
    stacking; a failure names the directory.

    Example:
        >>> import jax, jax.numpy as jnp, lorax_fn
        >>> params = {"w": jnp.ones((8, 4))}
        >>> trees = {}
        >>> for name, rank in (("legal", 2), ("medical", 3)):
        ...     spec = lorax_fn.LoraSpec("w", rank=rank)
        ...     _, trees[name] = lorax_fn.split(params, spec, key=jax.random.key(rank))
        ...     _ = lorax_fn.save(name, trees[name], spec, base=params)
        >>> stack = stack_checkpoints(["legal", "medical"], base=params)
        >>> stack.entries["w"].a.shape  # two adapters, ranks zero-padded to 3
        (2, 8, 3)
        >>> want = stack_adapters([trees["legal"], trees["medical"]])
        >>> bool((stack.entries["w"].a == want.entries["w"].a).all())
        True
        >>> stack_checkpoints(["legal", "missing"])
        Traceback (most recent call last):
        ...
        lorax_fn.errors.LoraError: missing: no checkpoint at ...missing
    """
    from lorax_fn.checkpoint.io import restore  # the checkpoint wing, with orbax, on use

    trees = []
    for directory in directories:
        try:
            trees.append(restore(directory, base=base))
        except LoraError as err:
            raise LoraError(f"{os.fspath(directory)}: {err}") from None
    return stack_adapters(trees, base=base)


@jax.jit
def _put(entries: dict[str, Any], k: jax.Array, new: dict[str, Any]) -> dict[str, Any]:
    # k is traced, so one compiled update serves every slot.
    return jax.tree.map(lambda s, x: s.at[k].set(x), entries, new)


def replace_adapter(stack: AdapterStack, k: int, tree: LoraTree) -> AdapterStack:
    """A new stack with adapter ``k`` replaced by ``tree``; shapes and structure unchanged.

    ``tree`` must target the stack's paths with the same layouts and weight shapes, at
    ranks no larger than the stack's (they are zero-padded); its factors are cast to the
    stack's dtype. Because only array values change, functions jitted over the stack — e.g.
    ``jax.jit(multi_lora(fn))`` — neither retrace nor recompile. A refused tree
    raises :class:`LoraError` naming the path; ``stack`` itself is never modified.

    Example:
        >>> import jax, jax.numpy as jnp, lorax_fn
        >>> params = {"w": jnp.ones((8, 4))}
        >>> trees = [lorax_fn.split(params, lorax_fn.LoraSpec("w", rank=2),
        ...                         key=jax.random.key(s))[1] for s in range(3)]
        >>> stack = stack_adapters(trees[:2])
        >>> replace_adapter(stack, 1, trees[2]).entries["w"].a.shape
        (2, 8, 2)
    """
    _check_index(k, stack.size)
    if not isinstance(tree, dict) or set(tree) != set(stack.entries):
        got = set(tree) if isinstance(tree, dict) else set()
        raise LoraError(
            f"the new adapter must target the stack's paths: missing "
            f"{sorted(set(stack.entries) - got)}, extra {sorted(got - set(stack.entries))}"
        )
    refuse_unstackable(tree, "the new adapter")
    shapes = _per_adapter(stack)
    new: dict[str, Any] = {}
    for path, entry in stack.entries.items():
        given, want = tree[path], shapes[path]
        if _describe(path, given) != _describe(path, want):
            raise _mismatch(path, "the new adapter", given, "the stack", want)
        if isinstance(entry, LoraFactors):
            if given.rank > entry.rank:
                raise LoraError(
                    f"{path}: the new adapter's rank {given.rank} exceeds the stack's padded "
                    f"rank {entry.rank}; rebuild the stack with stack_adapters"
                )
            new[path] = _fold(given, entry.rank, entry.a.dtype)
        else:
            new[path] = given
    return AdapterStack(_put(stack.entries, k, new))


def _check_ids(ids: jax.Array, n: int) -> None:
    """Raise for out-of-range ids when they are concrete; traced ones are checked by NaN."""
    try:
        values = np.asarray(ids)
    except jax.errors.TracerArrayConversionError:
        return
    bad = np.flatnonzero((values < -1) | (values >= n))
    if bad.size:
        raise LoraError(
            f"adapter_ids {values[bad].tolist()} at positions {bad.tolist()} are not in "
            f"[-1, {n}) for a stack of {n} adapters"
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdapterSelection:
    """Each example's adapter taken from a stack once, for reuse by many calls.

    ``entries`` maps each path to the per-example ``LoraFactors`` (``a: (B, *batch, *in,
    R)``, ``b: (B, *batch, R, *out)``, zero for base rows) or per-example trained leaves
    ``(B, *shape)``; ``adapter_ids`` are the ids it was made from. A pytree of arrays:
    pass it through ``jit`` like the stack. Build it with :func:`select_adapters`.

    Example:
        >>> import jax, jax.numpy as jnp, lorax_fn
        >>> lt = lorax_fn.split({"w": jnp.ones((8, 4))}, lorax_fn.LoraSpec("w", rank=2),
        ...                     key=jax.random.key(0))[1]
        >>> sel = select_adapters(stack_adapters([lt]), jnp.array([0, -1, 0]))
        >>> sel.batch_size, sel.entries["w"].a.shape
        (3, (3, 8, 2))
    """

    entries: dict[str, Any]
    adapter_ids: jax.Array

    @property
    def batch_size(self) -> int:
        """The number of examples B the selection was made for."""
        return int(self.adapter_ids.shape[0])


def _checked_ids(adapter_ids: Any, n: int) -> jax.Array:
    ids = jnp.asarray(adapter_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise LoraError(f"adapter_ids must be a 1-D integer array, got {ids.dtype}{ids.shape}")
    _check_ids(ids, n)
    return ids


def select_adapters(stack: AdapterStack, adapter_ids: Any) -> AdapterSelection:
    """Gather each example's factors from ``stack`` once, for many ``multi_lora`` calls.

    ``multi_lora(fn)(base, stack, ids, *args)`` gathers one copy of the factors per
    example on every call: in a decode loop driven from Python (one jitted call per
    token) that gather is paid per token, and in a decode step it moves more bytes than
    the base weights. ``multi_lora(fn)(base, select_adapters(stack, ids), *args)``
    computes the same result from the gathered copy, so a batch pays the gather once.
    Ids are checked as in :func:`multi_lora`; the base is checked when the selection is
    used. A selection holds the stack's values at the time it was made: after
    :func:`replace_adapter`, select again.

    Example:
        >>> import jax, jax.numpy as jnp, lorax_fn
        >>> params = {"w": jnp.ones((8, 4))}
        >>> stack = stack_adapters([lorax_fn.split(params, lorax_fn.LoraSpec("w", rank=2),
        ...                         key=jax.random.key(0))[1]])
        >>> g = jax.jit(multi_lora(lambda p, x: x @ p["w"]))
        >>> ids, x = jnp.array([0, -1]), jnp.ones((2, 8))
        >>> sel = select_adapters(stack, ids)
        >>> bool(jnp.array_equal(g(params, sel, x), g(params, stack, ids, x)))
        True
    """
    if not isinstance(stack, AdapterStack):
        raise LoraError(f"expected an AdapterStack (see stack_adapters), got {type(stack)}")
    refuse_unstackable(stack.entries, "the stack")
    ids = _checked_ids(adapter_ids, stack.size)

    def take(x: jax.Array) -> jax.Array:
        return routing.take(x, ids)

    # Base rows get A = B = 0 (see routing.take); their trained-in-full leaves are
    # replaced by the base's when the selection is used.
    return AdapterSelection(
        {
            path: (
                LoraFactors(take(e.a), take(e.b), e.scale, e.layout)
                if isinstance(e, LoraFactors)
                else take(e)
            )
            for path, e in stack.entries.items()
        },
        ids,
    )


def _where(adapted: jax.Array, x: jax.Array, otherwise: Any) -> jax.Array:
    return jnp.where(adapted.reshape(adapted.shape + (1,) * (x.ndim - 1)), x, otherwise)


def _trees(selection: AdapterSelection, base: Any) -> LoraTree:
    """Per-example LoRA trees with a leading batch axis; base rows train nothing in full."""
    adapted = selection.adapter_ids != -1
    base_leaves = dict(weight_leaves(base))
    return {
        path: e if isinstance(e, LoraFactors) else _where(adapted, e, base_leaves[path])
        for path, e in selection.entries.items()
    }


# The most adapters for which method="auto" groups (see multi_lora).
GROUPED_MAX_ADAPTERS = 8


def _routed_tree(stack: AdapterStack, adapter_id: jax.Array, base: Any) -> LoraTree:
    """One example's LoRA tree for the grouped method: factors routed, not gathered."""
    base_leaves = dict(weight_leaves(base))
    return {
        path: (
            RoutedFactors(e.a, e.b, adapter_id, e.layout)
            if isinstance(e, LoraFactors)
            else jnp.where(adapter_id == -1, base_leaves[path], routing.take(e, adapter_id))
        )
        for path, e in stack.entries.items()
    }


def multi_lora(
    fn: Callable[..., Any],
    *,
    batch_of_one: bool = True,
    chunk_size: int | None = None,
    method: Literal["gather", "grouped", "auto"] = "gather",
    on_fallback: FallbackMode = "warn",
    static_argnames: str | Iterable[str] | None = None,
) -> Callable[..., Any]:
    """Turn ``fn(params, *args, **kw)`` into ``g(base, stack, adapter_ids, *args, **kw)``.

    Example ``i`` of the batch is computed with adapter ``adapter_ids[i]`` of ``stack``
    (an :class:`AdapterStack`), or with the base alone where the id is ``-1``: row ``i``
    of the result equals ``fn(merge(base, stack.adapter(adapter_ids[i])), *args_i, **kw)``
    up to rounding, in one program whose cost grows with the batch size, not with N.

    Every positional argument after ``adapter_ids`` is per-example: each of its array
    leaves has a leading batch axis of length ``len(adapter_ids)``. Keyword arguments
    are shared by all examples (``train=False``, masks of shape ``(1, …)``). With
    ``batch_of_one=True`` (for models that expect a batch axis) each example is run as
    a batch of one and every output leaf must keep that leading axis; pass ``False``
    for a ``fn`` that takes a single unbatched example — many Flax models do, since
    their layers act on any leading axes — which is cheaper: under ``vmap`` the unit
    batch axis makes XLA copy attention tensors (+40% memory traffic on the decoder of
    ``benchmarks/multi_adapter.py``). Since examples are run separately,
    anything that mixes examples (batch statistics in training mode, ``mutable=``
    collections) is per example, not per batch.

    ``chunk_size=k`` runs the batch as a ``lax.map`` over chunks of ``k`` examples (each
    chunk vmapped) instead of one vmap over the whole batch: still one program whose
    cost does not depend on N. On a CPU, where a whole batch's activations overflow the
    caches, ``chunk_size=16`` was 1.25× faster on the decoder of
    ``benchmarks/multi_adapter.py`` (2 cores); on an accelerator, keep the default.

    ``g(base, select_adapters(stack, adapter_ids), *args, **kw)`` is the same with the
    per-example gather of the factors done beforehand, once for many calls (a decode
    loop driven from Python).

    ``method`` picks how the low-rank products meet the adapters. ``"gather"`` copies
    each example's factors (``B·(in+out)·R`` per weight). ``"grouped"`` (SGMV / Punica)
    sorts the examples by adapter and runs two ``lax.ragged_dot`` over the adapter
    groups, reading each adapter's factors once (``N·(in+out)·R``) at the cost of
    permuting the activations: for weights read by a ``dot_general`` over all their
    fan-in axes (Dense, DenseGeneral); other consumers gather. Its gradient is the
    gathered one. ``"auto"`` takes grouped when the stack holds at most
    ``GROUPED_MAX_ADAPTERS`` (8) adapters and fewer than the batch has examples, else
    gather: XLA's ``ragged_dot`` on CPU costs in proportion to the number of groups, so
    a decode step (B=64, d=512, r=8) ran at 1.02× / 0.92× / 0.55× / 0.13× the merged
    model for N = 1 / 4 / 16 / 64 grouped, against 0.52–0.58× gathered
    (docs/results/decode_grouped.md). A selection is already gathered: ``"grouped"`` with one
    is refused.

    ``adapter_ids`` are integers in ``[-1, N)``; concrete ids outside that range raise
    :class:`LoraError`, traced ones (under ``jit``) turn that example's output into
    NaN. Base rows (id ``-1``) use no adapter's values at all, so a NaN/Inf in one
    adapter reaches only the rows (and gradients) that use it. ``on_fallback`` is as in
    :func:`lorax_fn.lora`; note that a fallback here forms one full weight per example.
    Shared keyword arguments follow :func:`lorax_fn.lora`'s rule (floats traced; bools,
    ints and strings static); ``static_argnames`` makes named ones static, e.g. a float
    that drives Python control flow.

    Example:
        >>> import jax, jax.numpy as jnp, lorax_fn
        >>> params = {"w": jnp.ones((8, 4))}
        >>> trees = [lorax_fn.split(params, lorax_fn.LoraSpec("w", rank=r),
        ...                         key=jax.random.key(r))[1] for r in (1, 2)]
        >>> g = jax.jit(multi_lora(lambda p, x: x @ p["w"]))
        >>> g(params, stack_adapters(trees), jnp.array([0, -1, 1]), jnp.ones((3, 2, 8))).shape
        (3, 2, 4)
    """
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise LoraError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    if method not in ("gather", "grouped", "auto"):
        raise LoraError(f"method must be 'gather', 'grouped' or 'auto', got {method!r}")
    lora_fn = lora(fn, on_fallback=on_fallback, static_argnames=static_argnames)

    def one_example(base: Any, tree: LoraTree, args: tuple, kwargs: dict) -> Any:
        if batch_of_one:
            args = jax.tree.map(lambda x: x[None], args)
        out = lora_fn(base, tree, *args, **kwargs)
        return jax.tree.map(lambda y: y[0], out) if batch_of_one else out

    @functools.wraps(fn)
    def wrapped(
        base: Any, stack: AdapterStack | AdapterSelection, *rest: Any, **kwargs: Any
    ) -> Any:
        if isinstance(stack, AdapterSelection):
            if method == "grouped":
                raise LoraError(
                    "method='grouped' routes the stack's factors; an AdapterSelection has "
                    "them gathered already: pass the stack and adapter_ids"
                )
            selection, args = stack, rest
        elif isinstance(stack, AdapterStack):
            if not rest:
                raise LoraError("multi_lora(fn)(base, stack, adapter_ids, *args) needs adapter_ids")
            ids, args = _checked_ids(rest[0], stack.size), rest[1:]
            grouped = method == "grouped" or (
                method == "auto" and stack.size <= min(GROUPED_MAX_ADAPTERS, ids.shape[0] - 1)
            )
            if grouped:
                return run(base, stack, ids, args, kwargs)
            selection = select_adapters(stack, ids)
        else:
            raise LoraError(
                "expected an AdapterStack (see stack_adapters) or an AdapterSelection (see "
                f"select_adapters), got {type(stack)}"
            )
        refuse_unstackable(selection.entries, "the selection")
        check_fits(base, _strip_leading(selection.entries))
        _check_batch(args, selection.batch_size)

        def per_example(tree_and_args: tuple[LoraTree, tuple]) -> Any:
            return one_example(base, *tree_and_args, kwargs)

        return batched(per_example, (_trees(selection, base), args))

    def batched(per_example: Callable[[Any], Any], inputs: Any) -> Any:
        if chunk_size is None:
            return jax.vmap(per_example)(inputs)
        return jax.lax.map(per_example, inputs, batch_size=chunk_size)

    def run(base: Any, stack: AdapterStack, ids: jax.Array, args: tuple, kwargs: dict) -> Any:
        refuse_unstackable(stack.entries, "the stack")
        check_fits(base, _per_adapter(stack))
        _check_batch(args, ids.shape[0])

        def per_example(id_and_args: tuple[jax.Array, tuple]) -> Any:
            adapter_id, example = id_and_args
            return one_example(base, _routed_tree(stack, adapter_id, base), example, kwargs)

        return batched(per_example, (ids, args))

    return wrapped


def _check_batch(args: tuple, batch: int) -> None:
    for path, leaf in leaves_with_paths(args):
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] != batch:
            raise LoraError(
                f"positional argument {path} has shape {np.shape(leaf)}; every "
                f"per-example argument needs a leading batch axis of {batch} "
                "(pass shared values as keyword arguments)"
            )
