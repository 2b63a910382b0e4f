"""Torch kernels shared by the GM layers: dense materialisation and the block-diagonal fast path.

Layout conventions (docs/design.md section 2): features are channel-major, ``x.view(B, c, N)``. Kernels
``b`` have shape ``(r, c_out, c_in, |S|)``, modulations ``a`` shape ``(r, c_out, n_out)``; the weight
block of output channel o and input channel c is ``sum_k diag(a[k, o]) GM(b[k, o, c])``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..groups import FiniteGroup, regular_basis


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
    """The real block-diagonal basis of a group, arranged for the fast path.

    Blocks of equal size d are grouped in a *class*; inside a class the coordinates are ordered
    (coordinate-in-block, block), so ``Q^T x`` of a class viewed as ``(d, nb, ...)`` gives, for every
    coordinate, a contiguous stack over the blocks (batched GEMMs on plain views, no permutes).

    ``q`` is the permuted basis, ``classes`` lists ``(d, nb, offset)``, ``rho[c]`` is
    ``(N, d, d, nb)``-shaped: ``rho[c][s, y, x, b] = (Q_b^T B_s Q_b)[x, y]``. ``q_by_block`` holds the
    same columns ordered (class, block, coordinate-in-block) instead: the layout of grouped convolutions,
    whose groups (one per block) need their channels contiguous.
    """

    q: np.ndarray
    classes: tuple[tuple[int, int, int], ...]
    rho: tuple[np.ndarray, ...]
    q_by_block: np.ndarray


@functools.lru_cache(maxsize=64)
def block_plan(g: FiniteGroup) -> BlockPlan:
    basis = regular_basis(g)
    n = g.order
    cols, by_block, classes, rho = [], [], [], []
    offset = 0
    starts = basis.offsets
    for d in sorted(set(basis.blocks)):
        members = [s for s, size in zip(starts, basis.blocks) if size == d]
        nb = len(members)
        order = [start + y for y in range(d) for start in members]
        cols.extend(order)
        by_block.extend(start + y for start in members for y in range(d))
        qc = basis.q[:, order].reshape(n, d, nb)  # [i, coordinate, block]
        # rho[s, y, x, b] = sum_i qc[i, x, b] qc[table[i, s], y, b]
        shifted = qc[g.table]  # [i, s, y, b] = qc[table[i, s], y, b]
        rho.append(np.einsum("ixb,isyb->syxb", qc, shifted))
        classes.append((d, nb, offset))
        offset += d * nb
    q, q_by_block = (np.ascontiguousarray(basis.q[:, c]) for c in (cols, by_block))
    return BlockPlan(q, tuple(classes), tuple(rho), q_by_block)


def block_weights(kernels: torch.Tensor, rho: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per class, ``(d, d, nb, c_in, r c_out)`` block weights ``W[y, x, b][c, (k, o)]``.

    ``rho`` is restricted to the kernel support (``rho_c[s]`` for the support's elements s).
    """
    return [torch.einsum("kocs,syxb->yxbcko", kernels, rho_c).flatten(-2).contiguous() for rho_c in rho]


def block_forward(
    x: torch.Tensor, q: torch.Tensor, classes: tuple[tuple[int, int, int], ...], weights: list[torch.Tensor]
) -> torch.Tensor:
    """``x (B, c_in, N) -> (B, r c_out, N)``: transform, per-block batched GEMMs, transform back."""
    batch, c_in, n = x.shape
    z = torch.matmul(q.t(), x.reshape(batch * c_in, n).t())  # (N, B c_in) in the permuted basis
    pieces = []
    for (d, nb, offset), w in zip(classes, weights):
        zc = z[offset : offset + d * nb].view(d, nb, batch, c_in)
        for xo in range(d):
            acc = torch.bmm(zc[0], w[0, xo])
            for y in range(1, d):
                acc = torch.baddbmm(acc, zc[y], w[y, xo])
            pieces.append(acc)  # (nb, B, r c_out)
    yq = torch.cat(pieces, 0) if len(pieces) > 1 else pieces[0]
    rco = yq.shape[-1]
    return torch.matmul(yq.view(n, batch * rco).t(), q.t()).view(batch, rco, n)


def kernel_spectra(kernels_full: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Conjugated real FFT of kernels ``(r, c_out, c_in, N)`` over the cyclic factors: ``(r, c_out, c_in, F)``."""
    r, c_out, c_in, _ = kernels_full.shape
    dims = tuple(range(-len(shape), 0))
    kernels_full = kernels_full.to(_fft_dtype(kernels_full.dtype))
    return torch.fft.rfftn(kernels_full.reshape(r, c_out, c_in, *shape), dim=dims).flatten(3).conj()


def _fft_dtype(dtype: torch.dtype) -> torch.dtype:
    """FFTs of half types are not supported everywhere: run them in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def fft_forward(x: torch.Tensor, spectra: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``x (B, c_in, N) -> (B, r, c_out, N)`` by FFT over the cyclic factors (abelian groups).

    ``y_o(i) = sum_c sum_m f_{o,c}(m) x_c(i + m)`` (a cross-correlation), so in frequency
    ``Y_o = sum_c conj(F_{o,c}) X_c``; ``spectra`` is :func:`kernel_spectra`.
    """
    batch, c_in, n = x.shape
    r, c_out = spectra.shape[:2]
    dims = tuple(range(-len(shape), 0))
    xf = torch.fft.rfftn(x.reshape(batch, c_in, *shape).to(_fft_dtype(x.dtype)), dim=dims).flatten(2)
    yf = torch.einsum("bcf,kocf->bkof", xf, spectra)
    half = (*shape[:-1], shape[-1] // 2 + 1)
    y = torch.fft.irfftn(yf.reshape(batch, r, c_out, *half), s=shape, dim=dims)
    return y.reshape(batch, r, c_out, n).to(x.dtype)


@dataclass(frozen=True)
class GroupedPlan:
    """The block basis packed into ``groups`` equal groups of ``size`` coordinates, for one grouped convolution.

    Blocks are packed first-fit by decreasing size into groups of capacity ``size`` (the largest block);
    a group that is not full is completed with zero coordinates (zero columns of ``q``), so every group
    has the same width and a single ``groups=`` convolution does all the block mixing. ``q`` is
    ``(N, groups * size)`` with columns ordered (group, coordinate); ``members`` lists
    ``(group, offset, class, block)`` for every block of :func:`block_plan` (class and block index it).
    """

    q: np.ndarray
    groups: int
    size: int
    members: tuple[tuple[int, int, int, int], ...]


@functools.lru_cache(maxsize=64)
def grouped_plan(g: FiniteGroup) -> GroupedPlan:
    plan, basis = block_plan(g), regular_basis(g)
    size = max(d for d, _, _ in plan.classes)
    blocks = sorted(((d, c, b) for c, (d, nb, _) in enumerate(plan.classes) for b in range(nb)), key=lambda t: -t[0])
    fill: list[int] = []
    members = []
    for d, c, b in blocks:
        slot = next((i for i, used in enumerate(fill) if used + d <= size), len(fill))
        if slot == len(fill):
            fill.append(0)
        members.append((slot, fill[slot], c, b))
        fill[slot] += d
    q = np.zeros((g.order, len(fill) * size))
    starts = {}  # (class, block) -> first column of that block in the basis
    for c, (d, nb, _) in enumerate(plan.classes):
        same = [s for s, sz in zip(basis.offsets, basis.blocks) if sz == d]
        for b in range(nb):
            starts[c, b] = same[b]
    for slot, offset, c, b in members:
        d = plan.classes[c][0]
        q[:, slot * size + offset : slot * size + offset + d] = basis.q[:, starts[c, b] : starts[c, b] + d]
    return GroupedPlan(q, len(fill), size, tuple(members))


def grouped_conv_weights(
    kernels: torch.Tensor, rho: list[torch.Tensor], plan: GroupedPlan, offsets: int, kernel_size: tuple[int, ...]
) -> torch.Tensor:
    """The ``groups=plan.groups`` convolution weight ``(groups * size * r c_out, size * c_in, *kernel_size)``.

    ``kernels`` is ``(r, c_out, c_in * K, |S|)`` with the input index ordered (channel i, offset k). Block b
    maps its input coordinates y (times channels i) to output coordinates x (times terms k, channels o):
    ``W_b[(x, k, o), (y, i), offset] = sum_s kernels[k, o, (i, offset), s] rho[s, y, x, b]``; the blocks
    of a packed group sit on its diagonal, zeros elsewhere.
    """
    r, c_out, cik, _ = kernels.shape
    c_in, rco, size = cik // offsets, r * c_out, plan.size
    per_class = [torch.einsum("kocs,syxb->bxkoyc", kernels, rho_c).flatten(2, 3) for rho_c in rho]
    w = kernels.new_zeros(plan.groups, size, rco, size, cik)
    for slot, offset, c, b in plan.members:
        d = per_class[c].shape[1]
        w[slot, offset : offset + d, :, offset : offset + d] = per_class[c][b]
    w = w.view(plan.groups, size, rco, size, c_in, offsets)
    return w.reshape(plan.groups * size * rco, size * c_in, *kernel_size)


def grouped_conv_forward(
    x: torch.Tensor,
    q: torch.Tensor,
    weight: torch.Tensor,
    groups: int,
    conv: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    back: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x (B, c_in, N, H, W) -> (B, c_out N, H', W')``: channel transform, one grouped convolution, transform back.

    The transformed channels are laid out channels-last, ordered (coordinate m, channel i) so that each
    group's channels are contiguous (the fast layout of grouped convolutions on the CPU); ``q`` is
    :attr:`GroupedPlan.q` and ``conv(z, weight, groups)`` runs the layer's convolution. The way back
    folds the modulations and the sum over the rank: ``back[o, p, (k, m)] = a[k, o, p] q[p, m]``, one
    batched product per output channel, with the bias added by ``baddbmm``.
    """
    batch, c_in, n = x.shape[:3]
    spatial = x.shape[3:]
    m = q.shape[1]
    z = torch.matmul(q.t(), x.reshape(batch, c_in, n, -1))  # (B, c_in, M, HW)
    z = z.permute(0, 3, 2, 1).reshape(batch, *spatial, m * c_in).movedim(-1, 1)  # channels-last (m, i)
    yt = conv(z, weight, groups)  # (B, M * r * c_out, H', W'), channels (m, k, o)
    out_spatial = yt.shape[2:]
    c_out = back.shape[0]
    yt = yt.movedim(1, -1).reshape(batch, -1, m, yt.shape[1] // (m * c_out), c_out)  # (B, H'W', M, r, c_out)
    yt = yt.permute(0, 4, 3, 2, 1).reshape(batch * c_out, -1, yt.shape[1])  # (B c_out, r M, H'W')
    back = back.expand(batch, *back.shape).reshape(batch * c_out, n, -1)
    if bias is None:
        y = torch.bmm(back, yt)
    else:
        y = torch.baddbmm(bias.view(1, c_out, n, 1).expand(batch, c_out, n, 1).reshape(batch * c_out, n, 1), back, yt)
    return y.view(batch, c_out * n, *out_spatial)
