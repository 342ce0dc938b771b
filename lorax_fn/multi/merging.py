"""PEFT's task-tensor merging rules: task arithmetic, magnitude pruning, TIES and DARE.

Each rule takes ``n`` task tensors stacked on axis 0 (per-adapter ΔWs, or per-adapter
A or B factors) and weights ``(n,)``, and returns one tensor, as ``peft.utils.merge_utils``
does (PEFT 0.21):

- ``linear`` (task arithmetic): ``Σᵢ wᵢ·tᵢ``.
- ``magnitude_prune``: keep each task's ``int(density·size)`` largest-magnitude entries,
  then ``Σᵢ wᵢ·tᵢ``.
- ``ties`` (Yadav et al. 2023): trim as ``magnitude_prune``; elect a sign per entry from
  the trimmed, unweighted tasks (``"total"``: the sign of their sum, ``"frequency"``: of
  their sign count; a tie elects ``+``); average the weighted entries that carry the
  elected sign (a zero carries none): ``Σᵢ wᵢ·tᵢ·[sign tᵢ = s] / max(1, #agreeing)``.
- ``dare_linear`` / ``dare_ties`` (Yu et al. 2023): drop each entry with probability
  ``1 − density`` and rescale the kept ones by ``1/density`` (so the expectation is the
  task itself), then sum as ``linear`` or elect and average as ``ties``.

``density`` 1 prunes nothing. Where the rules run — on ΔW, one layer at a time, or on the
factors — is :func:`lorax_fn.multi.combine`'s business.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from lorax_fn.errors import LoraError

Rule = Literal["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
SignMethod = Literal["total", "frequency"]
RULES: tuple[str, ...] = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_PRUNED = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}
_RANDOM = {"dare_linear", "dare_ties"}


def check_rule_options(
    rule: str, density: float | None, majority_sign_method: str, key: jax.Array | None
) -> None:
    """Raise :class:`LoraError` unless the options fit ``rule``.

    A pruning rule needs ``0 < density ≤ 1``; ``linear`` takes none (a density there
    would be silently ignored). DARE needs a ``key``; the others refuse one, since it
    would suggest a randomness they do not have.

    Example:
        >>> check_rule_options("ties", 0.5, "total", None)
        >>> check_rule_options("dare_linear", 0.5, "total", None)
        Traceback (most recent call last):
        ...
        lorax_fn.errors.LoraError: dare_linear drops entries at random: pass key=jax.random.key(...)
    """
    if rule not in RULES:
        raise LoraError(f"unknown merging rule {rule!r}; one of {', '.join(RULES)}")
    if rule in _PRUNED:
        if density is None or not 0.0 < float(density) <= 1.0:
            raise LoraError(f"{rule} needs 0 < density <= 1 (the fraction kept), got {density!r}")
    elif density is not None:
        raise LoraError(f"{rule} prunes nothing, so density={density!r} would be ignored")
    if majority_sign_method not in ("total", "frequency"):
        raise LoraError(
            f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}"
        )
    if rule in _RANDOM and key is None:
        raise LoraError(f"{rule} drops entries at random: pass key=jax.random.key(...)")
    if rule not in _RANDOM and key is not None:
        raise LoraError(f"{rule} is deterministic; key is only for dare_linear / dare_ties")


def _weighted(tasks: jax.Array, weights: jax.Array) -> jax.Array:
    return tasks * jnp.reshape(weights, weights.shape + (1,) * (tasks.ndim - 1))


def _prune_magnitude(tasks: jax.Array, density: float) -> jax.Array:
    """Each task keeps its ``int(density·size)`` largest-magnitude entries (PEFT's count)."""
    if density >= 1.0:
        return tasks
    flat = tasks.reshape(tasks.shape[0], -1)
    k = int(density * flat.shape[1])
    if k == 0:
        return jnp.zeros_like(tasks)
    _, top = jax.lax.top_k(jnp.abs(flat), k)
    keep = jnp.zeros(flat.shape, bool).at[jnp.arange(flat.shape[0])[:, None], top].set(True)
    return jnp.where(keep, flat, 0.0).reshape(tasks.shape)


def _prune_random(tasks: jax.Array, density: float, key: jax.Array) -> jax.Array:
    """DARE: keep each entry with probability ``density``, rescaled so the mean is kept."""
    if density >= 1.0:
        return tasks
    keep = jax.random.bernoulli(key, density, tasks.shape)
    return jnp.where(keep, tasks / density, 0.0)


def _elected(tasks: jax.Array, method: SignMethod) -> jax.Array:
    """Where each task's entry carries the majority sign (a zero carries none)."""
    sign = jnp.sign(tasks)
    votes = jnp.sum(tasks if method == "total" else sign, axis=0)
    return sign == jnp.where(votes >= 0, 1.0, -1.0)


def _disjoint_mean(weighted: jax.Array, agree: jax.Array) -> jax.Array:
    total = jnp.sum(jnp.where(agree, weighted, 0.0), axis=0)
    return total / jnp.maximum(jnp.sum(agree, axis=0), 1).astype(total.dtype)


def merge_task_tensors(
    tasks: jax.Array,
    weights: jax.Array,
    rule: Rule,
    *,
    density: float | None = None,
    majority_sign_method: SignMethod = "total",
    key: jax.Array | None = None,
) -> jax.Array:
    """One tensor from the ``n`` task tensors ``tasks[i]`` by PEFT's ``rule``.

    ``weights`` has shape ``(n,)`` and may be traced; ``density`` and ``key`` are as
    :func:`check_rule_options` asks. The module docstring gives each rule.

    Example:
        >>> import jax.numpy as jnp
        >>> tasks = jnp.array([[4.0, -1.0, 2.0, -3.0, 5.0], [-2.0, 3.0, 1.0, -5.0, -6.0]])
        >>> merge_task_tensors(tasks, jnp.array([1.0, 0.5]), "ties", density=0.6).tolist()
        [4.0, 1.5, 0.0, -2.75, -3.0]
    """
    check_rule_options(rule, density, majority_sign_method, key)
    weights = jnp.asarray(weights, tasks.dtype)
    if weights.shape != tasks.shape[:1]:
        raise LoraError(f"need one weight per task: {tasks.shape[0]} tasks, {weights.shape}")
    if rule in _RANDOM:
        tasks = _prune_random(tasks, float(density), key)
    elif rule in _PRUNED:
        tasks = _prune_magnitude(tasks, float(density))
    if rule in ("ties", "dare_ties"):
        return _disjoint_mean(_weighted(tasks, weights), _elected(tasks, majority_sign_method))
    return jnp.sum(_weighted(tasks, weights), axis=0)
