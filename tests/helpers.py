"""Shared test helpers: randomised adapters and the merge-then-call reference."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.extend import core

import lorax_fn
from lorax_fn import LoraFactors


def randomize_b(lora_tree: dict[str, Any], seed: int = 1, std: float = 0.1) -> dict[str, Any]:
    """B = 0 at init hides every bug in the low-rank path, so tests use random B."""
    out = {}
    for i, (path, entry) in enumerate(sorted(lora_tree.items())):
        if isinstance(entry, LoraFactors):
            key = jax.random.fold_in(jax.random.key(seed), i)
            b = std * jax.random.normal(key, entry.b.shape, jnp.float32).astype(entry.b.dtype)
            # A variant's extras (DoRA's magnitude) away from their init (‖W0‖_c) exercise
            # their path too.
            extras = {}
            for j, name in enumerate(sorted(entry.extras), start=1):
                x = entry.extras[name]
                noise = jax.random.normal(jax.random.fold_in(key, j), x.shape)
                extras[name] = (x * (1.0 + std * noise)).astype(x.dtype)
            out[path] = dataclasses.replace(entry, b=b).with_extras(**extras)
        else:
            out[path] = entry
    return {p: out[p] for p in lora_tree}


def assert_matches_merged(fn, base, lora_tree, *args, rtol=2e-5, atol=2e-5, **kwargs):
    """lora(fn) equals fn(merge(...)) in value and in gradient w.r.t. the LoRA tree."""

    def scalar(out):
        leaves = [x for x in jax.tree_util.tree_leaves(out) if jnp.issubdtype(x.dtype, jnp.inexact)]
        return sum(jnp.sum(jnp.sin(x.astype(jnp.float32))) for x in leaves)

    factorized = lorax_fn.lora(fn, on_fallback="error")
    reference = lorax_fn.lora(fn, factorized=False)
    got = factorized(base, lora_tree, *args, **kwargs)
    want = reference(base, lora_tree, *args, **kwargs)
    jax.tree_util.tree_map(
        lambda g, w: np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=rtol, atol=atol
        ),
        got,
        want,
    )
    grad_got = jax.grad(lambda lt: scalar(factorized(base, lt, *args, **kwargs)))(lora_tree)
    grad_want = jax.grad(lambda lt: scalar(reference(base, lt, *args, **kwargs)))(lora_tree)
    for path in lora_tree:
        for g, w in zip(
            jax.tree_util.tree_leaves(grad_got[path]),
            jax.tree_util.tree_leaves(grad_want[path]),
            strict=True,
        ):
            scale = float(jnp.max(jnp.abs(w.astype(jnp.float32)))) + 1e-6
            np.testing.assert_allclose(
                np.asarray(g, np.float32) / scale,
                np.asarray(w, np.float32) / scale,
                rtol=rtol,
                atol=max(atol, 1e-4),
                err_msg=path,
            )
    return got


def tainted_shapes(jaxpr: core.Jaxpr, tainted: list[bool]) -> list[tuple]:
    """Shapes of every value computed from a tainted input, sub-jaxprs included."""
    taint = {v: t for v, t in zip(jaxpr.invars, tainted, strict=True)}
    shapes = []
    for eqn in jaxpr.eqns:
        hit = any(taint.get(v, False) for v in eqn.invars if not isinstance(v, core.Literal))
        for sub in core.jaxprs_in_params(eqn.params):
            n = len(sub.invars)
            shapes += tainted_shapes(sub, [hit] * n)
        for v in eqn.outvars:
            taint[v] = hit
            if hit:
                shapes.append(tuple(v.aval.shape))
    return shapes


def compiled_flops(fn, *args) -> float:
    """FLOPs of ``jax.jit(fn)`` compiled for ``args``, from XLA's cost analysis."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"])


class TiedLM(nn.Module):
    """An embedding used for the lookup and, tied, for the output logits (``attend``)."""

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(11, 8)
        x = embed(ids)
        x = nn.Dense(8)(jnp.tanh(x))
        return embed.attend(x)
