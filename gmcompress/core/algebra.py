"""Group-matrix algebra on numpy, in the conventions of docs/design.md section 2.

* ``GM(f)[i, j] = f(g_i^{-1} g_j)`` (Chalkley). Multiplying by ``GM(f)`` is a group cross-correlation
  and commutes with every left translation ``(L_h x)(g) = x(h^{-1} g)``.
* Every ``N x N`` matrix is ``M = sum_g diag(F_g) B_g`` with the coefficient matrix
  ``F[g, i] = M[i, idx(g_i g)]`` (a permutation of M's entries). M is a GM iff every row of F is
  constant.
* A relaxed GM of rank r is ``sum_k diag(a_k) GM(b_k)``, i.e. ``F = sum_k b_k a_k^T``. With channels,
  ``W[o, c] = sum_k diag(a[k, o]) GM(b[k, o, c])``; stacking ``F[o, c]`` over c gives a
  ``(c_in |S|) x N`` matrix of rank <= r, so the nearest relaxed form is its truncated SVD.

Feature layout is channel-major: flat index ``channel * N + group_index``.
"""

from __future__ import annotations

import numpy as np

from .groups import FiniteGroup, group

__all__ = ["group_matrix", "coefficients", "from_coefficients", "displacement", "displacement_rank"]


def group_matrix(kernel: np.ndarray, g: FiniteGroup | str) -> np.ndarray:
    """``M[..., i, j] = kernel[..., g_i^{-1} g_j]`` for a kernel of shape ``(..., N)``."""
    g = group(g)
    kernel = np.asarray(kernel)
    if kernel.shape[-1] != g.order:
        raise ValueError(f"kernel has {kernel.shape[-1]} entries, group {g.name} has order {g.order}")
    return kernel[..., g.right_shift_index()]


def coefficients(m: np.ndarray, g: FiniteGroup | str) -> np.ndarray:
    """Coefficient matrix ``F[..., g, i] = M[..., i, idx(g_i g)]`` (rows: group element, columns: position)."""
    g = group(g)
    m = np.asarray(m)
    _check_square(m, g)
    positions = np.arange(g.order)[None, :]
    return m[..., positions, g.table.T]


def from_coefficients(f: np.ndarray, g: FiniteGroup | str) -> np.ndarray:
    """Inverse of :func:`coefficients`: ``M[..., i, idx(g_i g)] = F[..., g, i]``."""
    g = group(g)
    f = np.asarray(f)
    _check_square(f, g)
    m = np.empty_like(f)
    positions = np.arange(g.order)[None, :]
    m[..., positions, g.table.T] = f
    return m


def displacement(m: np.ndarray, g: FiniteGroup | str) -> np.ndarray:
    """``D(M) = F(M) - F(M) P``, P the cyclic shift of the position columns; zero iff M is a GM."""
    f = coefficients(m, g)
    return f - np.roll(f, 1, axis=-1)


def displacement_rank(m: np.ndarray, g: FiniteGroup | str, tol: float | None = None) -> int:
    """Rank of :func:`displacement`; ``tol`` defaults to ``1e-9 * ||M||_F`` (relative to M, not to D)."""
    m = np.asarray(m, dtype=float)
    d = displacement(m, g)
    if tol is None:
        tol = 1e-9 * max(float(np.linalg.norm(m)), np.finfo(float).tiny)
    return int(np.linalg.matrix_rank(d, tol=tol))


def _check_square(m: np.ndarray, g: FiniteGroup) -> None:
    if m.ndim < 2 or m.shape[-1] != g.order or m.shape[-2] != g.order:
        raise ValueError(f"expected a (..., {g.order}, {g.order}) matrix for group {g.name}, got {m.shape}")
