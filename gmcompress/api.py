"""``compress()``: the front door. Plans per layer from the recipe, fits, swaps, reports."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .batches import run_model
from .fx import find_layers, module_aliases, swap
from .groups import group as parse_group
from .nn import GMConv2d, GMLinear, GMPointwiseConv, is_pointwise
from .nn.conv import group_of_square
from .recipe import LayerSettings, Recipe, load_recipe
from .report import CompressionReport, LayerReport, count_macs, measure_latency, state_dict_bytes

__all__ = ["compress", "CompressionPlan", "LayerPlan"]


@dataclass
class LayerPlan:
    """What happens to one dense layer: the form it becomes (or why it stays dense)."""

    name: str
    module: nn.Module
    settings: LayerSettings | None
    form: str = ""  # "GMLinear" | "GMPointwiseConv" | "GMConv2d" | "" when skipped
    reason: str = ""
    pad: bool = False
    params_after: int = 0
    build: Callable[[np.ndarray | None], nn.Module] | None = field(default=None, repr=False)

    @property
    def type(self) -> str:
        return type(self.module).__name__

    @property
    def shape(self) -> str:
        m = self.module
        if isinstance(m, nn.Linear):
            return f"{m.out_features}x{m.in_features}"
        return f"{m.out_channels}x{m.in_channels}x" + "x".join(str(k) for k in m.kernel_size)

    @property
    def params_before(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def report_row(self) -> LayerReport:
        s = self.settings
        group = ""
        if s is not None and self.form:
            group = s.conv_group if self.form == "GMConv2d" else s.group
        return LayerReport(
            name=self.name,
            type=self.type,
            shape=self.shape,
            status="planned" if self.form else "skipped",
            form=self.form,
            group=group or "",
            rank=s.rank if s is not None and self.form else None,
            params_before=self.params_before,
            params_after=self.params_after if self.form else self.params_before,
            padded=self.pad,
            reason=self.reason,
        )


@dataclass
class CompressionPlan:
    """The result of ``compress(..., dry_run=True)``: one :class:`LayerPlan` per dense layer, nothing fitted."""

    layers: list[LayerPlan]
    traced: bool
    trace_failure: str | None = None

    def report(self) -> CompressionReport:
        rows = [p.report_row() for p in self.layers]
        before = sum(r.params_before for r in rows)
        after = sum(r.params_after for r in rows)
        return CompressionReport(rows, before, after, traced=self.traced, trace_failure=self.trace_failure)

    def __str__(self) -> str:
        r = self.report()
        from .report import _table

        return _table(r.LAYER_HEADER[:7], [row[:7] for row in r.layer_rows()]) + (
            f"\nlayer parameters {r.params_before:,} -> {r.params_after:,}"
        )


def _count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _plan_layer(name: str, module: nn.Module, settings: LayerSettings | None, decided: str) -> LayerPlan:
    plan = LayerPlan(name, module, settings)
    weight = module.weight
    if not torch.isfinite(weight).all():
        raise ValueError(
            f"layer {name!r} ({plan.type} {plan.shape}): weight contains NaN or inf values; fix or retrain the "
            f"model before compressing, or skip the layer (exclude=... or a recipe rule with skip: true)"
        )
    if settings is None:
        plan.reason = f"skipped by {decided}"
        return plan
    s = settings
    if isinstance(module, nn.Linear) or is_pointwise(module):
        n_in, n_out = (
            (module.in_features, module.out_features)
            if isinstance(module, nn.Linear)
            else (module.in_channels, module.out_channels)
        )
        if s.group is None:
            plan.reason = "no group set (give group= or a recipe default)"
            return plan
        if min(n_in, n_out) < s.min_features:
            plan.reason = f"smaller than min_features={s.min_features}"
            return plan
        g = parse_group(s.group)
        if s.rank > g.order:
            raise ValueError(
                f"layer {name!r} ({plan.type} {plan.shape}): rank {s.rank} exceeds the order of "
                f"{s.group} ({g.order}); use rank <= {g.order}"
            )
        if n_in % g.order or n_out % g.order:
            msg = (
                f"layer {name!r} ({plan.type} {plan.shape}): sizes in={n_in}, out={n_out} are not multiples of "
                f"the order {g.order} of {s.group}"
            )
            if s.on_mismatch == "error":
                raise ValueError(msg + "; choose a group whose order divides both, on_mismatch='pad' or 'skip'")
            if s.on_mismatch == "skip":
                plan.reason = f"in={n_in}, out={n_out} not multiples of |{s.group}|={g.order}"
                return plan
            plan.pad = True
        plan.form = "GMLinear" if isinstance(module, nn.Linear) else "GMPointwiseConv"
        kwargs = dict(
            modulate=s.modulate,
            support=s.support,
            impl=s.impl,
            pad=plan.pad,
            damping=s.damping,
            bias="shared" if s.bias == "shared" else None,
            name=name,
        )
        bias_mode = ("shared" if s.bias == "shared" else True) if module.bias is not None else False
        shell = GMLinear(n_in, n_out, g, s.rank, s.modulate, s.support, bias=bias_mode, pad=plan.pad, device="meta")
        plan.params_after = _count_params(shell)
        if isinstance(module, nn.Linear):
            plan.build = lambda x: GMLinear.from_dense(module, g, s.rank, inputs=x, **kwargs)
        else:
            plan.build = lambda x: GMPointwiseConv.from_dense(module, g, s.rank, inputs=x, **kwargs)
        return plan
    if isinstance(module, nn.Conv2d):
        if s.conv_group is None:
            plan.reason = "k x k convolution: set conv_group (C2, C4, D2, D4) to compress it"
            return plan
        h = group_of_square(s.conv_group)
        if module.groups != 1 or module.kernel_size[0] != module.kernel_size[1] or module.padding_mode != "zeros":
            plan.reason = "GMConv2d needs groups=1, a square kernel and zero padding"
            return plan
        lifting = s.lifting if s.lifting is not None else module.in_channels % h.order != 0
        if module.out_channels % h.order or (not lifting and module.in_channels % h.order):
            msg = (
                f"layer {name!r} (Conv2d {plan.shape}): channels in={module.in_channels}, "
                f"out={module.out_channels} do not split into fibres of |{s.conv_group}|={h.order}"
            )
            if s.on_mismatch == "error":
                raise ValueError(msg + "; pick a smaller conv_group, lifting=true for plain inputs, or skip it")
            plan.reason = msg.split(": ", 1)[1] + (
                " (padding is not supported for convolutions)" if s.on_mismatch == "pad" else ""
            )
            return plan
        if s.rank > h.order:
            raise ValueError(
                f"layer {name!r} (Conv2d {plan.shape}): rank {s.rank} exceeds |{s.conv_group}|="
                f"{h.order}; use rank <= {h.order}"
            )
        shell = GMConv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size[0],
            h,
            s.rank,
            s.modulate,
            bias=module.bias is not None,
            lifting=lifting,
            device="meta",
        )
        plan.form, plan.params_after = "GMConv2d", _count_params(shell)
        plan.build = lambda x: GMConv2d.from_dense(
            module, h, s.rank, s.modulate, lifting, x, damping=s.damping, name=name
        )
        return plan
    plan.reason = f"{plan.type} with kernel {tuple(module.kernel_size)} is not supported (only 1x1 Conv1d)"
    return plan


def _calibration_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows a layer's weight multiplies: features (Linear), channels per pixel (1x1), patches (k x k)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, module.in_features)
    if is_pointwise(module):
        return x.movedim(1, -1).reshape(-1, module.in_channels)
    patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _capture_inputs(
    model: nn.Module, plans: list[LayerPlan], calibration: Iterable[object], max_rows: int, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    store: dict[str, list[torch.Tensor]] = {p.name: [] for p in plans}
    handles = []
    for p in plans:

        def hook(mod, args, p=p):
            rows = _calibration_rows(mod, args[0].detach()).to(torch.float64).cpu()
            store[p.name].append(rows)
            total = sum(len(t) for t in store[p.name])
            if total > 4 * max_rows:  # keep memory bounded: subsample what we have
                allrows = torch.cat(store[p.name])
                store[p.name] = [allrows[rng.choice(len(allrows), 2 * max_rows, replace=False)]]

        handles.append(p.module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in [calibration] if isinstance(calibration, torch.Tensor) else calibration:
                run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, chunks in store.items():
        if chunks:
            rows = torch.cat(chunks).numpy()
            if len(rows) > max_rows:
                rows = rows[rng.choice(len(rows), max_rows, replace=False)]
            out[name] = rows
    return out


def _equivariance_error(layer: nn.Module) -> float | None:
    try:
        if isinstance(layer, GMLinear):
            if layer.in_padded != layer.in_features or layer.out_padded != layer.out_features:
                return None
            return layer.check_equivariance(elements=range(min(layer.group.order, 16)), bias=False)
        if isinstance(layer, GMPointwiseConv):
            return _equivariance_error(layer.linear)
        if isinstance(layer, GMConv2d):
            return layer.check_equivariance(bias=False)
    except ValueError:
        return None
    return None


def compress(
    model: nn.Module,
    group: str | None = None,
    rank: int | None = None,
    *,
    recipe: str | Path | Recipe | None = None,
    include: str | None = None,
    exclude: str | None = None,
    example_inputs: object = None,
    calibration: Iterable[object] | torch.Tensor | None = None,
    inplace: bool = False,
    on_mismatch: str | None = None,
    dry_run: bool = False,
    modulate: bool | None = None,
    conv_group: str | None = None,
    min_features: int | None = None,
    max_calibration_rows: int = 2048,
    progress: bool = True,
) -> nn.Module | CompressionPlan:
    """Replace the dense ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` layers of ``model`` by group-matrix layers.

    Settings come from ``recipe`` (a YAML path or :class:`~gmcompress.recipe.Recipe`) with the keyword
    arguments (``group``, ``rank``, ``on_mismatch`` = "skip" | "pad" | "error", ``modulate``,
    ``conv_group``, ``min_features``) overriding its defaults; ``include``/``exclude`` are regexes on
    module names. With ``calibration`` (a tensor or an iterable of batches: tensors, tuples or dicts
    of model inputs) layers are fitted activation-aware. ``example_inputs`` (same forms) lets the
    report measure MACs and latency.

    The model is traced with torch.fx and the GM modules take the place of the originals in the
    returned ``GraphModule``; a model that does not trace gets one warning and its leaf modules are
    swapped by name on a copy. The user's model is left untouched unless ``inplace=True`` (then it is
    modified and returned). ``dry_run=True`` returns a :class:`CompressionPlan` without fitting.
    The result carries its :class:`~gmcompress.report.CompressionReport` as ``.gm_report``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress expects an nn.Module, got {type(model).__name__}")
    base = recipe if isinstance(recipe, Recipe) else load_recipe(recipe) if recipe is not None else Recipe()
    if on_mismatch is not None and on_mismatch not in ("skip", "pad", "error"):
        raise ValueError(f"on_mismatch must be 'skip', 'pad' or 'error', got {on_mismatch!r}")
    if group is not None:
        parse_group(group)  # unknown specs fail here, with the accepted forms
    rules = base.with_overrides(
        group=group,
        rank=rank,
        on_mismatch=on_mismatch,
        modulate=modulate,
        conv_group=conv_group,
        min_features=min_features,
    )
    if rules.defaults.group is None and rules.defaults.conv_group is None and not rules.rules:
        raise ValueError("compress needs a group (e.g. group='C8') or a recipe that sets one")

    working = model if inplace else copy.deepcopy(model)
    was_training = working.training
    working.eval()
    traced = find_layers(working)
    if traced.failure is not None:
        warnings.warn(
            f"gmcompress: {type(model).__name__} does not trace with torch.fx ({traced.failure}); "
            "swapping its leaf modules by name instead",
            stacklevel=2,
        )
    plans = []
    for name, module in traced.layers:
        if (include is not None and not _search(include, name)) or (exclude is not None and _search(exclude, name)):
            plans.append(LayerPlan(name, module, None, reason="excluded by include/exclude"))
            continue
        settings, decided = rules.resolve(name, type(module).__name__)
        plans.append(_plan_layer(name, module, settings, decided))
    plan = CompressionPlan(plans, traced.failure is None, traced.failure)
    if dry_run:
        working.train(was_training)
        return plan

    report = CompressionReport(traced=plan.traced, trace_failure=traced.failure)
    report.params_before = _count_params(working)
    report.bytes_before = state_dict_bytes(working)
    if example_inputs is not None:
        report.macs_before, macs_before = count_macs(working, example_inputs)
        report.latency_before_ms = measure_latency(working, example_inputs)
    todo = [p for p in plans if p.form]
    aware = [p for p in todo if p.settings.activation_aware]
    captured = (
        _capture_inputs(working, aware, calibration, max_calibration_rows) if calibration is not None and aware else {}
    )

    root = model if inplace else (traced.graph_module if traced.graph_module is not None else working)
    aliases = module_aliases(root)
    rows = {}
    for p in tqdm(todo, desc="gmcompress: fitting", disable=not progress or not todo, unit="layer"):
        new = p.build(captured.get(p.name))
        for alias in aliases.get(id(p.module), [p.name]):
            swap(root, alias, new)
        row = p.report_row()
        row.status = "compressed"
        row.params_after = _count_params(new)
        inner = new.linear if isinstance(new, GMPointwiseConv) else new
        row.fit_error = inner.fit_error
        row.output_error = inner.output_error
        row.equivariance_error = _equivariance_error(new)
        rows[p.name] = row
    report.layers = [rows.get(p.name, p.report_row()) for p in plans]
    report.params_after = _count_params(root)
    report.bytes_after = state_dict_bytes(root)
    if example_inputs is not None:
        report.macs_after, macs_after = count_macs(root, example_inputs)
        report.latency_after_ms = measure_latency(root, example_inputs)
        for row in report.layers:
            row.macs_before = macs_before.get(row.name)
            row.macs_after = macs_after.get(row.name, macs_after.get(f"{row.name}.linear"))
    root.train(was_training)
    root.gm_report = report
    return root


def _search(pattern: str, name: str) -> bool:
    import re

    return re.search(pattern, name) is not None
