"""Torch kernels shared by the GM layers: dense materialisation and the block-diagonal fast path.

Layout conventions (docs/design.md section 2): features are channel-major, ``x.view(B, c, N)``. Kernels
``b`` have shape ``(r, c_out, c_in, |S|)``, modulations ``a`` shape ``(r, c_out, n_out)``; the weight
block of output channel o and input channel c is ``sum_k diag(a[k, o]) GM(b[k, o, c])``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core.groups import FiniteGroup, regular_basis
from ..core.kernels import block_plan


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


@dataclass(frozen=True)
class ProductPlan:
    """How :func:`blocks_forward` multiplies: ``z = x q_in`` (M coordinates), ``groups`` products over ``size``
    coordinates each (one ``bmm``), and the way back ``u = t q_out^T``.

    Two forms. *Gauss* (``parts`` set), for groups whose real block basis has only 1x1 blocks and 2x2 blocks
    of complex type (every abelian group): a complex-type block's weight is ``[[P, Q], [-Q, P]]`` (rows the
    input coordinate y, columns the output coordinate x; P, Q are ``c_in x r c_out``), i.e.
    ``out0 = z0 P - z1 Q``, ``out1 = z0 Q + z1 P``. Gauss's trick needs three products instead of four:
    ``k1 = z0 P``, ``k2 = z1 Q``, ``k3 = (z0 + z1)(P + Q)``, ``out0 = k1 - k2``, ``out1 = k3 - k1 - k2``.
    The input sum folds into the basis change (columns ``q0, q1, q0 + q1`` of ``q_in``) and the output sums
    into the way back (columns ``q0 - q1, -(q0 + q1), q1`` of ``q_out``), so every product has width one:
    ``M = n_1 + 3 n_2`` products of ``c_in x r c_out`` (11 instead of 16 for C8, 23 instead of 32 for C16),
    and the weights are about 0.7 of the packed form's (11/16, 23/32). ``parts[j] = (class, block, role)``:
    role 0 a 1x1 block, 1, 2, 3 the P, Q, P + Q of a 2x2 block, ordered by role (all 1x1 blocks, all P, all Q,
    all P + Q): the first N products multiply by a spectrum (:func:`spectrum_map`) as it is stored, and only the
    ``P + Q`` are derived (:func:`gauss_weights`). *Packed* (``packing`` set): :func:`grouped_plan`.
    """

    q_in: np.ndarray
    q_out: np.ndarray
    groups: int
    size: int
    parts: tuple[tuple[int, int, int], ...] | None = None
    packing: GroupedPlan | None = None
    coordinates: int = field(init=False)  # M, the columns of q_in: a plain int for forward code (see below)

    def __post_init__(self) -> None:
        # forward code under torch.compile reads this int, not q_in's shape: a numpy array read there makes dynamo
        # guard on it, and that guard fails on its own frame under torch.inference_mode (torch 2.13)
        object.__setattr__(self, "coordinates", int(self.q_in.shape[1]))


@functools.lru_cache(maxsize=64)
def product_plan(g: FiniteGroup, gauss: bool = True) -> ProductPlan:
    """The Gauss form of ``g``'s block products when every block allows it (and ``gauss``), else the packed
    form. Fewer multiply-adds in the Gauss form; the packed one has twice the width per product, which runs
    faster when there are few output channels (``paths`` times both)."""
    plan = block_plan(g)
    if gauss and all(d == 1 or (d == 2 and _complex_type(rho)) for (d, _, _), rho in zip(plan.classes, plan.rho)):
        columns = {}  # (class, block, role) -> (q_in column, q_out column)
        for c, (d, nb, offset) in enumerate(plan.classes):
            for b in range(nb):
                q0 = plan.q[:, offset + b]
                if d == 1:
                    columns[c, b, 0] = (q0, q0)
                    continue
                q1 = plan.q[:, offset + nb + b]  # columns are (coordinate-in-block, block)
                columns.update({(c, b, 1): (q0, q0 - q1), (c, b, 2): (q1, -(q0 + q1)), (c, b, 3): (q0 + q1, q1)})
        parts = sorted(columns, key=lambda part: (part[2], part[0], part[1]))  # role-major (see spectrum_map)
        q_in, q_out = zip(*(columns[part] for part in parts))
        return ProductPlan(np.stack(q_in, 1), np.stack(q_out, 1), len(parts), 1, tuple(parts))
    packed = grouped_plan(g)
    return ProductPlan(packed.q, packed.q, packed.groups, packed.size, packing=packed)


def has_gauss_blocks(g: FiniteGroup) -> bool:
    """Whether the Gauss form of ``g``'s products differs from the packed one (it has 2x2 blocks): then the
    layers offer both as paths of their own."""
    parts = product_plan(g).parts
    return parts is not None and any(role for _, _, role in parts)


def _complex_type(rho: np.ndarray) -> bool:
    """Whether every ``rho[s, :, :, b]`` (2x2) is ``[[c, -s], [s, c]]``: commutes with a quarter turn."""
    return bool(
        np.allclose(rho[:, 0, 0], rho[:, 1, 1], atol=1e-9) and np.allclose(rho[:, 0, 1], -rho[:, 1, 0], atol=1e-9)
    )


def product_weights(kernels: torch.Tensor, rho: list[torch.Tensor], plan: ProductPlan) -> torch.Tensor:
    """The ``(groups, size c_in', size r c_out)`` right-hand sides of the block products (rows ``(y, i)``,
    columns ``(x, k, o)``) for kernels ``(r, c_out, c_in', |S|)``."""
    if plan.parts is None:
        return grouped_weights(kernels, rho, plan.packing).transpose(1, 2)
    # w[c][b, y, x, i, (k, o)] = sum_s kernels[k, o, i, s] rho_c[s, y, x, b]: block b's weight, input y, output x
    w = [torch.einsum("kocs,syxb->byxcko", kernels, rho_c).flatten(4) for rho_c in rho]
    pieces = []
    for c, b, role in plan.parts:  # role 0: a 1x1 block's value, 1: P, 2: Q, 3: P + Q
        p = w[c][b, 0, 0] if role != 2 else w[c][b, 0, 1]
        pieces.append(p + w[c][b, 0, 1] if role == 3 else p)
    return torch.stack(pieces)


def spectrum_map(g: FiniteGroup) -> np.ndarray | None:
    """The ``(N, N)`` map ``T`` with ``spectrum[f] = sum_s T[f, s] kernels[..., s]`` for groups whose blocks have a
    Gauss form (1x1 blocks and complex-type 2x2 blocks ``[[P, Q], [-Q, P]]``: every abelian group), else None.

    The spectrum's rows are the free block coordinates: the 1x1 blocks' values, then every 2x2 block's P, then
    every 2x2 block's Q (each block in :func:`block_plan` order). ``T`` is invertible: the real block basis is a
    change of basis of the group algebra, and these are its coordinates without repetition.
    """
    plan = product_plan(g)
    if plan.parts is None:
        return None
    rho = block_plan(g).rho
    rows = [rho[c][:, 0, 0, b] for c, b, role in plan.parts if role in (0, 1)]  # the 1x1 values, then every P
    rows += [rho[c][:, 0, 1, b] for c, b, role in plan.parts if role == 1]  # every Q
    return np.stack(rows)


def gauss_weights(spectrum: torch.Tensor, n_pairs: int) -> torch.Tensor:
    """The right-hand sides ``(M, c_in, r c_out)`` of the Gauss products (:func:`product_plan`, role-major) from a
    spectrum ``(N, c_in, r c_out)`` (:func:`spectrum_map`) with ``n_pairs`` 2x2 blocks: the spectrum as it is
    stored, then every ``P + Q`` (:func:`pair_sums`)."""
    if n_pairs == 0:
        return spectrum
    return torch.cat([spectrum, pair_sums(spectrum, n_pairs)])


def pair_sums(spectrum: torch.Tensor, n_pairs: int) -> torch.Tensor:
    """``P + Q`` of every 2x2 block of a spectrum ``(N, c_in, r c_out)``: the weights of the last ``n_pairs`` Gauss
    products, the only ones not stored."""
    n = spectrum.shape[0]
    return spectrum[n - 2 * n_pairs : n - n_pairs] + spectrum[n - n_pairs :]


@functools.lru_cache(maxsize=64)
def direct_plan(g: FiniteGroup) -> tuple[np.ndarray, np.ndarray] | None:
    """The basis changes ``(q_in, q_out)``, each ``(N, 2N)``, of :func:`direct_forward`: the block products read
    straight from a spectrum (:func:`spectrum_map`), four products a 2x2 block instead of Gauss's three, so that no
    weight is derived. None for groups without 2x2 blocks (their spectrum is already the products' weights).

    Every spectrum row ``f`` (a 1x1 value, a P or a Q) multiplies two rows of the transformed input, ``h = 0, 1``
    (column ``2 f + h``): for a 2x2 block with basis columns ``q0, q1`` both P and Q take ``(z0, z1) = (x q0, x
    q1)``; P's products go back along ``(q0, q1)`` and Q's along ``(q1, -q0)``, which is ``out0 = z0 P - z1 Q``,
    ``out1 = z0 Q + z1 P`` (:class:`ProductPlan`); a 1x1 value takes ``x q0`` and a zero row."""
    products = product_plan(g)
    if products.parts is None or not any(role == 1 for _, _, role in products.parts):
        return None
    plan = block_plan(g)
    n = g.order
    q_in, q_out = np.zeros((n, 2 * n)), np.zeros((n, 2 * n))

    def columns(c: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        _, nb, offset = plan.classes[c]
        return plan.q[:, offset + b], plan.q[:, offset + nb + b]

    singles = [(c, b) for c, b, role in products.parts if role == 0]
    pairs = [(c, b) for c, b, role in products.parts if role == 1]
    for f, (c, b) in enumerate(singles):
        q0 = plan.q[:, plan.classes[c][2] + b]
        q_in[:, 2 * f], q_out[:, 2 * f] = q0, q0
    for k, (c, b) in enumerate(pairs):
        q0, q1 = columns(c, b)
        p, q = len(singles) + k, len(singles) + len(pairs) + k
        q_in[:, 2 * p], q_in[:, 2 * p + 1], q_out[:, 2 * p], q_out[:, 2 * p + 1] = q0, q1, q0, q1
        q_in[:, 2 * q], q_in[:, 2 * q + 1], q_out[:, 2 * q], q_out[:, 2 * q + 1] = q0, q1, q1, -q0
    return q_in, q_out


def packed_index(g: FiniteGroup) -> tuple[np.ndarray, np.ndarray]:
    """Where the packed block weights (:func:`grouped_plan`, ``(groups, size y, size x)`` entries of ``c_in x r
    c_out``) take their values from a spectrum: entry ``e`` is ``sign[e] * spectrum[index[e]]`` (sign 0: zero)."""
    packing, plan = grouped_plan(g), product_plan(g)
    singles = sum(1 for _, _, role in plan.parts if role == 0)
    pairs = sum(1 for _, _, role in plan.parts if role == 1)
    index = np.zeros((packing.groups, packing.size, packing.size), dtype=np.int64)
    sign = np.zeros(index.shape)
    d_of = [d for d, _, _ in block_plan(g).classes]
    block_rank = {}  # (class, block) -> its place among blocks of its size, as spectrum_map orders them
    for c, b, role in plan.parts:
        if role in (0, 1):
            block_rank[c, b] = len([k for k in block_rank if d_of[k[0]] == d_of[c]])
    for slot, offset, c, b in packing.members:
        k = block_rank[c, b]
        if d_of[c] == 1:
            index[slot, offset, offset], sign[slot, offset, offset] = k, 1.0
            continue
        p, q = singles + k, singles + pairs + k
        for y, x, f, s in ((0, 0, p, 1.0), (0, 1, q, 1.0), (1, 0, q, -1.0), (1, 1, p, 1.0)):
            index[slot, offset + y, offset + x], sign[slot, offset + y, offset + x] = f, s
    return index, sign


def packed_weights(spectrum: torch.Tensor, index: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """The packed products' right-hand sides ``(groups, size c_in, size r c_out)`` (rows ``(y, i)``, columns ``(x, k,
    o)``) from a spectrum, with ``index`` and ``sign`` from :func:`packed_index`."""
    groups, size, _ = index.shape
    _, c_in, rco = spectrum.shape
    w = spectrum[index.reshape(-1)] * sign.reshape(-1, 1, 1)  # (groups size size, c_in, r c_out)
    return w.view(groups, size, size, c_in, rco).transpose(2, 3).reshape(groups, size * c_in, size * rco)


def blocks_forward(
    x: torch.Tensor,
    q_in: torch.Tensor,
    q_out: torch.Tensor,
    weight_t: torch.Tensor,
    modulations: torch.Tensor | None,
    c_out: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x (B, c_in N) -> (B, c_out N)``: transform, one ``bmm`` over the block products, transform back, modulate.

    ``q_in``, ``q_out`` and ``weight_t`` (``(groups, size c_in, size r c_out)``, columns ``(x, k, o)``) come from
    a :class:`ProductPlan` and :func:`product_weights`; ``bias`` (optional) is the ``(c_out N,)`` bias added at
    the end. The layouts are chosen so that the only reordering is one copy in chunks of ``r c_out``:

    - ``z[b, m, i] = sum_n q_in[n, m] x[b, i, n]``: one product batched over rows, ``(B, M, c_in)``; group g's
      coordinates are the contiguous slice ``m in [g size, (g+1) size)``, so ``z.view(B, G, size c_in)
      .transpose(0, 1)`` is the bmm's input without a copy.
    - ``t[g, b, (x, k, o)] = z[b, g] W_g``, copied to row-major ``(B, M, r c_out)``.
    - ``u[b, p, (k, o)] = sum_m q_out[p, m] t[b, m, (k, o)]``: the way back, batched over rows;
      ``y[b, o, p] = sum_k a[k, o, p] u[b, p, k, o]`` (``a = 1`` without modulations) reads ``u``
      transposed and writes the channel-major output once; the bias is added in the same pass.
    """
    (n, m), batch = q_in.shape, x.shape[0]
    c_in, groups = x.shape[1] // n, weight_t.shape[0]
    size = m // groups
    r = 1 if modulations is None else modulations.shape[0]
    z = _transformed(x, q_in)
    t = torch.bmm(z.view(batch, groups, size * c_in).transpose(0, 1), weight_t)  # (G, B, size r c_out)
    return _rows_back(t.transpose(0, 1).reshape(batch, m, r * c_out), q_out, modulations, c_out, bias)


def spectrum_forward(
    x: torch.Tensor,
    q_in: torch.Tensor,
    q_out: torch.Tensor,
    spectrum: torch.Tensor,
    n_pairs: int,
    modulations: torch.Tensor | None,
    c_out: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`blocks_forward` with Gauss's products on a stored spectrum ``(N, c_in, r c_out)`` with ``n_pairs`` 2x2
    blocks (``q_in``, ``q_out`` of :func:`product_plan`): the first N products multiply by the spectrum where it
    lies and the last ``n_pairs`` by ``P + Q`` (:func:`pair_sums`, the only weights derived), the two ``bmm`` writing
    into one buffer. Where ``out=`` is not allowed (autograd, autocast, vmap, compile; :func:`_may_write_into`), one
    ``bmm`` on the concatenated weights (:func:`gauss_weights`)."""
    if n_pairs == 0 or not _may_write_into(x, spectrum, modulations, bias):
        return blocks_forward(x, q_in, q_out, gauss_weights(spectrum, n_pairs), modulations, c_out, bias)
    (n, m), batch = q_in.shape, x.shape[0]
    z = _transformed(x, q_in).transpose(0, 1)  # (M, B, c_in), a view
    t = x.new_empty(m, batch, spectrum.shape[2])
    torch.bmm(z[:n], spectrum, out=t[:n])
    torch.bmm(z[n:], pair_sums(spectrum, n_pairs), out=t[n:])
    return _rows_back(t.transpose(0, 1), q_out, modulations, c_out, bias)


def _transformed(x: torch.Tensor, q_in: torch.Tensor) -> torch.Tensor:
    """The basis change of row-major products: ``z[b, m, i] = sum_n q_in[n, m] x[b, i, n]`` for ``x (B, c_in N)``,
    one product batched over rows, ``(B, M, c_in)`` contiguous."""
    n = q_in.shape[0]
    return torch.matmul(q_in.t(), x.reshape(x.shape[0], -1, n).transpose(1, 2))


def direct_forward(
    x: torch.Tensor,
    q_in: torch.Tensor,
    q_out: torch.Tensor,
    spectrum: torch.Tensor,
    modulations: torch.Tensor | None,
    c_out: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x (B, c_in N) -> (B, c_out N)`` with the spectrum ``(N, c_in, r c_out)`` itself as the products' weights
    (``q_in``, ``q_out`` from :func:`direct_plan`): one ``bmm`` of ``(N, 2B, c_in)`` against the stored parameter,
    no weight derived, so a call reads each weight once. It costs ``2N`` products a row against Gauss's ``M``
    (:func:`blocks_forward`), which pays off at few rows, where deriving the Gauss weights each call costs more
    than the products.

    Group-major: the basis change is one matrix product over every (row, channel), ``z[(b, i), (f, h)]``; one copy
    puts it in the bmm's layout ``(f, (h, b), i)``; the products' output ``(N, 2B, r c_out)`` is, as it lies, the
    ``(2N, B r c_out)`` right-hand side of the way back, one matrix product ``u = q_out t`` with rows ``p``; the
    modulated transpose writes the channel-major output once. Against the row-major layout of :func:`blocks_forward`
    it ran 1.05-1.76x faster at 1 row and 0.79-1.52x at 8; Gauss's products, at more rows, stay row-major, where
    this layout was 1.2-2.4x slower (docs/design.md, section 4)."""
    n, batch = q_in.shape[0], x.shape[0]
    c_in = x.shape[1] // n
    r = 1 if modulations is None else modulations.shape[0]
    rco = r * c_out
    z = torch.mm(x.reshape(batch * c_in, n), q_in)  # ((b, i), (f, h))
    z = z.view(batch, c_in, n, 2).permute(2, 3, 0, 1).reshape(n, 2 * batch, c_in)  # (f, (h, b), i)
    t = torch.bmm(z, spectrum)  # (N, 2B, r c_out): row (f, h) is column 2 f + h of q_out
    u = torch.mm(q_out, t.view(2 * n, batch * rco)).view(n, batch, r, c_out)  # (p, b, k, o)
    return _modulate(u.transpose(0, 1), modulations, bias).view(batch, c_out * n)  # read as (b, p, k, o)


def _rows_back(
    t: torch.Tensor, q_out: torch.Tensor, modulations: torch.Tensor | None, c_out: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """The way back of row-batched products ``t (rows, M, r c_out)`` -> ``(rows, c_out N)``: ``u = q_out t`` per
    row, the modulated, transposed product with the bias (:func:`_modulate`)."""
    n = q_out.shape[0]
    u = torch.matmul(q_out, t).view(t.shape[0], n, -1, c_out)
    return _modulate(u, modulations, bias).view(t.shape[0], c_out * n)


def _modulate(u: torch.Tensor, modulations: torch.Tensor | None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y[b, o, p] = sum_k a[k, o, p] u[b, p, k, o] + bias[o N + p]`` (``a = 1`` without modulations, no bias
    without one), contiguous, in the dtype of ``u`` (under autocast the products ran in the lower precision, as a
    dense layer's would). The bias goes into the same pass as the first term (``addcmul``, or ``add``)."""
    first = u[:, :, 0].transpose(1, 2)  # (B, c_out, N), read transposed
    b = None if bias is None else bias.to(u.dtype).view(first.shape[1:])
    if modulations is None:
        return first.contiguous() if b is None else torch.add(b, first).contiguous()
    a = modulations.to(u.dtype)
    # the modulations (or the bias) first: the result takes their (contiguous) layout, so .contiguous() copies nothing
    y = (torch.mul(a[0], first) if b is None else torch.addcmul(b, a[0], first)).contiguous()
    for k in range(1, a.shape[0]):
        y.addcmul_(u[:, :, k].transpose(1, 2), a[k])
    return y


def kernel_spectra(kernels_full: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Conjugated real FFT of kernels ``(r, c_out, c_in, N)`` over the cyclic factors, laid out for the products
    of :func:`fft_forward`: ``(F, c_in, r c_out)``, frequency-major, contiguous."""
    r, c_out, c_in, _ = kernels_full.shape
    dims = tuple(range(-len(shape), 0))
    kernels_full = kernels_full.to(_fft_dtype(kernels_full.dtype))
    spectra = torch.fft.rfftn(kernels_full.reshape(r, c_out, c_in, *shape), dim=dims).flatten(3).conj()
    return spectra.permute(3, 2, 0, 1).reshape(-1, c_in, r * c_out).contiguous()


def _fft_dtype(dtype: torch.dtype) -> torch.dtype:
    """FFTs of half types are not supported everywhere: run them in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def fft_forward(x: torch.Tensor, spectra: torch.Tensor, shape: tuple[int, ...], rank: int) -> torch.Tensor:
    """``x (B, c_in, N) -> (B, r, c_out, N)`` by FFT over the cyclic factors (abelian groups).

    ``y_o(i) = sum_c sum_m f_{o,c}(m) x_c(i + m)`` (a cross-correlation), so in frequency
    ``Y_o = sum_c conj(F_{o,c}) X_c``: one complex ``bmm`` over the frequencies, with ``spectra`` from
    :func:`kernel_spectra` (``(F, c_in, r c_out)``, read as it is stored: the product reads each spectrum once).
    """
    batch, c_in, n = x.shape
    dims = tuple(range(-len(shape), 0))
    xf = torch.fft.rfftn(x.reshape(batch, c_in, *shape).to(_fft_dtype(x.dtype)), dim=dims).flatten(2)
    yf = torch.bmm(xf.permute(2, 0, 1).contiguous(), spectra)  # (F, B, r c_out); strided, bmm copies per slice
    half = (*shape[:-1], shape[-1] // 2 + 1)
    y = torch.fft.irfftn(yf.permute(1, 2, 0).reshape(batch, rank, -1, *half), s=shape, dim=dims)
    return y.reshape(batch, rank, -1, n).to(x.dtype)


def grouped_conv_forward(
    x: torch.Tensor,
    q_in: torch.Tensor,
    q_out: torch.Tensor,
    weight: torch.Tensor,
    groups: int,
    conv: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None,
    modulations: torch.Tensor | None,
    back: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x (B, c_in N, H, W) -> (B, c_out N, H', W')``: channel transform, one grouped convolution, transform back.

    The block products of :func:`blocks_forward` with a convolution in place of each product: ``weight`` is
    ``(groups size r c_out, size c_in, kh, kw)`` (:func:`product_weights`, kernel offsets unfolded), its
    output channels ordered ``(m, k, o)``, and ``conv(z, weight, groups)`` runs the layer's convolution;
    ``conv=None`` says the convolution is pointwise (1x1 kernel, no padding, stride applied by the caller), and
    the products run as matrix products in NCHW (on small pointwise layers the grouped 1x1 convolution was
    1.5-2.6x slower, docs/design.md section 4). The work follows the input's memory format, and so does the
    output:

    - channels-last: every pixel is a row, exactly as in :func:`blocks_forward` (``z = x q_in`` batched over
      pixels, the convolution, ``u = q_out t`` batched over pixels, the modulated, transposed product);
    - contiguous (NCHW): ``z[b, (m, i), hw]`` by one product batched over (image, channel) and one copy in
      chunks of ``H W``; the way back reads the convolution's output in place, one
      ``y[b, o] = back[o] t[b, :, o]`` product per output channel with ``back`` from :func:`modulated_back`
      and the bias added by ``baddbmm`` (per image, straight into the output, when :func:`_may_write_into`
      allows; else after one copy of the convolution's output). When it allows (inference), the whole chain
      runs on :data:`CHUNK_BYTES` worth of images at a time, so each step reads what the step before wrote
      while it is still in cache.
    """
    batch, channels, height, width = x.shape
    n, m = q_in.shape
    c_in, c_out = channels // n, back.shape[0]
    r = 1 if modulations is None else modulations.shape[0]
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        rows = x.permute(0, 2, 3, 1).reshape(-1, channels)
        if conv is None:  # a pointwise convolution is the linear layer on the pixels
            weight_t = weight.view(groups, -1, weight.shape[1]).transpose(1, 2)
            y = blocks_forward(rows, q_in, q_out, weight_t, modulations, c_out, bias)
            return y.view(batch, height, width, c_out * n).permute(0, 3, 1, 2)
        z = _transformed(rows, q_in)  # (B H W, M, c_in)
        t = conv(z.view(batch, height, width, m * c_in).permute(0, 3, 1, 2), weight, groups)  # channels-last
        y = _rows_back(t.permute(0, 2, 3, 1).reshape(-1, m, r * c_out), q_out, modulations, c_out, bias)
        return y.view(batch, *t.shape[2:], c_out * n).permute(0, 3, 1, 2)
    b3 = bias.view(c_out, n, 1) if bias is not None else None
    if not _may_write_into(x, weight, back, bias):  # autograd, autocast, vmap, export: no out= arguments
        t, out_size = _nchw_products(x, q_in, weight, groups, conv, None)
        tv = t.view(batch, m * r, c_out, -1).transpose(1, 2).reshape(batch * c_out, m * r, -1)
        back = back.expand(batch, *back.shape).reshape(batch * c_out, n, -1)
        if b3 is None:
            y = torch.bmm(back, tv)
        else:
            y = torch.baddbmm(b3.expand(batch, c_out, n, 1).reshape(batch * c_out, n, 1), back, tv)
        return y.view(batch, c_out * n, *out_size)
    # inference: a few images at a time through the whole chain, so that its intermediates stay in cache
    # (CHUNK_BYTES; design.md section 4)
    per_image = max(c_in, r * c_out) * m * height * width * x.element_size()  # transformed input, products
    step = max(1, CHUNK_BYTES // per_image)
    y = t = None
    for start in range(0, batch, step):
        t, out_size = _nchw_products(x[start : start + step], q_in, weight, groups, conv, t)
        if y is None:
            y = x.new_empty(batch, c_out, n, t.shape[-1])
        tv = t.view(-1, m * r, c_out, t.shape[-1]).transpose(1, 2)  # (b, c_out, M r, H'W'), strided
        for b in range(tv.shape[0]):
            _way_back(back, tv[b], b3, out=y[start + b])
    return y.view(batch, c_out * n, *out_size)


CHUNK_BYTES = 2 << 20
"""Inference runs :func:`grouped_conv_forward` on as many images at a time (at least one) as keep the larger of
the transformed input and the products' output near this size (about one core's L2 cache here)."""


def _nchw_products(
    x: torch.Tensor,
    q_in: torch.Tensor,
    weight: torch.Tensor,
    groups: int,
    conv: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None,
    buffer: torch.Tensor | None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Channel transform and block products of contiguous ``x (b, c_in N, H, W)``: ``(b, M r c_out, H' W')`` and
    ``(H', W')``. ``buffer``: an earlier result for at least ``b`` images that the pointwise products may
    overwrite (inference), or None."""
    batch, channels, height, width = x.shape
    n, m = q_in.shape
    z = torch.matmul(q_in.t(), x.reshape(batch, channels // n, n, height * width))  # (b, c_in, M, HW)
    if conv is not None:
        t = conv(z.transpose(1, 2).reshape(batch, -1, height, width), weight, groups)
        return t.flatten(2), t.shape[2:]
    zg = _group_rows(z, groups)
    w = weight.view(groups, -1, zg.shape[2])
    if buffer is None and not _may_write_into(x, weight):
        return torch.matmul(w, zg).view(batch, -1, height * width), (height, width)
    t = buffer[:batch] if buffer is not None else x.new_empty(batch, groups, w.shape[1], height * width)
    t = t.view(batch, groups, w.shape[1], -1)
    for b in range(batch):
        torch.bmm(w, zg[b], out=t[b])
    return t.view(batch, -1, height * width), (height, width)


def _group_rows(z: torch.Tensor, groups: int) -> torch.Tensor:
    """``z (B, c_in, M, HW)`` -> ``(B, groups, size c_in, HW)``: each product's input rows ``(y, i)``, ``y < size``.
    Width-one products (``size`` 1) read the strided rows ``z[b, :, g]`` in place; wider ones are copied."""
    batch, c_in, m, hw = z.shape
    size = m // groups
    if size == 1:
        return z.transpose(1, 2)
    return z.view(batch, c_in, groups, size, hw).permute(0, 2, 3, 1, 4).reshape(batch, groups, size * c_in, hw)


def _way_back(back: torch.Tensor, t: torch.Tensor, b3: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """``out[o] = back[o] t[o] (+ b3[o])`` for one image: ``t (c_out, M r, H'W')``, ``out (c_out, N, H'W')``."""
    if b3 is None:
        return torch.matmul(back, t, out=out)
    return torch.baddbmm(b3, back, t, out=out)


def modulated_back(modulations: torch.Tensor | None, q_out: torch.Tensor, c_out: int) -> torch.Tensor:
    """``back[o, p, (m, k)] = a[k, o, p] q_out[p, m]`` (``a = 1`` without modulations): the way back of
    :func:`grouped_conv_forward` with the modulations and the sum over the rank folded in, ``(c_out, N, M r)``."""
    a = modulations if modulations is not None else q_out.new_ones(1, c_out, q_out.shape[0])
    return torch.einsum("kop,pm->opmk", a, q_out).reshape(c_out, q_out.shape[0], -1).contiguous()


def _may_write_into(*tensors: torch.Tensor | None) -> bool:
    """Whether a kernel may take an ``out=`` argument: nothing to record for autograd, no autocast, no
    functorch transform (vmap, grad), no tracing or export, one dtype (``out=`` functions support none of
    these)."""
    present = [t for t in tensors if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return False
    if len({t.dtype for t in present}) > 1 or torch.is_autocast_enabled(present[0].device.type):
        return False
    if torch._C._functorch.maybe_current_level() is not None:  # inside vmap / grad / jacrev
        return False
    return not (torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing())
