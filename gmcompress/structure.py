"""Group-matrix math on numpy/scipy, in the conventions of design.md section 2.

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

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import scipy.sparse.linalg

from .groups import FiniteGroup, group

__all__ = [
    "GMFit",
    "group_matrix",
    "coefficients",
    "from_coefficients",
    "displacement",
    "displacement_rank",
    "relaxed_dense",
    "channel_counts",
    "resolve_support",
    "project",
]


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


def channel_counts(shape: tuple[int, int], g: FiniteGroup, what: str = "weight") -> tuple[int, int]:
    """``(c_out, c_in)`` for a ``(c_out*N, c_in*N)`` matrix, or a ValueError that says how to fix it."""
    out_f, in_f = shape
    n = g.order
    if out_f % n or in_f % n:
        raise ValueError(
            f"{what} of shape (out={out_f}, in={in_f}) does not divide into {g.name} blocks: both sizes must "
            f"be multiples of the group order N={n}. Pick a group whose order divides both, or pad "
            f"(on_mismatch='pad') / skip the layer."
        )
    return out_f // n, in_f // n


def resolve_support(g: FiniteGroup, support: Iterable[int] | None) -> np.ndarray:
    """Sorted, unique element indices of the kernel support (all of G when None)."""
    if support is None:
        return np.arange(g.order)
    s = np.unique(np.asarray(list(support), dtype=np.int64))
    if s.size == 0 or s.min() < 0 or s.max() >= g.order:
        raise ValueError(f"support must be a non-empty set of element indices of {g.name} (0..{g.order - 1})")
    return s


def relaxed_dense(kernels: np.ndarray, modulations: np.ndarray, support: np.ndarray, g: FiniteGroup) -> np.ndarray:
    """Dense ``(c_out N, c_in N)`` matrix of ``W[o, c] = sum_k diag(a[k, o]) GM(b[k, o, c])``.

    ``kernels`` has shape ``(r, c_out, c_in, |S|)`` (values on the support), ``modulations``
    ``(r, c_out, N)``.
    """
    r, c_out, c_in, _ = kernels.shape
    n = g.order
    full = np.zeros((r, c_out, c_in, n), dtype=np.result_type(kernels, modulations))
    full[..., support] = kernels
    f = np.einsum("kocg,kop->ocgp", full, modulations)  # coefficient matrices per block
    blocks = from_coefficients(f, g)  # (c_out, c_in, N, N) [o, c, p, q]
    return blocks.transpose(0, 2, 1, 3).reshape(c_out * n, c_in * n)


def _block_coefficients(w: np.ndarray, g: FiniteGroup, c_out: int, c_in: int) -> np.ndarray:
    n = g.order
    blocks = w.reshape(c_out, n, c_in, n).transpose(0, 2, 1, 3)  # (o, c, p, q)
    return coefficients(blocks, g)  # (o, c, g, p)


@dataclass
class GMFit:
    """A least-squares fit of a dense matrix by a (relaxed) group matrix.

    ``kernels`` ``(r, c_out, c_in, |S|)``, ``modulations`` ``(r, c_out, N)``, ``support`` the element
    indices the kernels live on; ``relative_error = ||W - dense()||_F / ||W||_F``.
    """

    group: FiniteGroup
    kernels: np.ndarray
    modulations: np.ndarray
    support: np.ndarray
    relative_error: float
    modulate: bool = True
    activation_aware: bool = False
    output_error: float | None = field(default=None)

    @property
    def rank(self) -> int:
        return int(self.kernels.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        _, c_out, c_in, _ = self.kernels.shape
        return c_out * self.group.order, c_in * self.group.order

    @property
    def num_parameters(self) -> int:
        return int(self.kernels.size + (self.modulations.size if self.modulate else 0))

    def dense(self) -> np.ndarray:
        return relaxed_dense(self.kernels, self.modulations, self.support, self.group)


def project(
    w: np.ndarray,
    g: FiniteGroup | str,
    rank: int = 1,
    modulate: bool = True,
    support: Iterable[int] | None = None,
    inputs: np.ndarray | None = None,
    *,
    damping: float = 0.1,
    max_iter: int = 100,
) -> GMFit:
    """Nearest (relaxed) group-matrix form of ``w`` (shape ``(c_out N, c_in N)``) in least squares.

    * ``modulate=False`` (rank 1 only): the exact GM projection, the mean along each group diagonal.
    * ``modulate=True``: per output channel, the truncated SVD of the stacked coefficient matrix
      (Eckart-Young), split as ``b = u s / sqrt(N)`` and ``a = v sqrt(N)`` (so ``a`` is ~1 near a GM).
    * ``support``: kernels restricted to those elements; the other coefficient rows are fitted by 0.
    * ``inputs`` (calibration activations, ``(samples, c_in N)``): the kernels minimise
      ``||(W - W_gm) X^T||_F`` instead, with the modulations from the plain fit held fixed
      (linear least squares, solved with LSQR from the plain fit). ``damping`` adds
      ``damping * mean(diag(X^T X)) * ||W - W_gm||_F^2`` so that few calibration samples do not
      overfit (0 = pure activation-aware, large = the plain fit).
    """
    g = group(g)
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"project expects a 2-D weight, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError(f"weight of shape {w.shape} contains NaN or inf values; fix the model before compressing")
    c_out, c_in = channel_counts(w.shape, g)
    n = g.order
    sup = resolve_support(g, support)
    rank = int(rank)
    if not modulate and rank != 1:
        raise ValueError(f"rank={rank} needs modulate=True: a sum of unmodulated group matrices is one group matrix")
    if not 1 <= rank <= n:
        raise ValueError(f"rank must lie in 1..N={n} for group {g.name}, got {rank}")

    f = _block_coefficients(w, g, c_out, c_in)[:, :, sup, :]  # (o, c, s, p)
    if not modulate:
        kernels = f.mean(axis=-1)[None]
        modulations = np.ones((1, c_out, n))
    else:
        stacked = f.reshape(c_out, c_in * sup.size, n)
        u, s, vt = np.linalg.svd(stacked, full_matrices=False)
        k = min(rank, s.shape[-1])
        u, s, vt = u[:, :, :k], s[:, :k], vt[:, :k, :]
        sign = np.where(vt.sum(axis=-1) < 0, -1.0, 1.0)  # (o, k): make the modulations mostly positive
        modulations = (vt * sign[..., None] * np.sqrt(n)).transpose(1, 0, 2)
        kernels = (u * (s * sign / np.sqrt(n))[:, None, :]).transpose(2, 0, 1).reshape(k, c_out, c_in, sup.size)
        if k < rank:  # fewer singular values than asked: pad with zero terms
            kernels = np.concatenate([kernels, np.zeros((rank - k, c_out, c_in, sup.size))])
            modulations = np.concatenate([modulations, np.ones((rank - k, c_out, n))])

    output_error = None
    if inputs is not None:
        kernels, output_error = _fit_kernels_to_inputs(
            w, np.asarray(inputs, dtype=np.float64), kernels, modulations, sup, g, max_iter, damping
        )
    fit = GMFit(g, kernels, modulations, sup, 0.0, modulate, inputs is not None, output_error)
    fit.relative_error = _relative_error(w, fit.dense())
    return fit


def _relative_error(w: np.ndarray, approx: np.ndarray) -> float:
    norm = float(np.linalg.norm(w))
    return float(np.linalg.norm(w - approx)) / norm if norm > 0 else float(np.linalg.norm(approx))


def _fit_kernels_to_inputs(
    w: np.ndarray,
    x: np.ndarray,
    kernels0: np.ndarray,
    modulations: np.ndarray,
    sup: np.ndarray,
    g: FiniteGroup,
    max_iter: int,
    damping: float,
) -> tuple[np.ndarray, float]:
    """Minimise ``||(W - W_gm(b)) X^T||^2 + mu ||W - W_gm(b)||^2`` over kernels b, modulations fixed (LSQR).

    ``mu = damping * mean(diag(X^T X))`` is a ridge towards W, as GPTQ's dampening: it is the same
    problem with X stacked on ``sqrt(mu) I``, whose product with ``W_gm`` costs nothing extra.
    """
    if x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"calibration inputs must have shape (samples, {w.shape[1]}), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("calibration inputs contain NaN or inf values")
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    x_report = x
    # ||A X^T|| == ||A R^T|| for X = Q R: work with the (at most in x in) triangular factor.
    if x.shape[0] > x.shape[1]:
        x = scipy.linalg.qr(x, mode="r")[0][: x.shape[1]]
    sqrt_mu = np.sqrt(damping * float((x**2).sum(axis=0).mean()))
    c_out, c_in = kernels0.shape[1:3]
    n_out = w.shape[0] * x.shape[0]
    target = np.concatenate([(w @ x.T).ravel(), sqrt_mu * w.ravel()])
    scale = float(np.linalg.norm(target)) or 1.0

    def matvec(b: np.ndarray) -> np.ndarray:
        dense = relaxed_dense(b.reshape(kernels0.shape), modulations, sup, g)
        return np.concatenate([(dense @ x.T).ravel(), sqrt_mu * dense.ravel()]) / scale

    def rmatvec(resid: np.ndarray) -> np.ndarray:
        grad = resid[:n_out].reshape(w.shape[0], x.shape[0]) @ x + sqrt_mu * resid[n_out:].reshape(w.shape)
        coef = _block_coefficients(grad / scale, g, c_out, c_in)[:, :, sup, :]  # (o, c, s, p)
        return np.einsum("ocsp,kop->kocs", coef, modulations).ravel()

    op = scipy.sparse.linalg.LinearOperator(
        (target.size, kernels0.size), matvec=matvec, rmatvec=rmatvec, dtype=np.float64
    )
    result = scipy.sparse.linalg.lsqr(op, target / scale, x0=kernels0.ravel(), atol=1e-8, btol=1e-8, iter_lim=max_iter)
    kernels = result[0].reshape(kernels0.shape)
    reference = w @ x_report.T
    resid = reference - relaxed_dense(kernels, modulations, sup, g) @ x_report.T
    return kernels, float(np.linalg.norm(resid)) / (float(np.linalg.norm(reference)) or 1.0)
