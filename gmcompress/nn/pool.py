"""``GMPool``: max or mean over the cells of a partition of the group axis (cosets, stride windows)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..core.groups import FiniteGroup, group, left_cosets, subgroup
from .base import GMLayer, NotApplicable


class GMPool(GMLayer):
    """Pool channel-major features ``(..., c * N)`` over cells of the group axis -> ``(..., c * n_cells)``.

    * :meth:`cosets` pools over the left cosets ``gH`` of a subgroup (output: functions on ``G/H``).
      ``H = G`` pools the whole group: an invariant. Equivariant to G acting on ``G/H``.
    * :meth:`stride` pools a product of cyclic groups (a pixel torus ``C_H x C_W``) over windows
      ``s + {0..k-1}^d`` of the stride-k subgroup, like ``nn.MaxPool2d(k)`` on the torus; the output is
      indexed row-major on ``C_{H/k} x C_{W/k}`` and is equivariant to translations by the subgroup.

    Pooling has no weights: ``from_dense`` and ``to_dense`` raise :class:`NotApplicable`, and ``macs`` is 0.
    """

    def __init__(
        self, cells: np.ndarray, mode: str = "max", name: str = "", group: str | FiniteGroup | None = None
    ) -> None:
        super().__init__()
        if mode not in ("max", "mean"):
            raise ValueError(f"GMPool mode must be 'max' or 'mean', got {mode!r}")
        cells = np.asarray(cells, dtype=np.int64)
        if sorted(cells.ravel().tolist()) != list(range(cells.size)):
            raise ValueError("GMPool cells must partition the group elements 0..N-1")
        self.mode, self.name = mode, name
        self.group = None if group is None else _group(group)
        self.n_in, self.n_out = cells.size, cells.shape[0]
        self.register_buffer("cells", torch.as_tensor(cells.copy()), persistent=False)

    @classmethod
    def cosets(cls, g: str | FiniteGroup, sub: Sequence[int] | None = None, mode: str = "max") -> GMPool:
        """Pool over the left cosets of the subgroup with elements ``sub`` (all of G when None)."""
        g = group(g)
        elements = np.arange(g.order) if sub is None else subgroup(g, sub)
        return cls(left_cosets(g, elements), mode, f"{g.name}/{len(elements)}", g)

    @classmethod
    def stride(cls, g: str | FiniteGroup, stride: int = 2, mode: str = "max") -> GMPool:
        g = group(g)
        if g.cyclic_shape is None or any(n % stride for n in g.cyclic_shape):
            raise ValueError(
                f"GMPool.stride needs a product of cyclic groups with orders divisible by {stride}, got {g.name}"
            )
        shape = g.cyclic_shape
        out_shape = tuple(n // stride for n in shape)
        grid = np.arange(g.order).reshape(shape)
        for axis, n in enumerate(shape):  # window axis last
            grid = np.moveaxis(
                grid.reshape(*grid.shape[:axis], n // stride, stride, *grid.shape[axis + 1 :]), axis + 1, -1
            )
        cells = grid.reshape(int(np.prod(out_shape)), stride ** len(shape))
        return cls(cells, mode, f"{g.name}/stride{stride}", g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, n = x.shape[:-1], self.n_in
        if x.shape[-1] % n:
            raise ValueError(f"GMPool({self.name}) expects features c * {n}, got {x.shape[-1]}")
        xs = x.reshape(*lead, -1, n)[..., self.cells]  # (..., c, n_out, cell)
        y = xs.amax(-1) if self.mode == "max" else xs.mean(-1)
        return y.reshape(*lead, -1)

    def config(self) -> dict:
        from .linear import group_config

        return {
            "cells": self.cells.tolist(),
            "mode": self.mode,
            "name": self.name,
            "group": None if self.group is None else group_config(self.group),
        }

    @classmethod
    def from_config(cls, config: dict, **factory) -> GMPool:
        from .linear import group_from_config

        g = config.get("group")
        return cls(np.asarray(config["cells"]), config["mode"], config["name"], group_from_config(g) if g else None)

    def cell_action(self, h: int) -> np.ndarray | None:
        """The permutation of cells induced by ``h`` (``(h . y)[c] = y[perm[c]]``), or None if h mixes cells."""
        g = self.group
        cells = self.cells.cpu().numpy()
        cell_of = np.empty(self.n_in, dtype=np.int64)
        cell_of[cells.ravel()] = np.repeat(np.arange(self.n_out), cells.shape[1])
        moved = cell_of[g.table[g.inverse[h]][cells]]  # cell of h^{-1} g for every g of every cell
        if not (moved == moved[:, :1]).all():
            return None
        return moved[:, 0]

    @torch.no_grad()
    def check_equivariance(self, x: torch.Tensor | None = None, elements=None, bias: bool = True) -> float:
        """Max over the elements h that map cells to cells of ``||P(h . x) - h . P(x)|| / ||P(x)||``."""
        if self.group is None:
            raise NotApplicable(f"GMPool({self.name}) was built from raw cells: no group acts on them")
        if x is None:
            x = torch.randn(4, 3 * self.n_in)
        y = self(x)
        worst = 0.0
        for h in elements if elements is not None else range(self.group.order):
            perm_out = self.cell_action(h)
            if perm_out is None:
                continue
            perm_in = torch.tensor(self.group.table[self.group.inverse[h]])
            hx = x.reshape(*x.shape[:-1], -1, self.n_in)[..., perm_in].reshape(x.shape)
            hy = y.reshape(*y.shape[:-1], -1, self.n_out)[..., torch.as_tensor(perm_out)].reshape(y.shape)
            worst = max(worst, float((self(hx) - hy).norm() / y.norm().clamp_min(1e-30)))
        return worst

    def macs(self, inp: torch.Tensor, out: torch.Tensor) -> int:
        return 0

    def extra_repr(self) -> str:
        return f"{self.name}, mode={self.mode}, {self.n_in} -> {self.n_out}"


_group = group
