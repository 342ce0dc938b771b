"""`infer_layouts`: read each weight's fan-in, fan-out and stacked axes off a jaxpr.

Shapes alone cannot tell a ``DenseGeneral`` query kernel ``(d, heads, head_dim)``
from a scan-stacked Dense kernel ``(layers, in, out)`` or a 1-D conv kernel
``(width, in, out)``. How the function *uses* the weight can: the axes a
``dot_general`` contracts are the fan-in, its batch axes and the axes a ``scan``
slices are stacked, a ``conv`` kernel's output-feature axis is the fan-out, and the
axis an embedding ``gather`` indexes plays the fan-in role.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend import core

from lorax_fn.factors import Layout
from lorax_fn.paths import leaves_with_paths
from lorax_fn.symbolic import reshape_groups


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


_SAME_AXES = {
    "convert_element_type",
    "copy",
    "copy_p",
    "reduce_precision",
    "slice",
    "dynamic_slice",
    "optimization_barrier",
}
_CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}


class _Walker:
    def __init__(self) -> None:
        self.found: dict[str, Layout] = {}
        self.lookups: dict[str, Layout] = {}

    def record(self, track: _Track, layout: Layout | None, lookup: bool = False) -> None:
        if layout is not None:
            (self.lookups if lookup else self.found).setdefault(track.path, layout)

    def walk(self, jaxpr: core.Jaxpr, tracks: Sequence[_Track | None]) -> list[_Track | None]:
        env: dict[Any, _Track | None] = dict(zip(jaxpr.invars, tracks, strict=True))
        read = lambda v: None if isinstance(v, core.Literal) else env.get(v)  # noqa: E731
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            outs = self.eqn(eqn, ins) if any(ins) else [None] * len(eqn.outvars)
            for v, t in zip(eqn.outvars, outs, strict=True):
                env[v] = t
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn: core.JaxprEqn, ins: list[_Track | None]) -> list[_Track | None]:
        name, p, t = eqn.primitive.name, eqn.params, ins[0]
        none = [None] * len(eqn.outvars)
        if name in _SAME_AXES and t is not None:
            return [t]
        if name == "transpose" and t is not None:
            return [dataclasses.replace(t, axes=tuple(t.axes[k] for k in p["permutation"]))]
        if name in ("reshape", "squeeze", "broadcast_in_dim") and t is not None:
            return [self.reshape(t, eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape)]
        if name == "dot_general":
            (lc, rc), (lb, rb) = p["dimension_numbers"]
            for track, c, b in ((ins[0], lc, lb), (ins[1], rc, rb)):
                if track is not None:
                    self.record(track, track.layout(c, b))
            return none
        if name == "conv_general_dilated" and ins[1] is not None:
            out_axis = p["dimension_numbers"].rhs_spec[0]
            k = ins[1]
            others = [i for i in range(len(k.axes)) if i != out_axis]
            self.record(k, k.layout(others, ()))
            return none
        if name == "gather" and t is not None:
            self.record(t, t.layout(p["dimension_numbers"].collapsed_slice_dims, ()), lookup=True)
            return none
        if name in _CALLS:
            sub = p[_CALLS[name]]
            sub = sub.jaxpr if isinstance(sub, core.ClosedJaxpr) else sub
            return self.walk(sub, ins)
        if name == "cond":
            for branch in p["branches"]:
                self.walk(branch.jaxpr, ins[1:])
            return none
        if name == "while":
            nc, nb = p["cond_nconsts"], p["body_nconsts"]
            self.walk(p["body_jaxpr"].jaxpr, ins[nc : nc + nb] + [None] * (len(ins) - nc - nb))
            return none
        if name == "scan":
            n = p["num_consts"] + p["num_carry"]
            xs = [
                None
                if x is None
                else dataclasses.replace(x, axes=x.axes[1:], stacked=x.stacked | set(x.axes[0]))
                for x in ins[n:]
            ]
            self.walk(p["jaxpr"].jaxpr, ins[: p["num_consts"]] + [None] * p["num_carry"] + xs)
            return none
        return none

    @staticmethod
    def reshape(t: _Track, old: Sequence[int], new: Sequence[int]) -> _Track | None:
        groups = reshape_groups(old, new)
        if groups is None:
            return None
        axes: list[tuple[int, ...]] = [()] * len(new)
        for old_axes, new_axes in groups:
            merged = tuple(a for k in old_axes for a in t.axes[k])
            for k in new_axes:
                axes[k] = merged
        return dataclasses.replace(t, axes=tuple(axes))


def infer_layouts(
    fn: Callable[..., Any], params: Any, *args: Any, **kwargs: Any
) -> dict[str, Layout]:
    """Trace ``fn(params, *args, **kwargs)`` and read each weight's Layout off its use.

    Returns ``{path: Layout}`` for every leaf of ``params`` (of rank ≥ 2) consumed by a
    ``dot_general``, ``conv_general_dilated`` or embedding ``gather``, following it
    through transposes, casts, reshapes, slices, ``jit``, ``remat``, ``scan`` (the
    scanned axis is stacked), ``cond`` and ``while``. An embedding lookup decides for
    a tied table; otherwise the first consumer does. Pass the result to
    :func:`lorax_fn.split` as ``layouts=``.

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
    return {**walker.found, **walker.lookups}
