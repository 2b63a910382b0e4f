"""``GMPointwiseConv``: a 1x1 Conv1d/Conv2d whose channel mixing is a :class:`GMLinear`."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _ntuple

from ..aware import InputStats
from ..groups import FiniteGroup
from .base import BiasMode
from .linear import GMLinear

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class GMPointwiseConv(GMLinear):
    """A 1x1 convolution over ``dims`` spatial axes (1: Conv1d, 2: Conv2d) compressed over the channel axis.

    At every position the channels ``(in_channels,)`` are mapped by the GMLinear weight (channel-major
    fibres: channel ``c * N + g``). ``stride`` and ``padding`` (any ``padding_mode``) act as in
    ``nn.Conv{dims}d`` with a 1x1 kernel: pad, then keep every stride-th position. Inputs may be
    batched ``(B, C, *spatial)`` or unbatched ``(C, *spatial)``, as torch's convolutions accept.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        group: str | FiniteGroup,
        rank: int = 1,
        modulate: bool = True,
        support: Iterable[int] | None = None,
        bias: BiasMode = True,
        impl: str = "auto",
        *,
        dims: int = 2,
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] = 0,
        padding_mode: str = "zeros",
        pad: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if dims not in (1, 2):
            raise ValueError(f"GMPointwiseConv supports 1 or 2 spatial dimensions (Conv1d, Conv2d), got dims={dims}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        super().__init__(
            in_channels, out_channels, group, rank, modulate, support, bias, impl, pad=pad, device=device, dtype=dtype
        )
        self.dims = dims
        self.stride = tuple(int(v) for v in _ntuple(dims)(stride))
        self.padding = tuple(int(v) for v in _ntuple(dims)(padding))
        self.padding_mode = padding_mode

    @property
    def in_channels(self) -> int:
        return self.in_features

    @property
    def out_channels(self) -> int:
        return self.out_features

    @classmethod
    def from_dense(  # type: ignore[override]
        cls,
        conv: nn.Conv1d | nn.Conv2d,
        group: str | FiniteGroup,
        rank: int = 1,
        modulate: bool = True,
        support: Iterable[int] | None = None,
        inputs: np.ndarray | torch.Tensor | InputStats | None = None,
        *,
        impl: str = "auto",
        pad: bool = False,
        damping: float = 0.1,
        bias: BiasMode | None = None,
        name: str = "",
    ) -> GMPointwiseConv:
        """Fit a 1x1, ``groups=1`` Conv1d/Conv2d; ``inputs`` are channel rows ``(samples, in_channels)`` or their
        :class:`~gmcompress.aware.InputStats`."""
        label = f"{name or type(conv).__name__}({conv.in_channels}, {conv.out_channels}, kernel_size=1)"
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d)) or isinstance(conv, nn.modules.conv._ConvTransposeNd):
            raise TypeError(f"{label}: from_dense expects nn.Conv1d or nn.Conv2d, got {type(conv).__name__}")
        if any(k != 1 for k in conv.kernel_size) or conv.groups != 1:
            raise ValueError(
                f"{label}: GMPointwiseConv needs a 1x1 kernel and groups=1, got kernel_size={conv.kernel_size}, "
                f"groups={conv.groups}"
            )
        bias_mode = (conv.bias is not None) if bias is None or conv.bias is None else bias
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            group,
            rank,
            modulate,
            support,
            bias_mode,
            impl,
            dims=len(conv.kernel_size),
            stride=conv.stride,
            padding=0 if isinstance(conv.padding, str) else conv.padding,  # "valid"/"same": no padding at 1x1
            padding_mode=conv.padding_mode,
            pad=pad,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        weight = conv.weight.reshape(conv.out_channels, conv.in_channels)
        return layer._fit_dense(weight, conv.bias, inputs, damping, label)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (self.dims + 1, self.dims + 2) or x.shape[-self.dims - 1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}({self.in_channels}, {self.out_channels}): expected input "
                f"(batch, {self.in_channels}, {', '.join('L' if self.dims == 1 else 'HW')}) or unbatched "
                f"({self.in_channels}, ...) with {self.dims} spatial dims, got shape {tuple(x.shape)}"
            )
        unbatched = x.dim() == self.dims + 1
        if unbatched:
            x = x.unsqueeze(0)
        if any(self.padding):
            pads = [p for v in reversed(self.padding) for p in (v, v)]
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, pads, mode=mode)
        if any(s != 1 for s in self.stride):
            x = x[(..., *(slice(None, None, s) for s in self.stride))]
        y = super().forward(x.movedim(1, -1)).movedim(-1, 1)
        return y.squeeze(0) if unbatched else y

    def macs(self, inp: torch.Tensor, out: torch.Tensor) -> int:
        """Positions of ``out`` times :meth:`macs_per_row`."""
        return out.numel() // self.out_channels * self.macs_per_row()

    def config(self) -> dict:
        config = super().config()
        for key in ("in_subgroup", "out_subgroup"):
            config.pop(key)
        config["in_channels"] = config.pop("in_features")
        config["out_channels"] = config.pop("out_features")
        config.update(dims=self.dims, stride=list(self.stride), padding=list(self.padding))
        config["padding_mode"] = self.padding_mode
        return config

    def to_dense(self) -> nn.Conv1d | nn.Conv2d:
        """The equivalent ``nn.Conv{dims}d`` with a 1x1 kernel."""
        conv_type = nn.Conv1d if self.dims == 1 else nn.Conv2d
        out = conv_type(
            self.in_channels,
            self.out_channels,
            1,
            self.stride,
            self.padding,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=self.kernels.device,
            dtype=self.kernels.dtype,
        )
        weight = self.weight.reshape(self.out_channels, self.in_channels, *([1] * self.dims))
        return self._export(out, weight, self.out_channels)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dims={self.dims}, stride={self.stride}, padding={self.padding}"
