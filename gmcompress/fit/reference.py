"""The reference fits on numpy/scipy: :func:`project` and :func:`project_pattern`, whose activation-aware fit
solves the least-squares problem on the calibration rows with scipy's LSQR. The tests and benchmarks compare
the fast fits of :mod:`gmcompress.fit.aware` with these; compress does not call them."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import scipy.linalg
import scipy.sparse.linalg

from ..core.checks import check_finite, check_nonnegative
from ..core.groups import FiniteGroup, group
from ..core.patterns import GMFit, Pattern, class_sums, pattern_for, relaxed_dense
from .aware import DAMPING
from .plain import plain_fit, plain_project, relative_error

__all__ = ["project", "project_pattern"]


def project(
    w: np.ndarray,
    g: FiniteGroup | str,
    rank: int = 1,
    modulate: bool = True,
    support: Iterable[int] | None = None,
    inputs: np.ndarray | None = None,
    *,
    in_subgroup: Iterable[int] | None = None,
    out_subgroup: Iterable[int] | None = None,
    damping: float = DAMPING,
    max_iter: int = 100,
) -> GMFit:
    """Nearest (relaxed) group-matrix form of ``w`` (shape ``(c_out N, c_in N)``) in least squares.

    * ``modulate=False`` (rank 1 only): the exact GM projection, the mean along each group diagonal.
    * ``modulate=True``: per output channel, the truncated SVD of the stacked coefficient matrix
      (Eckart-Young), split as ``b = u s / sqrt(N)`` and ``a = v sqrt(N)`` (so ``a`` is ~1 near a GM).
    * ``support``: group elements the kernels may use; the other coefficients are fitted by 0.
    * ``in_subgroup`` / ``out_subgroup`` (element lists of subgroups H, K): fit a map between the coset
      spaces ``G/H -> G/K`` (features ``c * |G/H|``), kernels on the double cosets ``K\\G/H``
      (:func:`coset_pattern`); ``support`` elements then select their double cosets.
    * ``inputs`` (calibration activations, ``(samples, c_in N)``): the kernels minimise
      ``||(W - W_gm) X^T||_F`` instead, with the modulations from the plain fit held fixed
      (linear least squares, solved with LSQR from the plain fit). ``damping`` adds
      ``damping * mean(diag(X^T X)) * ||W - W_gm||_F^2`` so that few calibration samples do not
      overfit (0 = pure activation-aware, large = the plain fit).
    """
    pattern, classes = pattern_for(group(g), support, in_subgroup, out_subgroup)
    return project_pattern(w, pattern, rank, modulate, classes, inputs, damping=damping, max_iter=max_iter)


def project_pattern(
    w: np.ndarray,
    pattern: Pattern,
    rank: int = 1,
    modulate: bool = True,
    support: Iterable[int] | None = None,
    inputs: np.ndarray | None = None,
    *,
    damping: float = DAMPING,
    max_iter: int = 100,
    what: str = "weight",
) -> GMFit:
    """:func:`project` for any :class:`Pattern` (support given as kernel classes).

    With multiplicities ``m`` the least-squares problem is the SVD of ``F / sqrt(m)`` (class sums
    scaled), since ``||W - M||^2 = ||W||^2 - sum m mean^2 + sum m (mean - M)^2`` class by class.
    """
    if inputs is None:
        return plain_project(w, pattern, rank, modulate, support, what)
    w = np.asarray(w, dtype=np.float64)
    kernels, modulations, sup = plain_fit(w, pattern, rank, modulate, support, what)
    kernels, output_error = _fit_kernels_to_inputs(
        w, np.asarray(inputs, dtype=np.float64), kernels, modulations, sup, pattern, max_iter, damping
    )
    fit = GMFit(pattern, kernels, modulations, sup, 0.0, modulate, True, output_error)
    fit.relative_error = relative_error(w, fit.dense())
    return fit


def _fit_kernels_to_inputs(
    w: np.ndarray,
    x: np.ndarray,
    kernels0: np.ndarray,
    modulations: np.ndarray,
    sup: np.ndarray,
    pattern: Pattern,
    max_iter: int,
    damping: float,
) -> tuple[np.ndarray, float]:
    """Minimise ``||(W - W_gm(b)) X^T||^2 + mu ||W - W_gm(b)||^2`` over kernels b, modulations fixed (LSQR).

    ``mu = damping * mean(diag(X^T X))`` is a ridge towards W, as GPTQ's dampening: it is the same
    problem with X stacked on ``sqrt(mu) I``, whose product with ``W_gm`` costs nothing extra.
    """
    if x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"calibration inputs must have shape (samples, {w.shape[1]}), got {x.shape}")
    check_finite(x, "calibration inputs", "check the calibration data")
    damping = check_nonnegative(damping, "damping")
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
        dense = relaxed_dense(b.reshape(kernels0.shape), modulations, sup, pattern)
        return np.concatenate([(dense @ x.T).ravel(), sqrt_mu * dense.ravel()]) / scale

    def rmatvec(resid: np.ndarray) -> np.ndarray:
        grad = resid[:n_out].reshape(w.shape[0], x.shape[0]) @ x + sqrt_mu * resid[n_out:].reshape(w.shape)
        coef = class_sums(grad / scale, pattern, c_out, c_in)[:, :, sup, :]  # (o, c, s, p)
        return np.einsum("ocsp,kop->kocs", coef, modulations).ravel()

    op = scipy.sparse.linalg.LinearOperator(
        (target.size, kernels0.size), matvec=matvec, rmatvec=rmatvec, dtype=np.float64
    )
    result = scipy.sparse.linalg.lsqr(op, target / scale, x0=kernels0.ravel(), atol=1e-8, btol=1e-8, iter_lim=max_iter)
    kernels = result[0].reshape(kernels0.shape)
    reference = w @ x_report.T
    resid = reference - relaxed_dense(kernels, modulations, sup, pattern) @ x_report.T
    return kernels, float(np.linalg.norm(resid)) / (float(np.linalg.norm(reference)) or 1.0)
