"""The plain (Frobenius) fit of a dense weight by a relaxed group matrix, on numpy: the modulations every fit
starts from, and the whole fit when no calibration data is given."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..core.checks import check_finite, check_rank
from ..core.patterns import GMFit, Pattern, channel_counts, class_sums, resolve_support

__all__ = ["plain_fit", "plain_project", "relative_error"]


def plain_fit(
    w: np.ndarray,
    pattern: Pattern,
    rank: int = 1,
    modulate: bool = True,
    support: Iterable[int] | None = None,
    what: str = "weight",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kernels ``(r, c_out, c_in, |S|)``, modulations ``(r, c_out, n_out)`` and support of the Frobenius fit.

    Per output channel the scaled class sums ``F`` (``(c_in |S|) x n_out``) are projected on their top-r
    right singular subspace ``V`` (Eckart-Young): ``F V V^T``, so ``b = F V / sqrt(n)`` and ``a = V sqrt(n)``.
    ``V`` comes from the eigenvectors of the small Gram matrix ``F^T F`` (``n_out x n_out``), which is
    much faster than an SVD of the tall ``F``; ``F V V^T`` stays exact when r = n_out.
    """
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D weight, got shape {w.shape}")
    check_finite(w, what)
    c_out, c_in = channel_counts(w.shape, pattern, what)
    n = pattern.n_out
    sup = resolve_support(pattern, support)
    rank = check_rank(rank, n, modulate, what)
    root_m = np.sqrt(pattern.counts[sup])[:, None]
    f = class_sums(w, pattern, c_out, c_in)  # (o, c, class, p)
    f = f if sup.size == pattern.n_classes else f[:, :, sup, :]
    f = f if (pattern.counts == 1).all() else f / root_m  # scaled means
    if not modulate:
        return (f.mean(axis=-1) / root_m[:, 0])[None], np.ones((1, c_out, n)), sup
    stacked = f.reshape(c_out, c_in * sup.size, n)
    k = min(rank, c_in * sup.size, n)
    _, vecs = np.linalg.eigh(np.matmul(stacked.transpose(0, 2, 1), stacked))  # ascending eigenvalues
    v = vecs[:, :, ::-1][:, :, :k]  # (o, p, k): top-k right singular vectors
    sign = np.where(v.sum(axis=1) < 0, -1.0, 1.0)[:, None, :]  # make the modulations mostly positive
    v = v * sign
    modulations = (v * np.sqrt(n)).transpose(2, 0, 1)
    kernels = (np.matmul(stacked, v) / np.sqrt(n)).transpose(2, 0, 1).reshape(k, c_out, c_in, sup.size)
    kernels = kernels / root_m[:, 0]  # (k, o, c, s): small
    if k < rank:  # fewer singular values than asked: pad with zero terms
        kernels = np.concatenate([kernels, np.zeros((rank - k, c_out, c_in, sup.size))])
        modulations = np.concatenate([modulations, np.ones((rank - k, c_out, n))])
    return kernels, modulations, sup


def relative_error(w: np.ndarray, approx: np.ndarray) -> float:
    norm = float(np.linalg.norm(w))
    return float(np.linalg.norm(w - approx)) / norm if norm > 0 else float(np.linalg.norm(approx))


def plain_project(
    w: np.ndarray, pattern: Pattern, rank: int = 1, modulate: bool = True, support: Iterable[int] | None = None,
    what: str = "weight",
) -> GMFit:
    """The plain fit of ``w`` as a :class:`GMFit` (:func:`plain_fit` with its relative error)."""
    w = np.asarray(w, dtype=np.float64)
    kernels, modulations, sup = plain_fit(w, pattern, rank, modulate, support, what)
    fit = GMFit(pattern, kernels, modulations, sup, 0.0, modulate, False, None)
    fit.relative_error = relative_error(w, fit.dense())
    return fit
