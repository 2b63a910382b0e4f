"""The approximately equivariant baselines of the smoke-plume benchmark, written from their papers' descriptions.

Both act on C4-regular feature maps (channel ``c * 4 + h``, as :class:`gmcompress.nn.GMConv2d`) and reuse
its exact p4 weight tying, so the three relaxations differ only in how they leave the exact form:

* :class:`RPPConv2d` (residual pathway priors, Finzi, Benton and Wilson, NeurIPS 2021): an exact equivariant
  layer plus an unconstrained convolution in parallel, ``y = E x + R x``. The prior prefers the equivariant
  path: ``R`` carries a much stronger weight prior (a Gaussian prior = an L2 penalty, here a larger weight
  decay, see :meth:`RPPConv2d.param_groups`), so the data must pay for every departure from symmetry.
* :class:`RGroupConv2d` (relaxed group convolution, Wang, Walters and Yu, ICML 2022): ``L`` filter banks of
  exact group kernels ``psi_l`` combined with learnt weights that depend on the output group element,
  ``Psi(g, h) = sum_l w_l(g) psi_l(g^-1 h)``; ``w`` is one ``(L, |G|)`` table per layer, shared by all
  channels, initialised to 1 (so the layer starts equivariant).

For comparison, the relaxed group matrix of :class:`~gmcompress.nn.GMConv2d` (rank r) is the same sum with
a modulation ``a[k, o, g]`` per output *channel* o, not one per layer.

These are benchmark baselines, not gmcompress layers: they have no ``from_dense``/``save`` support.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gmcompress.core.kernels import materialize
from gmcompress.nn import GMConv2d
from gmcompress.nn.base import expand_bias


class RPPConv2d(nn.Module):
    """Residual pathway prior convolution on C4-regular fields: ``exact(x) + residual(x)``.

    ``exact`` is a rank-1 :class:`GMConv2d` (exactly equivariant, shared bias); ``residual`` an unconstrained
    ``nn.Conv2d`` without bias, initialised small (``residual_init`` times the default) so the layer starts
    close to equivariant.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: int = 1, residual_init: float = 0.1
    ) -> None:
        super().__init__()
        self.exact = GMConv2d(in_channels, out_channels, kernel_size, "C4", 1, False, padding=padding, bias="shared")
        self.residual = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        with torch.no_grad():
            self.residual.weight.mul_(residual_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.exact(x) + self.residual(x)

    def param_groups(self, weight_decay: float, residual_decay: float) -> list[dict]:
        """AdamW groups: the equivariant path at ``weight_decay``, the residual path at ``residual_decay``."""
        return [
            {"params": list(self.exact.parameters()), "weight_decay": weight_decay},
            {"params": list(self.residual.parameters()), "weight_decay": residual_decay},
        ]


class RGroupConv2d(nn.Module):
    """Relaxed group convolution (C4) with ``banks`` filter banks and layer-wide relaxed weights ``(banks, 4)``.

    The filter banks are the kernels of a rank-``banks`` :class:`GMConv2d` (its own per-channel modulations are
    not used: the relaxed weights replace them), so ``psi_l`` has exactly the p4 tying of the GM layers.
    """

    def __init__(self, in_channels: int, out_channels: int, banks: int = 2, kernel_size: int = 3, padding: int = 1):
        super().__init__()
        self.tied = GMConv2d(in_channels, out_channels, kernel_size, "C4", banks, True, padding=padding, bias="shared")
        self.tied.modulations = None  # replaced by the layer-wide relaxed weights below
        self.relaxed_weights = nn.Parameter(torch.ones(banks, 4))
        self.padding = padding

    @property
    def weight(self) -> torch.Tensor:
        """The ``(out_channels, in_channels, k, k)`` convolution weight."""
        t = self.tied
        mods = self.relaxed_weights[:, None, :].expand(t.rank, t.c_out, t.group.order)
        dense = materialize(t.kernels, mods, t._support, t._index, t.pattern.n_classes)
        return dense.view(t.out_channels, t.in_channels, *t.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tied
        bias = expand_bias(t.bias, t.out_channels, t.group.order)
        return F.conv2d(x, self.weight, bias, 1, self.padding)
