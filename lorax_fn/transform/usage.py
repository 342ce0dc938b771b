"""Which inputs of a jaxpr its outputs depend on.

``lora(fn)`` uses this to catch a ``fn`` that never reads the weights it is given (an
NNX model or linen ``variables`` captured by closure, a targeted weight the function
never touches): such a weight would train with an all-zero gradient and no word.

The walk is a backward liveness pass over the equations (dead-code elimination):
an input is used when a live output, or an equation with side effects, depends on
it. Sub-jaxprs are followed, so a weight used only inside a ``jit``, ``remat``,
``cond`` branch, ``scan`` or ``while`` body counts, while a weight handed to a ``jit``
that ignores it does not. Loop carries are iterated to a fixpoint. A weight returned
unchanged counts as used.
"""

from __future__ import annotations

from collections.abc import Sequence

from jax.extend import core

from lorax_fn.transform.primitives import SUB_JAXPR


def used_inputs(jaxpr: core.Jaxpr, live_outputs: Sequence[bool] | None = None) -> list[bool]:
    """For each of ``jaxpr.invars``: does a live output (default: all) depend on it?

    Example:
        >>> import jax, jax.numpy as jnp
        >>> closed = jax.make_jaxpr(lambda w, v, x: (jnp.sin(x @ w), v.shape))(
        ...     jnp.ones((2, 2)), jnp.ones(3), jnp.ones((1, 2)))
        >>> used_inputs(closed.jaxpr)
        [True, False, True]
    """
    if live_outputs is None:
        live_outputs = [True] * len(jaxpr.outvars)
    live = {v for v, keep in zip(jaxpr.outvars, live_outputs, strict=True) if keep and _var(v)}
    for eqn in reversed(jaxpr.eqns):
        outs = [_var(v) and v in live for v in eqn.outvars]
        if eqn.effects:
            outs = [True] * len(outs)
        if not any(outs):
            continue
        for v, used in zip(eqn.invars, _eqn_inputs(eqn, outs), strict=True):
            if used and _var(v):
                live.add(v)
    return [v in live for v in jaxpr.invars]


def _var(v: object) -> bool:
    return isinstance(v, core.Var) and not isinstance(v, core.DropVar)


def _open(sub: object) -> core.Jaxpr:
    return sub.jaxpr if isinstance(sub, core.ClosedJaxpr) else sub


def _eqn_inputs(eqn: core.JaxprEqn, outs: list[bool]) -> list[bool]:
    name, p, n_in = eqn.primitive.name, eqn.params, len(eqn.invars)
    if name in SUB_JAXPR:
        sub = _open(p[SUB_JAXPR[name]])
        if len(sub.invars) == n_in and len(sub.outvars) == len(outs):
            return used_inputs(sub, outs)
    elif name == "cond":
        used = [False] * (n_in - 1)
        for branch in p["branches"]:
            used = [a or b for a, b in zip(used, used_inputs(_open(branch), outs), strict=True)]
        return [True, *used]
    elif name == "scan":
        return _scan_inputs(_open(p["jaxpr"]), p["num_consts"], p["num_carry"], outs)
    elif name == "while":
        return _while_inputs(eqn, outs)
    # Any other primitive: each input feeds every output. Unknown higher-order
    # primitives land here too, which can only over-report use.
    return [True] * n_in


def _scan_inputs(body: core.Jaxpr, n_consts: int, n_carry: int, outs: list[bool]) -> list[bool]:
    carry, ys = outs[:n_carry], outs[n_carry:]
    while True:
        used = used_inputs(body, carry + ys)
        # A carry read by the body is live on every earlier iteration's output too.
        grown = [a or b for a, b in zip(carry, used[n_consts : n_consts + n_carry], strict=True)]
        if grown == carry:
            return used
        carry = grown


def _while_inputs(eqn: core.JaxprEqn, outs: list[bool]) -> list[bool]:
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cond_used = used_inputs(_open(p["cond_jaxpr"]), [True])
    carry = [a or b for a, b in zip(outs, cond_used[nc:], strict=True)]
    while True:
        body_used = used_inputs(_open(p["body_jaxpr"]), carry)
        grown = [a or b for a, b in zip(carry, body_used[nb:], strict=True)]
        if grown == carry:
            return cond_used[:nc] + body_used[:nb] + carry
        carry = grown
