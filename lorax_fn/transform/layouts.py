"""`infer_layouts`: read each weight's fan-in, fan-out and stacked axes off a jaxpr.

Shapes alone cannot tell a ``DenseGeneral`` query kernel ``(d, heads, head_dim)``
from a scan-stacked Dense kernel ``(layers, in, out)`` or a 1-D conv kernel
``(width, in, out)``. How the function *uses* the weight can: the axes a
``dot_general`` contracts are the fan-in, its batch axes, the axes a ``scan``
slices and the expert axis of a ``ragged_dot`` weight are stacked, a ``conv``
kernel's output-feature axis is the fan-out, and the axis an embedding ``gather``
indexes plays the fan-in role. A weight with none of these uses gets a reason
instead: the function never reads it, or reads it through an op (named) whose
effect on its axes is not followed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax.extend import core

from lorax_fn.factors import Layout
from lorax_fn.paths import leaves_with_paths
from lorax_fn.transform.primitives import PRIMITIVES, SUB_JAXPR, dispatch, unit_broadcast
from lorax_fn.transform.symbolic import reshape_groups
from lorax_fn.transform.usage import used_inputs

# Kinds whose rules end a weight's track by design: they record a layout or walk a body.
_ENDS_TRACK = ("consumer", "scan", "cond", "while")


class InferredLayouts(dict[str, Layout]):
    """``{path: Layout}`` from :func:`infer_layouts`, with why the other weights have none.

    ``unplaced`` maps each leaf of rank ≥ 2 without a layout to the reason, a sentence
    that says what to do: the function never reads it (exclude it), or reads it
    through an op whose effect on its axes is not followed (give its layout).
    :func:`lorax_fn.split` quotes it when such a weight is targeted. A ``dict``, so it
    merges and edits like one; a copy made with ``dict(...)`` drops the reasons.

    Example:
        >>> import jax.numpy as jnp
        >>> got = infer_layouts(lambda p, x: x @ p["w"], {"w": jnp.ones((2, 3)),
        ...                     "unused": jnp.ones((3, 3))}, jnp.ones((1, 2)))
        >>> dict(got), got.unplaced["unused"].split(":")[0]
        ({'w': Layout(in_axes=(0,), out_axes=(1,), batch_axes=())}, 'the function never reads it')
    """

    def __init__(
        self, found: Mapping[str, Layout] | None = None, unplaced: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(found or {})
        self.unplaced: dict[str, str] = dict(unplaced or {})


_NEVER_READ = (
    "the function never reads it: an adapter there would train with a zero gradient. "
    "Leave it out of the targets (LoraSpec(exclude=...))"
)
_NOT_CONSUMED = (
    "the function reads it, but no dot_general, conv_general_dilated, gather or "
    "ragged_dot consumes it (it is only returned or passed on). Give its layout: "
    "LoraSpec(layouts={pattern: lorax_fn.Layout(...)}) or split(..., layouts=)"
)


@dataclasses.dataclass(frozen=True)
class _Track:
    """Which original weight axes each current axis holds, and which are known stacked."""

    path: str
    ndim: int
    axes: tuple[tuple[int, ...], ...]
    stacked: frozenset[int] = frozenset()

    def present(self) -> set[int]:
        return {a for group in self.axes for a in group}

    def layout(self, contracted: Sequence[int], batch: Sequence[int]) -> Layout | None:
        fan_in = {a for k in contracted for a in self.axes[k]}
        stacked = set(self.stacked) | {a for k in batch for a in self.axes[k]}
        stacked |= set(range(self.ndim)) - self.present()
        fan_out = set(range(self.ndim)) - fan_in - stacked
        if not fan_in or not fan_out or fan_in & stacked:
            return None
        return Layout(tuple(sorted(fan_in)), tuple(sorted(fan_out)), tuple(sorted(stacked)))


class _Walker:
    def __init__(self) -> None:
        self.found: dict[str, Layout] = {}
        self.lookups: dict[str, Layout] = {}
        self.why: dict[str, str] = {}  # the first use that placed no layout, per path

    def record(self, track: _Track, layout: Layout | None, op: str, lookup: bool = False) -> None:
        if layout is not None:
            (self.lookups if lookup else self.found).setdefault(track.path, layout)
        else:
            self.why.setdefault(
                track.path,
                f"the function's `{op}` contracts it with no fan-in or no fan-out axis left "
                "(or contracts an axis a scan stacks). Give its layout: "
                "LoraSpec(layouts={pattern: lorax_fn.Layout(...)}) or split(..., layouts=)",
            )

    def lost(self, ins: Sequence[_Track | None], op: str) -> None:
        for t in ins:
            if t is not None:
                self.why.setdefault(
                    t.path,
                    f"the function reads it through `{op}`, an op whose effect on the "
                    "weight's axes infer_layouts does not follow. Give its layout: "
                    "LoraSpec(layouts={pattern: lorax_fn.Layout(...)}) or split(..., layouts=)",
                )

    def walk(self, jaxpr: core.Jaxpr, tracks: Sequence[_Track | None]) -> list[_Track | None]:
        env: dict[Any, _Track | None] = dict(zip(jaxpr.invars, tracks, strict=True))
        read = lambda v: None if isinstance(v, core.Literal) else env.get(v)  # noqa: E731
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            name = eqn.primitive.name
            rule = _RULES.get(name)
            outs = rule(self, eqn, ins) if rule and any(ins) else None
            if any(ins) and not any(outs or ()) and PRIMITIVES.get(name) not in _ENDS_TRACK:
                self.lost(ins, name)
            for v, t in zip(eqn.outvars, outs or [None] * len(eqn.outvars), strict=True):
                env[v] = t
        return [read(v) for v in jaxpr.outvars]


# Each rule returns the tracks of the equation's outputs, or None when no weight's
# axes survive it. The primitives followed are lorax_fn.primitives' table, the one
# lora() evaluates with, so the two cannot disagree on where a weight can go.


def _same(w, eqn, ins):
    return ins if len(ins) == len(eqn.outvars) else None


def _first(w, eqn, ins):
    return [ins[0]]


def _transpose(w, eqn, ins):
    t = ins[0]
    return [dataclasses.replace(t, axes=tuple(t.axes[k] for k in eqn.params["permutation"]))]


def _reshape(w, eqn, ins):
    if len(ins) > 1 or eqn.params.get("dimensions") is not None:
        return None
    return [_reshaped(ins[0], eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape)]


def _squeeze(w, eqn, ins):
    return [_reshaped(ins[0], eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape)]


def _broadcast_in_dim(w, eqn, ins):
    old, new = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
    if len(ins) > 1 or not unit_broadcast(old, new, eqn.params["broadcast_dimensions"]):
        return None
    return [_reshaped(ins[0], old, new)]


def _dot_general(w, eqn, ins):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    for track, c, b in ((ins[0], lc, lb), (ins[1], rc, rb)):
        if track is not None:
            w.record(track, track.layout(c, b), eqn.primitive.name)


def _ragged_dot(w, eqn, ins):
    # Only the right-hand side with group axes is a weight of experts: its group axes
    # are stacked (one adapter per expert), like the batch axes of a dot_general.
    dn = eqn.params["ragged_dot_dimension_numbers"]
    (_, rc), (_, rb) = dn.dot_dimension_numbers
    t = ins[1]
    if t is not None and dn.rhs_group_dimensions:
        w.record(t, t.layout(rc, (*rb, *dn.rhs_group_dimensions)), eqn.primitive.name)


def _conv(w, eqn, ins):
    k = ins[1]
    if k is not None:
        out_axis = eqn.params["dimension_numbers"].rhs_spec[0]
        others = [i for i in range(len(k.axes)) if i != out_axis]
        w.record(k, k.layout(others, ()), eqn.primitive.name)


def _gather(w, eqn, ins):
    t = ins[0]
    if t is not None:
        dims = eqn.params["dimension_numbers"].collapsed_slice_dims
        w.record(t, t.layout(dims, ()), eqn.primitive.name, lookup=True)


def _call(w, eqn, ins):
    sub = eqn.params[SUB_JAXPR[eqn.primitive.name]]
    return w.walk(sub.jaxpr if isinstance(sub, core.ClosedJaxpr) else sub, ins)


def _cond(w, eqn, ins):
    for branch in eqn.params["branches"]:
        w.walk(branch.jaxpr, ins[1:])


def _while(w, eqn, ins):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    w.walk(p["body_jaxpr"].jaxpr, ins[nc : nc + nb] + [None] * (len(ins) - nc - nb))


def _scan(w, eqn, ins):
    p = eqn.params
    n = p["num_consts"] + p["num_carry"]
    xs = [
        None
        if x is None
        else dataclasses.replace(x, axes=x.axes[1:], stacked=x.stacked | set(x.axes[0]))
        for x in ins[n:]
    ]
    w.walk(p["jaxpr"].jaxpr, ins[: p["num_consts"]] + [None] * p["num_carry"] + xs)


def _reshaped(t: _Track, old: Sequence[int], new: Sequence[int]) -> _Track | None:
    groups = reshape_groups(old, new)
    if groups is None:
        return None
    axes: list[tuple[int, ...]] = [()] * len(new)
    for old_axes, new_axes in groups:
        merged = tuple(a for k in old_axes for a in t.axes[k])
        for k in new_axes:
            axes[k] = merged
    return dataclasses.replace(t, axes=tuple(axes))


_RULES: dict[str, Callable] = dispatch(
    {
        "same": _same,
        "transpose": _transpose,
        "reshape": _reshape,
        "squeeze": _squeeze,
        "broadcast_in_dim": _broadcast_in_dim,
        "slice": _first,
        "dynamic_slice": _first,
        "dot_general": _dot_general,
        "conv_general_dilated": _conv,
        "gather": _gather,
        "ragged_dot_general": _ragged_dot,
        "call": _call,
        "custom": _call,
        "scan": _scan,
        "cond": _cond,
        "while": _while,
    }
)


def infer_layouts(
    fn: Callable[..., Any], params: Any, *args: Any, **kwargs: Any
) -> InferredLayouts:
    """Trace ``fn(params, *args, **kwargs)`` and read each weight's Layout off its use.

    Returns ``{path: Layout}`` for every leaf of ``params`` (of rank ≥ 2) consumed by a
    ``dot_general``, ``conv_general_dilated``, embedding ``gather`` or as the experts
    ``(E, in, out)`` of ``lax.ragged_dot`` (the expert axis is stacked), following it
    through the primitives :func:`lorax_fn.lora` keeps it factorized through
    (:mod:`lorax_fn.transform.primitives`: transposes, casts, ``optimization_barrier``,
    reshapes, slices, ``jit``, ``remat``, ``scan`` (the scanned axis is stacked),
    ``cond``, ``while``, and the primal body of custom-derivative functions). An
    embedding lookup decides for a tied table; otherwise the first consumer does. Pass
    the result to :func:`lorax_fn.split` as ``layouts=``: for a targeted weight it could
    not place, its ``unplaced`` reason (see :class:`InferredLayouts`) is the error.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import linen as nn
        >>> model = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
        >>> x = jnp.ones((1, 3, 8))
        >>> variables = model.init(jax.random.key(0), x)
        >>> infer_layouts(model.apply, variables, x)["params/out/kernel"]
        Layout(in_axes=(0, 1), out_axes=(2,), batch_axes=())
    """
    closed = jax.make_jaxpr(lambda p: fn(p, *args, **kwargs))(params)
    leaves = leaves_with_paths(params)
    tracks = [
        _Track(path, len(x.shape), tuple((k,) for k in range(len(x.shape))))
        if len(getattr(x, "shape", ())) >= 2
        else None
        for path, x in leaves
    ]
    walker = _Walker()
    walker.walk(closed.jaxpr, tracks)
    found = {**walker.found, **walker.lookups}
    read = used_inputs(closed.jaxpr)
    unplaced = {
        path: walker.why.get(path, _NOT_CONSUMED) if used else _NEVER_READ
        for (path, _), track, used in zip(leaves, tracks, read, strict=True)
        if track is not None and path not in found
    }
    return InferredLayouts(found, unplaced)
