"""Group-matrix math on numpy/scipy, in the conventions of docs/design.md section 2.

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

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import scipy.sparse.linalg

from .checks import check_finite, check_nonnegative, check_rank
from .groups import FiniteGroup, double_coset_ids, grid_action, group, left_cosets

__all__ = [
    "GMFit",
    "group_matrix",
    "coefficients",
    "from_coefficients",
    "displacement",
    "displacement_rank",
    "Pattern",
    "regular_pattern",
    "coset_pattern",
    "conv_pattern",
    "relaxed_dense",
    "channel_counts",
    "resolve_support",
    "pattern_for",
    "project",
    "project_pattern",
    "plain_fit",
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


@dataclass(frozen=True)
class Pattern:
    """Where each kernel value lands in one ``(n_out x n_in)`` block of a structured weight.

    ``index[p, q]`` is the kernel class of entry ``(p, q)``: a group element ``g_p^{-1} g_q`` for a
    group matrix, a double coset for maps between coset spaces, an (element, pixel) pair for a group
    convolution. Every output position p sees each class exactly ``counts[class]`` times. The
    coefficient matrix generalises docs/design.md's F: ``F[class, p] = sum_{q: index[p, q] = class} W[p, q]``.
    """

    index: np.ndarray
    counts: np.ndarray
    name: str = ""

    # Plain ints kept on the instance: a forward that reads a numpy array's shape under torch.compile makes dynamo
    # guard on the array, and that guard fails on its own frame under torch.inference_mode (torch 2.13).
    @functools.cached_property
    def n_out(self) -> int:
        return int(self.index.shape[0])

    @functools.cached_property
    def n_in(self) -> int:
        return int(self.index.shape[1])

    @functools.cached_property
    def n_classes(self) -> int:
        return int(self.counts.shape[0])

    @functools.cached_property
    def _row_order(self) -> np.ndarray:
        return np.argsort(self.index, axis=1, kind="stable")

    @functools.cached_property
    def _starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]])

    def class_sums(self, m: np.ndarray) -> np.ndarray:
        """``(..., n_out, n_in) -> (..., n_classes, n_out)``: sums of the entries of each class, per row."""
        if (self.counts == 1).all() and self.n_in == self.n_classes:  # a permutation: plain gather
            inv = np.empty_like(self.index)
            np.put_along_axis(inv, self.index, np.arange(self.n_in)[None, :], axis=1)
            return m[..., np.arange(self.n_out)[None, :], inv.T]  # [..., s, p] = m[..., p, inv[p, s]], contiguous
        order = np.broadcast_to(self._row_order, m.shape)
        sums = np.add.reduceat(np.take_along_axis(m, order, axis=-1), self._starts, axis=-1)
        return np.swapaxes(sums, -1, -2)

    def expand(self, f: np.ndarray) -> np.ndarray:
        """``(..., n_classes, n_out) -> (..., n_out, n_in)``: ``M[p, q] = F[index[p, q], p]``."""
        return f[..., self.index, np.arange(self.n_out)[:, None]]


def _pattern_from_index(index: np.ndarray, name: str) -> Pattern:
    index = np.ascontiguousarray(index, dtype=np.int64)
    counts = np.bincount(index[0], minlength=int(index.max()) + 1)
    for row in index[1:]:
        if not np.array_equal(np.bincount(row, minlength=counts.size), counts):
            raise ValueError(f"pattern {name}: class multiplicities differ between output positions")
    index.setflags(write=False)
    counts.setflags(write=False)
    return Pattern(index, counts, name)


@functools.lru_cache(maxsize=128)
def regular_pattern(g: FiniteGroup) -> Pattern:
    """Group matrices: ``index[i, j] = idx(g_i^{-1} g_j)``, one entry of each element per row."""
    return _pattern_from_index(g.right_shift_index(), g.name)


@functools.lru_cache(maxsize=128)
def coset_pattern(g: FiniteGroup, in_subgroup: tuple[int, ...], out_subgroup: tuple[int, ...]) -> Pattern:
    """Maps from functions on ``G/H`` (``H = in_subgroup``) to functions on ``G/K`` (``K = out_subgroup``).

    ``y(sK) = sum_{rH} f(s^{-1} r) x(rH)`` with f bi-invariant (``f(k g h) = f(g)``), so the kernel
    lives on the double cosets ``K\\G/H`` and ``index[p, q]`` is the double coset of ``s_p^{-1} r_q``
    (coset representatives as in :func:`left_cosets`). H = K = {e} gives :func:`regular_pattern`.
    """
    in_reps = left_cosets(g, in_subgroup)[:, 0]
    out_reps = left_cosets(g, out_subgroup)[:, 0]
    ids = double_coset_ids(g, out_subgroup, in_subgroup)
    index = ids[g.table[g.inverse[out_reps][:, None], in_reps[None, :]]]
    return _pattern_from_index(index, f"{g.name}/({len(in_subgroup)}->{len(out_subgroup)})")


@functools.lru_cache(maxsize=128)
def conv_pattern(h: FiniteGroup, kernel_size: int, lifting: bool) -> Pattern:
    """Group convolution over a group H of the square (C2, C4, D2, D4) with ``k x k`` kernels.

    Positions are output orientations ``h_out``; a block's input axis is ``(h_in, pixel v)``
    (``pixel v`` alone when lifting). The tied weight is
    ``W[h_out, (h_in, v)] = psi(h_out^{-1} h_in, h_out^{-1} . v)`` (p4/p4m weight tying), so the kernel
    classes are pairs (relative element, pixel) — or pixels when lifting — and a relaxed form adds a
    modulation over output orientations.
    """
    perm = grid_action(h, kernel_size)  # (h . img).ravel() == img.ravel()[perm[h]]
    k2 = kernel_size * kernel_size
    n = h.order
    if lifting:
        index = perm.copy()  # class u = h_out^{-1} . v
    else:
        rel = h.table[h.inverse][:, :, None]  # (h_out, h_in, 1): h_out^{-1} h_in
        index = (rel * k2 + perm[:, None, :]).reshape(n, n * k2)
    return _pattern_from_index(index, f"{h.name}-conv{kernel_size}x{kernel_size}{'-lift' if lifting else ''}")


def channel_counts(shape: tuple[int, int], pattern: Pattern, what: str = "weight") -> tuple[int, int]:
    """``(c_out, c_in)`` for a ``(c_out*n_out, c_in*n_in)`` matrix, or a ValueError that says how to fix it."""
    out_f, in_f = shape
    if out_f % pattern.n_out or in_f % pattern.n_in:
        raise ValueError(
            f"{what} of shape (out={out_f}, in={in_f}) does not divide into {pattern.name} blocks: out must be a "
            f"multiple of {pattern.n_out} and in a multiple of {pattern.n_in} (the group order N={pattern.n_out}"
            f" for a plain group matrix). Pick a group whose order divides both, or pad "
            f"(on_mismatch='pad') / skip the layer."
        )
    return out_f // pattern.n_out, in_f // pattern.n_in


def resolve_support(pattern: Pattern, support: Iterable[int] | None) -> np.ndarray:
    """Sorted, unique kernel classes of the support (all classes when None)."""
    if support is None:
        return np.arange(pattern.n_classes)
    s = np.unique(np.asarray(list(support), dtype=np.int64))
    if s.size == 0 or s.min() < 0 or s.max() >= pattern.n_classes:
        raise ValueError(
            f"support must be a non-empty set of kernel classes of {pattern.name} (0..{pattern.n_classes - 1})"
        )
    return s


def relaxed_dense(kernels: np.ndarray, modulations: np.ndarray, support: np.ndarray, pattern: Pattern) -> np.ndarray:
    """Dense ``(c_out n_out, c_in n_in)`` matrix of ``W[o, c] = sum_k diag(a[k, o]) GM(b[k, o, c])``.

    ``kernels`` has shape ``(r, c_out, c_in, |S|)`` (values on the support), ``modulations``
    ``(r, c_out, n_out)``.
    """
    r, c_out, c_in, _ = kernels.shape
    full = np.zeros((r, c_out, c_in, pattern.n_classes), dtype=np.result_type(kernels, modulations))
    full[..., support] = kernels
    f = np.einsum("kocg,kop->ocgp", full, modulations)  # coefficient matrices per block
    blocks = pattern.expand(f)  # (c_out, c_in, n_out, n_in) [o, c, p, q]
    return blocks.transpose(0, 2, 1, 3).reshape(c_out * pattern.n_out, c_in * pattern.n_in)


def _class_sums(w: np.ndarray, pattern: Pattern, c_out: int, c_in: int) -> np.ndarray:
    blocks = w.reshape(c_out, pattern.n_out, c_in, pattern.n_in).transpose(0, 2, 1, 3)  # (o, c, p, q)
    return pattern.class_sums(blocks)  # (o, c, class, p)


@dataclass
class GMFit:
    """A least-squares fit of a dense matrix by a (relaxed) group matrix.

    ``kernels`` ``(r, c_out, c_in, |S|)``, ``modulations`` ``(r, c_out, n_out)``, ``support`` the kernel
    classes (group elements for a plain GM) the kernels live on;
    ``relative_error = ||W - dense()||_F / ||W||_F``.
    """

    pattern: Pattern
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
        return c_out * self.pattern.n_out, c_in * self.pattern.n_in

    @property
    def num_parameters(self) -> int:
        return int(self.kernels.size + (self.modulations.size if self.modulate else 0))

    def dense(self) -> np.ndarray:
        return relaxed_dense(self.kernels, self.modulations, self.support, self.pattern)


def pattern_for(
    g: FiniteGroup,
    support: Iterable[int] | None = None,
    in_subgroup: Iterable[int] | None = None,
    out_subgroup: Iterable[int] | None = None,
) -> tuple[Pattern, np.ndarray | None]:
    """The pattern of a plain GM (no subgroups) or of a coset-space map, and the support's kernel classes.

    ``support`` lists group elements; for coset spaces each element stands for its double coset.
    """
    if in_subgroup is None and out_subgroup is None:
        pattern = regular_pattern(g)
        return pattern, None if support is None else resolve_support(pattern, support)
    h = tuple(int(v) for v in (in_subgroup if in_subgroup is not None else [g.identity]))
    k = tuple(int(v) for v in (out_subgroup if out_subgroup is not None else [g.identity]))
    pattern = coset_pattern(g, h, k)
    if support is None:
        return pattern, None
    ids = double_coset_ids(g, k, h)
    return pattern, resolve_support(pattern, sorted({int(ids[s]) for s in support}))


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
    damping: float = 0.1,
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
    damping: float = 0.1,
    max_iter: int = 100,
    what: str = "weight",
) -> GMFit:
    """:func:`project` for any :class:`Pattern` (support given as kernel classes).

    With multiplicities ``m`` the least-squares problem is the SVD of ``F / sqrt(m)`` (class sums
    scaled), since ``||W - M||^2 = ||W||^2 - sum m mean^2 + sum m (mean - M)^2`` class by class.
    """
    w = np.asarray(w, dtype=np.float64)
    kernels, modulations, sup = plain_fit(w, pattern, rank, modulate, support, what)
    output_error = None
    if inputs is not None:
        kernels, output_error = _fit_kernels_to_inputs(
            w, np.asarray(inputs, dtype=np.float64), kernels, modulations, sup, pattern, max_iter, damping
        )
    fit = GMFit(pattern, kernels, modulations, sup, 0.0, modulate, inputs is not None, output_error)
    fit.relative_error = _relative_error(w, fit.dense())
    return fit


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
    f = _class_sums(w, pattern, c_out, c_in)  # (o, c, class, p)
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


def _relative_error(w: np.ndarray, approx: np.ndarray) -> float:
    norm = float(np.linalg.norm(w))
    return float(np.linalg.norm(w - approx)) / norm if norm > 0 else float(np.linalg.norm(approx))


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
        coef = _class_sums(grad / scale, pattern, c_out, c_in)[:, :, sup, :]  # (o, c, s, p)
        return np.einsum("ocsp,kop->kocs", coef, modulations).ravel()

    op = scipy.sparse.linalg.LinearOperator(
        (target.size, kernels0.size), matvec=matvec, rmatvec=rmatvec, dtype=np.float64
    )
    result = scipy.sparse.linalg.lsqr(op, target / scale, x0=kernels0.ravel(), atol=1e-8, btol=1e-8, iter_lim=max_iter)
    kernels = result[0].reshape(kernels0.shape)
    reference = w @ x_report.T
    resid = reference - relaxed_dense(kernels, modulations, sup, pattern) @ x_report.T
    return kernels, float(np.linalg.norm(resid)) / (float(np.linalg.norm(reference)) or 1.0)
