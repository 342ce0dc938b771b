"""CorDA (Yang et al. 2024; PEFT's ``init_lora_weights="corda"``): context-oriented
decomposition of each weight by its inputs' covariance.

For each targeted weight (each layer of a stack), with ``C`` the covariance of its inputs
over a few batches (PEFT's: ``Σ x̂ᵀx̂`` over the batches' calls, each input ``x̂ = x/|max x|``,
divided by the number of calls; collected as EVA's, :func:`lorax_fn.inits.eva.collect_inputs`)
and ``C' = C + d·mean(diag C)·I`` (``d`` from 0.01, doubled until ``C'·C'⁻¹`` is within
0.05 of ``I``): the SVD of PEFT's ``(out, in)`` weight times ``C'``,
``Wᵀ·C' = U·S·Vh``, and ``V = (Vh·C'⁻¹)ᵀ``. ``"ipm"`` (instruction-previewed, the default)
takes the ``r`` largest components, ``"kpm"`` (knowledge-preserved) the ``r`` smallest;
``A = V_r·√(S_r/s)``, ``B = √(S_r/s)·U_rᵀ``, and the base becomes the residual
``W0 − s·A·B``, recorded as for PiSSA.

Memory: one float32 ``fan_in × fan_in`` covariance per targeted weight (per layer),
held by the init until ``split``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_fn.errors import LoraError
from lorax_fn.factors import Layout, LoraFactors
from lorax_fn.inits.base import Init, as_matrix, factors_of, register, with_residual
from lorax_fn.inits.eva import InputStats, collect_inputs
from lorax_fn.spec import LoraSpec

METHODS = ("ipm", "kpm")


def corda_factors(
    mat: np.ndarray, cov: np.ndarray, rank: int, scale: float, method: str = "ipm"
) -> tuple[np.ndarray, np.ndarray]:
    """CorDA's ``(A, B)`` of one ``(fan_in, fan_out)`` weight and its input covariance.

    ``A = lora_Aᵀ`` and ``B = lora_Bᵀ`` of PEFT's ``corda_init`` on the ``(out, in)``
    weight ``matᵀ`` (float32, as PEFT computes them).

    Example:
        >>> a, b = corda_factors(np.diag([3.0, 1.0]), np.eye(2), 1, 1.0)
        >>> np.round(a @ b, 4).tolist()
        [[3.0, 0.0], [0.0, 0.0]]
    """
    if method not in METHODS:
        raise LoraError(f"CorDA: unknown method {method!r}; one of {METHODS}")
    cov = np.asarray(cov, np.float32)
    eye = np.eye(cov.shape[0], dtype=np.float32)
    damp = 0.01
    while True:
        fixed = cov + eye * np.mean(np.diag(cov)) * np.float32(damp)
        inv = np.linalg.inv(fixed)
        if np.linalg.norm(fixed @ inv - eye) < 0.05:
            break
        damp *= 2
    u, s, vh = np.linalg.svd(np.asarray(mat, np.float32).T @ fixed, full_matrices=False)
    v = (vh @ inv).T
    keep = slice(None, rank) if method == "ipm" else slice(-rank, None)
    root = np.sqrt(s[keep] / np.float32(scale))
    return v[:, keep] * root, root[:, None] * u[:, keep].T


@dataclasses.dataclass(frozen=True, eq=False)
class Corda(Init):
    """The CorDA init, holding each weight's input covariance (see :func:`corda`).

    Args:
      stats: ``{path: InputStats}`` collected with ``normalize=True``.
      method: ``"ipm"`` (the largest components, default) or ``"kpm"`` (the smallest).
    """

    stats: Mapping[str, InputStats] = dataclasses.field(default_factory=dict)
    method: str = "ipm"
    name = "corda"
    rewrites_base = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LoraError(f"CorDA: unknown method {self.method!r}; one of {METHODS}")

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
        if path not in self.stats:
            raise LoraError(
                f"{path}: init='corda' needs this weight's input covariance: register "
                "lorax_fn.inits.corda(fn, params, spec, batches) before split"
            )
        st = self.stats[path]
        st.check(path, layout)
        mats = np.asarray(as_matrix(w, layout))
        covs = np.asarray(st.xtx / st.calls[..., None, None])
        a = np.zeros(mats.shape[:-1] + (rank,), np.float32)
        b = np.zeros(mats.shape[:-2] + (rank, mats.shape[-1]), np.float32)
        for idx in np.ndindex(mats.shape[:-2]):
            a[idx], b[idx] = corda_factors(mats[idx], covs[idx], rank, scale, self.method)
        factors = factors_of(jnp.asarray(a), jnp.asarray(b), tuple(w.shape), layout, scale, spec)
        return with_residual(w, factors, self.name)


def corda(
    fn: Callable[..., Any],
    params: Any,
    spec: LoraSpec,
    batches: Iterable[Any],
    *,
    method: str = "ipm",
) -> Corda:
    """The CorDA init for ``spec``'s targets, from their inputs in ``fn(params, *batch)``.

    ``batches`` yields ``fn``'s arguments after the params (a tuple, or one argument).
    Register the result and split with ``init="corda"``; the base ``split`` returns is
    the residual.

    Example:
        >>> import jax, lorax_fn
        >>> params = {"w": jax.random.normal(jax.random.key(0), (16, 8))}
        >>> xs = [jax.random.normal(jax.random.key(i), (32, 16)) for i in range(2)]
        >>> spec = lorax_fn.LoraSpec("w", rank=2, init="corda")
        >>> _ = register(corda(lambda p, x: x @ p["w"], params, spec, xs))
        >>> base, lt = lorax_fn.split(params, spec, key=jax.random.key(1))
        >>> bool(jnp.allclose(lorax_fn.merge(base, lt)["w"], params["w"], atol=1e-5))
        True
    """
    return Corda(collect_inputs(fn, params, spec, batches, normalize=True), method)


register(Corda())
