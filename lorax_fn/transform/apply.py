"""`lora(fn)`: run a function of params on (base, LoRA tree), factorized.

``fn`` is traced once per input signature with ``jax.make_jaxpr``; the jaxpr is
then evaluated with every adapted weight held as ``W0 + scale·A·B``
(:class:`~lorax_fn.transform.symbolic.SymbolicWeight`). Layout operations on a weight stay
symbolic, supported consumers (``dot_general``, ``conv_general_dilated``,
embedding ``gather``, ``lax.ragged_dot`` over experts) compute
``x·W0 + scale·(x·A)·B``, ``jit``, ``remat``, ``scan``, ``cond`` and ``while`` are
evaluated recursively (the table is :mod:`lorax_fn.transform.primitives`, shared with layout
inference), and anything else — custom-derivative functions included, whose rule
needs the full weight — materializes that one weight and reports it. A quantized weight
(:class:`~lorax_fn.quant.lazy.LazyWeight`) is dequantized inside the operation reading it.
An adapter variant's weight ``(W0 + scale·A·B)·c`` (:mod:`lorax_fn.variants`; DoRA's
``c = m/‖V‖_c``) stays factorized too: its consumers scale their output columns by ``c``.
The result is ordinary JAX code, so ``jit``, ``grad``, ``vmap`` and ``pmap`` compose
with it, and the gradient never holds a full-size weight where the weight stays
symbolic.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core

from lorax_fn.errors import LoraError
from lorax_fn.factors import LoraFactors
from lorax_fn.merge import check_fits, merge
from lorax_fn.paths import path_str
from lorax_fn.quant import lazy
from lorax_fn.quant.lazy import LazyWeight
from lorax_fn.quant.quantized import QuantizedArray
from lorax_fn.subsets import expand_subsets
from lorax_fn.transform import fusion, primitives, symbolic
from lorax_fn.transform.routing import RoutedFactors
from lorax_fn.transform.signature import (
    Split,
    StaticArgs,
    Trace,
    aval_key,
    describe,
    split_static,
    warn_at_caller,
)
from lorax_fn.transform.symbolic import SymbolicWeight
from lorax_fn.transform.usage import used_inputs

FallbackMode = Literal["warn", "error", "ignore"]


class _Context:
    """Per-call state: how to report fallbacks (once per signature), and the dropout key."""

    def __init__(
        self,
        on_fallback: FallbackMode,
        reported: set,
        key: jax.Array | None,
        signature: str,
        fuse: bool = True,
    ):
        self.on_fallback = on_fallback
        self.reported = reported
        self.key = key
        self.signature = signature
        self.consumers = 0
        self.fuse = fuse
        # The shared-input plan of the jaxpr being evaluated (lorax_fn.transform.fusion).
        self.fusion: fusion.SharedInputs | None = None

    def next_key(self) -> jax.Array | None:
        self.consumers += 1
        return None if self.key is None else jax.random.fold_in(self.key, self.consumers)

    def with_key(self, key: jax.Array | None) -> _Context:
        ctx = _Context(self.on_fallback, self.reported, key, self.signature, self.fuse)
        ctx.consumers = self.consumers
        return ctx

    def report(self, path: str, primitive: str, message: str) -> None:
        if (path, primitive) not in self.reported:
            self.reported.add((path, primitive))
            message = f"lorax_fn: {message} (inputs {self.signature})"
            if self.on_fallback == "error":
                raise LoraError(message)
            if self.on_fallback == "warn":
                warn_at_caller(message)

    def fallback(self, w: SymbolicWeight | LazyWeight, primitive: str, why: str = "") -> jax.Array:
        formed = (
            "the quantized weight is dequantized in full outside its consumer"
            if isinstance(w, LazyWeight)
            else "the full weight W0 + scale·A·B is formed"
        )
        self.report(
            w.path,
            primitive,
            f"{w.path} is consumed by `{primitive}`, "
            f"{why or 'which has no factorized rule'}; {formed} there",
        )
        return w.value() if isinstance(w, LazyWeight) else w.materialize()


def _concrete(value: Any, ctx: _Context, primitive: str) -> Any:
    return ctx.fallback(value, primitive) if isinstance(value, _HELD) else value


# What the evaluator holds in place of an array: an adapted weight, a quantized one.
_HELD = (SymbolicWeight, LazyWeight)
# LoRA-tree entries that are factors, not leaves trained in full.
_FACTORS = (LoraFactors, RoutedFactors)


# --------------------------------------------------------------- evaluation


def _eval_jaxpr(
    jaxpr: core.Jaxpr, consts: Sequence[Any], args: Sequence[Any], ctx: _Context
) -> list[Any]:
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, core.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    outer = ctx.fusion
    ctx.fusion = fusion.SharedInputs(jaxpr.eqns, env, ctx.key is not None) if ctx.fuse else None
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if any(isinstance(x, _HELD) for x in invals):
            outvals = _eval_symbolic(eqn, invals, ctx)
        else:
            outvals = _bind_plain(eqn, invals)
        if not eqn.primitive.multiple_results:
            outvals = [outvals]
        for v, x in zip(eqn.outvars, outvals, strict=True):
            if not isinstance(v, core.DropVar):
                env[v] = x
    ctx.fusion = outer
    return [read(v) for v in jaxpr.outvars]


def _eval_closed(closed: core.ClosedJaxpr, args: Sequence[Any], ctx: _Context) -> list[Any]:
    return _eval_jaxpr(closed.jaxpr, closed.consts, args, ctx)


def _bind_plain(eqn: core.JaxprEqn, invals: Sequence[Any]) -> Any:
    return eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))


def _bind_frozen(eqn: core.JaxprEqn, invals: Sequence[Any]) -> Any:
    # A quantized weight is dequantized inside the operation that reads it.
    if any(isinstance(x, LazyWeight) for x in invals):
        return lazy.bind(eqn, invals)
    return _bind_plain(eqn, invals)


def _eval_symbolic(eqn: core.JaxprEqn, invals: list[Any], ctx: _Context) -> Any:
    name = eqn.primitive.name
    if not any(isinstance(x, SymbolicWeight) for x in invals):
        rule = _FROZEN_RULES.get(name)
    else:
        rule = _RULES.get(name)
        if rule not in _ROUTE_AWARE:  # a routed weight gathers its factors here
            invals = [x.resolved() if isinstance(x, SymbolicWeight) else x for x in invals]
        if rule not in _PASS_PENDING:  # a pending column scale is computed whole here
            invals = [x.with_scale() if isinstance(x, SymbolicWeight) else x for x in invals]
    result = rule(eqn, invals, ctx) if rule else None
    if result is not None:
        return result
    return _bind_frozen(
        eqn, [ctx.fallback(x, name) if isinstance(x, SymbolicWeight) else x for x in invals]
    )


def _layout_w0(eqn: core.JaxprEqn, w0: Any) -> Any:
    return w0.apply(eqn) if isinstance(w0, LazyWeight) else _bind_plain(eqn, [w0])


def _frozen_layout(eqn, invals, ctx):
    # Layout ops stay pending on a quantized weight, so that the checkpoint around its
    # consumer covers them too; a dynamic slice of one layer slices the stored arrays.
    w = invals[0]
    if not isinstance(w, LazyWeight) or any(isinstance(x, _HELD) for x in invals[1:]):
        return None
    if eqn.primitive.name == "dynamic_slice":
        return w.dynamic_slice(invals[1:], eqn.params["slice_sizes"])
    return w.apply(eqn) if len(invals) == 1 else None


# ------------------------------------------------------------ layout rules


def _transpose(eqn, invals, ctx):
    return symbolic.transpose(invals[0], eqn.params["permutation"])


def _same(eqn, invals, ctx):
    if len(invals) == 1:
        # A cast or copy acts on W0; the low-rank path keeps the factors' dtype, as
        # for a bfloat16 base with float32 factors.
        w = invals[0]
        if not primitives.keeps_factors(eqn.primitive.name, eqn.params, w.w0.dtype):
            return None  # not a rounding of the sum (int, bool, float8): formed, reported
        return w.replace(w0=_layout_w0(eqn, w.w0))
    # optimization_barrier: the same barrier over every array, factors included.
    leaves, treedef = jax.tree_util.tree_flatten(invals)
    return jax.tree_util.tree_unflatten(treedef, _bind_plain(eqn, leaves))


def _reshape(eqn, invals, ctx):
    w = invals[0]
    if eqn.params.get("dimensions") is not None or len(invals) > 1:
        return None
    return symbolic.reshape(w, eqn.params["new_sizes"])


def _squeeze(eqn, invals, ctx):
    w = invals[0]
    return symbolic.reshape(w, eqn.outvars[0].aval.shape)


def _broadcast_in_dim(eqn, invals, ctx):
    w, shape = invals[0], eqn.params["shape"]
    # Only inserting unit axes keeps the factorization; real broadcasting materializes.
    if len(invals) > 1 or not primitives.unit_broadcast(
        w.w0.shape, shape, eqn.params["broadcast_dimensions"]
    ):
        return None
    return symbolic.reshape(w, shape)


def _slice(eqn, invals, ctx):
    w = invals[0]
    start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params["strides"] or (1,) * len(start)

    def slicer(x, axes):
        return lax.slice(
            x,
            [start[k] for k in axes] + [0],
            [limit[k] for k in axes] + [x.shape[-1]],
            [strides[k] for k in axes] + [1],
        )

    return symbolic.slice_axes(w, slicer, _layout_w0(eqn, w.w0))


def _dynamic_slice(eqn, invals, ctx):
    w, starts = invals[0], invals[1:]
    if any(isinstance(s, _HELD) for s in starts):
        return None
    sizes = eqn.params["slice_sizes"]
    if isinstance(w.w0, LazyWeight):
        w0 = w.w0.dynamic_slice(starts, sizes)
        if w0 is None:
            return None
    else:
        w0 = _bind_plain(eqn, [w.w0, *starts])

    def slicer(x, axes):
        return lax.dynamic_slice(
            x, [starts[k] for k in axes] + [0], [sizes[k] for k in axes] + [x.shape[-1]]
        )

    return symbolic.slice_axes(w, slicer, w0)


def _dot_general(eqn, invals, ctx):
    lhs, rhs = invals
    if isinstance(lhs, SymbolicWeight) and isinstance(rhs, SymbolicWeight):
        return None
    weight_is_lhs = isinstance(lhs, SymbolicWeight)
    w, x = (lhs, rhs) if weight_is_lhs else (rhs, lhs)

    def base(x):
        return _bind_frozen(eqn, [w.w0, x] if weight_is_lhs else [x, w.w0])

    fused = ctx.fusion.product(eqn, x, w, weight_is_lhs, base) if ctx.fusion else None
    if fused is not None:
        ctx.next_key()  # the k-th product's dropout key stays the k-th
        return fused
    return symbolic.dot_general(
        x,
        w,
        weight_is_lhs=weight_is_lhs,
        dimension_numbers=eqn.params["dimension_numbers"],
        precision=eqn.params["precision"],
        preferred_element_type=eqn.params["preferred_element_type"],
        base=base,
        key=ctx.next_key(),
    )


def _ragged_dot(eqn, invals, ctx):
    x, w, *rest = invals
    if isinstance(x, SymbolicWeight) or any(isinstance(v, _HELD) for v in rest):
        return None
    dn = eqn.params["ragged_dot_dimension_numbers"]
    if eqn.params.get("group_offset") is not None or not symbolic.ragged_factorizable(w, dn):
        return None
    base_out = _bind_frozen(eqn, [x, w.w0, *rest])
    return symbolic.ragged_dot(x, w, rest[0], dn, eqn.params["precision"], base_out, ctx.next_key())


def _conv(eqn, invals, ctx):
    x, w = invals
    if isinstance(x, SymbolicWeight) or not isinstance(w, SymbolicWeight):
        return None
    base_out = _bind_frozen(eqn, [x, w.w0])
    return symbolic.conv(x, w, eqn.params, base_out, ctx.next_key())


def _gather(eqn, invals, ctx):
    w, indices = invals
    if isinstance(indices, SymbolicWeight):
        return None
    base_out = _bind_frozen(eqn, [w.w0, indices])
    return symbolic.gather(w, indices, eqn.params, base_out, ctx.next_key())


# ------------------------------------------------------- higher-order rules


def _inline(eqn, invals, ctx):
    sub = eqn.params[primitives.SUB_JAXPR[eqn.primitive.name]]
    if isinstance(sub, core.ClosedJaxpr):
        return _eval_closed(sub, invals, ctx)
    return _eval_jaxpr(sub, (), invals, ctx)


def _custom(eqn, invals, ctx):
    # The custom rule (a straight-through estimator, a kernel's hand-written backward)
    # is defined on the full weight: evaluating the primal body factorized would
    # differentiate that body instead and silently lose the rule.
    sub = eqn.params[primitives.SUB_JAXPR[eqn.primitive.name]]
    func = getattr(getattr(sub.jaxpr, "debug_info", None), "func_name", None) or "?"
    why = f"the custom-derivative function `{func}`, whose rule is defined on the full weight"
    name = eqn.primitive.name
    return _bind_plain(
        eqn, [ctx.fallback(x, name, why) if isinstance(x, _HELD) else x for x in invals]
    )


def _remat(eqn, invals, ctx):
    jaxpr = eqn.params["jaxpr"]

    @functools.partial(
        jax.checkpoint, prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"]
    )
    def body(*args):
        return _eval_jaxpr(jaxpr, (), args, ctx)

    return body(*invals)


def _with_scale(x: Any) -> Any:
    return x.with_scale() if isinstance(x, SymbolicWeight) else x


def _scan(eqn, invals, ctx):
    p = eqn.params
    n_consts, n_carry = p["num_consts"], p["num_carry"]
    # Read by every step: a pending column scale is computed once, outside the loop.
    consts = [_with_scale(x) for x in invals[:n_consts]]
    carry = [_concrete(x, ctx, "scan carry") for x in invals[n_consts : n_consts + n_carry]]
    xs = invals[n_consts + n_carry :]
    # A weight scanned over its leading axis: slice W0 (a quantized one's stored arrays),
    # and each factor holding that axis.
    rebuilds = {}

    def scanned_w0(k, w0):
        parts = lazy.scan_parts(w0) if isinstance(w0, LazyWeight) else None
        if parts is None:
            return _concrete(w0, ctx, "scan")
        rebuilds[k] = parts[1]
        return parts[0]

    sliced = []
    for k, x in enumerate(xs):
        if isinstance(x, SymbolicWeight):
            if x.kinds[0] != "b":
                x = xs[k] = x.with_scale()
            a = x.a if x.kinds[0] in "bi" else None
            b, c = (x.b, x.c) if x.kinds[0] in "bo" else (None, None)
            # A pending column scale: its factors are sliced too (all lead with the layer).
            sliced.append((scanned_w0(k, x.w0), a, b, c, x.pending))
        else:
            sliced.append(scanned_w0(k, x))
    key = ctx.key
    step_index = key is not None or bool(rebuilds)
    xs_in = (sliced, jnp.arange(p["length"]) if step_index else None)

    def body(carry_vals, xs_vals):
        per_step, step = xs_vals
        step_ctx = ctx.with_key(None if key is None else jax.random.fold_in(key, step))

        def step_w0(k, w0):
            return rebuilds[k](w0, step) if k in rebuilds else w0

        args = []
        for k, (orig, x) in enumerate(zip(xs, per_step, strict=True)):
            if isinstance(orig, SymbolicWeight):
                w0, a, b, c, pending = x
                layer = orig.replace(
                    w0=step_w0(k, w0),
                    a=orig.a if a is None else a,
                    b=orig.b if b is None else b,
                    c=orig.c if b is None else c,
                    kinds=orig.kinds[1:],
                    pending=None if pending is None else symbolic.peel_layer(pending),
                )
                # This layer's column scale, here rather than where the body consumes
                # the weight: a remat inside the body would recompute it.
                args.append(layer.with_scale())
            else:
                args.append(step_w0(k, x))
        out = _eval_jaxpr(
            p["jaxpr"].jaxpr, p["jaxpr"].consts, [*consts, *carry_vals, *args], step_ctx
        )
        out = [_concrete(o, step_ctx, "scan output") for o in out]
        return out[:n_carry], out[n_carry:]

    carry_out, ys = lax.scan(
        body, carry, xs_in, length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
    )
    return [*carry_out, *ys]


def _cond(eqn, invals, ctx):
    index, operands = invals[0], invals[1:]
    branches = [
        functools.partial(
            lambda br, *ops: [_concrete(o, ctx, "cond output") for o in _eval_closed(br, ops, ctx)],
            br,
        )
        for br in eqn.params["branches"]
    ]
    return lax.switch(_concrete(index, ctx, "cond"), branches, *operands)


def _while(eqn, invals, ctx):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    # Read by every iteration: a pending column scale is computed once, outside the loop.
    cond_consts = [_with_scale(x) for x in invals[:nc]]
    body_consts = [_with_scale(x) for x in invals[nc : nc + nb]]
    init = [_concrete(x, ctx, "while carry") for x in invals[nc + nb :]]

    def cond_fn(carry):
        (out,) = _eval_closed(p["cond_jaxpr"], [*cond_consts, *carry], ctx)
        return out

    def body_fn(carry):
        out = _eval_closed(p["body_jaxpr"], [*body_consts, *carry], ctx)
        return [_concrete(o, ctx, "while carry") for o in out]

    return lax.while_loop(cond_fn, body_fn, init)


_RULES: dict[str, Callable] = primitives.dispatch(
    {
        "same": _same,
        "transpose": _transpose,
        "reshape": _reshape,
        "squeeze": _squeeze,
        "broadcast_in_dim": _broadcast_in_dim,
        "slice": _slice,
        "dynamic_slice": _dynamic_slice,
        "dot_general": _dot_general,
        "conv_general_dilated": _conv,
        "gather": _gather,
        "ragged_dot_general": _ragged_dot,
        "call": _inline,
        "remat2": _remat,
        "checkpoint": _remat,
        "scan": _scan,
        "cond": _cond,
        "while": _while,
        "custom": _custom,
    }
)

# Rules that keep a routed weight (multi_lora's grouped method) routed.
_ROUTE_AWARE = (_dot_general, _same, _inline, _remat)

# Rules that pass a stacked weight's pending column scale on (SymbolicWeight.pending):
# called once, or a scan, which computes it layer by layer where it slices the weight.
_PASS_PENDING = (_inline, _remat, _cond, _scan, _while)

# Rules for operations reading quantized weights but no adapted one: control flow as
# above, layout ops pending; every other consumer dequantizes in place (_bind_frozen).
_FROZEN_RULES: dict[str, Callable] = {
    name: _frozen_layout if kind in ("same", "layout") else _RULES[name]
    for name, kind in primitives.PRIMITIVES.items()
    if kind != "consumer"
}


# ------------------------------------------------------------ the transform


def _all_empty(outputs: Any) -> bool:
    """Whether ``fn`` returned arrays and every one has size 0 (an empty batch)."""
    leaves = jax.tree.leaves(outputs)
    return bool(leaves) and all(math.prod(o.shape) == 0 for o in leaves)


def _quantized(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


def _aval(x: Any) -> Any:
    # fn is traced on a quantized weight's float shape and dtype.
    return jax.ShapeDtypeStruct(x.shape, x.dtype) if _quantized(x) else x


def lora(
    fn: Callable[..., Any],
    *,
    factorized: bool = True,
    on_fallback: FallbackMode = "warn",
    fuse_shared_inputs: bool = True,
    cache_size: int = 32,
    static_argnums: int | Iterable[int] | None = None,
    static_argnames: str | Iterable[str] | None = None,
) -> Callable[..., Any]:
    """Turn ``fn(params, *args, **kw)`` into ``g(base, lora_tree, *args, lora_key=None, **kw)``.

    ``g`` returns exactly ``fn(merge(base, lora_tree), *args, **kw)`` but computes every
    adapted weight's products as ``x·W0 + scale·(x·A)·B``: neither the forward nor the
    backward pass forms ``W0 + scale·A·B`` or a full-size weight gradient when the weight
    is consumed by ``dot_general`` (any dimension numbers, either side, batched),
    ``conv_general_dilated`` (ungrouped), an embedding ``gather`` or ``lax.ragged_dot``
    (mixture-of-experts weights ``(E, in, out)``, one adapter per expert: the same
    group sizes route ``x``, ``x·A`` and the result). An adapter variant computes
    ``(x·W0 + scale·(x·A)·B)·c`` per output column, ``c`` from the variant (DoRA,
    ``LoraSpec(use_dora=True)``: ``m/‖V‖_c``, the norm detached in the gradient and taken
    from ‖W0‖², ⟨W0ᵀA, B⟩ and AᵀA — one pass over W0, no ``V``; a stack's norms one
    layer at a time, in the body of the ``scan`` that slices it).
    Transposes, dtype
    casts, copies, ``optimization_barrier``, grouping reshapes, unit broadcasts and
    slices of a weight stay factorized, as do weights passed through ``jit``, ``scan``
    (stacked layers), ``remat``, ``cond`` and ``while`` (:mod:`lorax_fn.transform.primitives`).

    A weight that enters a ``jax.custom_jvp`` / ``jax.custom_vjp`` function is formed in
    full there and the function is called with its custom rule intact, so gradients
    are those of merge-then-call (custom functions applied to activations, such as
    ``jax.nn.relu``, stay on the fast path). That, and any other consumer without a
    factorized rule, materializes that one weight (always correct) and is reported once
    per (input signature, path, primitive) by ``on_fallback``: ``"warn"``, ``"error"``
    (raise :class:`LoraError`) or ``"ignore"``. A warning names the line that called
    the wrapped function (the first frame outside lorax_fn, JAX and Flax), under
    ``jit``, ``grad`` or ``scan`` too. ``factorized=False`` is plain merge-then-call
    (the reference, and a baseline for benchmarks).

    ``fuse_shared_inputs`` (default ``True``): adapted products that read the same
    activation the same way (q, k and v; gate and up) compute their ``x·A`` as one
    product ``x·[A_q|A_k|A_v]`` and split it, and the backward pass follows (one
    product into ``dx``); XLA on CPU merges no such dots itself
    (:mod:`lorax_fn.transform.fusion`). The results are the unfused ones up to float
    rounding; ``False`` computes each product alone.

    A base holding :class:`~lorax_fn.QuantizedArray` weights (from
    :func:`lorax_fn.quantize_base`: QLoRA) gives ``fn(merge(dequantize_base(base),
    lora_tree), ...)``. ``fn`` is traced on their float shapes and dtypes; each is
    dequantized inside the one operation that reads it, under a ``jax.checkpoint`` of
    that operation alone, so no float copy of the model exists and the backward pass
    recomputes each weight from its codes instead of saving it. Layout ops stay pending
    on it, ``scan`` over stacked layers and ``w[i]`` with a traced ``i`` slice the
    stored arrays; a quantized weight used any other way (a ``scan`` carry, an output)
    is dequantized in full there and reported by ``on_fallback``.

    ``fn`` must read its weights from its params argument: a LoRA-tree entry that no
    output depends on (the jaxpr decides, sub-jaxprs included) would train with a zero
    gradient, so one such entry is warned about, and an ``fn`` that reads none of them
    (a model captured by closure) raises :class:`LoraError`.

    ``lora_key``, when given, applies each adapter's LoRA dropout
    (``LoraSpec(dropout=...)``) to the input of its low-rank path; leave it ``None`` for
    evaluation. The k-th adapted product evaluated (k = 1, 2, …) draws its mask from
    ``jax.random.fold_in(lora_key, k)``; inside a ``scan`` the key is first folded with
    the iteration index, so stacked layers get different masks.

    ``fn`` is traced once per input signature. Array leaves of the arguments are
    traced, and so are Python floats (and complex numbers), as weakly typed scalars, as
    ``jax.jit`` traces them: a new temperature or loss weight neither retraces nor
    recompiles, and a float multiplying bfloat16 activations keeps them bfloat16. Python
    bools and ints stay static (unlike ``jax.jit``), so that ``train=True``,
    ``deterministic=True`` or a decode length can drive Python control flow without a
    mark; so do strings and any other leaf (``mutable=[...]``). Static values key the
    trace cache and must be hashable, as for ``jax.jit``; the traces of the
    ``cache_size`` most recently used signatures are kept (least recently used dropped
    first). ``static_argnums`` / ``static_argnames`` make whole arguments static, as in
    ``jax.jit``: a float that drives Python control flow (``if temperature == 0:``), or a
    hashable configuration object. Positions count ``fn``'s parameters, ``params``
    being 0 (so the first argument after ``base, lora_tree`` is 1), as ``jax.jit(fn,
    static_argnums=...)`` counts them; a parameter named either way is static however
    it is passed, and a position or name ``fn`` has no parameter for raises
    :class:`LoraError`. An int to be traced instead (a step counter) is passed as an
    array: ``jnp.asarray(step)``. Tracing a float that ``fn`` needs concretely raises
    :class:`LoraError` saying to mark it static.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lorax_fn import LoraSpec, split
        >>> params = {"w": jnp.ones((4, 3))}
        >>> base, lt = split(params, LoraSpec("w", rank=2), key=jax.random.key(0))
        >>> g = lora(lambda p, x: x @ p["w"])
        >>> g(base, lt, jnp.ones((2, 4))).shape
        (2, 3)

        A float is traced (one trace for every temperature), an int is static, and a
        float that Python branches on is marked static:

        >>> def logits(p, x, temperature, steps):
        ...     for _ in range(steps):  # steps: an int, static by default
        ...         x = jnp.tanh(x @ p["w"] @ p["w"].T)
        ...     return x @ p["w"] / temperature
        >>> g = lora(logits)
        >>> [g(base, lt, jnp.ones((2, 4)), t, 2).shape for t in (0.5, 1.0)]
        [(2, 3), (2, 3)]
        >>> def sample(p, x, temperature):
        ...     y = x @ p["w"]
        ...     return jnp.argmax(y, -1) if temperature == 0 else y / temperature
        >>> lora(sample, static_argnames="temperature")(base, lt, jnp.ones((2, 4)), 0.0)
        Array([0, 0], dtype=int32)
    """
    if on_fallback not in ("warn", "error", "ignore"):
        raise LoraError(f"on_fallback must be 'warn', 'error' or 'ignore', got {on_fallback!r}")
    if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
        raise LoraError(f"cache_size must be an int >= 1, got {cache_size!r}")
    static = StaticArgs.resolve(fn, static_argnums, static_argnames)
    traces: OrderedDict[Any, Trace] = OrderedDict()

    def trace(paths, params_def, param_avals, split: Split) -> Trace:
        args_static, args_def, arg_avals = split.static, split.treedef, split.arrays
        cache_key = (
            params_def,
            tuple(map(aval_key, param_avals)),
            args_def,
            tuple(map(aval_key, arg_avals)),
            args_static,
        )
        if cache_key in traces:
            traces.move_to_end(cache_key)
            return traces[cache_key]

        def flat_fn(param_leaves, arg_leaves):
            params = jax.tree_util.tree_unflatten(params_def, param_leaves)
            it = iter(arg_leaves)
            leaves = [next(it) if s is None else s[1] for s in args_static]
            args, kwargs = jax.tree_util.tree_unflatten(args_def, leaves)
            return fn(params, *args, **kwargs)

        shapes = [
            [
                jax.ShapeDtypeStruct(
                    jnp.shape(x), jnp.result_type(x), weak_type=getattr(x, "weak_type", False)
                )
                for x in xs
            ]
            for xs in (param_avals, arg_avals)
        ]
        try:
            closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*shapes)
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError) as e:
            if not split.scalars:
                raise
            raise LoraError(
                f"lora(fn): fn needs the value of a traced argument ({type(e).__name__}). "
                f"Python floats are traced, as under jax.jit ({', '.join(split.scalars)}): "
                "if one of them drives Python control flow, make it static with "
                "lora(fn, static_argnames=...) or static_argnums=..., or bind it with "
                "functools.partial(fn, name=value)"
            ) from e
        out_def = jax.tree_util.tree_structure(out_shape)
        used = used_inputs(closed.jaxpr)[: len(paths)]
        entry = Trace(
            frozenset(p for p, u in zip(paths, used, strict=True) if u),
            describe(arg_avals),
            empty=_all_empty(out_shape),
        )

        # Jitted so that an eager call evaluates the jaxpr once per signature too; under
        # an outer jit it is just a nested call.
        @functools.partial(jax.jit, static_argnums=0)
        def evaluate(paths, param_leaves, factors, arg_leaves, lora_key):
            inputs = [
                LazyWeight.of(p, x) if _quantized(x) else x
                for p, x in zip(paths, param_leaves, strict=True)
            ]
            ctx = _Context(
                on_fallback, entry.reported, lora_key, entry.signature, fuse_shared_inputs
            )
            inputs = [
                SymbolicWeight.from_factors(p, x, factors[p]) if p in factors else x
                for p, x in zip(paths, inputs, strict=True)
            ]
            outs = _eval_closed(closed, [*inputs, *arg_leaves], ctx)
            outs = [_concrete(o, ctx, "output") for o in outs]
            return jax.tree_util.tree_unflatten(out_def, outs)

        entry.evaluate = evaluate
        traces[cache_key] = entry
        if len(traces) > cache_size:
            traces.popitem(last=False)
        return entry

    @functools.wraps(fn)
    def wrapped(
        base: Any,
        lora_tree: dict[str, Any],
        *args: Any,
        lora_key: jax.Array | None = None,
        **kwargs: Any,
    ) -> Any:
        lora_tree = expand_subsets(lora_tree)  # layer subsets (lorax_fn.subsets): full stacks
        if not factorized:
            if lora_key is not None:
                raise LoraError("LoRA dropout needs the factorized transform (factorized=True)")
            return fn(merge(base, lora_tree), *args, **kwargs)
        flat, params_def = jax.tree_util.tree_flatten_with_path(base, is_leaf=_quantized)
        paths = tuple(path_str(k) for k, _ in flat)
        # A routed entry (multi_lora's grouped method) is checked as one adapter's factors.
        one = {p: e.shapes() if isinstance(e, RoutedFactors) else e for p, e in lora_tree.items()}
        check_fits(jax.tree_util.tree_unflatten(params_def, [_aval(x) for _, x in flat]), one)
        param_leaves = [
            lora_tree[p] if p in lora_tree and not isinstance(lora_tree[p], _FACTORS) else x
            for p, (_, x) in zip(paths, flat, strict=True)
        ]
        split = split_static(args, kwargs, static)
        entry = trace(paths, params_def, list(map(_aval, param_leaves)), split)
        entry.check_usage(tuple(lora_tree))
        factors = {p: f for p, f in lora_tree.items() if isinstance(f, _FACTORS)}
        return entry.evaluate(paths, param_leaves, factors, split.arrays, lora_key)

    return wrapped
