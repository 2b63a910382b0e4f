"""Where kernel values land in a structured weight (:class:`Pattern`: plain group matrices, coset-space maps, tied
convolutions), the relaxed dense weight of kernels and modulations, and :class:`GMFit`, a fit's result.

Conventions of docs/design.md section 2; the algebra of single group matrices is in :mod:`gmcompress.core.algebra`,
the fits in :mod:`gmcompress.fit`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .groups import FiniteGroup, double_coset_ids, grid_action, left_cosets

__all__ = [
    "GMFit",
    "Pattern",
    "regular_pattern",
    "coset_pattern",
    "conv_pattern",
    "relaxed_dense",
    "class_sums",
    "channel_counts",
    "resolve_support",
    "pattern_for",
]


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


def class_sums(w: np.ndarray, pattern: Pattern, c_out: int, c_in: int) -> np.ndarray:
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


