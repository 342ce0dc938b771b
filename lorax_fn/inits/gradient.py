"""LoRA-GA (Wang et al. 2024; PEFT's ``init_lora_weights="lora_ga"``): factors aligned with
the first step of full fine-tuning, from one batch's weight gradients.

For each targeted weight, the gradient ``G = ∂loss/∂W`` of one batch is computed with the
full weights (merge-then-call: one forward and backward pass of your loss on the
original model, gradients taken only for the targeted weights), and its top ``2r``
singular triplets are split between A and B (``direction``; PEFT's default ``"ArB2r"``:
in PEFT's ``(out, in)`` orientation ``lora_A`` takes the first ``r`` rows of ``Vᵀ`` and
``lora_B`` the next ``r`` columns of ``U·S``), B rescaled (``scaling``; default
``"stable"``: times ``fan_out^¼/√γ``). A·B ≠ 0, so the base is rewritten to
the residual ``W0 - scale·A·B`` and recorded, as for PiSSA.

Memory: the pass holds the model's activations for one batch, as a full fine-tuning step
would, plus one float32 gradient per targeted weight (the size of the adapted weights),
until ``split`` has turned each into factors (one SVD per weight).

Differences from PEFT: PEFT takes a randomized SVD (``torch.svd_lowrank``, ``q = 4r``,
4 power iterations); here the SVD is exact, so the two agree (up to each direction's sign)
where ``4r`` covers the smaller side of the weight, and here is the better approximation
where it does not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lorax_fn.errors import LoraError
from lorax_fn.factors import Layout, LoraFactors
from lorax_fn.inits.base import Init, as_matrix, factors_of, register, with_residual
from lorax_fn.paths import compile_filter, leaves_with_paths
from lorax_fn.spec import LoraSpec

DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")


def _indices(direction: str, rank: int, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Which of the top ``2r`` singular triplets A and B take (PEFT's ``direction``)."""
    if direction == "ArBr":
        return jnp.arange(1, 2 * rank, 2), jnp.arange(0, 2 * rank, 2)
    if direction == "A2rBr":
        return jnp.arange(rank, 2 * rank), jnp.arange(rank)
    if direction == "ArB2r":
        return jnp.arange(rank), jnp.arange(rank, 2 * rank)
    chosen = jax.random.permutation(key, 2 * rank)[:rank]
    return chosen, chosen


def lora_ga_factors(
    grad: jax.Array,
    w: jax.Array,
    rank: int,
    scale: float,
    *,
    direction: str = "ArB2r",
    scaling: str = "stable",
    stable_gamma: float = 16.0,
    key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """LoRA-GA's ``(A, B)`` of one ``(fan_in, fan_out)`` gradient and weight matrix.

    ``A = lora_Aᵀ`` and ``B = lora_Bᵀ`` of PEFT's ``lora_ga_init`` on the ``(out, in)``
    weight ``wᵀ`` with gradient ``gradᵀ`` (exact SVD instead of ``svd_lowrank``).

    Example:
        >>> g = jnp.diag(jnp.array([4.0, 3.0, 2.0, 1.0]))
        >>> a, b = lora_ga_factors(g, jnp.eye(4), 1, 1.0, scaling="unit")
        >>> (a @ b).round(4).tolist()[:2]
        [[0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    """
    u, s, vh = jnp.linalg.svd(grad.astype(jnp.float32), full_matrices=False)
    idx_a, idx_b = _indices(direction, rank, jax.random.key(0) if key is None else key)
    # PEFT's (out, in) gradient is gradᵀ = vhᵀ·s·uᵀ: its Vᵀ rows are our u's columns.
    a = u[..., :, idx_a]
    s_b = s[..., idx_b]
    b = s_b[..., :, None] * vh[..., idx_b, :]
    fan_out = grad.shape[-1]
    if scaling == "stable":
        b = b * (fan_out**0.25 / stable_gamma**0.5)
    elif scaling == "weight_svd":
        top = jnp.linalg.svd(w.astype(jnp.float32), compute_uv=False)[..., :1]
        ratio = jnp.where(s_b[..., :1] > 0, top / jnp.where(s_b[..., :1] > 0, s_b[..., :1], 1), 1)
        b = b * ratio[..., None]
    elif scaling == "gd_scale":
        a, b = a / scale, b / scale
    return a, b


@dataclasses.dataclass(frozen=True, eq=False)
class LoraGA(Init):
    """The LoRA-GA init, holding one batch's gradients by path (see :func:`lora_ga`).

    Args:
      grads: ``{path: ∂loss/∂W}``, each shaped like its weight.
      direction: PEFT's ``LoraGAConfig.direction``: ``"ArB2r"`` (default), ``"A2rBr"``,
        ``"ArBr"`` or ``"random"``.
      scaling: PEFT's ``LoraGAConfig.scale``: ``"stable"`` (default), ``"weight_svd"``,
        ``"gd_scale"`` or ``"unit"``.
      stable_gamma: PEFT's ``stable_gamma`` (16).
    """

    grads: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)
    direction: str = "ArB2r"
    scaling: str = "stable"
    stable_gamma: float = 16.0
    name = "lora_ga"
    rewrites_base = True

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise LoraError(f"LoRA-GA: unknown direction {self.direction!r}; one of {DIRECTIONS}")
        if self.scaling not in SCALES:
            raise LoraError(f"LoRA-GA: unknown scaling {self.scaling!r}; one of {SCALES}")

    def __call__(
        self,
        path: str,
        w: jax.Array,
        layout: Layout,
        rank: int,
        scale: float,
        spec: LoraSpec,
        key: jax.Array,
    ) -> tuple[LoraFactors, Any]:
        if path not in self.grads:
            raise LoraError(
                f"{path}: init='lora_ga' needs this weight's gradient: register "
                "lorax_fn.inits.lora_ga(loss_fn, params, spec, *batch) (one batch's "
                "gradients of the spec's targets) before split"
            )
        fan_in, fan_out = layout.fan_in(w.shape), layout.fan_out(w.shape)
        if 2 * rank > min(fan_in, fan_out):
            raise LoraError(
                f"{path}: init='lora_ga' takes 2·rank = {2 * rank} singular directions of the "
                f"gradient, more than min(fan_in, fan_out) = {min(fan_in, fan_out)}; lower the "
                "rank (rank_pattern sets it per path)"
            )
        a, b = lora_ga_factors(
            as_matrix(self.grads[path], layout),
            as_matrix(w, layout),
            rank,
            scale,
            direction=self.direction,
            scaling=self.scaling,
            stable_gamma=self.stable_gamma,
            key=key,
        )
        return with_residual(w, factors_of(a, b, tuple(w.shape), layout, scale, spec), self.name)


def lora_ga(
    loss_fn: Callable[..., jax.Array],
    params: Any,
    spec: LoraSpec,
    *batch: Any,
    direction: str = "ArB2r",
    scaling: str = "stable",
    stable_gamma: float = 16.0,
) -> LoraGA:
    """The LoRA-GA init for ``spec``'s targets, from the gradients of ``loss_fn(params, *batch)``.

    ``loss_fn`` takes the params as :func:`lorax_fn.split` does (the full float weights)
    and returns a scalar; average several batches with a ``loss_fn`` that does. The
    gradients are taken for the targeted weights only, in one pass. Register the result
    and split with ``init="lora_ga"``; registering ``LoraGA()`` again drops the gradients.

    Example:
        >>> import jax, jax.numpy as jnp, lorax_fn
        >>> params = {"w": jax.random.normal(jax.random.key(0), (16, 8))}
        >>> x, y = jnp.ones((4, 16)), jnp.zeros((4, 8))
        >>> loss = lambda p, x, y: jnp.mean((x @ p["w"] - y) ** 2)
        >>> spec = lorax_fn.LoraSpec("w", rank=2, init="lora_ga")
        >>> _ = register(lora_ga(loss, params, spec, x, y))
        >>> base, lt = lorax_fn.split(params, spec, key=jax.random.key(1))
        >>> bool(jnp.allclose(lorax_fn.merge(base, lt)["w"], params["w"], atol=1e-5))
        True
    """
    flat, treedef = jax.tree_util.tree_flatten(params)
    paths = [p for p, _ in leaves_with_paths(params)]
    targets = [compile_filter(f) for f in spec.targets]
    excludes = [compile_filter(f) for f in spec.exclude]
    chosen = {
        p: x
        for p, x in zip(paths, flat, strict=True)
        if any(t(p, x) for t in targets)
        and not any(e(p, x) for e in excludes)
        and jnp.issubdtype(getattr(x, "dtype", jnp.int32), jnp.floating)
    }
    if not chosen:
        raise LoraError("lora_ga: the spec's targets match no floating leaf of params")

    def loss_of(weights: dict[str, jax.Array]) -> jax.Array:
        leaves = [weights.get(p, x) for p, x in zip(paths, flat, strict=True)]
        return loss_fn(jax.tree_util.tree_unflatten(treedef, leaves), *batch)

    return LoraGA(jax.grad(loss_of)(chosen), direction, scaling, stable_gamma)


register(LoraGA())
