"""``plan()`` and ``compress()``: the front door. Plan every dense layer from the recipe, then fit and swap.

``plan`` decides, per dense layer, the GM form it becomes (or why it stays dense) without fitting
anything; ``compress`` is ``plan`` followed by :func:`apply_plan` (capture calibration inputs, fit each
planned layer through its handler, swap it in at every name it has, report).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .budget import BudgetOutcome, plan_budget
from .core.checks import check_flag
from .core.groups import FiniteGroup, spec_of
from .core.groups import group as parse_group
from .core.tables import format_table
from .fit.aware import InputStats
from .graph.batches import calibration_batches, cuda_devices, eval_mode, first_inputs
from .graph.calibration import calibrate, check_mode
from .graph.fx import TraceResult, find_layers, is_lifted, module_aliases, source_name, swap, unfused_paths
from .measure.counts import count_macs, equivariance_error, state_dict_bytes
from .measure.fidelity import Fidelity, as_batches, compare_outputs, reference_outputs, split_holdout
from .measure.paths import (
    AS_COMPRESSED,
    AS_IS,
    FREEZE_MARGIN,
    FREEZE_ROUNDS,
    FREEZE_SECONDS,
    FROZEN_ATTRIBUTE,
    GM_FORMS,
    TORCH_LAYER,
    TORCH_LAYERS,
    FormChoice,
    FreezeReport,
    is_frozen,
    model_seconds,
    plain_layer,
    serving_form,
    time_forms,
)
from .measure.timing import interleaved_best, measure_latencies, measure_latency
from .nn import GMLayer
from .planning.budget_spec import Budget
from .planning.handlers import LayerPlan, handler_for
from .recipe import Recipe, check_pattern, load_recipe, name_matches
from .report import CompressionReport, LayerReport

__all__ = ["compress", "plan", "apply_plan", "freeze", "CompressionPlan"]


@dataclass
class CompressionPlan:
    """One :class:`~gmcompress.planning.handlers.LayerPlan` per dense layer of the model (nothing fitted yet)."""

    model: nn.Module
    layers: list[LayerPlan]
    traced: bool
    trace_failure: str | None = None
    graph_module: torch.fx.GraphModule | None = None
    budget: BudgetOutcome | None = None  # the measured options and allocation, for a budget

    def report(self) -> CompressionReport:
        rows = [_report_row(p) for p in self.layers]
        return CompressionReport(
            rows,
            sum(r.params_before for r in rows),
            sum(r.params_after for r in rows),
            traced=self.traced,
            trace_failure=self.trace_failure,
            budget=self.budget.summary() if self.budget else None,
        )

    def __str__(self) -> str:
        r = self.report()
        table = format_table(r.LAYER_HEADER[:7], [row[:7] for row in r.layer_rows()])
        budget = f"\n\n{self.budget.table()}" if self.budget else ""
        return table + f"\nlayer parameters {r.params_before:,} -> {r.params_after:,}" + budget


def _report_row(p: LayerPlan) -> LayerReport:
    return LayerReport(
        name=p.name,
        type=p.type,
        shape=p.shape,
        status="planned" if p.form else "skipped",
        form=p.form,
        group=p.group,
        rank=p.settings.rank if p.form else None,
        params_before=p.params_before,
        params_after=p.params_after if p.form else p.params_before,
        padded=p.padded,
        reason=p.reason,
    )


def _rules(recipe: str | Path | dict | Recipe | None, **overrides: object) -> Recipe:
    base = recipe if isinstance(recipe, Recipe) else load_recipe(recipe) if recipe is not None else Recipe()
    if overrides.get("group") is not None:
        parse_group(overrides["group"])  # unknown specs fail here, with the accepted forms
    rules = base.with_overrides(**overrides)
    if rules.defaults.group is None and rules.defaults.conv_group is None and not rules.rules:
        raise ValueError("compress needs a group (e.g. group='C8') or a recipe that sets one")
    return rules


def plan(
    model: nn.Module,
    group: str | FiniteGroup | None = None,
    rank: int | None = None,
    *,
    recipe: str | Path | dict | Recipe | None = None,
    include: str | None = None,
    exclude: str | None = None,
    on_mismatch: str | None = None,
    modulate: bool | None = None,
    conv_group: str | FiniteGroup | None = None,
    min_features: int | None = None,
    damping: float | None = None,
    budget: Budget | str | dict | None = None,
    calibration: Iterable[object] | torch.Tensor | dict | None = None,
    example_inputs: object = None,
    max_calibration_rows: int | None = None,
    progress: bool = True,
    heldout: Iterable[object] | torch.Tensor | None = None,
    inplace: bool = False,
    calibration_mode: str = "sequential",
) -> CompressionPlan:
    """What :func:`compress` would do to every dense layer of ``model``, without the final fits or changing it.

    Without a budget nothing is fitted and models on the ``meta`` device work (no weights are read). With a
    ``budget``, every option of every layer is measured (timed on ``example_inputs``, fitted on
    ``calibration``: :mod:`gmcompress.budget`; a fidelity budget is checked on ``heldout``, default the last part
    of ``calibration``, with its allocations fitted in ``calibration_mode``) and the plan holds the allocation
    (``plan.budget``); ``model`` is not modified either way. Arguments as in :func:`compress`; ``inplace`` is
    checked and otherwise ignored (a plan never modifies the model), so the same arguments serve both functions.
    """
    _check_arguments(model, include, exclude, inplace, progress, calibration_mode)
    if calibration is not None:
        calibration = calibration_batches(model, calibration)
    overrides = dict(on_mismatch=on_mismatch, modulate=modulate, conv_group=conv_group)
    resolved = _resolve(recipe, group, rank, budget, **overrides, min_features=min_features, damping=damping)
    return _plan(
        model, resolved, include, exclude, _Measure(calibration, example_inputs, max_calibration_rows, progress,
                                                    heldout, calibration_mode),
    )  # fmt: skip


@dataclass(frozen=True)
class _Resolved:
    """The settings of one call, resolved and checked once: the rules (recipe defaults with the keyword overrides)
    and the budget (None without one)."""

    rules: Recipe
    budget: Budget | None


@dataclass(frozen=True)
class _Measure:
    """What a budget measures its options on (the arguments of :func:`plan` a budget reads)."""

    calibration: list[object] | None
    example_inputs: object
    max_rows: int | None
    progress: bool
    heldout: Iterable[object] | torch.Tensor | None
    mode: str


def _resolve(
    recipe: str | Path | dict | Recipe | None,
    group: str | FiniteGroup | list[str] | None,
    rank: int | None,
    budget: Budget | str | dict | None,
    **overrides: object,
) -> _Resolved:
    """The recipe loaded, the budget parsed and the keyword overrides checked, once per call (bad values fail here,
    before any copy or work)."""
    loaded = recipe if recipe is None or isinstance(recipe, Recipe) else load_recipe(recipe)
    budget, group = _budget(budget, loaded, group, rank)
    return _Resolved(_rules(loaded, group=group, rank=rank, **overrides), budget)


def _plan(
    model: nn.Module, resolved: _Resolved, include: str | None, exclude: str | None, measure: _Measure
) -> CompressionPlan:
    """:func:`plan` on checked arguments: one :class:`LayerPlan` per dense layer, then the budget's allocation."""
    traced = find_layers(model)
    plans = _layer_plans(model, traced, resolved, include, exclude)
    the_plan = CompressionPlan(model, plans, traced.failure is None, traced.failure, traced.graph_module)
    if resolved.budget is not None:
        with unfused_paths(model):  # the measuring hooks see every Linear called, on plain tensors
            the_plan.budget = plan_budget(
                plans, model, traced.graph_module, resolved.budget, measure.calibration, measure.example_inputs,
                measure.max_rows, measure.progress, measure.heldout, measure.mode,
            )  # fmt: skip
        the_plan.layers = the_plan.budget.allocated(plans)
    return the_plan


def _layer_plans(
    model: nn.Module, traced: TraceResult, resolved: _Resolved, include: str | None, exclude: str | None
) -> list[LayerPlan]:
    """Each dense layer's plan from its rules (with a budget, ``on_mismatch="error"`` means that no candidate
    group fits, which the budget checks, not that the first one does not); tied weights and the layers the graph
    pass keeps dense stay dense. Warns about patterns and name rules that match no layer."""
    rules, tied = resolved.rules, _tied_weights(model)
    plans = []
    for name, module in traced.layers:
        handler = handler_for(module)
        if not _selected(name, include, exclude):
            plans.append(LayerPlan(name, module, handler, None, reason="excluded by include/exclude"))
            continue
        settings, decided = rules.resolve(name, handler.type_name)
        budget_checks = resolved.budget is not None and settings is not None and settings.on_mismatch == "error"
        layer_plan = handler.plan(name, module, settings, decided, on_mismatch="skip" if budget_checks else "")
        if layer_plan.form and id(module.weight) in tied:
            others = ", ".join(n for n in tied[id(module.weight)] if not n.startswith(f"{name}."))
            layer_plan.skip(f"weight tied to {others}: tied layers stay dense (untying them would change the model)")
        if layer_plan.form and name in traced.kept_dense:
            layer_plan.skip(traced.kept_dense[name])
        plans.append(layer_plan)
    layer_names = [name for name, _ in traced.layers]
    if include is not None and not any(_selected(name, include, exclude) for name in layer_names):
        _warn_unmatched(f"include={include!r}", "the pattern must match the whole name", layer_names)
    for name in rules.unmatched_names(layer_names):
        _warn_unmatched(f"recipe rule name={name!r}", "a name rule gives the layer's whole name", layer_names)
    return plans


def _selected(name: str, include: str | None, exclude: str | None) -> bool:
    """Whether ``include``/``exclude`` let the layer ``name`` through (each must match the whole name)."""
    return (include is None or name_matches(include, name)) and (exclude is None or not name_matches(exclude, name))


def _check_arguments(
    model: object, include: object, exclude: object, inplace: object, progress: object, calibration_mode: object
) -> None:
    """The arguments :func:`plan` and :func:`compress` share that no recipe carries, checked before any work."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress expects an nn.Module, got {type(model).__name__}")
    for what, pattern in (("include", include), ("exclude", exclude)):
        if pattern is not None:
            check_pattern(pattern, what)
    check_flag(inplace, "inplace")
    check_flag(progress, "progress")
    check_mode(calibration_mode)


def _warn_unmatched(what: str, hint: str, layer_names: list[str]) -> None:
    """One warning that ``what`` names no dense layer, with a few of the real names."""
    shown = ", ".join(repr(n) for n in layer_names[:4]) + (", ..." if len(layer_names) > 4 else "")
    warnings.warn(
        f"gmcompress: {what} matches none of the {len(layer_names)} dense layers ({hint}; the layers are "
        f"{shown or 'none'})",
        stacklevel=5,
    )


_GROUP_FORMS = 'a group spec such as "C8" (or "D4", "C4xC4", "C2^3") or a gm.groups.FiniteGroup'


def _check_group_argument(group: object) -> None:
    """The ``group`` keyword without a budget: a spec string or a FiniteGroup (a list of groups needs a budget)."""
    if group is None or isinstance(group, (str, FiniteGroup)):
        return
    if isinstance(group, (list, tuple)):
        raise TypeError(f"group: a list of groups ({group!r}) needs a budget to choose among them")
    if isinstance(group, bytes):
        suggestion = group.decode(errors="replace")
    elif isinstance(group, int) and not isinstance(group, bool) and group > 0:
        suggestion = f"C{group}"
    else:
        suggestion = "C8"
    raise TypeError(
        f"group={group!r} ({type(group).__name__}): expected {_GROUP_FORMS}; did you mean group={suggestion!r}?"
    )


def _budget(
    budget: Budget | str | dict | None,
    recipe: Recipe | None,
    group: str | FiniteGroup | list[str] | None,
    rank: int | None,
) -> tuple[Budget | None, str | FiniteGroup | None]:
    """The budget (argument, else the recipe's ``budget:``) and the group the base rules use.

    With a budget, ``group`` names the candidate groups (a family such as "C", a group or a list) and the
    ranks are chosen, so ``rank`` must not be given."""
    budget = budget if budget is not None else recipe.budget if recipe is not None else None
    if budget is None:
        _check_group_argument(group)
        return None, group
    if isinstance(group, FiniteGroup):
        if spec_of(group) is None:
            raise TypeError(
                f"group={group!r} with a budget: a budget's candidate groups are specs (a family such as 'C', a "
                "spec or a list of specs), and no spec rebuilds this group; compress without a budget to use it"
            )
        group = spec_of(group)
    budget = Budget.parse(budget)
    if group is not None:
        budget = replace(budget, groups=group)
    if rank is not None:
        raise ValueError(f"rank={rank} with a budget: the budget chooses each layer's rank (leave rank out)")
    return budget, budget.groups[0]


def _tied_weights(model: nn.Module) -> dict[int, list[str]]:
    """Parameters reachable from more than one *module object*: id -> every name they have."""
    names: dict[int, list[str]] = {}
    owners: dict[int, set[int]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if full not in names.setdefault(id(p), []):
                names[id(p)].append(full)
            owners.setdefault(id(p), set()).add(id(module))
    return {k: v for k, v in names.items() if len(owners[k]) > 1}


def compress(
    model: nn.Module,
    group: str | FiniteGroup | None = None,
    rank: int | None = None,
    *,
    recipe: str | Path | dict | Recipe | None = None,
    include: str | None = None,
    exclude: str | None = None,
    example_inputs: object = None,
    calibration: Iterable[object] | torch.Tensor | dict | None = None,
    inplace: bool = False,
    on_mismatch: str | None = None,
    modulate: bool | None = None,
    conv_group: str | FiniteGroup | None = None,
    min_features: int | None = None,
    damping: float | None = None,
    max_calibration_rows: int | None = None,
    calibration_mode: str = "sequential",
    progress: bool = True,
    budget: Budget | str | dict | None = None,
    heldout: Iterable[object] | torch.Tensor | None = None,
) -> nn.Module:
    """Replace the dense ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` layers of ``model`` by group-matrix layers.

    Settings come from ``recipe`` (a YAML path, a dict or a :class:`~gmcompress.recipe.Recipe`) with the
    keyword arguments (``group``, ``rank``, ``on_mismatch`` = "skip" | "pad" | "error", ``modulate``,
    ``conv_group``, ``min_features``, ``damping``) overriding its defaults; ``include``/``exclude`` are
    regexes that must match a whole module name. With ``calibration`` (one batch: a tensor or a dict of keyword
    inputs; or an iterable of batches such as a list or a DataLoader: tensors, tuples or dicts of model inputs, or
    ``(inputs, labels)`` pairs read as ``finetune`` reads them, see
    :func:`~gmcompress.graph.batches.calibration_batches`) layers are fitted activation-aware from per-layer input
    statistics (``max_calibration_rows`` caps the rows per layer; None: all of them). ``calibration_mode``
    "sequential" fits the layers in call order, each on the
    inputs the already compressed layers before it produce; "original" fits every layer on the original model's
    activations (see :mod:`gmcompress.graph.calibration`). ``example_inputs`` (one batch: a tensor, a tuple or a dict)
    lets the report measure MACs and latency. No forward path is timed here: each GM layer takes its documented
    ``"auto"`` rule, and the report's latency is the model's as compressed; :func:`freeze` measures every
    layer's forms for serving, on the serving device and batch.
    ``budget`` (a :class:`~gmcompress.Budget`, ``"params=4"`` or a mapping; or the recipe's ``budget:``)
    chooses each layer's group and rank (or keeps it dense) from measured error, size and latency; ``group``
    then names the candidates (a family: "C", "D", a group or a list of groups). See :mod:`gmcompress.budget`.

    Fidelity: the report compares the compressed model with the original on data the fits did not see
    (:mod:`gmcompress.measure.fidelity`): ``heldout`` batches if given, else ``example_inputs``, else the last
    quarter of
    the calibration samples (kept out of the fits). When the model has lost its predictions (top-1 agreement
    under 0.9 for a classifier, else output error over 0.5) ``compress`` warns, naming the layers that fit worst.

    The model is traced with torch.fx and the GM modules take the place of the originals in the
    returned ``GraphModule``; a model that does not trace gets one warning and its modules are swapped
    by name on a copy. The user's model is left untouched unless ``inplace=True`` (then it is modified
    and returned; ``inplace`` and ``progress`` must be real bools), and the global RNG state is left as it was.
    :func:`plan` shows the plan without fitting. The result carries its
    :class:`~gmcompress.report.CompressionReport` as ``.gm_report``.
    """
    _check_arguments(model, include, exclude, inplace, progress, calibration_mode)
    overrides = dict(on_mismatch=on_mismatch, modulate=modulate, conv_group=conv_group)
    resolved = _resolve(recipe, group, rank, budget, **overrides, min_features=min_features, damping=damping)
    if calibration is not None:  # a list: a budget reads the batches before the fits do, a generator must not run dry
        calibration = calibration_batches(model, calibration)
    calibration, heldout, source = _fidelity_data(calibration, heldout, example_inputs)
    with torch.random.fork_rng(devices=cuda_devices(model)):
        working = model if inplace else _copy(model)
        modes = {name: m.training for name, m in working.named_modules(remove_duplicate=False)}
        with eval_mode(working):
            reference = reference_outputs(working, heldout) if heldout is not None else None
            measure = _Measure(calibration, example_inputs, max_calibration_rows, progress, heldout, calibration_mode)
            the_plan = _plan(working, resolved, include, exclude, measure)
            if the_plan.trace_failure is not None:
                warnings.warn(
                    f"gmcompress: {type(model).__name__} does not trace with torch.fx ({the_plan.trace_failure}); "
                    "swapping its layers by name instead",
                    stacklevel=2,
                )
            root = working if inplace or the_plan.graph_module is None else the_plan.graph_module
            if inplace:
                _keep_lifted_dense(the_plan)
            apply_plan(
                the_plan, root, example_inputs, calibration, max_calibration_rows, progress, calibration_mode,
                original=None if inplace else model,
            )  # fmt: skip
            if reference is not None:
                root.gm_report.fidelity = compare_outputs(reference, reference_outputs(root, heldout), source)
                _warn_if_lost(root.gm_report)
        _restore_modes(root, modes)
    return root


def _keep_lifted_dense(the_plan: CompressionPlan) -> None:
    """In place, the model's own forward runs: a layer lifted from a functional call exists only in the GraphModule."""
    for p in the_plan.layers:
        if p.form and the_plan.graph_module is not None and is_lifted(the_plan.graph_module, p.name):
            p.skip(
                "lifted from a functional call (F.linear/F.conv1d/F.conv2d in a forward), which only the GraphModule "
                "that compress returns without inplace=True calls as a layer; in place it stays dense"
            )


def _restore_modes(root: nn.Module, modes: dict[str, bool]) -> None:
    """Each module of the result takes the training flag its counterpart in the model had (``modes``, by name):
    the module itself, the dense layer a GM layer replaced, the module a GraphModule stands for or whose weight a
    lifted functional layer holds (:func:`~gmcompress.graph.fx.source_name`); a module with none, its parent's."""
    for name, module in root.named_modules(remove_duplicate=False):
        source = source_name(root, name)
        module.training = modes[source] if source in modes else root.get_submodule(name.rpartition(".")[0]).training


def _fidelity_data(
    calibration: list[object] | torch.Tensor | None, heldout: object, example_inputs: object
) -> tuple[list[object] | torch.Tensor | None, list[object] | None, str]:
    """``(calibration for the fits, held-out batches, what they are)``: ``heldout`` if given, else
    ``example_inputs``, else the last quarter of the calibration samples, which the fits then do not see
    (:func:`~gmcompress.measure.fidelity.split_holdout`); no held-out batches when there is none of these."""
    if heldout is not None:
        return calibration, as_batches(heldout), "held-out"
    if example_inputs is not None:
        return calibration, [example_inputs], "example-input"
    if calibration is None:
        return None, None, ""
    fit, held = split_holdout(calibration)
    return fit, as_batches(held), "held-out calibration"


def _warn_if_lost(report: CompressionReport) -> None:
    """One warning when the compressed model no longer does what the original did (:attr:`Fidelity.lost`)."""
    fidelity: Fidelity = report.fidelity
    if not fidelity.lost:
        return
    worst = sorted(report.compressed, key=_layer_error, reverse=True)[:3]
    names = ", ".join(f"{r.name} ({_layer_error(r):.2f})" for r in worst)
    target = "agreement=0.95" if fidelity.classifier else "max_error=0.1"
    warnings.warn(
        f"gmcompress: the compressed model has lost the original's predictions ({fidelity.summary()}); the layers "
        f"that fit worst (output or weight error): {names}. Fix: compress under a fidelity budget "
        f"(group='C', budget=gm.Budget({target}) with calibration data), a higher rank, or fewer layers (exclude=...)",
        stacklevel=3,
    )


def _layer_error(row: LayerReport) -> float:
    error = row.output_error if row.output_error is not None else row.fit_error
    return -1.0 if error is None or error != error else error


def _copy(model: nn.Module, caller: str = "compress") -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as err:  # locks, open files, generators ... in the user's module
        raise TypeError(
            f"{caller}(inplace=False) copies the model first, and {type(model).__name__} cannot be deep-copied "
            f"({type(err).__name__}: {err}); pass inplace=True to {caller} it in place"
        ) from None


def apply_plan(
    the_plan: CompressionPlan,
    root: nn.Module,
    example_inputs: object = None,
    calibration: Iterable[object] | torch.Tensor | None = None,
    max_calibration_rows: int | None = None,
    progress: bool = True,
    calibration_mode: str = "sequential",
    original: nn.Module | None = None,
) -> CompressionReport:
    """Fit every planned layer, swap it into ``root`` at all its names, and attach the report as ``root.gm_report``.

    ``original``: an untouched dense copy of the model; with it the latencies before and after are measured at
    the end in alternating rounds (:func:`~gmcompress.measure.timing.measure_latencies`), else one after the other."""
    model = the_plan.model
    report = CompressionReport(traced=the_plan.traced, trace_failure=the_plan.trace_failure)
    report.params_before, report.bytes_before = _count_params(model), state_dict_bytes(model)
    macs_before: dict[str, int] = {}
    if example_inputs is not None:
        report.macs_before, macs_before = count_macs(model, example_inputs)
        if original is None:
            report.latency_before_ms = measure_latency(model, example_inputs)
    todo = [p for p in the_plan.layers if p.form]
    bar = tqdm(total=len(todo), desc="gmcompress: fitting", disable=not progress or not todo, unit="layer")
    swaps = _Swaps(root, module_aliases(root), bar)
    with bar, unfused_paths(model):
        calibrate(
            model, the_plan.graph_module, todo, calibration, partial(install, swaps), calibration_mode,
            max_calibration_rows,
        )  # fmt: skip
    _warn_few_rows(swaps.few_rows)
    report.layers = [swaps.rows.get(p.name, _report_row(p)) for p in the_plan.layers]
    if the_plan.budget is not None:
        report.budget = _budget_outcome(the_plan.budget, root)
    report.params_after, report.bytes_after = _count_params(root), state_dict_bytes(root)
    if example_inputs is not None:
        report.macs_after, macs_after = count_macs(root, example_inputs)
        if original is None:
            report.latency_after_ms = measure_latency(root, example_inputs)
        else:
            report.latency_before_ms, report.latency_after_ms = measure_latencies(original, root, example_inputs)
        for row in report.layers:
            row.macs_before, row.macs_after = macs_before.get(row.name), macs_after.get(row.name)
    root.gm_report = report
    return report


@dataclass
class _Swaps:
    """Where :func:`install` puts the fitted layers (``root``, at every alias) and what it records of them."""

    root: nn.Module
    aliases: dict[int, list[str]]
    bar: tqdm
    rows: dict[str, LayerReport] = field(default_factory=dict)  # the report row of each fitted layer
    few_rows: list[str] = field(default_factory=list)  # layers fitted on fewer calibration rows than inputs


def install(swaps: _Swaps, p: LayerPlan, stats: InputStats | None) -> nn.Module:
    """Build the planned layer ``p`` from ``stats``, swap it in at every name its dense layer has and record its
    report row (the ``install`` step :func:`~gmcompress.graph.calibration.calibrate` calls per layer)."""
    if stats is not None and stats.rows < stats.gram.shape[0]:
        swaps.few_rows.append(f"{p.name} ({stats.rows} rows for {stats.gram.shape[0]} inputs)")
    new = p.build(stats)
    _keep_frozen(p.module, new)
    for alias in swaps.aliases.get(id(p.module), [p.name]):
        swap(swaps.root, alias, new)
    swaps.rows[p.name] = _fitted_row(p, new)
    swaps.bar.set_postfix_str(p.name, refresh=False)
    swaps.bar.update()
    return new


def _warn_few_rows(few_rows: list[str]) -> None:
    if few_rows:
        warnings.warn(
            f"gmcompress: calibration reached {len(few_rows)} layer(s) with fewer rows than input features, so their "
            f"activation-aware fits rest on the ridge term for the unseen directions: {', '.join(few_rows[:5])}"
            f"{' ...' if len(few_rows) > 5 else ''}. Give more calibration samples",
            stacklevel=4,
        )


def _budget_outcome(outcome: BudgetOutcome, root: nn.Module) -> str:
    """The budget's summary with the compressed model's measured error; a fidelity budget it misses warns."""
    summary, warning = outcome.check_compressed(root)
    if warning is not None:
        warnings.warn(warning, stacklevel=3)
    return summary


def _keep_frozen(dense: nn.Module, new: nn.Module) -> None:
    """A frozen weight (or bias) of the dense layer stays frozen in its replacement."""
    for name, q in new.named_parameters():
        source = dense.bias if name == "bias" and dense.bias is not None else dense.weight
        q.requires_grad_(source.requires_grad)


def _fitted_row(p: LayerPlan, new: nn.Module) -> LayerReport:
    row = _report_row(p)
    row.status = "compressed"
    row.path = new.resolved_impl() if hasattr(new, "resolved_impl") else "dense"
    row.params_after = _count_params(new)
    row.fit_error, row.output_error = new.fit_error, new.output_error
    row.equivariance_error = equivariance_error(new)
    return row


def _count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def freeze(model: nn.Module, example_inputs: object, *, inplace: bool = False, progress: bool = True) -> nn.Module:
    """An inference copy of compressed ``model`` in which every GM layer takes its fastest form, measured.

    Each GM layer's input is captured on ``example_inputs`` (one batch as it will be served: a tensor, a tuple or a
    dict, on the model's device), and the layer is timed there in each of its forward paths (``impls()``) and as its
    plain torch layer (``to_dense()``), in interleaved rounds (:func:`~gmcompress.measure.paths.time_forms`). The
    fastest is kept (a GM form only when at least 5% faster than the plain layer,
    :func:`~gmcompress.measure.paths.serving_form`): a
    path (``layer.impl``), or the plain ``nn.Linear``/``nn.Conv*`` swapped in at every name the layer has. Last,
    the whole model is timed on ``example_inputs`` (interleaved rounds,
    :func:`~gmcompress.measure.paths.model_seconds`) with the forms chosen layer by layer, with the forms the layers
    had as compressed, and with every such layer as its plain torch layer, and the fastest serves (one with GM
    forms only when at least 5% faster than the torch layers): layers timed alone do not add up to the model
    (caches, threads and memory traffic differ), and the frozen copy should not be slower than the dense model or
    the compressed one. Use it
    after ``compress`` (and ``finetune``), before serving, on the serving device and batch.

    The result is in eval mode with ``requires_grad`` False on every parameter, and carries a
    :class:`~gmcompress.measure.paths.FreezeReport` as ``.freeze_report``. It is for inference: ``finetune`` refuses it
    and a backward through it reaches no parameter; train the compressed model and freeze it again. Freezing a
    frozen model is an error (its plain layers can no longer take a GM path): freeze the model it came from. A
    model without GM layers is returned as it is (a copy, eval, no gradients) with a warning. The user's model is
    left untouched unless ``inplace=True`` (then it is modified and returned); ``progress`` shows a bar over the
    layers.
    """
    _check_freeze_arguments(model, example_inputs, inplace, progress)
    frozen = model if inplace else _copy(model, "freeze")
    frozen.eval()
    report = FreezeReport(device=_device_of(frozen))
    layers = {name: m for name, m in frozen.named_modules() if isinstance(m, GMLayer)}
    if not layers:
        warnings.warn(
            f"gmcompress.freeze: {type(model).__name__} has no GM layer (compress it first); returned it unchanged, "
            "in eval mode without gradients",
            stacklevel=2,
        )
    inputs = first_inputs(frozen, example_inputs, layers) if layers else {}
    aliases = module_aliases(frozen)
    timed: list[_Timed] = []  # the layers with a plain torch layer: the whole-model check chooses among their forms
    for name, layer in tqdm(layers.items(), desc="gmcompress: timing forms", disable=not progress, unit="layer"):
        if name not in inputs:
            report.not_called.append(name)
            continue
        entry = _freeze_layer(frozen, name, layer, inputs[name], aliases.get(id(layer), [name]))
        if entry is not None:
            report.layers.append(entry.choice)
            if entry.torch_layer is not None:
                timed.append(entry)
    if timed:
        _check_whole_model(frozen, example_inputs, timed, report)
    frozen.requires_grad_(False)
    setattr(frozen, FROZEN_ATTRIBUTE, report)
    return frozen


def _check_freeze_arguments(model: object, example_inputs: object, inplace: object, progress: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"freeze expects an nn.Module (a compressed model), got {type(model).__name__}")
    if is_frozen(model):
        raise ValueError(
            f"freeze: {type(model).__name__} is already frozen (it has .{FROZEN_ATTRIBUTE}; its layers that became "
            "plain torch layers can no longer take a GM path): freeze the compressed model it came from, "
            "gm.freeze(compressed, example_inputs), on the serving device and batch"
        )
    if example_inputs is None:
        raise TypeError(
            "freeze needs example_inputs: one batch as it will be served (a tensor, a tuple or a dict of inputs, on "
            "the model's device); every GM layer is timed on its input from that batch"
        )
    check_flag(inplace, "inplace")
    check_flag(progress, "progress")


def _device_of(model: nn.Module) -> str:
    devices = sorted({str(t.device) for t in [*model.parameters(), *model.buffers()]})
    return ", ".join(devices) or "cpu"


def _freeze_layer(root: nn.Module, name: str, layer: GMLayer, x: torch.Tensor, names: list[str]) -> _Timed | None:
    """Time every form of ``layer`` on ``x`` and keep the fastest: its path, or its plain torch layer at ``names``
    (None, and nothing timed, for a layer with one form: one path and no plain torch layer, such as ``GMPool``)."""
    torch_layer = plain_layer(layer)
    if torch_layer is None and len(layer.impls()) <= 1:
        return None
    torch_layer = torch_layer.train(False) if torch_layer is not None else None
    as_compressed = layer.path_for(layer.batch_of(x)) if layer.impls() else AS_IS  # before timing moves impl
    times = time_forms(layer, x, torch_layer, FREEZE_SECONDS, FREEZE_ROUNDS)
    chosen = serving_form(times)
    ms = {form: seconds * 1e3 for form, seconds in times.items()}
    entry = _Timed(FormChoice(name, type(layer).__name__, tuple(x.shape), ms, chosen), layer, torch_layer, names,
                   as_compressed)  # fmt: skip
    entry.serve(root, chosen)
    return entry


@dataclass
class _Timed:
    """A GM layer freeze timed: its choice, its plain torch layer (None where it has none), every name it has in the
    model, and the path it took as compressed (its ``impl`` rule at this input)."""

    choice: FormChoice
    layer: GMLayer
    torch_layer: nn.Module | None
    names: list[str]
    as_compressed: str

    def serve(self, root: nn.Module, form: str) -> None:
        """Put the layer in ``root`` in ``form``: a path (or :data:`AS_IS`), or :data:`TORCH_LAYER`."""
        module = self.torch_layer if form == TORCH_LAYER else self.layer
        for alias in self.names:
            swap(root, alias, module)
        if form not in (TORCH_LAYER, AS_IS):
            self.layer.impl = form


def _check_whole_model(frozen: nn.Module, example_inputs: object, timed: list[_Timed], report: FreezeReport) -> None:
    """Time ``frozen`` on ``example_inputs`` with the ``timed`` layers in each whole-model candidate (the forms
    chosen layer by layer, the forms they had as compressed, all plain torch layers) in :data:`FREEZE_ROUNDS`
    interleaved rounds, and leave it in the fastest (a candidate with GM forms only when :data:`FREEZE_MARGIN`
    faster than the torch layers); the times go to ``report.model_ms``, the winner to ``report.served``."""
    candidates = {
        GM_FORMS: [t.choice.chosen for t in timed],
        AS_COMPRESSED: [t.as_compressed for t in timed],
        TORCH_LAYERS: [TORCH_LAYER] * len(timed),
    }
    if candidates[GM_FORMS] in (candidates[AS_COMPRESSED], candidates[TORCH_LAYERS]):
        del candidates[GM_FORMS]  # the same model as another candidate

    def serve(label: str) -> None:
        for t, form in zip(timed, candidates[label]):
            t.serve(frozen, form)

    def timer(label: str) -> Callable[[], float]:
        def run() -> float:
            serve(label)
            return model_seconds(frozen, example_inputs)

        return run

    times = interleaved_best({label: timer(label) for label in candidates}, FREEZE_ROUNDS)
    best = min((label for label in candidates if label != TORCH_LAYERS), key=times.get)
    served = TORCH_LAYERS if times[best] * FREEZE_MARGIN > times[TORCH_LAYERS] else best
    serve(served)
    for t, form in zip(timed, candidates[served]):
        t.choice.chosen, t.choice.by_model = form, form != t.choice.chosen
    report.model_ms = {label: seconds * 1e3 for label, seconds in times.items()}
    report.served = served
