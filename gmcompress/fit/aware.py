"""Activation-aware fits from streamed input statistics, in torch (docs/design.md section 2.8).

With calibration rows X the kernels b minimise, the modulations of the plain fit held fixed,

    ||(W - W_gm) X^T||^2 + mu ||W - W_gm||^2 = tr(R H^ R^T),   R = W - W_gm(b),   H^ = X^T X + mu I,

``mu = damping * mean(diag(X^T X))``. Only ``H = X^T X`` is needed, so calibration keeps it per layer
(:class:`InputStats`, summed batch by batch) instead of the rows. The loss separates per output channel o
(the kernels ``b[:, o]`` only reach the rows of o), so the normal equations ``A_o b_o = c_o`` are solved
for every o at once by preconditioned conjugate gradients (:func:`solve`). ``A b`` applies ``b -> W_gm(b) H^``
and its adjoint; the preconditioner is the exact Hessian for constant modulations,
``Abar_o (x) M`` with ``Abar_o[k, l] = mean_p a[k, o, p] a[l, o, p]`` and ``M = sum_p T_p^T H^ T_p``
(``T_p`` places a kernel on output row p), which CG then corrects for the modulations' variation.

Two operators compute these products:

* :class:`BlockOperator` (plain group matrices, full support): in the real block basis Q of the group,
  ``GM(b) = Q B^(b) Q^T`` with B^ block-diagonal, so ``W_gm H^ (I x Q) = sum_k diag(a_k) Q (B^_k H~)``
  with ``H~ = (I x Q^T) H^ (I x Q)``: a block-sparse product that costs about ``4 r out in^2 / N``
  instead of ``2 out in^2``. M is a c_in x c_in matrix of group matrices, hence block-diagonal in Q too:
  its inverse is one small inverse per block.
* :class:`DenseOperator` (any :class:`~gmcompress.core.patterns.Pattern`, any support): materialise
  ``W_gm``, multiply by ``H^``, sum the classes back; M is assembled densely and factored once.

The heavy products run on H's device in float32 for large layers (float64 for small ones); CG vectors
and inner products are float64. :func:`gmcompress.fit.reference.project` with ``inputs`` (scipy LSQR on the
rows) is the reference the tests compare with.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from ..core.checks import check_nonnegative
from ..core.groups import FiniteGroup
from ..core.groups import group as as_group
from ..core.kernels import block_plan, materialize
from ..core.patterns import GMFit, Pattern, pattern_for, regular_pattern
from .plain import plain_fit, plain_project

__all__ = ["InputStats", "stats_dtype", "project", "project_pattern", "fit_kernels", "solve"]

DAMPING = 0.1  # the ridge of an activation-aware fit, relative to mean(diag(X^T X)): every damping default
SMALL_LAYER = 1 << 22  # weights; smaller layers run their products in float64


def stats_dtype(device: torch.device | str) -> torch.dtype:
    """float64 sums on the CPU, float32 on accelerators (fast, ample for a ridge fit)."""
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


@dataclass
class InputStats:
    """Calibration statistics of one layer: ``gram = X^T X`` over every row seen, and the row count.

    Adding batches one by one gives the same ``gram`` as all rows at once (``X^T X = sum_b X_b^T X_b``), so
    memory is ``fan_in^2`` numbers whatever the amount of calibration data.
    """

    gram: torch.Tensor
    rows: int = 0

    @classmethod
    def empty(cls, fan_in: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> InputStats:
        return cls(torch.zeros(fan_in, fan_in, device=device, dtype=dtype or stats_dtype(device)))

    @classmethod
    def from_rows(cls, x: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> InputStats:
        """Statistics of the rows ``x`` (``(samples, fan_in)``), on ``device`` (default: x's)."""
        x = torch.as_tensor(x)
        if x.ndim != 2:
            raise ValueError(f"calibration inputs must have shape (samples, fan_in), got {tuple(x.shape)}")
        stats = cls.empty(x.shape[1], device if device is not None else x.device)
        stats.update(x)
        return stats

    @classmethod
    def of(
        cls, inputs: np.ndarray | torch.Tensor | InputStats, fan_in: int, device: torch.device | str | None = None
    ) -> InputStats:
        """``inputs`` as statistics: given ones are checked, rows (any shape ending in ``fan_in``) are summed."""
        if not isinstance(inputs, InputStats):
            x = torch.as_tensor(inputs)
            if x.ndim < 2 or x.shape[-1] != fan_in:
                raise ValueError(f"calibration inputs must have shape (samples, {fan_in}), got {tuple(x.shape)}")
            inputs = cls.from_rows(x.reshape(-1, fan_in), device)
        if inputs.fan_in != fan_in:
            raise ValueError(f"calibration statistics are for {inputs.fan_in} features, the layer has {fan_in}")
        if inputs.rows == 0:
            raise ValueError("calibration statistics hold no rows")
        return inputs

    @property
    def fan_in(self) -> int:
        return int(self.gram.shape[0])

    def update(self, x: torch.Tensor) -> None:
        """Add the rows ``x`` (``(samples, fan_in)``): ``gram += x^T x``.

        The batch's product runs in the rows' precision (at least float32: float32 activations take the fast
        float32 GEMM, float64 rows stay exact) and is summed into ``gram``'s precision.
        """
        x = x.detach().reshape(-1, self.fan_in).to(self.gram.device)
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        if not bool(torch.isfinite(x).all()):
            raise ValueError("calibration inputs contain NaN or inf: check the calibration data")
        if x.dtype == self.gram.dtype:
            self.gram.addmm_(x.t(), x)
        else:
            self.gram += (x.t() @ x).to(self.gram.dtype)
        self.rows += int(x.shape[0])

    def padded(self, fan_in: int) -> InputStats:
        """The statistics of the rows zero-padded to ``fan_in`` features."""
        extra = fan_in - self.fan_in
        return self if extra == 0 else InputStats(torch.nn.functional.pad(self.gram, (0, extra, 0, extra)), self.rows)


def _spd_inverse(m: torch.Tensor) -> torch.Tensor:
    """Inverses of a batch of symmetric PSD matrices, ``L^{-T} L^{-1}`` from their Cholesky factors ``L``, with a
    growing jitter if one is singular (``torch.cholesky_inverse`` is far slower on the CPU)."""
    scale = torch.diagonal(m, dim1=-2, dim2=-1).mean(-1, keepdim=True).clamp_min(1e-300)
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    for jitter in (0.0, 1e-10, 1e-8, 1e-6, 1e-4):
        factor, info = torch.linalg.cholesky_ex(m + jitter * scale[..., None] * eye)
        if not bool((info != 0).any()):
            inv_factor = torch.linalg.solve_triangular(factor, eye.expand_as(factor), upper=False)
            return inv_factor.transpose(-2, -1) @ inv_factor
    raise RuntimeError("activation-aware fit: the input covariance could not be factored")


class DenseOperator:
    """Products with ``b -> W_gm(b) H^`` for any pattern: materialise, multiply, sum classes back.

    Coordinates: rows are output features, columns input features (no change of basis). Every method
    takes the modulations ``a`` of the output channels it works on (CG drops converged channels).
    """

    def __init__(self, hhat: torch.Tensor, pattern: Pattern, sup: torch.Tensor, c_in: int) -> None:
        self.hhat, self.sup, self.c_in, self.dtype = hhat, sup, c_in, hhat.dtype
        self.index = torch.tensor(pattern.index, device=hhat.device)
        self.n_classes = pattern.n_classes
        self.m_inv = _spd_inverse(self._average_hessian(hhat.double())).to(self.dtype)

    def transform(self, m: torch.Tensor) -> torch.Tensor:
        return m

    def dense(self, v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``W_gm(v)``, ``(c_out n_out, c_in n_in)``."""
        return materialize(v, a, self.sup, self.index, self.n_classes)

    def product(self, v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``W_gm(v) H^``."""
        return self.dense(v, a) @ self.hhat

    def adjoint(self, y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Adjoint of :meth:`dense`: ``g[k, o, c, s] = sum_p a[k, o, p] sum_{q: index[p, q] = s} Y[o p, c q]``."""
        n_out, n_in = self.index.shape
        y4 = y.view(-1, n_out, self.c_in, n_in).transpose(1, 2)  # (o, c, p, q)
        sums = _class_sums(y4, self.index, self.n_classes)[..., self.sup]  # (o, c, p, s)
        return torch.einsum("ocps,kop->kocs", sums, a)

    def hessian(self, v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.adjoint(self.product(v, a), a)

    def _average_hessian(self, hhat: torch.Tensor) -> torch.Tensor:
        """``M = sum_p T_p^T H^ T_p`` on the support: ``M[(c, s), (c', s')]`` sums H^ over the class pairs of row p."""
        n_out, n_in = self.index.shape
        h4 = hhat.view(self.c_in, n_in, self.c_in, n_in)
        m = hhat.new_zeros(self.c_in, self.n_classes, self.c_in, self.n_classes)
        for p in range(n_out):
            cols = _class_sums(h4, self.index[p : p + 1], self.n_classes)  # (c, q, c', s')
            m += _class_sums(cols.permute(0, 2, 3, 1), self.index[p : p + 1], self.n_classes).permute(0, 3, 1, 2)
        m = m[:, self.sup][:, :, :, self.sup]
        size = self.c_in * len(self.sup)
        return m.reshape(size, size)

    def precondition(self, r: torch.Tensor) -> torch.Tensor:
        """``M^{-1} r`` for every (rank term, output channel)."""
        rk, c_out, c_in, s = r.shape
        rhs = r.permute(2, 3, 0, 1).reshape(c_in * s, rk * c_out).to(self.dtype)
        return (self.m_inv @ rhs).double().reshape(c_in, s, rk, c_out).permute(2, 3, 0, 1)


def _class_sums(y: torch.Tensor, index: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``(..., n_rows, n_in) -> (..., n_rows, n_classes)``: entries of each class summed, row by row.

    ``index`` is ``(n_rows, n_in)`` or ``(1, n_in)`` (the same classes for every row).
    """
    idx = index.expand(*y.shape[:-2], y.shape[-2], index.shape[-1])
    return y.new_zeros(*y.shape[:-1], n_classes).scatter_add_(-1, idx, y)


class BlockOperator:
    """Products with ``b -> W_gm(b) H^`` for plain group matrices (regular pattern, full support).

    Coordinates: rows are output features, columns the block-basis coordinates ``(c, j)`` of the inputs
    (``transform(m) = m (I x Q)``, Q the permuted basis of :func:`~gmcompress.core.kernels.block_plan`,
    whose classes order the coordinates of equal-size blocks as ``off + y * nb + b``).
    """

    def __init__(self, hhat: torch.Tensor, g: FiniteGroup, c_in: int) -> None:
        plan = block_plan(g)
        dev, dtype = hhat.device, hhat.dtype
        self.c_in, self.n, self.dtype, self.classes = c_in, g.order, dtype, plan.classes
        self.q = torch.as_tensor(plan.q, device=dev, dtype=dtype)
        self.index = torch.tensor(g.right_shift_index(), device=dev)
        self.table = torch.tensor(g.table, device=dev)
        self.rho = [torch.as_tensor(r, device=dev, dtype=dtype) for r in plan.rho]
        self.m_inv = self._preconditioner(hhat, plan.rho)
        ht = self.transform(hhat).view(c_in, self.n, -1)  # columns to the basis
        ht = torch.einsum("ij,cif->cjf", self.q, ht)  # rows too: H~, rows (c, j)
        self.h_blocks = [  # per class: (nb, c_in d, fan_in), rows (c, y) of block b
            ht[:, off : off + d * nb].reshape(c_in, d, nb, -1).permute(2, 0, 1, 3).reshape(nb, c_in * d, -1)
            for d, nb, off in self.classes
        ]

    def transform(self, m: torch.Tensor) -> torch.Tensor:
        """``m (I x Q)``: the input side of ``m`` in block coordinates."""
        return (m.reshape(m.shape[0], self.c_in, self.n) @ self.q).reshape(m.shape)

    def dense(self, v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``W_gm(v)``, ``(c_out N, c_in N)``."""
        return materialize(v, a, None, self.index, self.n)

    def _sparse_products(self, v: torch.Tensor) -> list[torch.Tensor]:
        """``B^_k H~`` per class of output rows, ``(nb, r, c_out, d, c_in, N)``: one batched GEMM per class.

        ``B^_k = Q^T GM(v_k) Q`` is block-diagonal: row ``(x, b)`` only meets the columns ``(c, (y, b))``,
        with entries ``sum_s v[k, o, c, s] rho[s, y, x, b]``.
        """
        r, c_out = v.shape[:2]
        out = []
        for (d, nb, _), rho, hb in zip(self.classes, self.rho, self.h_blocks):
            lhs = torch.einsum("kocs,syxb->bkoxcy", v, rho).reshape(nb, r * c_out * d, self.c_in * d)
            out.append(torch.bmm(lhs, hb).view(nb, r, c_out, d, self.c_in, self.n))
        return out

    def adjoint(self, y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Adjoint of ``v -> W_gm(v) (I x Q)``: the block entries of ``Q^T diag(a_k) Y`` pulled back to kernels."""
        y3 = y.view(a.shape[1], self.n, -1)
        return torch.stack([self._pull_back(self.q.t() @ (a[k, :, :, None] * y3)) for k in range(a.shape[0])])

    def _pull_back(self, t: torch.Tensor) -> torch.Tensor:
        """Kernels ``(o, c, s)`` from a ``(o, N, c_in N)`` matrix in block coordinates on both sides."""
        t = t.view(t.shape[0], self.n, self.c_in, self.n)
        g = 0
        for (d, nb, off), rho in zip(self.classes, self.rho):
            tc = t[:, off : off + d * nb, :, off : off + d * nb].reshape(-1, d, nb, self.c_in, d, nb)
            g = g + torch.einsum("oxcyb,syxb->ocs", torch.diagonal(tc, dim1=2, dim2=5), rho)
        return g

    def hessian(self, v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``adjoint(W_gm(v) H^ (I x Q))``, where ``W_gm(v) H^ (I x Q) = sum_l diag(a_l) Q (B^_l H~)``.

        The adjoint reads ``Q^T diag(a_k)`` of that, i.e. ``sum_l C_kl (B^_l H~)`` with ``C_kl = Q^T diag(a_k a_l) Q``,
        and only on the block entries: the full products are never formed.
        """
        mix = torch.einsum("kop,lop,pi,pj->kloij", a, a, self.q, self.q)  # (r, r, o, N, N)
        zs = self._sparse_products(v)
        grad = 0
        for (d, nb, off), rho in zip(self.classes, self.rho):
            y = 0
            for (d2, nb2, off2), z in zip(self.classes, zs):
                zsub = z[..., off : off + d * nb].unflatten(-1, (d, nb))  # [B, l, o, X, c, y, b]
                csub = (
                    mix[..., off : off + d * nb, off2 : off2 + d2 * nb2].unflatten(-1, (d2, nb2)).unflatten(3, (d, nb))
                )
                y = y + torch.einsum("kloxbXB,BloXcyb->kocyxb", csub, zsub)
            grad = grad + torch.einsum("kocyxb,syxb->kocs", y, rho)
        return grad

    def _preconditioner(self, hhat: torch.Tensor, rho: tuple[np.ndarray, ...]) -> list[torch.Tensor]:
        """Inverses of ``M = sum_p T_p^T H^ T_p`` per block of the basis.

        ``M[c, c']`` is the group matrix of ``f[c, c', h] = sum_i H^[c i, c' idx(g_i h)]`` (M commutes with
        the translations), so in the basis it is block-diagonal: block b is ``((c, x), (c', y))`` with
        entries ``sum_h f[c, c', h] rho[h, y, x, b]``.
        """
        h4 = hhat.view(self.c_in, self.n, self.c_in, self.n)
        f = sum(h4[:, i].index_select(-1, self.table[i]).double() for i in range(self.n))  # (c, c', h)
        inverses = []
        for (d, nb, _), rho_c in zip(self.classes, rho):
            blocks = torch.einsum("ach,hyxb->baxcy", f, torch.as_tensor(rho_c, device=hhat.device))
            inverses.append(_spd_inverse(blocks.reshape(nb, self.c_in * d, self.c_in * d)).to(self.dtype))
        return inverses

    def precondition(self, r: torch.Tensor) -> torch.Tensor:
        """``M^{-1} r``: to the basis, one small matrix product per block, back."""
        rk, c_out = r.shape[:2]
        rt = r.to(self.dtype) @ self.q  # (k, o, c, j)
        out = torch.empty_like(rt)
        for (d, nb, off), inv in zip(self.classes, self.m_inv):
            rc = rt[..., off : off + d * nb].reshape(rk, c_out, self.c_in, d, nb).permute(4, 2, 3, 0, 1)
            sol = inv @ rc.reshape(nb, self.c_in * d, rk * c_out)
            out[..., off : off + d * nb] = sol.view(nb, self.c_in, d, rk, c_out).permute(3, 4, 1, 2, 0).flatten(-2)
        return (out @ self.q.t()).double()


Operator = DenseOperator | BlockOperator


def solve(
    op: Operator, a: torch.Tensor, rhs: torch.Tensor, v0: torch.Tensor, c0: torch.Tensor, max_iter: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Preconditioned CG on ``A_o v_o = rhs_o`` for every output channel o at once (float64 vectors).

    ``A v = op.hessian(v)``; the preconditioner is ``(Abar_o (x) M)^{-1} = Abar_o^{-1} (x) M^{-1}``. Channel o's
    objective ``L_o(v) = c0_o - 2 v.rhs_o + v.A_o v`` (``tr(R H^ R^T)`` over its rows) equals
    ``c0_o - v.rhs_o - v.r_o`` with the residual ``r = rhs - A v`` and falls by ``alpha r^T z`` per step; o stops
    once a step gains less than ``tol * L_o`` and leaves the products (the active set shrinks). Returns the
    kernels, every channel's ``L_o`` and the number of steps.
    """
    v_out, loss_out = v0.clone(), c0.clone()
    active = torch.arange(v0.shape[1], device=v0.device)
    a_act, abar_inv = a, _gram_inverse(a.double())
    v = v0.clone()
    r = rhs - op.hessian(v.to(op.dtype), a).double()
    z = _mix_ranks(abar_inv, op.precondition(r))
    p, rz = z, _dot(r, z)
    steps = 0
    while active.numel():
        loss = c0[active] - _dot(v, rhs[:, active]) - _dot(v, r)
        if steps == max_iter:
            keep = torch.zeros_like(active, dtype=torch.bool)
        else:
            q = op.hessian(p.to(op.dtype), a_act).double()
            alpha = rz / _dot(p, q).clamp_min(1e-300)
            v, r = v + alpha[None, :, None, None] * p, r - alpha[None, :, None, None] * q
            z = _mix_ranks(abar_inv, op.precondition(r))
            rz, rz_old = _dot(r, z), rz
            p = z + (rz / rz_old.clamp_min(1e-300))[None, :, None, None] * p
            keep = alpha * rz_old > tol * loss.clamp_min(0)
            steps += 1
        if not bool(keep.all()):
            done = ~keep
            v_out[:, active[done]] = v[:, done]
            loss_out[active[done]] = (c0[active] - _dot(v, rhs[:, active]) - _dot(v, r))[done]
            active, a_act, abar_inv = active[keep], a_act[:, keep], abar_inv[keep]
            v, r, p, rz = v[:, keep], r[:, keep], p[:, keep], rz[keep]
    return v_out, loss_out, steps


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per output channel inner products of ``(r, c_out, c_in, s)`` tensors."""
    return (x * y).flatten(2).sum(-1).sum(0)


def _mix_ranks(abar_inv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("okl,locs->kocs", abar_inv, x)


def _gram_inverse(a: torch.Tensor) -> torch.Tensor:
    """``Abar_o^{-1}`` with ``Abar_o[k, l] = mean_p a[k, o, p] a[l, o, p]`` (ridged if singular)."""
    abar = torch.einsum("kop,lop->okl", a, a) / a.shape[-1]
    scale = torch.diagonal(abar, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)[:, None, None]
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return torch.linalg.inv(abar + 1e-9 * scale * eye)


def _operator(hhat: torch.Tensor, pattern: Pattern, sup: np.ndarray, c_in: int, g: FiniteGroup | None) -> Operator:
    """The block operator for a plain group matrix on its full support, else the dense one."""
    if g is not None and sup.size == pattern.n_classes and np.array_equal(pattern.index, regular_pattern(g).index):
        return BlockOperator(hhat, g, c_in)
    return DenseOperator(hhat, pattern, torch.as_tensor(sup, device=hhat.device), c_in)


def fit_kernels(
    w: torch.Tensor,
    fit: GMFit,
    stats: InputStats,
    damping: float = DAMPING,
    *,
    group: FiniteGroup | None = None,
    max_iter: int = 100,
    tol: float = 1e-3,
    dtype: torch.dtype | None = None,
) -> tuple[np.ndarray, float, float, int]:
    """Kernels minimising ``tr(R H^ R^T)`` from ``fit``'s, its modulations fixed, on the device of ``stats``.

    Returns the kernels, the output error ``sqrt(tr(R H R^T) / tr(W H W^T))`` (H = X^T X without the ridge,
    i.e. ``||(W - W_gm) X^T|| / ||W X^T||`` over every calibration row), ``||R||_F / ||W||_F`` and the CG steps.
    ``dtype`` of the heavy products: float64 for layers up to ``SMALL_LAYER`` weights, else float32.
    """
    damping = check_nonnegative(damping, "damping")
    dev = stats.gram.device
    dtype = dtype or (torch.float64 if w.numel() <= SMALL_LAYER else torch.float32)
    mu = damping * float(torch.diagonal(stats.gram).mean()) / stats.rows
    hhat = stats.gram.to(dtype) / stats.rows  # H^ = H / rows + mu I, one copy in the product dtype
    hhat.diagonal().add_(mu)
    c_in = fit.kernels.shape[2]
    a = torch.as_tensor(fit.modulations, device=dev, dtype=dtype)
    op = _operator(hhat, fit.pattern, fit.support, c_in, group)
    w = w.detach().to(dev, dtype)
    wh = op.transform(w @ hhat)  # the one dense GEMM: W H^
    del hhat
    rhs = op.adjoint(wh, a).double()
    c0 = (op.transform(w) * wh).view(a.shape[1], -1).sum(1, dtype=torch.float64)
    del wh
    v0 = torch.as_tensor(fit.kernels, device=dev, dtype=torch.float64)
    v, loss, steps = solve(op, a, rhs, v0, c0, max_iter, tol)
    out_err, rel_err = _errors(op, a, w, v.to(dtype), float(c0.sum()), float(loss.sum()), mu)
    return v.cpu().numpy(), out_err, rel_err, steps


def _errors(
    op: Operator, a: torch.Tensor, w: torch.Tensor, v: torch.Tensor, ref: float, loss: float, mu: float
) -> tuple[float, float]:
    """The output error from the objectives and the Frobenius error from the materialised fit.

    ``tr(R H R^T) / rows = tr(R H^ R^T) - mu ||R||^2`` (``loss`` is ``tr(R H^ R^T)``, ``ref`` ``tr(W H^ W^T)``).
    """
    r2 = float((w - op.dense(v, a)).square().sum(dtype=torch.float64))
    w2 = float(w.square().sum(dtype=torch.float64))
    err, ref = max(loss - mu * r2, 0.0), ref - mu * w2
    out_err = math.sqrt(err / ref) if ref > 0 else math.sqrt(err)
    return out_err, math.sqrt(r2 / w2) if w2 > 0 else math.sqrt(r2)


def project_pattern(
    w: np.ndarray | torch.Tensor,
    pattern: Pattern,
    rank: int = 1,
    modulate: bool = True,
    support: Iterable[int] | None = None,
    inputs: np.ndarray | torch.Tensor | InputStats | None = None,
    *,
    damping: float = DAMPING,
    group: FiniteGroup | None = None,
    max_iter: int = 100,
    tol: float = 1e-3,
    dtype: torch.dtype | None = None,
    what: str = "weight",
) -> GMFit:
    """:func:`gmcompress.fit.reference.project_pattern` with the fast activation-aware fit.

    ``inputs`` are calibration rows ``(samples, fan_in)`` or their :class:`InputStats`; without them
    this is the plain fit. ``group`` (the group of a regular pattern) enables :class:`BlockOperator`.
    """
    w = torch.as_tensor(w)
    w64 = w.detach().to("cpu", torch.float64).numpy()
    if inputs is None:
        return plain_project(w64, pattern, rank, modulate, support, what=what)
    kernels, modulations, sup = plain_fit(w64, pattern, rank, modulate, support, what)
    fit = GMFit(pattern, kernels, modulations, sup, 0.0, modulate)
    stats = InputStats.of(inputs, w.shape[1], w.device)
    fit.kernels, fit.output_error, fit.relative_error, _ = fit_kernels(
        w, fit, stats, damping, group=group, max_iter=max_iter, tol=tol, dtype=dtype
    )
    fit.activation_aware = True
    return fit


def project(
    w: np.ndarray | torch.Tensor,
    g: FiniteGroup | str,
    rank: int = 1,
    modulate: bool = True,
    support: Iterable[int] | None = None,
    inputs: np.ndarray | torch.Tensor | InputStats | None = None,
    *,
    in_subgroup: Iterable[int] | None = None,
    out_subgroup: Iterable[int] | None = None,
    damping: float = DAMPING,
    max_iter: int = 100,
    tol: float = 1e-3,
    dtype: torch.dtype | None = None,
) -> GMFit:
    """:func:`gmcompress.fit.reference.project` (same arguments) with the fast activation-aware fit."""
    g = as_group(g)
    pattern, classes = pattern_for(g, support, in_subgroup, out_subgroup)
    regular = in_subgroup is None and out_subgroup is None
    return project_pattern(
        w, pattern, rank, modulate, classes, inputs, damping=damping, group=g if regular else None,
        max_iter=max_iter, tol=tol, dtype=dtype,
    )  # fmt: skip
