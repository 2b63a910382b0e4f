"""One handler per kind of dense layer, registered by module type: what gmcompress knows about each kind.

A handler says whether a layer can be compressed (and why not), plans and builds its GM replacement,
and counts the layer's dense multiply-accumulates and the calibration rows its weight multiplies. The
graph pass, :func:`gmcompress.compress`, reports and recipes ask :func:`handler_for`; none of them names
a layer class. Adding a kind of layer means writing its GM layer (``gmcompress.nn``) and a handler here
(as torchao's ``quantize_`` looks up a handler registered per config type).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.checks import check_finite, check_rank
from ..core.groups import FiniteGroup, square_group
from ..core.groups import group as parse_group
from ..fit.aware import InputStats
from ..nn import GMChannelConv, GMConv2d, GMLayer, GMLinear
from .settings import LayerSettings

__all__ = ["LayerPlan", "LayerHandler", "register", "handler_for", "own_forward_base", "type_names", "HANDLERS"]


@dataclass
class LayerPlan:
    """What happens to one dense layer: the GM form it becomes and its size, or why it stays dense."""

    name: str
    module: nn.Module
    handler: LayerHandler
    settings: LayerSettings | None
    form: str = ""  # the GM layer class name, "" when the layer stays dense
    group: str = ""
    reason: str = ""
    padded: bool = False
    params_after: int = 0
    gm_type: type[GMLayer] | None = field(default=None, repr=False)  # the GM layer class, None when dense
    gm_group: FiniteGroup | None = field(default=None, repr=False)  # the parsed group (of the square for GMConv2d)
    lifting: bool = False  # GMConv2d only: the input channels are plain, not fibres of the group

    def build(self, stats: InputStats | torch.Tensor | None) -> GMLayer:
        """The fitted GM layer, from calibration statistics (or rows, or None for a plain fit):
        :meth:`LayerHandler.build`."""
        return self.handler.build(self._planned(), stats)

    def shell(self, device: torch.device) -> GMLayer:
        """The GM layer unfitted (freshly initialised) on ``device``: its size on ``meta``, its speed on the model's
        device (:meth:`LayerHandler.shell`)."""
        return self.handler.shell(self._planned(), device)

    def _planned(self) -> LayerPlan:
        if not self.form:
            raise ValueError(f"layer {self.name!r} ({self.type}) stays dense: {self.reason or 'nothing planned'}")
        return self

    @property
    def type(self) -> str:
        return type(self.module).__name__

    @property
    def shape(self) -> str:
        return self.handler.shape(self.module)

    @property
    def params_before(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def skip(self, reason: str) -> LayerPlan:
        self.form, self.reason, self.gm_type, self.gm_group = "", reason, None, None
        return self

    def planned(self, gm_type: type[GMLayer], gm_group: FiniteGroup, group: str) -> LayerPlan:
        """The plan of a layer that becomes ``gm_type`` over ``gm_group`` (named ``group``), with its size."""
        self.form, self.gm_type, self.gm_group, self.group = gm_type.__name__, gm_type, gm_group, group
        self.params_after = sum(p.numel() for p in self.shell(torch.device("meta")).parameters())
        return self


class LayerHandler:
    """Base handler: the checks every kind shares; subclasses say how their kind is compressed."""

    type_name: str = ""  # the name recipe ``type:`` rules use ("Linear", "Conv2d", ...)
    module_types: tuple[type[nn.Module], ...] = ()

    def shape(self, module: nn.Module) -> str:
        return "x".join(str(v) for v in module.weight.shape)

    def dense_macs(self, module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
        raise NotImplementedError

    def calibration_rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The rows the layer's weight multiplies, ``(samples, fan_in)``."""
        raise NotImplementedError

    def rows_key(self, module: nn.Module) -> tuple:
        """Equal for two layers of this kind whose :meth:`calibration_rows` agree on any input (q/k/v projections
        of one tensor share their calibration statistics)."""
        geometry = tuple(getattr(module, a, None) for a in ("kernel_size", "stride", "padding", "dilation"))
        return (self.type_name, tuple(module.weight.shape[1:]), *geometry)

    def plan(
        self, name: str, module: nn.Module, settings: LayerSettings | None, decided: str, on_mismatch: str = ""
    ) -> LayerPlan:
        """The plan for one layer: shared checks first, then :meth:`plan_kind`. ``on_mismatch``, when given, is
        used instead of the settings' own (a budget checks ``"error"`` itself, over all its candidate groups: the
        plan keeps the layer's settings and skips the layer on a mismatch)."""
        plan = LayerPlan(name, module, self, settings)
        check_finite(
            module.weight,
            f"layer {name!r} ({plan.type} {plan.shape}) weight",
            "fix or retrain the model before compressing, or skip the layer (exclude=... or a recipe rule "
            "with skip: true)",
        )
        if settings is None:
            return plan.skip(f"skipped by {decided}")
        reason = _module_blocker(module, self.module_types)
        if reason:
            return plan.skip(reason)
        return self.plan_kind(plan, settings, on_mismatch or settings.on_mismatch)

    def plan_kind(self, plan: LayerPlan, settings: LayerSettings, on_mismatch: str) -> LayerPlan:
        raise NotImplementedError

    def build(self, plan: LayerPlan, stats: InputStats | torch.Tensor | None) -> GMLayer:
        """The fitted GM layer of a planned layer (see :meth:`LayerPlan.build`)."""
        raise NotImplementedError

    def shell(self, plan: LayerPlan, device: torch.device) -> GMLayer:
        """The unfitted GM layer of a planned layer (see :meth:`LayerPlan.shell`)."""
        raise NotImplementedError


def _module_blocker(module: nn.Module, base_types: tuple[type[nn.Module], ...]) -> str:
    """Why a layer of a handled type must stay dense whatever the settings ("" when nothing blocks it)."""
    if torch.nn.utils.parametrize.is_parametrized(module):
        return (
            "weight is parametrized (weight_norm, spectral_norm, ...): remove the parametrization first "
            "(torch.nn.utils.parametrize.remove_parametrizations) to compress it"
        )
    if any(type(h).__name__ == "WeightNorm" for h in module._forward_pre_hooks.values()):
        return "weight norm hook (torch.nn.utils.weight_norm): call torch.nn.utils.remove_weight_norm first"
    base = own_forward_base(module, base_types)
    if base is not None:
        return (
            f"{type(module).__name__} subclasses {base.__name__} with its own forward, which the graph pass could "
            "not trace into down to one F.linear/F.conv1d/F.conv2d call on its weight (or the model does not trace); "
            "replacing it would drop what that forward does"
        )
    return ""


def own_forward_base(module: nn.Module, base_types: tuple[type[nn.Module], ...] | None = None) -> type | None:
    """The handled type (of ``base_types``, default: every registered one) that ``module``'s class subclasses with
    its own ``forward``; None when it runs its base's forward (or is no handled layer)."""
    types = tuple(HANDLERS) if base_types is None else base_types
    base = next((t for t in type(module).__mro__ if t in types), None)
    if base is None or type(module) is base or type(module).forward is base.forward:
        return None
    return base


def _plan_group_matrix(
    plan: LayerPlan, n_in: int, n_out: int, s: LayerSettings, on_mismatch: str, layer_type: type[GMLayer]
) -> LayerPlan:
    """Plan a GM over features (Linear) or channels (1x1 conv): group, rank, sizes, padding."""
    if s.group is None:
        return plan.skip("no group set (give group= or a recipe default)")
    if min(n_in, n_out) < s.min_features:
        return plan.skip(f"smaller than min_features={s.min_features}")
    g = parse_group(s.group)
    label = f"layer {plan.name!r} ({plan.type} {plan.shape})"
    check_rank(s.rank, g.order, s.modulate, label)
    if n_in % g.order or n_out % g.order:
        msg = f"sizes in={n_in}, out={n_out} are not multiples of |{s.group}|={g.order}"
        if on_mismatch == "error":
            raise ValueError(f"{label}: {msg}; choose a group whose order divides both, on_mismatch='pad' or 'skip'")
        if on_mismatch == "skip":
            return plan.skip(msg)
        plan.padded = True
    return plan.planned(layer_type, g, s.group if isinstance(s.group, str) else g.name)


def _shell_bias(plan: LayerPlan) -> bool | str:
    """The bias of an unfitted GM layer: none when the dense layer has none, else shared or per output."""
    return ("shared" if plan.settings.bias == "shared" else True) if plan.module.bias is not None else False


def _fitted_bias(plan: LayerPlan) -> str | None:
    return "shared" if plan.settings.bias == "shared" else None


def _fit_group_matrix(plan: LayerPlan, stats: InputStats | torch.Tensor | None, impl: str) -> GMLayer:
    """:class:`GMLinear` or :class:`GMChannelConv` fitted to the dense layer (activation-aware with ``stats``)."""
    s = plan.settings
    return plan.gm_type.from_dense(
        plan.module, plan.gm_group, s.rank, s.modulate, inputs=stats, support=s.support, impl=impl, pad=plan.padded,
        damping=s.damping, bias=_fitted_bias(plan), name=plan.name,
    )  # fmt: skip


def _conv_geometry(conv: nn.Module) -> dict:
    return dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, padding_mode=conv.padding_mode)


class LinearHandler(LayerHandler):
    """``nn.Linear`` -> :class:`GMLinear` over the features."""

    type_name = "Linear"
    module_types = (nn.Linear,)

    def dense_macs(self, module: nn.Linear, inp: torch.Tensor, out: torch.Tensor) -> int:
        return inp.numel() // module.in_features * module.in_features * module.out_features

    def calibration_rows(self, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, module.in_features)

    def plan_kind(self, plan: LayerPlan, settings: LayerSettings, on_mismatch: str) -> LayerPlan:
        m = plan.module
        return _plan_group_matrix(plan, m.in_features, m.out_features, settings, on_mismatch, GMLinear)

    def build(self, plan: LayerPlan, stats: InputStats | torch.Tensor | None) -> GMLayer:
        return _fit_group_matrix(plan, stats, plan.settings.impl)

    def shell(self, plan: LayerPlan, device: torch.device) -> GMLayer:
        m, s = plan.module, plan.settings
        return GMLinear(
            m.in_features, m.out_features, plan.gm_group, s.rank, s.modulate, s.support, bias=_shell_bias(plan),
            pad=plan.padded, device=device,
        )  # fmt: skip


class ConvHandler(LayerHandler):
    """``nn.Conv1d`` / ``nn.Conv2d`` (any kernel, stride, dilation, padding and padding mode) ->
    :class:`GMChannelConv` over the channel fibres (``group``); with ``conv_group`` set, a k x k Conv2d becomes
    :class:`GMConv2d` instead (spatial weight tying, the rotation-equivariant form). Grouped and depthwise
    convolutions stay dense."""

    def __init__(self, conv_type: type[nn.Module]) -> None:
        self.module_types = (conv_type,)
        self.type_name = conv_type.__name__

    def dense_macs(self, module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
        return out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)

    def calibration_rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Patches ``(samples, in_channels * K)`` in ``F.unfold`` order (channel, offset)."""
        if x.dim() == len(module.kernel_size) + 1:
            x = x.unsqueeze(0)  # unbatched input
        if all(k == 1 for k in module.kernel_size) and all(s == 1 for s in module.stride):
            return x.movedim(1, -1).reshape(-1, module.in_channels)  # padding adds rows of zeros only
        if module.padding_mode != "zeros":
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0 if module.padding_mode != "zeros" or module.padding == "valid" else module.padding
        if padding == "same":
            padding = 0
            totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            x = F.pad(x, [v for t in reversed(totals) for v in (t // 2, t - t // 2)])
        if x.dim() == 3:  # Conv1d: a height-1 image
            x, kernel, dilation, stride = (
                x.unsqueeze(2),
                (1, *module.kernel_size),
                (1, *module.dilation),
                (1, *module.stride),
            )
            padding = padding if isinstance(padding, int) else (0, *padding)
        else:
            kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
        patches = F.unfold(x, kernel, dilation, padding, stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])

    def plan_kind(self, plan: LayerPlan, s: LayerSettings, on_mismatch: str) -> LayerPlan:
        m = plan.module
        if m.groups != 1:
            kind = "depthwise" if m.groups == m.in_channels else f"grouped (groups={m.groups})"
            return plan.skip(f"{kind} convolution: only groups=1 convolutions are compressed")
        if s.conv_group is not None and isinstance(m, nn.Conv2d) and any(k != 1 for k in m.kernel_size):
            return _plan_tied_conv(plan, s, on_mismatch)
        return _plan_group_matrix(plan, m.in_channels, m.out_channels, s, on_mismatch, GMChannelConv)

    def build(self, plan: LayerPlan, stats: InputStats | torch.Tensor | None) -> GMLayer:
        s = plan.settings
        if plan.gm_type is GMConv2d:
            return GMConv2d.from_dense(
                plan.module, plan.gm_group, s.rank, s.modulate, plan.lifting, stats, damping=s.damping,
                bias=_fitted_bias(plan), name=plan.name,
            )  # fmt: skip
        return _fit_group_matrix(plan, stats, s.impl if s.impl in ("auto", "dense", "packed") else "grouped")

    def shell(self, plan: LayerPlan, device: torch.device) -> GMLayer:
        m, s = plan.module, plan.settings
        if plan.gm_type is GMConv2d:
            return GMConv2d(
                m.in_channels, m.out_channels, m.kernel_size[0], plan.gm_group, s.rank, s.modulate,
                bias=_shell_bias(plan), lifting=plan.lifting, stride=m.stride, padding=m.padding, dilation=m.dilation,
                device=device,
            )  # fmt: skip
        return GMChannelConv(
            m.in_channels, m.out_channels, tuple(m.kernel_size), plan.gm_group, s.rank, s.modulate,
            bias=_shell_bias(plan), support=s.support, pad=plan.padded, device=device, **_conv_geometry(m),
        )  # fmt: skip


def _plan_tied_conv(plan: LayerPlan, s: LayerSettings, on_mismatch: str) -> LayerPlan:
    """A k x k Conv2d tied by a group of the square (:class:`GMConv2d`)."""
    m = plan.module
    h = square_group(s.conv_group)
    if m.kernel_size[0] != m.kernel_size[1] or m.padding_mode != "zeros":
        return plan.skip("GMConv2d needs a square kernel and zero padding")
    lifting = s.lifting if s.lifting is not None else m.in_channels % h.order != 0
    if m.out_channels % h.order or (not lifting and m.in_channels % h.order):
        msg = (
            f"channels in={m.in_channels}, out={m.out_channels} do not split into fibres of |{s.conv_group}|={h.order}"
        )
        if on_mismatch == "error":
            raise ValueError(
                f"layer {plan.name!r} (Conv2d {plan.shape}): {msg}; pick a smaller conv_group, lifting=true "
                "for plain inputs, or skip it"
            )
        return plan.skip(msg + (" (padding is not supported for convolutions)" if on_mismatch == "pad" else ""))
    check_rank(s.rank, h.order, s.modulate, f"layer {plan.name!r} (Conv2d {plan.shape})")
    plan.lifting = lifting
    return plan.planned(GMConv2d, h, s.conv_group)


class UnsupportedHandler(LayerHandler):
    """Dense layers gmcompress lists in the report but does not compress (Conv3d, transposed convolutions)."""

    def __init__(self, module_type: type[nn.Module], reason: str) -> None:
        self.module_types = (module_type,)
        self.type_name = module_type.__name__
        self.reason = reason

    def dense_macs(self, module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
        per_out = module.weight.numel() // module.weight.shape[1 if self._transposed(module) else 0]
        return (inp if self._transposed(module) else out).numel() * per_out

    @staticmethod
    def _transposed(module: nn.Module) -> bool:
        return bool(getattr(module, "transposed", False))

    def plan_kind(self, plan: LayerPlan, settings: LayerSettings, on_mismatch: str) -> LayerPlan:
        return plan.skip(self.reason)


HANDLERS: dict[type[nn.Module], LayerHandler] = {}


def register(handler: LayerHandler) -> LayerHandler:
    """Register ``handler`` for each of its ``module_types`` (a later registration replaces an earlier one)."""
    for t in handler.module_types:
        HANDLERS[t] = handler
    return handler


def handler_for(module: nn.Module) -> LayerHandler | None:
    """The handler of the nearest registered base class of ``module``'s type (None: not a dense layer)."""
    for t in type(module).__mro__:
        if t in HANDLERS:
            return HANDLERS[t]
    return None


def type_names() -> tuple[str, ...]:
    """The layer type names recipes may use in ``type:`` rules."""
    return tuple(dict.fromkeys(h.type_name for h in HANDLERS.values()))


register(LinearHandler())
register(ConvHandler(nn.Conv1d))
register(ConvHandler(nn.Conv2d))
register(UnsupportedHandler(nn.Conv3d, "Conv3d is not supported (only Linear, Conv1d and Conv2d are compressed)"))
for _t in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register(UnsupportedHandler(_t, f"{_t.__name__} is not supported (transposed convolutions stay dense)"))
