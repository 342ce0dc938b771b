"""Inits that leave the base as it is: ``A·B = 0``, so the model starts equal to the base.

- ``"gaussian"``: A ~ N(0, ``init_std``²) (default std ``1/r``, PEFT's), B = 0.
- ``"kaiming_uniform"``: A ~ U(±1/√fan_in) (PEFT's default), B = 0.
- ``"orthogonal"``: PEFT's ``init_lora_weights="orthogonal"``: A and B both non-zero,
  built from the odd and even rows of one random ``r×r`` orthogonal matrix, so that
  ``A·B = 0`` exactly in exact arithmetic while both factors already carry gradient.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lorax_fn.errors import LoraError
from lorax_fn.factors import Layout, LoraFactors
from lorax_fn.inits.base import Init, factors_of, fan_in_bound, register, zero_b
from lorax_fn.spec import LoraSpec


class Gaussian(Init):
    """A ~ N(0, std²) with std ``spec.init_std`` or ``1/r``; B = 0 (the LoRA paper)."""

    name = "gaussian"

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
        a_shape, b_shape = layout.shapes(w.shape, rank)
        std = spec.init_std if spec.init_std is not None else 1.0 / rank
        a = std * jax.random.normal(key, a_shape, jnp.float32)
        return zero_b(a, b_shape, scale, layout, spec), w


class KaimingUniform(Init):
    """A ~ U(±1/√fan_in), B = 0: PEFT's default (``kaiming_uniform_(a=√5)``)."""

    name = "kaiming_uniform"

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
        a_shape, b_shape = layout.shapes(w.shape, rank)
        bound = fan_in_bound(w.shape, layout)
        a = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound)
        return zero_b(a, b_shape, scale, layout, spec), w


def orthogonal_factors(
    x: jax.Array, g_in: jax.Array, g_out: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """PEFT's orthogonal init from its three Gaussian draws, as ``(A, B)`` matrices.

    ``x``: ``(*batch, r, r)``, ``g_in``: ``(*batch, fan_in, r/2)``, ``g_out``:
    ``(*batch, r/2, fan_out)``. With ``Q`` the QR factor of ``x``, ``A = g_in·Q[0::2]/10``
    and ``B = Q[1::2]ᵀ·g_out/10`` (PEFT's ``lora_A.weight`` is ``Aᵀ``, ``lora_B.weight``
    is ``Bᵀ``); the rows of ``Q`` are orthonormal, so ``A·B = 0``.

    Example:
        >>> k = jax.random.split(jax.random.key(0), 3)
        >>> a, b = orthogonal_factors(jax.random.normal(k[0], (4, 4)),
        ...     jax.random.normal(k[1], (8, 2)), jax.random.normal(k[2], (2, 6)))
        >>> a.shape, b.shape, float(jnp.abs(a @ b).max()) < 1e-6
        ((8, 4), (4, 6), True)
    """
    q, _ = jnp.linalg.qr(x)
    a = jnp.matmul(g_in, q[..., 0::2, :], precision=jax.lax.Precision.HIGHEST) / 10.0
    b = (
        jnp.matmul(
            jnp.swapaxes(q[..., 1::2, :], -1, -2), g_out, precision=jax.lax.Precision.HIGHEST
        )
        / 10.0
    )
    return a, b


class Orthogonal(Init):
    """PEFT's ``"orthogonal"`` init (even ranks only, as in PEFT): see
    :func:`orthogonal_factors`; the base is unchanged."""

    name = "orthogonal"

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
        if rank % 2:
            raise LoraError(
                f"{path}: init='orthogonal' needs an even rank (A and B take alternate rows "
                f"of an r×r orthogonal matrix), got rank {rank}; pick rank {rank + 1} or "
                f"{rank - 1} (rank_pattern sets it per path)"
            )
        batch = tuple(w.shape[i] for i in layout.batch_axes)
        k_x, k_in, k_out = jax.random.split(key, 3)
        x = jax.random.normal(k_x, batch + (rank, rank), jnp.float32)
        g_in = jax.random.normal(k_in, batch + (layout.fan_in(w.shape), rank // 2))
        g_out = jax.random.normal(k_out, batch + (rank // 2, layout.fan_out(w.shape)))
        a, b = orthogonal_factors(x, g_in, g_out)
        return factors_of(a, b, tuple(w.shape), layout, scale, spec), w


for _init in (Gaussian(), KaimingUniform(), Orthogonal()):
    register(_init)
