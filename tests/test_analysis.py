"""Tests for lorax_fn.analysis: subspace similarity φ and the spectrum of ΔW = s·A@B."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from lorax_fn.analysis import (
    delta_spectrum,
    plot_subspace_similarity,
    subspace_similarity,
    subspace_similarity_grid,
)

ATOL = 2e-5  # float32 SVDs of small, well-conditioned matrices


def _orthonormal(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(n, k)))
    return q


def _with_basis(basis: np.ndarray, singular_values: list[float]) -> np.ndarray:
    """A (fan_in, r) factor whose left singular vectors are exactly ``basis``'s columns."""
    rng = np.random.default_rng(123)
    r = basis.shape[1]
    return basis @ np.diag(singular_values) @ _orthonormal(rng, r, r).T


def test_identical_subspaces_give_one() -> None:
    a = np.random.default_rng(0).normal(size=(32, 6))
    grid = np.asarray(subspace_similarity_grid(a, a))
    np.testing.assert_allclose(np.diag(grid), 1.0, atol=ATOL)
    for i in range(1, 7):
        assert float(subspace_similarity(a, a, i, i)) == pytest.approx(1.0, abs=ATOL)


def test_same_span_different_basis_is_one_at_full_rank() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(32, 4))
    mixed = a @ rng.normal(size=(4, 4))  # invertible mixing: same span, other directions
    assert float(subspace_similarity(a, mixed, 4, 4)) == pytest.approx(1.0, abs=ATOL)


def test_orthogonal_subspaces_give_zero() -> None:
    rng = np.random.default_rng(2)
    q = _orthonormal(rng, 40, 8 + 5)
    a1 = q[:, :8] @ rng.normal(size=(8, 8))
    a2 = q[:, 8:] @ rng.normal(size=(5, 5))
    grid = np.asarray(subspace_similarity_grid(a1, a2))
    assert grid.shape == (8, 5)
    np.testing.assert_allclose(grid, 0.0, atol=ATOL)


def test_known_partial_overlap() -> None:
    # U1 = [e0, e1, e2, e3], U2 = [e2, e3, e4, e5] (distinct singular values fix the order),
    # all rotated by one random orthogonal map of input space, which φ must not notice.
    rng = np.random.default_rng(3)
    eye = np.eye(12)
    rotation = _orthonormal(rng, 12, 12)
    a1 = rotation @ _with_basis(eye[:, [0, 1, 2, 3]], [4.0, 3.0, 2.0, 1.0])
    a2 = rotation @ _with_basis(eye[:, [2, 3, 4, 5]], [4.0, 3.0, 2.0, 1.0])
    expected = {
        (4, 4): 2 / 4,  # two shared directions out of four
        (2, 2): 0.0,  # {e0, e1} vs {e2, e3}
        (4, 2): 1.0,  # {e2, e3} lies inside U1
        (3, 1): 1.0,  # e2 lies inside {e0, e1, e2}
        (3, 3): 1 / 3,  # only e2 shared
        (2, 4): 0.0,
    }
    grid = np.asarray(subspace_similarity_grid(a1, a2))
    for (i, j), value in expected.items():
        assert float(subspace_similarity(a1, a2, i, j)) == pytest.approx(value, abs=ATOL)
        assert grid[i - 1, j - 1] == pytest.approx(value, abs=ATOL)


@pytest.mark.parametrize("theta", [0.0, 0.3, np.pi / 4, 1.2, np.pi / 2])
def test_single_direction_is_cosine_squared(theta: float) -> None:
    a1 = np.zeros((5, 1))
    a1[0] = 2.0
    a2 = np.zeros((5, 1))
    a2[0], a2[1] = np.cos(theta), np.sin(theta)
    assert float(subspace_similarity(a1, a2, 1, 1)) == pytest.approx(np.cos(theta) ** 2, abs=ATOL)


def test_invariant_to_scale_and_rotation_within_subspace() -> None:
    rng = np.random.default_rng(4)
    a1, a2 = rng.normal(size=(24, 6)), rng.normal(size=(24, 3))
    base = np.asarray(subspace_similarity_grid(a1, a2))
    # c * A @ Q leaves the left singular vectors (up to sign) unchanged, so every entry holds.
    moved1 = -7.5 * a1 @ _orthonormal(rng, 6, 6)
    moved2 = 0.01 * a2 @ _orthonormal(rng, 3, 3)
    np.testing.assert_allclose(subspace_similarity_grid(moved1, moved2), base, atol=1e-4)
    assert not np.allclose(base, 0.0) and not np.allclose(base, 1.0)


def test_grid_agrees_with_pointwise_and_is_bounded() -> None:
    rng = np.random.default_rng(5)
    a1, a2 = rng.normal(size=(20, 5)), rng.normal(size=(20, 3))
    grid = np.asarray(subspace_similarity_grid(a1, a2))
    assert grid.shape == (5, 3)
    assert (grid >= -ATOL).all() and (grid <= 1 + ATOL).all()
    for i in range(1, 6):
        for j in range(1, 4):
            assert grid[i - 1, j - 1] == pytest.approx(
                float(subspace_similarity(a1, a2, i, j)), abs=ATOL
            )
    # Two random subspaces of R^20 (dims 5 and 3): E[φ] = 5/20, far from 0 and 1.
    assert 0.05 < grid[4, 2] < 0.9


def test_leading_stack_axis_is_per_layer() -> None:
    rng = np.random.default_rng(6)
    a1, a2 = rng.normal(size=(3, 16, 4)), rng.normal(size=(3, 16, 2))
    phi = np.asarray(subspace_similarity(a1, a2, 3, 2))
    grid = np.asarray(subspace_similarity_grid(a1, a2))
    assert phi.shape == (3,) and grid.shape == (3, 4, 2)
    for layer in range(3):
        single = float(subspace_similarity(a1[layer], a2[layer], 3, 2))
        assert phi[layer] == pytest.approx(single, abs=ATOL)
        np.testing.assert_allclose(
            grid[layer], subspace_similarity_grid(a1[layer], a2[layer]), atol=ATOL
        )


def test_subspace_similarity_validates_arguments() -> None:
    a = np.ones((8, 4))
    with pytest.raises(ValueError, match="i <= 4"):
        subspace_similarity(a, a, 5, 1)
    with pytest.raises(ValueError, match="i <= 4"):
        subspace_similarity(a, a, 0, 1)
    with pytest.raises(ValueError, match="fan_in"):
        subspace_similarity(a, np.ones((9, 4)), 1, 1)
    with pytest.raises(ValueError, match="fan_in"):
        subspace_similarity_grid(np.ones((3, 4)), np.ones((3, 4)))


@pytest.mark.parametrize(
    ("fan_in", "fan_out", "r", "scale"),
    [(64, 32, 4, 1.0), (10, 50, 8, 0.25), (7, 5, 9, -2.0), (3, 40, 6, 16 / 6), (1, 1, 1, 3.0)],
)
def test_delta_spectrum_matches_dense_svd(fan_in: int, fan_out: int, r: int, scale: float) -> None:
    rng = np.random.default_rng(fan_in * 1000 + fan_out * 10 + r)
    a = rng.normal(size=(fan_in, r)).astype(np.float32)
    b = rng.normal(size=(r, fan_out)).astype(np.float32)
    dense = np.linalg.svd(scale * a.astype(np.float64) @ b, compute_uv=False)
    spectrum = np.asarray(delta_spectrum(a, b, scale))
    k = min(fan_in, fan_out, r)
    assert spectrum.shape == (k,)
    np.testing.assert_allclose(spectrum, dense[:k], rtol=1e-4, atol=1e-4 * dense[0])
    # Whatever delta_spectrum leaves out must be zero in the dense spectrum.
    np.testing.assert_allclose(dense[k:], 0.0, atol=1e-4 * dense[0])


def test_delta_spectrum_known_values_at_a_size_too_big_to_form() -> None:
    # ΔW here would be 20000 x 30000 float32 (2.4 GB); the QR route never builds it.
    rng = np.random.default_rng(7)
    s = np.array([5.0, 2.0, 0.5, 0.1])
    u = _orthonormal(rng, 20_000, 4)
    v = _orthonormal(rng, 30_000, 4)
    a = (u * s).astype(np.float32)
    b = v.T.astype(np.float32)
    np.testing.assert_allclose(delta_spectrum(a, b, scale=2.0), 2.0 * s, rtol=1e-4)


def test_delta_spectrum_stacked_and_rank_deficient() -> None:
    rng = np.random.default_rng(8)
    a = rng.normal(size=(2, 12, 3))
    b = rng.normal(size=(2, 3, 9))
    b[1, 2] = 0.0  # second layer's update has rank 2
    spectrum = np.asarray(delta_spectrum(a, b, 0.5))
    assert spectrum.shape == (2, 3)
    for layer in range(2):
        dense = np.linalg.svd(0.5 * a[layer] @ b[layer], compute_uv=False)[:3]
        np.testing.assert_allclose(spectrum[layer], dense, rtol=1e-4, atol=1e-5)
    assert spectrum[1, 2] == pytest.approx(0.0, abs=1e-5)


def test_delta_spectrum_validates_shapes() -> None:
    with pytest.raises(ValueError, match="fan_in"):
        delta_spectrum(np.ones((8, 4)), np.ones((3, 8)))


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_plot_writes_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    grid = subspace_similarity_grid(rng.normal(size=(16, 8)), rng.normal(size=(16, 4)))
    path = tmp_path / "phi.png"
    plot_subspace_similarity(grid, path, title="test")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 50 and height > 50
    with pytest.raises(ValueError, match="2-D"):
        plot_subspace_similarity(np.zeros((2, 3, 3)), tmp_path / "bad.png")
