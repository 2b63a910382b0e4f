"""``GMChannelConv``: a Conv1d/Conv2d whose weight at every kernel offset is a (relaxed) group matrix over channels.

``W[(o, p), (i, q), k] = sum_r a[r, o, p] * b[r, o, i, k](g_p^{-1} g_q)``: channel-major fibres (channel
``i * N + q``), the group acting on the fibres only, the spatial kernel free, the modulations shared by all
offsets k. Folding the offset into the input channel (input index order (i, k, q)) makes the weight a plain
GM matrix with ``c_in * K`` input channels, which is how it is fitted and stored. This is the form that makes
CNNs faster (the fast path is block-diagonal mixing as grouped convolutions); :class:`GMConv2d` (spatial
tying) is the one that makes them rotation-equivariant.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _ntuple

from ..core.groups import FiniteGroup
from ..core.groups import group as _as_group
from ..core.kernels import block_plan
from ..core.patterns import channel_counts, pattern_for
from ..fit import aware
from .base import BiasMode, GMModule, NotApplicable, expand_bias, make_bias
from .functional import ProductPlan, grouped_conv_forward, has_gauss_blocks, modulated_back

CONV_IMPLS = ("auto", "dense", "grouped", "packed")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
PROBE_SIZE = 7  # the spatial size of check_equivariance's default input, where the kernel fits in it


class GMChannelConv(GMModule):
    """A ``groups=1`` Conv1d (``dims=1``) or Conv2d (``dims=2``) with GM channel mixing at every kernel offset.

    stride, padding (numbers, ``"same"``, ``"valid"``), dilation, ``padding_mode`` and bias behave as in
    ``nn.Conv{dims}d``; inputs may be batched or unbatched. ``impl``: ``"dense"`` (materialised weight on every call,
    one convolution), ``"grouped"`` (transform the channel fibres to the real block basis,
    one grouped convolution over the block products, transform back; for abelian groups Gauss's three
    products per 2x2 block), ``"packed"`` (each 2x2 block one product of twice the width: more multiply-adds,
    faster when the channels per product are few; for groups without Gauss's form it is the grouped path) or
    ``"auto"`` (grouped when it at least halves the multiply-adds). ``pad=True`` zero-pads channel counts
    that are not multiples of N.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        group: str | FiniteGroup,
        rank: int = 1,
        modulate: bool = True,
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] | str = 0,
        dilation: int | tuple[int, ...] = 1,
        bias: BiasMode = True,
        padding_mode: str = "zeros",
        impl: str = "auto",
        *,
        dims: int | None = None,
        support: Iterable[int] | None = None,
        pad: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        dims = dims or (len(kernel_size) if isinstance(kernel_size, (tuple, list)) else 2)
        label = f"GMChannelConv({in_channels}, {out_channels}, kernel_size={kernel_size})"
        if dims not in (1, 2):
            raise ValueError(f"{label}: dims must be 1 (Conv1d) or 2 (Conv2d), got {dims}")
        if impl not in CONV_IMPLS or padding_mode not in PADDING_MODES:
            raise ValueError(f"{label}: impl must be one of {CONV_IMPLS} and padding_mode one of {PADDING_MODES}")
        g = _as_group(group)
        pattern, classes = pattern_for(g, support)
        n = pattern.n_out
        in_padded, out_padded = (-(-c // n) * n if pad else c for c in (in_channels, out_channels))
        c_out, c_in = channel_counts((out_padded, in_padded), pattern, label)
        ks = tuple(int(v) for v in _ntuple(dims)(kernel_size))
        super().__init__(pattern, c_out, c_in * math.prod(ks), rank, modulate, classes, device, dtype)
        gauss = has_gauss_blocks(g)
        self._paths = ("dense", "grouped", "packed") if gauss else ("dense", "grouped")
        self.group, self._impl, self.dims, self.kernel_size = g, impl, dims, ks
        self.in_channels, self.out_channels, self.in_padded, self.out_padded = (
            in_channels, out_channels, in_padded, out_padded,
        )  # fmt: skip
        self.channels_in = c_in  # input channel fibres (c_in here is c_in * K, the GM's input channels)
        self.stride, self.dilation = (tuple(int(v) for v in _ntuple(dims)(s)) for s in (stride, dilation))
        self.padding = padding if isinstance(padding, str) else tuple(int(v) for v in _ntuple(dims)(padding))
        self.padding_mode, self.bias_mode = padding_mode, bias
        self.support_elements = None if support is None else [int(v) for v in support]
        self.bias = make_bias(bias, c_out, n, out_channels, {"device": device, "dtype": dtype})
        plan = block_plan(g)
        self._register_products(g)
        self._n_rho = len(plan.rho)
        for i, r in enumerate(plan.rho):
            self._register_constant(f"_rho{i}", r if classes is None else r[classes])
        self._enable_spectrum()
        self._store_as(self._form_for(impl))
        self._settle_path()
        fan_in = in_padded * math.prod(ks)
        self.reset_structure_parameters(fan_in)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    # ------------------------------------------------------------------ construction from a dense layer
    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv1d | nn.Conv2d,
        group: str | FiniteGroup,
        rank: int = 1,
        modulate: bool = True,
        support: Iterable[int] | None = None,
        inputs: np.ndarray | torch.Tensor | None = None,
        *,
        impl: str = "auto",
        pad: bool = False,
        damping: float = aware.DAMPING,
        bias: BiasMode | None = None,
        name: str = "",
    ) -> GMChannelConv:
        """Least-squares fit of a ``groups=1`` Conv1d/Conv2d (activation-aware with ``inputs``).

        The weight is viewed as the matrix ``W.reshape(C_out, c_in, N, K).permute(0, 1, 3, 2)`` (input index
        (i, k, q)) and projected (:func:`gmcompress.fit.aware.project_pattern`). ``inputs`` are unfolded
        patches ``(samples, C_in * K)`` in ``F.unfold`` order (channel, offset).
        """
        label = f"{name or type(conv).__name__}({conv.in_channels}, {conv.out_channels}, {tuple(conv.kernel_size)})"
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d)) or conv.groups != 1:
            raise ValueError(f"{label}: GMChannelConv fits a groups=1 nn.Conv1d or nn.Conv2d")
        layer = cls(
            conv.in_channels, conv.out_channels, tuple(conv.kernel_size), group, rank, modulate, conv.stride,
            conv.padding, conv.dilation, (conv.bias is not None) if bias is None or conv.bias is None else bias,
            conv.padding_mode, impl, dims=len(conv.kernel_size), support=support, pad=pad,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )  # fmt: skip
        return layer._fit_dense(conv, inputs, damping, label)

    def _fit_dense(
        self, conv: nn.Module, inputs: np.ndarray | torch.Tensor | aware.InputStats | None, damping: float, label: str
    ) -> GMChannelConv:
        """Fit the offset-folded weight matrix (input order (i, k, q)); calibration rows or statistics come in
        ``F.unfold`` order (channel ``i * N + q``, offset k) and are reordered the same way."""
        n, k = self.pattern.n_out, math.prod(self.kernel_size)
        w = conv.weight.detach().reshape(self.out_channels, self.in_channels, k)
        w = F.pad(w, (0, 0, 0, self.in_padded - self.in_channels, 0, self.out_padded - self.out_channels))
        matrix = w.view(self.out_padded, -1, n, k).permute(0, 1, 3, 2).reshape(self.out_padded, -1)
        stats = None
        if inputs is not None:
            stats = aware.InputStats.of(inputs, self.in_channels * k, w.device).padded(self.in_padded * k)
            order = torch.arange(self.in_padded * k, device=w.device).view(-1, n, k).transpose(1, 2).reshape(-1)
            stats = aware.InputStats(stats.gram[order][:, order], stats.rows)
        classes = None if self._support is None else self._support.cpu().numpy()
        fit = aware.project_pattern(
            matrix, self.pattern, self.rank, self.modulate, classes, stats, damping=damping,
            group=self.group, what=label,
        )  # fmt: skip
        self.load_fit(fit)
        self._copy_dense_bias(conv.bias, self.out_padded)
        return self

    def config(self) -> dict:
        from .linear import group_config

        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "group": group_config(self.group),
            "rank": self.rank,
            "modulate": self.modulate,
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "bias": self.bias_mode,
            "padding_mode": self.padding_mode,
            "impl": self.impl,
            "batch_paths": self._batch_paths_config(),
            "dims": self.dims,
            "support": self.support_elements,
            "pad": self.in_padded != self.in_channels or self.out_padded != self.out_channels,
        }

    @classmethod
    def from_config(cls, config: dict, **factory) -> GMChannelConv:
        from .linear import group_from_config

        kwargs = dict(config, group=group_from_config(config["group"]))
        kwargs.pop("batch_paths", None)
        for key in ("kernel_size", "stride", "padding", "dilation"):
            if isinstance(kwargs[key], list):
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs, **factory)._with_batch_paths(config)

    # ------------------------------------------------------------------ weights
    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out_channels, in_channels, *kernel_size)`` weight."""
        return self.weight_padded()[: self.out_channels, : self.in_channels]

    def to_dense(self) -> nn.Conv1d | nn.Conv2d:
        conv_type = nn.Conv1d if self.dims == 1 else nn.Conv2d
        out = conv_type(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
            bias=self.bias is not None, padding_mode=self.padding_mode, device=self._free().device,
            dtype=self._free().dtype,
        )  # fmt: skip
        return self._export(out, self.weight, self.out_channels)

    # ------------------------------------------------------------------ forward
    def impls(self) -> tuple[str, ...]:
        return self._paths

    def resolved_impl(self) -> str:
        """The path ``forward`` takes without measured :attr:`batch_paths` (with them: :meth:`path_for`).
        "auto": grouped when it needs at most half the dense multiply-adds; "packed" where the group has no
        Gauss form: grouped, the same products. On a CUDA device, dense (docs/design.md, "auto")."""
        if self.impl != "auto":
            return self._explicit_path("grouped")
        if self._free().device.type == "cuda":
            return "dense"
        dense = self.in_padded * self.out_padded * math.prod(self.kernel_size)
        return "grouped" if 2 * self._grouped_macs_per_position() <= dense else "dense"

    def _grouped_macs_per_position(self, impl: str = "grouped") -> int:
        """Per output position (input positions taken as equal): transforms, block mixing, modulation."""
        n, rco, k = self.pattern.n_out, self.rank * self.c_out, math.prod(self.kernel_size)
        plan = self._plan(impl)
        m, size = plan.coordinates, plan.size  # product coordinates (see ProductPlan)
        mixing = plan.groups * size**2 * self.channels_in * rco * k
        return self.channels_in * n * m + mixing + rco * n * m + (rco * n if self.modulations is not None else 0)

    batch_unit = "images"

    def batch_of(self, x: torch.Tensor) -> int:
        """Images (1 for an unbatched input)."""
        return x.shape[0] if x.dim() == self.dims + 2 else 1

    def macs(self, inp: torch.Tensor, out: torch.Tensor) -> int:
        positions = out.numel() // self.out_channels
        impl = self.path_for(self.batch_of(inp))
        if impl == "dense":
            return positions * self.out_channels * self.in_channels * math.prod(self.kernel_size)
        return positions * self._grouped_macs_per_position(impl)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, groups: int, bias: torch.Tensor | None = None):
        """The layer's own convolution (stride, padding and its mode, dilation) of ``x`` with ``weight``."""
        conv = F.conv1d if self.dims == 1 else F.conv2d
        if self.padding_mode == "zeros":
            return conv(x, weight, bias, self.stride, self.padding, self.dilation, groups)
        return conv(F.pad(x, self._explicit_padding(), mode=self.padding_mode), weight, bias, self.stride, 0,
                    self.dilation, groups)  # fmt: skip

    def _conv2d(self, x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
        """:meth:`_conv` on a 4-D tensor: a Conv1d's length is the width of a height-1 image."""
        if self.dims == 2:
            return self._conv(x, weight, groups)
        stride, dilation = (1, *self.stride), (1, *self.dilation)
        padding = self.padding if isinstance(self.padding, str) else (0, *self.padding)
        if self.padding_mode == "zeros":
            return F.conv2d(x, weight, None, stride, padding, dilation, groups)
        x = F.pad(x, self._explicit_padding() + [0, 0], mode=self.padding_mode)
        return F.conv2d(x, weight, None, stride, 0, dilation, groups)

    def _explicit_padding(self) -> list[int]:
        """``F.pad`` amounts (last dimension first) for the non-zero padding modes, as ``nn.Conv`` computes them."""
        if self.padding == "valid":
            return [0, 0] * self.dims
        if self.padding == "same":
            totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            return [v for t in reversed(totals) for v in (t // 2, t - t // 2)]
        return [v for p in reversed(self.padding) for v in (p, p)]

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # nn.Linear's and nn.Conv2d's name for it
        x = input
        if x.dim() not in (self.dims + 1, self.dims + 2) or x.shape[-self.dims - 1] != self.in_channels:
            raise ValueError(
                f"GMChannelConv({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}): expected "
                f"input (batch, {self.in_channels}, *spatial) or unbatched "
                f"({self.in_channels}, *spatial) with {self.dims} spatial dims, got shape {tuple(x.shape)}"
            )
        unbatched = x.dim() == self.dims + 1
        if not unbatched and x.shape[0] == 0:  # an empty batch: the dense convolution gives its shape
            bias = None if self.bias is None else self._padded_bias()[: self.out_channels]
            return self._conv(x, self.weight, 1, bias)
        x = x.unsqueeze(0) if unbatched else x
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        if self.in_padded != self.in_channels:
            x = F.pad(x, (0, 0) * self.dims + (0, self.in_padded - self.in_channels))
        bias = self._padded_bias()
        impl = self.path_for(x.shape[0])
        if impl == "dense":
            y = self._conv(x, self.weight_padded(), 1, bias)
        else:
            weight, back = self._grouped_weights(impl)
            plan = self._plan(impl)
            q_in, q_out = (self._q_packed, self._q_packed) if plan is self._packed else (self._q_in, self._q_out)
            x4 = x if self.dims == 2 else x.contiguous().unsqueeze(2)  # a Conv1d runs as a height-1 Conv2d
            conv = self._conv2d
            if self._pointwise() and not channels_last:  # the products as matrix products, on the kept pixels
                conv = None
                step_h, step_w = self.stride if self.dims == 2 else (1, *self.stride)
                if step_h > 1 or step_w > 1:
                    x4 = x4[..., ::step_h, ::step_w].contiguous()
            y = grouped_conv_forward(x4, q_in, q_out, weight, plan.groups, conv, self.modulations, back, bias)
            y = y if self.dims == 2 else y.squeeze(2)
        if self.out_padded != self.out_channels:
            y = y[:, : self.out_channels]
            y = y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        return y.squeeze(0).contiguous() if unbatched else y  # (C, H, W) has no channels-last format

    def _pointwise(self) -> bool:
        """A 1x1 kernel without padding: each output pixel is the channel mixing of one input pixel."""
        no_padding = isinstance(self.padding, str) or not any(self.padding)  # "same" pads a 1x1 kernel by 0
        return all(k == 1 for k in self.kernel_size) and no_padding

    def _padded_bias(self) -> torch.Tensor | None:
        """One bias per (padded) output channel: a per-channel bias padded with zeros, a shared one expanded."""
        bias = self._param("bias")
        if bias is None:
            return None
        if bias.shape[0] == self.out_padded:
            return bias  # (F.pad copies even by 0: 4 us a call at batch 1)
        if bias.shape[0] == self.out_channels:
            return F.pad(bias, (0, self.out_padded - self.out_channels))
        return expand_bias(bias, self.out_padded, self.pattern.n_out)

    def weight_padded(self) -> torch.Tensor:
        """The dense weight on the padded channel counts (what the dense path convolves with)."""
        n, k = self.pattern.n_out, math.prod(self.kernel_size)
        w = self.dense_weight().view(self.out_padded, self.channels_in, k, n).transpose(2, 3)
        return w.reshape(self.out_padded, self.in_padded, *self.kernel_size)

    def _spectrum_group(self) -> FiniteGroup | None:
        return self.group if self._support is None else None

    def _plan(self, impl: str) -> ProductPlan:
        """The block products of path ``impl`` (the packed form, or Gauss's where the group has one)."""
        return self._packed if impl == "packed" else self._products

    def _grouped_weights(self, impl: str = "grouped") -> tuple[torch.Tensor, torch.Tensor]:
        """The grouped convolution's weight ``(groups size r c_out, size c_in, *kernel_size)`` (2-D) and the
        modulated way back (:func:`~gmcompress.nn.functional.modulated_back`) of path ``impl``."""
        w = self._product_weights(self._plan(impl))  # (G, size c_in K, size r c_out), rows (y, i, k)
        w = w.transpose(1, 2).reshape(w.shape[0] * w.shape[2], -1, *(1,) * (2 - self.dims), *self.kernel_size)
        q_out = self._q_packed if impl == "packed" else self._q_out
        return w.contiguous(), modulated_back(self._param("modulations"), q_out, self.c_out)

    # ------------------------------------------------------------------ equivariance
    @torch.no_grad()
    def check_equivariance(self, x: torch.Tensor | None = None, elements=None, bias: bool = True) -> float:
        """Max over h of ``||f(h . x) - h . f(x)|| / ||f(x)||`` with h permuting every channel fibre
        (``(h . x)[i, g] = x[i, h^{-1} g]``); the spatial axes are not acted on."""
        if self.in_padded != self.in_channels or self.out_padded != self.out_channels:
            raise NotApplicable(f"{self.extra_repr()}: the group does not act on zero-padded channels")
        if x is None:
            x = torch.randn(self._probe_shape(), dtype=self._free().dtype, device=self._free().device)
        offset = expand_bias(self.bias, self.out_channels, self.pattern.n_out) if self.bias is not None else None

        def f(v: torch.Tensor) -> torch.Tensor:
            y = self(v)
            return y if bias or offset is None else y - offset.view(-1, *([1] * self.dims))

        def act(v: torch.Tensor, h: int) -> torch.Tensor:
            perm = torch.tensor(self.group.table[self.group.inverse[h]], device=v.device)
            return v.view(v.shape[0], -1, self.pattern.n_out, *v.shape[2:])[:, :, perm].reshape(v.shape)

        y = f(x)
        worst = 0.0
        for h in elements if elements is not None else range(self.group.order):
            worst = max(worst, float((f(act(x, h)) - act(y, h)).norm() / y.norm().clamp_min(1e-30)))
        return worst

    def _probe_shape(self) -> tuple[int, ...]:
        """A batch of 2 inputs the layer accepts, :data:`PROBE_SIZE` long on each spatial axis, or as long as the
        dilated kernel where that is longer (a (512, 1) kernel over audio): valid without any padding."""
        spans = (d * (k - 1) + 1 for k, d in zip(self.kernel_size, self.dilation))
        return (2, self.in_channels, *(max(PROBE_SIZE, span) for span in spans))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, group={self.group.name}, "
            f"{self._structure_repr()}, impl={self._impl_repr()}, stride={self.stride}, padding={self.padding}"
        )
