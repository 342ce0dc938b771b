"""Inits that move a principal part of ``W0`` into the adapter and return the residual.

- ``"pissa"`` (PiSSA, Meng et al. 2024): ``scale·A·B`` is the top-``r`` SVD part of ``W0``,
  split evenly between A and B.
- ``"olora"`` (OLoRA, Büyükakyüz 2024; PEFT's ``init_lora_weights="olora"``): the thin QR
  ``W0ᵀ = Q·R`` of the weight in PyTorch's ``(out, in)`` orientation, ``B = Q[:, :r]ᵀ``
  (orthonormal) and ``A = R[:r]ᵀ`` — as in PEFT, *not* divided by ``scale``, so the part
  moved out of the base is ``scale·Q_r·R_r``.

Both return the residual ``W0 - scale·A·B`` as the base, in the weight's dtype, with the
record of :mod:`lorax_fn.pissa`, so the model is unchanged at init and restore refuses
the original weights.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lorax_fn.factors import Layout, LoraFactors
from lorax_fn.inits.base import Init, as_matrix, factors_of, register, svd_factors, with_residual
from lorax_fn.spec import LoraSpec


class Pissa(Init):
    """PiSSA: the top-``r`` singular directions become the adapter, the rest stays frozen."""

    name = "pissa"
    rewrites_base = True

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
        a, b = svd_factors(as_matrix(w, layout), rank, scale)
        return with_residual(w, factors_of(a, b, tuple(w.shape), layout, scale, spec), self.name)


def olora_factors(mat: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """OLoRA's ``(A, B)`` of a ``(*batch, fan_in, fan_out)`` matrix, as PEFT computes them.

    PEFT factors the ``(out, in)`` weight: ``Q, R = qr(Wᵀ)``, ``lora_B = Q[:, :r]``,
    ``lora_A = R[:r]``; here ``A = lora_Aᵀ`` and ``B = lora_Bᵀ``, so ``A·B = (Q_r·R_r)ᵀ``.

    Example:
        >>> w = jnp.array([[3.0, 0.0], [0.0, 2.0], [0.0, 0.0]])  # (in=3, out=2)
        >>> a, b = olora_factors(w, 1)
        >>> ((a @ b).round(4) + 0.0).tolist()  # + 0.0: no negative zeros
        [[3.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    """
    q, r = jnp.linalg.qr(jnp.swapaxes(mat, -1, -2))
    return jnp.swapaxes(r[..., :rank, :], -1, -2), jnp.swapaxes(q[..., :, :rank], -1, -2)


class Olora(Init):
    """OLoRA: A and B from the thin QR of ``W0`` (:func:`olora_factors`), residual base."""

    name = "olora"
    rewrites_base = True

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
        a, b = olora_factors(as_matrix(w, layout), rank)
        return with_residual(w, factors_of(a, b, tuple(w.shape), layout, scale, spec), self.name)


for _init in (Pissa(), Olora()):
    register(_init)
