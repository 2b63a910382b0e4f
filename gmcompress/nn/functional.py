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


@dataclass(frozen=True)
class GroupedPlan:
    """The block basis packed into ``groups`` equal groups of ``size`` coordinates: one batched product mixes all.

    Blocks are packed first-fit by decreasing size into groups of capacity ``size`` (the largest block); a
    group that is not full is completed with zero coordinates (zero columns of ``q``), so every group has
    the same width and a single ``bmm`` (Linear) or ``groups=`` convolution (convs) does all the block
    mixing. ``q`` is ``(N, groups * size)`` with columns ordered (group, coordinate); ``members`` lists
    ``(group, offset, class, block)`` for every block of :func:`block_plan`.
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
    for slot, offset, c, b in members:
        d = plan.classes[c][0]
        start = [s for s, sz in zip(basis.offsets, basis.blocks) if sz == d][b]
        q[:, slot * size + offset : slot * size + offset + d] = basis.q[:, start : start + d]
    return GroupedPlan(q, len(fill), size, tuple(members))


def grouped_weights(kernels: torch.Tensor, rho: list[torch.Tensor], plan: GroupedPlan) -> torch.Tensor:
    """The packed block weights ``(groups, size * r c_out, size * c_in')`` of kernels ``(r, c_out, c_in', |S|)``.

    Block b maps input coordinates y (times input channels) to output coordinates x (times terms k and
    output channels o): ``W_b[(x, k, o), (y, i)] = sum_s kernels[k, o, i, s] rho[s, y, x, b]``; the blocks of
    a packed group sit on its diagonal, zeros elsewhere. (A convolution's offsets are folded into i.)
    """
    r, c_out, cin, _ = kernels.shape
    rco, size = r * c_out, plan.size
    per_class = [torch.einsum("kocs,syxb->bxkoyc", kernels, rho_c).flatten(2, 3) for rho_c in rho]
    w = kernels.new_zeros(plan.groups, size, rco, size, cin)
    for slot, offset, c, b in plan.members:
        d = per_class[c].shape[1]
        w[slot, offset : offset + d, :, offset : offset + d] = per_class[c][b]
    return w.view(plan.groups, size * rco, size * cin)


def modulated_basis(modulations: torch.Tensor | None, q: torch.Tensor, c_out: int) -> torch.Tensor:
    """``back[o, p, (k, m)] = a[k, o, p] q[p, m]``: the way back from the packed basis with the modulations
    and the sum over the rank folded in (``a = 1`` without modulations)."""
    a = modulations if modulations is not None else q.new_ones(1, c_out, q.shape[0])
    return torch.einsum("kop,pm->opkm", a, q).reshape(c_out, q.shape[0], -1)


def blocks_forward(
    x: torch.Tensor, q: torch.Tensor, weight_t: torch.Tensor, modulations: torch.Tensor | None, c_out: int
) -> torch.Tensor:
    """``x (B, c_in, N) -> (B, c_out N)``: transform, one ``bmm`` over the packed groups, transform back, modulate.

    ``weight_t`` is :func:`grouped_weights` transposed, ``(groups, size c_in, size r c_out)``. The way back is one
    GEMM over every (row, channel, term): ``u[b, o, k, p] = sum_m yt[b, o, k, m] q[p, m]``, then
    ``y[b, o, p] = sum_k a[k, o, p] u[b, o, k, p]`` (``a = 1`` without modulations), elementwise. (A bmm batched
    over output channels with the modulations folded into the basis did the same in c_out tiny products.)
    """
    batch, c_in, n = x.shape
    groups, m = weight_t.shape[0], q.shape[1]
    size = m // groups
    r = 1 if modulations is None else modulations.shape[0]
    z = torch.matmul(x, q).view(batch, c_in, groups, size).permute(2, 0, 3, 1).reshape(groups, batch, size * c_in)
    yt = torch.bmm(z, weight_t)  # (G, B, size r c_out), columns (x, k, o)
    yt = yt.view(groups, batch, size, r, c_out).permute(1, 4, 3, 0, 2).reshape(batch * c_out * r, m)  # rows (b, o, k)
    u = torch.mm(yt, q.t())
    if modulations is None:
        return u.view(batch, c_out * n)
    if r == 1:
        return (u.view(batch, c_out, n) * modulations[0]).view(batch, c_out * n)
    return (u.view(batch, c_out, r, n) * modulations.transpose(0, 1)).sum(2).view(batch, c_out * n)


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
