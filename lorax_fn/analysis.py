"""Analysis of learned LoRA factors: subspace similarity and update spectra.

Convention. ``lorax_fn`` computes the update as ``x @ A @ B`` with ``A`` of shape
``(fan_in, r)`` and ``B`` of shape ``(r, fan_out)``, so ``ΔW = scale * A @ B`` has Flax's
``(fan_in, fan_out)`` kernel layout. The LoRA paper (Hu et al., 2021, Sec. 7.2) writes
``A`` in PyTorch layout, shape ``(r, d_in)``, and compares the *right* singular vectors
``U_A`` of its ``A``: the directions in input space that the adapter reads. Our ``A`` is the
transpose of the paper's, so those same directions are the *left* singular vectors of our
``A`` (columns of ``U`` in ``A = U S Vᵀ``). Everything below uses that convention.

All functions are pure and work on ``jax.Array`` or NumPy inputs; leading batch axes
(e.g. one entry per layer of a scanned stack) are mapped over.
"""

from __future__ import annotations

from os import PathLike
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike

__all__ = [
    "delta_spectrum",
    "draw_subspace_similarity",
    "plot_subspace_similarity",
    "subspace_similarity",
    "subspace_similarity_grid",
]


def _input_basis(a: ArrayLike) -> Array:
    """Left singular vectors of ``a`` (shape ``(..., fan_in, r)``), ordered by singular value."""
    a = jnp.asarray(a)
    if a.ndim < 2:
        raise ValueError(f"LoRA A must have shape (..., fan_in, r); got {a.shape}")
    if a.shape[-1] > a.shape[-2]:
        # More directions than the input space has: φ's normalisation would be meaningless.
        raise ValueError(f"rank r={a.shape[-1]} exceeds fan_in={a.shape[-2]}")
    u, _, _ = jnp.linalg.svd(a, full_matrices=False)
    return u


def _check_pair(a1: Array, a2: Array) -> None:
    if a1.shape[:-1] != a2.shape[:-1]:
        raise ValueError(
            f"A factors must agree on (..., fan_in); got shapes {a1.shape} and {a2.shape}"
        )


def subspace_similarity_grid(a1: ArrayLike, a2: ArrayLike) -> Array:
    """φ(A1, A2, i, j) for every ``i in 1..r1`` and ``j in 1..r2``.

    ``grid[..., i - 1, j - 1] = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j)``, where ``U1``, ``U2``
    are the left singular vectors of ``a1`` (``(..., fan_in, r1)``) and ``a2``
    (``(..., fan_in, r2)``) ordered by decreasing singular value. Values lie in ``[0, 1]``:
    1 means the top-``min(i, j)`` directions of one lie inside the span of the other, 0 means
    orthogonal subspaces. Requires ``r1, r2 <= fan_in``.

    Example::

        >>> import numpy as np
        >>> a = np.random.default_rng(0).normal(size=(16, 4))
        >>> grid = subspace_similarity_grid(a, a[:, :2])
        >>> grid.shape
        (4, 2)
        >>> round(float(grid[3, 1]), 4)  # span(a[:, :2]) lies inside span(a)
        1.0
    """
    a1, a2 = jnp.asarray(a1), jnp.asarray(a2)
    _check_pair(a1, a2)
    u1, u2 = _input_basis(a1), _input_basis(a2)
    overlap = jnp.swapaxes(u1, -1, -2) @ u2  # (..., r1, r2)
    # ‖U1[:, :i]ᵀ U2[:, :j]‖²_F is the (i, j) prefix sum of the squared overlaps.
    cumulative = jnp.cumsum(jnp.cumsum(overlap**2, axis=-2), axis=-1)
    i = jnp.arange(1, a1.shape[-1] + 1)[:, None]
    j = jnp.arange(1, a2.shape[-1] + 1)[None, :]
    return cumulative / jnp.minimum(i, j)


def subspace_similarity(a1: ArrayLike, a2: ArrayLike, i: int, j: int) -> Array:
    """The LoRA paper's normalised subspace similarity φ(A1, A2, i, j).

    ``φ = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j)`` with ``U`` the left singular vectors of
    our ``(fan_in, r)`` A factors (see the module docstring for why left, not right).
    Inputs of shape ``(..., fan_in, r)`` give one value per leading index (e.g. per layer).
    It is invariant to ``A -> c * A @ Q`` for any ``c != 0`` and orthogonal ``Q`` (which
    leave the left singular vectors alone). A general invertible mixing ``A @ R`` keeps the
    span, hence φ at ``i = r1, j = r2``, but may reorder the singular directions, so
    smaller ``i, j`` can change.

    Example::

        >>> import numpy as np
        >>> a = np.random.default_rng(0).normal(size=(16, 4))
        >>> round(float(subspace_similarity(a, 3.0 * a, 2, 2)), 4)
        1.0
        >>> b = np.zeros((16, 4)); b[:4] = np.eye(4); c = np.zeros((16, 4)); c[4:8] = np.eye(4)
        >>> float(subspace_similarity(b, c, 4, 4))
        0.0
    """
    a1, a2 = jnp.asarray(a1), jnp.asarray(a2)
    r1, r2 = a1.shape[-1], a2.shape[-1]
    if not (1 <= i <= r1 and 1 <= j <= r2):
        raise ValueError(f"need 1 <= i <= {r1} and 1 <= j <= {r2}; got i={i}, j={j}")
    _check_pair(a1, a2)
    u1 = _input_basis(a1)[..., :i]
    u2 = _input_basis(a2)[..., :j]
    overlap = jnp.swapaxes(u1, -1, -2) @ u2
    return jnp.sum(overlap**2, axis=(-2, -1)) / min(i, j)


def delta_spectrum(a: ArrayLike, b: ArrayLike, scale: float = 1.0) -> Array:
    """Singular values of ``ΔW = scale * a @ b`` without forming ``ΔW``.

    With reduced QR factorisations ``a = Q_a R_a`` and ``bᵀ = Q_b R_b`` we have
    ``ΔW = scale * Q_a (R_a R_bᵀ) Q_bᵀ``; the ``Q`` factors have orthonormal columns, so the
    singular values of ``ΔW`` are those of the small ``k_a x k_b`` matrix ``scale * R_a R_bᵀ``.
    Cost is O((fan_in + fan_out) r²) instead of O(fan_in · fan_out · min(...)).

    Args:
        a: ``(..., fan_in, r)`` LoRA A factor.
        b: ``(..., r, fan_out)`` LoRA B factor.
        scale: the LoRA scale (e.g. ``alpha / r``); its sign does not matter.

    Returns:
        ``(..., min(fan_in, fan_out, r))`` singular values in decreasing order. The remaining
        ``min(fan_in, fan_out) - r`` singular values of ``ΔW`` (if any) are exactly zero.

    Example::

        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> a, b = rng.normal(size=(64, 4)), rng.normal(size=(4, 32))
        >>> s = delta_spectrum(a, b, scale=0.5)
        >>> s.shape
        (4,)
        >>> bool(np.allclose(s, np.linalg.svd(0.5 * a @ b, compute_uv=False)[:4], rtol=1e-4))
        True
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2] or a.shape[:-2] != b.shape[:-2]:
        raise ValueError(
            f"need a (..., fan_in, r) and b (..., r, fan_out); got {a.shape}, {b.shape}"
        )
    _, r_a = jnp.linalg.qr(a, mode="reduced")
    _, r_b = jnp.linalg.qr(jnp.swapaxes(b, -1, -2), mode="reduced")
    core = scale * (r_a @ jnp.swapaxes(r_b, -1, -2))
    return jnp.linalg.svd(core, compute_uv=False)


def draw_subspace_similarity(ax: Any, grid: ArrayLike) -> Any:
    """Draw a 2-D φ grid on a matplotlib ``Axes``; returns the image (for a colorbar).

    Rows are ``i = 1..r1`` top to bottom, columns ``j = 1..r2``, the colour scale fixed
    to ``[0, 1]`` so that panels are comparable.

    Example:
        >>> import jax
        >>> from matplotlib.figure import Figure
        >>> a1 = jax.random.normal(jax.random.key(0), (32, 4))
        >>> a2 = jax.random.normal(jax.random.key(1), (32, 8))
        >>> ax = Figure().add_subplot()
        >>> image = draw_subspace_similarity(ax, subspace_similarity_grid(a1, a2))
        >>> image.get_array().shape, image.get_clim()
        ((4, 8), (0.0, 1.0))
    """
    values = np.asarray(grid, dtype=np.float64)
    r1, r2 = values.shape
    return ax.imshow(
        values,
        vmin=0.0,
        vmax=1.0,
        cmap="viridis",
        aspect="auto",
        interpolation="nearest",
        extent=(0.5, r2 + 0.5, r1 + 0.5, 0.5),
    )


def plot_subspace_similarity(
    grid: ArrayLike,
    path: str | PathLike[str],
    title: str = "Subspace similarity φ(A1, A2, i, j)",
    xlabel: str = "j",
    ylabel: str = "i",
) -> None:
    """Writes a heat map of a :func:`subspace_similarity_grid` result to a PNG file.

    ``grid`` must be 2-D (select one layer first). Rows are ``i = 1..r1`` top to bottom,
    columns ``j = 1..r2``; the colour scale is fixed to ``[0, 1]`` so plots are comparable.
    Needs ``matplotlib`` (imported here so the library does not depend on it).

    Example:
        >>> import jax
        >>> a_rank8 = jax.random.normal(jax.random.key(0), (64, 8))
        >>> a_rank64 = jax.random.normal(jax.random.key(1), (64, 64))
        >>> grid = subspace_similarity_grid(a_rank8, a_rank64)
        >>> plot_subspace_similarity(grid, "phi.png", title="Wq, layer 0")
        >>> open("phi.png", "rb").read(8) == b"\\x89PNG\\r\\n\\x1a\\n"
        True
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "plot_subspace_similarity needs matplotlib: pip install matplotlib"
        ) from err

    values = np.asarray(grid, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"grid must be 2-D (r1, r2); got shape {values.shape}")
    r1, r2 = values.shape
    # A standalone Figure (no pyplot) keeps this thread-safe and free of global state.
    fig = Figure(figsize=(1.5 + 0.25 * min(r2, 32), 1.0 + 0.25 * min(r1, 32)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = draw_subspace_similarity(ax, values)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, format="png")
