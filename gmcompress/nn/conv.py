"""``GMConv2d``: group convolution over a group of the square (p4/p4m weight tying), exact or relaxed."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from ..core.checks import check_finite
from ..core.groups import FiniteGroup, square_element, square_group
from ..core.patterns import conv_pattern
from ..fit import aware
from .base import BiasMode, GMModule, expand_bias, make_bias


class GMConv2d(GMModule):
    """Convolution whose weight is tied by a group H of the square (C2, C4, D2, D4, ...).

    Channels carry fibres of size ``|H|`` (channel index ``c' * |H| + h``). The exact form (rank 1,
    ``modulate=False``) is the p4/p4m G-CNN layer ``W[h_out, h_in] = h_out . psi(h_out^{-1} h_in)``,
    equivariant to rotating/flipping the image and permuting the fibres; a relaxed rank-r form adds a
    learnt modulation over output orientations. With ``lifting=True`` the input has plain channels
    (e.g. RGB) and ``W[h_out] = h_out . psi``.

    stride, padding, dilation and bias behave as in ``nn.Conv2d`` (groups=1, square kernels; odd sizes keep the
    rotation centre on a pixel, which :meth:`check_equivariance` assumes).
    ``bias="shared"`` keeps one bias per output channel fibre (exactly equivariant). It starts at 0, a per-feature
    bias (``bias=True``) uniform in ``+-1 / sqrt(fan_in)`` as in ``nn.Conv2d``. A shared bias drawn at that
    scale sets the sign of all |H| orientation channels of its fibre at once, and after a few layers it
    outweighs the signal (about 0.4x per layer at this initialisation): behind a ReLU a layer of c fibres
    was then entirely off at initialisation as often as c coins all land tails, and a dead layer never
    trains (the "drifting" relaxed seed of the smoke-plume benchmark, benchmarks/studies/plume.md).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        group: str | FiniteGroup = "C4",
        rank: int = 1,
        modulate: bool = True,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: BiasMode = True,
        lifting: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        h = square_group(group)
        k = int(kernel_size[0] if isinstance(kernel_size, tuple) else kernel_size)
        if isinstance(kernel_size, tuple) and kernel_size[0] != kernel_size[1]:
            raise ValueError(f"GMConv2d needs a square kernel to rotate it, got {kernel_size}")
        fibre = h.order
        label = f"GMConv2d({in_channels}, {out_channels}, kernel_size={k}, group={h.name})"
        if out_channels % fibre or (not lifting and in_channels % fibre):
            what = "out_channels" if out_channels % fibre else "in_channels"
            raise ValueError(
                f"{label}: {what} must be a multiple of |H|={fibre} (channel = c' * |H| + orientation); "
                f"use lifting=True for an input without orientation fibres, or pick a smaller group"
            )
        pattern = conv_pattern(h, k, bool(lifting))
        c_in = in_channels if lifting else in_channels // fibre
        super().__init__(pattern, out_channels // fibre, c_in, rank, modulate, None, device, dtype)
        self.group, self.lifting = h, bool(lifting)
        self.bias_mode: BiasMode = bias
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (k, k)
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        factory = {"device": device, "dtype": dtype}
        self.bias = make_bias(bias, self.c_out, fibre, out_channels, factory)
        fan_in = in_channels * k * k
        self.reset_structure_parameters(fan_in)
        if self.bias is not None and bias != "shared":  # a shared bias starts at 0 (see the class docstring)
            nn.init.uniform_(self.bias, -1 / np.sqrt(fan_in), 1 / np.sqrt(fan_in))

    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv2d,
        group: str | FiniteGroup = "C4",
        rank: int = 1,
        modulate: bool = True,
        lifting: bool | None = None,
        inputs: np.ndarray | torch.Tensor | aware.InputStats | None = None,
        *,
        damping: float = aware.DAMPING,
        bias: BiasMode | None = None,
        name: str = "",
    ) -> GMConv2d:
        """Fit a pretrained ``nn.Conv2d`` by least squares (orbit average for the exact form).

        ``lifting=None`` treats the input as plain channels when ``in_channels`` is not a multiple of
        ``|H|``. ``inputs`` are unfolded patches ``(samples, in_channels * k * k)`` for an
        activation-aware fit. ``bias="shared"`` keeps one bias per output fibre (its mean), as GMLinear.
        """
        label = f"{name or 'Conv2d'}({conv.in_channels}, {conv.out_channels}, kernel_size={conv.kernel_size})"
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{label}: from_dense expects nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1 or conv.kernel_size[0] != conv.kernel_size[1] or conv.padding_mode != "zeros":
            raise ValueError(f"{label}: GMConv2d supports groups=1, square kernels and zero padding")
        h = square_group(group)
        if lifting is None:
            lifting = conv.in_channels % h.order != 0
        check_finite(conv.weight, label)
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size[0],
            h,
            rank,
            modulate,
            conv.stride,
            conv.padding,
            conv.dilation,
            (conv.bias is not None) if bias is None or conv.bias is None else bias,
            lifting,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        w = conv.weight.detach().reshape(conv.out_channels, -1)
        stats = None if inputs is None else aware.InputStats.of(inputs, w.shape[1], w.device)
        fit = aware.project_pattern(w, layer.pattern, rank, modulate, None, stats, damping=damping, what=label)
        layer.load_fit(fit)
        layer._copy_dense_bias(conv.bias, conv.out_channels)
        return layer

    def config(self) -> dict:
        """JSON-able constructor arguments."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": self.kernel_size[0],
            "group": self.group.name,
            "rank": self.rank,
            "modulate": self.modulate,
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "bias": self.bias_mode,
            "lifting": self.lifting,
        }

    @classmethod
    def from_config(cls, config: dict, **factory) -> GMConv2d:
        kwargs = dict(config)
        for key in ("stride", "padding", "dilation"):
            if isinstance(kwargs[key], list):
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs, **factory)

    @property
    def weight(self) -> torch.Tensor:
        """The tied ``(out_channels, in_channels, k, k)`` convolution weight."""
        return self.dense_weight().view(self.out_channels, self.in_channels, *self.kernel_size)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # nn.Linear's and nn.Conv2d's name for it
        x = input
        weight = self.weight
        bias = None if self.bias is None else expand_bias(self.bias, self.out_channels, self.group.order)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)

    def macs(self, inp: torch.Tensor, out: torch.Tensor) -> int:
        """A dense ``F.conv2d`` on the tied weight: ``out.numel() * in_channels * k * k``."""
        return out.numel() * self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def to_dense(self) -> nn.Conv2d:
        out = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            bias=self.bias is not None,
            device=self.kernels.device,
            dtype=self.kernels.dtype,
        )
        return self._export(out, self.weight, self.out_channels)

    def transform_input(self, x: torch.Tensor, h: int) -> torch.Tensor:
        """Act with h on a feature map: rotate/flip the image and (unless lifting) permute the fibres."""
        return transform_feature_map(x, self.group, h, fibred=not self.lifting)

    @torch.no_grad()
    def check_equivariance(
        self, x: torch.Tensor | None = None, elements: Iterable[int] | None = None, bias: bool = True
    ) -> float:
        """Max over h of ``||f(h . x) - h . f(x)|| / ||f(x)||`` with a real image rotation/flip.

        Measured on the layer's weight with stride 1 and 'same' padding (the layer's own stride and
        padding can move the rotation centre, which is a property of the grid, not of the weight).
        ``bias=False`` leaves the bias out.
        """
        if x is None:
            x = torch.randn(2, self.in_channels, 9, 9, dtype=self.kernels.dtype, device=self.kernels.device)
        weight = self.weight
        b = None if self.bias is None or not bias else expand_bias(self.bias, self.out_channels, self.group.order)
        pad = self.dilation[0] * (self.kernel_size[0] - 1) // 2

        def f(v: torch.Tensor) -> torch.Tensor:
            return F.conv2d(v, weight, b, 1, pad, self.dilation)

        y = f(x)
        worst = 0.0
        for h in elements if elements is not None else range(self.group.order):
            hy = transform_feature_map(y, self.group, h, fibred=True)
            worst = max(worst, float((f(self.transform_input(x, h)) - hy).norm() / y.norm().clamp_min(1e-30)))
        return worst

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, group={self.group.name}, "
            f"lifting={self.lifting}, {self._structure_repr()}, stride={self.stride}, padding={self.padding}, "
            f"bias={self.bias is not None}"
        )


def transform_feature_map(x: torch.Tensor, h_group: FiniteGroup, h: int, fibred: bool) -> torch.Tensor:
    """``(h . x)(p, h') = x(h^{-1} p, h^{-1} h')``: rotate/flip the spatial grid, permute each fibre.

    The spatial transform is ``torch.rot90(flip?(img))`` for ``h = r^k s^f``, the same as
    :func:`gmcompress.groups.grid_action`.
    """
    flip, quarter_turns = square_element(h_group, h)
    out = torch.flip(x, dims=(-1,)) if flip else x
    out = torch.rot90(out, quarter_turns, dims=(-2, -1))
    if fibred:
        n = h_group.order
        b, c = out.shape[:2]
        perm = torch.tensor(h_group.table[h_group.inverse[h]], device=x.device)  # new[h'] = old[h^{-1} h']
        out = out.reshape(b, c // n, n, *out.shape[2:])[:, :, perm].reshape(out.shape)
    return out
