"""The dense weight of kernels and modulations, and the real block-diagonal basis of a group: the torch kernels
both the GM layers (:mod:`gmcompress.nn.functional`) and the activation-aware fits (:mod:`gmcompress.fit.aware`)
build on. Layout conventions: docs/design.md section 2."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from .groups import FiniteGroup, regular_basis

__all__ = ["full_kernels", "materialize", "BlockPlan", "block_plan"]


def full_kernels(kernels: torch.Tensor, support: torch.Tensor | None, n_classes: int) -> torch.Tensor:
    """Scatter kernel values on the support into all ``n_classes`` classes (zeros elsewhere)."""
    if support is None:
        return kernels
    shape = (*kernels.shape[:-1], n_classes)
    return kernels.new_zeros(shape).index_copy(-1, support, kernels)


def materialize(
    kernels: torch.Tensor,
    modulations: torch.Tensor | None,
    support: torch.Tensor | None,
    index: torch.Tensor,
    n_classes: int,
) -> torch.Tensor:
    """Dense ``(c_out n_out, c_in n_in)`` weight: ``W[o p, c q] = sum_k a[k, o, p] b[k, o, c, index[p, q]]``."""
    r, c_out, c_in, _ = kernels.shape
    n_out, n_in = index.shape
    full = full_kernels(kernels, support, n_classes)
    blocks = full[..., index]  # (r, c_out, c_in, n_out, n_in)
    if modulations is None:
        w = blocks[0]
    else:
        w = torch.einsum("kocpq,kop->ocpq", blocks, modulations)
    return w.permute(0, 2, 1, 3).reshape(c_out * n_out, c_in * n_in)


@dataclass(frozen=True)
class BlockPlan:
    """The real block-diagonal basis of a group (:func:`gmcompress.groups.regular_basis`), per block size.

    Blocks of equal size d form a *class*; ``classes`` lists ``(d, nb, offset)`` and ``rho[c]`` has shape
    ``(N, d, d, nb)`` with ``rho[c][s, y, x, b] = (Q_b^T B_s Q_b)[x, y]``: what group diagonal ``B_s`` is on
    block b of class c. ``q`` is the basis with the columns of a class ordered (coordinate-in-block, block),
    starting at the class's ``offset``.
    """

    classes: tuple[tuple[int, int, int], ...]
    rho: tuple[np.ndarray, ...]
    q: np.ndarray


@functools.lru_cache(maxsize=64)
def block_plan(g: FiniteGroup) -> BlockPlan:
    basis = regular_basis(g)
    classes, rho, cols = [], [], []
    offset = 0
    for d in sorted(set(basis.blocks)):
        members = [s for s, size in zip(basis.offsets, basis.blocks) if size == d]
        nb = len(members)
        cols += [start + y for y in range(d) for start in members]
        qc = basis.q[:, cols[offset:]].reshape(g.order, d, nb)
        shifted = qc[g.table]  # [i, s, y, b] = qc[table[i, s], y, b]
        rho.append(np.einsum("ixb,isyb->syxb", qc, shifted))  # sum_i qc[i, x, b] qc[table[i, s], y, b]
        classes.append((d, nb, offset))
        offset += d * nb
    return BlockPlan(tuple(classes), tuple(rho), np.ascontiguousarray(basis.q[:, cols]))
