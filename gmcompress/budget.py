"""Compression under a budget: per-layer groups and ranks chosen from measured sensitivity and latency.

``compress(model, budget=Budget(params=4.0), calibration=..., example_inputs=...)`` (or ``plan(...)`` for the
plan alone). For every layer the plan would compress, the options are "keep dense" and every group of
``Budget.groups`` whose order divides the layer's sizes at the ranks of :func:`rank_ladder` up to ``max_rank``:
``1, 2, 4, ..., N/2`` (each step halves the compression, and ``C_N`` rank r has the size of ``C_2N`` rank 2r, so
the groups together cover every power-of-two ratio), then ``3N/4, 7N/8, ..., N - 1`` (fractions of the dense
size between 1/2 and 1, so a sensitive layer can give up a little instead of half). Each option is measured, then
one option per layer is allocated (:func:`gmcompress.planning.allocation.allocate`, a multiple-choice knapsack).
Everything is measured on the traced graph when there is one (it calls the layers lifted from functional calls as
modules):

* **size**: parameters from the planned layer (no fit);
* **latency** (``speedup`` budgets): each option's fastest forward path, timed on the layer's real input
  from ``example_inputs`` on an unfitted layer of its shape, in the same interleaved rounds as the dense layer
  (:func:`gmcompress.measure.paths.time_layers`); the model's latency is predicted as ``T_model - sum_l t_dense_l +
  sum_l t_l`` (``T_model`` measured);
* **sensitivity** (needs ``calibration``): each option fitted activation-aware on the original model's
  statistics on the fit batches; its *layer error* ``||(W - W_gm) X^T|| / ||W X^T||`` and its *model error*, the
  relative change of the model's output tensors (all of them) on the probe batch (the first held-out batch, else
  the first calibration batch) when only this layer is replaced (a forward hook swaps the output; the user's
  model, its modules' modes and the RNG are left as they were). Model errors of different layers are treated as
  independent: the squared errors add.

Allocation: ``params``: least summed squared model error with at most ``dense / params`` weights in the
candidate layers; ``speedup``: least error with a predicted latency at most ``T_model / speedup``. Budgets
that no choice meets fail before any fit (size and latency are known first) with the closest achievable value.

Fidelity budgets, ``max_error`` (relative output error) and ``agreement`` (top-1 agreement with the original,
classifier-shaped outputs only), are checked on held-out batches (``heldout``, else the last part of the
calibration batches, :func:`gmcompress.measure.fidelity.split_holdout`, which the fits then do not use): errors compound
through the layers, so the independent sum under-predicts. The fewest weights with summed squared model errors
under a cap (``max_error^2``; for ``agreement`` ``8 (1 - agreement)`` to start) are fitted as ``compress`` fits
them (``calibrate`` on the fit batches) and the model is measured on the held-out batches. While nothing has
passed, a miss shrinks the cap to the failed allocation's summed error times ``(0.9 target / measured)^2``
(``agreement``: ``(0.9 (1 - target) / (1 - measured))^2``), but by at most :data:`MAX_TIGHTEN`; once one cap has
passed and a larger one failed, the next cap is their geometric middle, and the lightest allocation that passed
is kept. A first cap that passes ends the search. Cost: at most :data:`VERIFY_ROUNDS` checks (one more with
``min_params``), each one set of final fits plus one forward pass over the held-out batches. With ``min_params`` an
allocation smaller than that becomes the least-error one at ``min_params``; when that one fails its check, a
``BudgetError`` names its measured value, before the final fits. Without it, every layer dense is exact: when no check
passes, that is the allocation, with a warning.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .core.tables import format_table
from .graph.batches import cuda_devices, eval_mode, first_tensor, output_tensors, run_model
from .graph.calibration import calibrate, capture_statistics
from .measure.fidelity import Fidelity, as_batches, compare_outputs, reference_outputs, split_holdout
from .measure.paths import capture_layer_inputs, time_layers
from .measure.timing import measure_latency
from .planning.allocation import Allocation, Infeasible, allocate
from .planning.budget_spec import FIDELITY_KINDS, Budget, BudgetError
from .planning.handlers import LayerPlan
from .planning.settings import LayerSettings

__all__ = ["Option", "LayerOptions", "BudgetOutcome", "plan_budget", "rank_ladder"]

VERIFY_ROUNDS = 5  # allocations fitted and measured on the held-out batches at most (one more for min_params)
TIGHTEN_MARGIN = 0.9  # a failed check shrinks the error cap a little further than the measured ratio asks
MAX_TIGHTEN = 16.0  # ... but by at most this factor (an agreement far below target asked for 300x: all dense)
CAP_RESOLUTION = 1.1  # a passed and a failed cap closer than this ratio end the search
AGREEMENT_START = 8.0  # an agreement budget's first error cap: output error^2 <= 8 (1 - agreement), a guess the
# checks then tighten (MNISTNet on 256 held-out digits: output errors 0.18, 0.33 and 0.47 kept 99.6%, 98.4%, 97.7%)


@dataclass
class Option:
    """One choice for one layer: keep it dense (``plan`` skipped) or one group and rank."""

    label: str
    plan: LayerPlan
    params: int
    seconds: float | None = None  # fastest path on the layer's example input
    layer_error: float = 0.0
    model_error: float = 0.0


@dataclass
class LayerOptions:
    name: str
    options: list[Option]  # options[0] keeps the layer dense

    @property
    def dense(self) -> Option:
        return self.options[0]


@dataclass
class Verification:
    """One allocation of a fidelity budget fitted as ``compress`` fits it and measured on the held-out batches."""

    choice: tuple[int, ...]  # the option index per layer
    params_ratio: float
    predicted_error: float  # sqrt(sum of squared model errors) of its options
    measured: Fidelity

    def value(self, kind: str) -> float:
        """The measured value of a fidelity budget's quantity (NaN reads as the worst)."""
        value = self.measured.output_error if kind == "max_error" else self.measured.top1_agreement
        return value if value == value else (math.inf if kind == "max_error" else 0.0)


@dataclass
class BudgetOutcome:
    """The measured options of every candidate layer, the allocation and what it achieves (predicted, and for
    fidelity budgets measured on held-out batches)."""

    budget: Budget
    layers: list[LayerOptions]
    allocation: Allocation
    model_seconds: float | None = None  # the original model on example_inputs
    probe: object = field(default=None, repr=False)  # the calibration batch the model errors are measured on
    reference: torch.Tensor | None = field(default=None, repr=False)  # the original model's output on it
    fit_batches: list[object] = field(default_factory=list, repr=False)  # the calibration batches the fits use
    heldout: list[object] | None = field(default=None, repr=False)  # the batches the fidelity is measured on
    heldout_reference: list[object] | None = field(default=None, repr=False)  # the original's outputs on them
    verified: list[Verification] = field(default_factory=list)  # every allocation checked, in order

    def measured_error(self, model: nn.Module) -> float:
        """``||y - y_ref|| / ||y_ref||`` of ``model``'s outputs on the held-out batches (on the probe batch when
        there are none): what the plan predicted."""
        if self.heldout is None:
            return _relative_error(_output(model, self.probe), self.reference)
        return self.measured_fidelity(model).output_error

    def measured_fidelity(self, model: nn.Module) -> Fidelity:
        """:class:`~gmcompress.measure.fidelity.Fidelity` of ``model`` against the original on the held-out batches."""
        with eval_mode(model):
            return compare_outputs(self.heldout_reference, reference_outputs(model, self.heldout), "held-out")

    def check_compressed(self, model: nn.Module) -> tuple[str, str | None]:
        """The summary with the compressed ``model``'s measured error (its final fits see the compressed prefix,
        the options did not), and a warning when it misses a fidelity budget (else None)."""
        if self.budget.kind == "agreement":
            agreement = self.measured_fidelity(model).top1_agreement
            text = f"{self.summary()}; compressed model's top-1 agreement {agreement:.4f}"
            if agreement < self.budget.target:
                return text, (
                    f"gmcompress: budget {self.budget}: the compressed model's top-1 agreement on the held-out "
                    f"batches is {agreement:.4f}; ask for a higher agreement to stay above it"
                )
            return text, None
        measured = self.measured_error(model)
        text = f"{self.summary()}; measured model error {measured:.4f}"
        if self.budget.kind == "max_error" and measured > self.budget.target:
            where = "the held-out batches" if self.heldout is not None else "the probe batch"
            return text, (
                f"gmcompress: budget {self.budget}: the compressed model's output error on {where} is "
                f"{measured:.4f} (predicted {self.model_error:.4f}); ask for a smaller max_error to stay under it"
            )
        return text, None

    @property
    def chosen(self) -> list[Option]:
        return [lo.options[j] for lo, j in zip(self.layers, self.allocation.choice)]

    def allocated(self, plans: list[LayerPlan]) -> list[LayerPlan]:
        """``plans`` with each candidate layer's plan replaced by its chosen option's (the others as they are)."""
        chosen = {lo.name: o.plan for lo, o in zip(self.layers, self.chosen)}
        return [chosen.get(p.name, p) for p in plans]

    @property
    def params_ratio(self) -> float:
        return sum(lo.dense.params for lo in self.layers) / sum(o.params for o in self.chosen)

    @property
    def model_error(self) -> float:
        """``sqrt(sum of squared model errors)`` of the chosen options: the predicted output error."""
        return math.sqrt(sum(o.model_error**2 for o in self.chosen))

    @property
    def predicted_speedup(self) -> float | None:
        """The model's latency before / after predicted from the timed layers (None without timings)."""
        speed = self._speedup_of(self.chosen)
        return None if math.isnan(speed) else speed

    @property
    def achieved(self) -> float:
        """The planned value of the budgeted quantity (for a fidelity budget, as measured on the held-out batches;
        an all-dense allocation is exact)."""
        kind = self.budget.kind
        if kind in FIDELITY_KINDS:
            exact = 0.0 if kind == "max_error" else 1.0
            return self.chosen_check.value(kind) if self.chosen_check is not None else exact
        return {"params": self.params_ratio, "speedup": self.predicted_speedup}[kind]

    def summary(self) -> str:
        method = "exact" if self.allocation.exact else f"Lagrangian, optimality gap {self.allocation.gap:.2e}"
        speed = self.predicted_speedup
        parts = [
            f"budget {self.budget}: planned {self.params_ratio:.2f}x fewer weights in {len(self.layers)} layers",
            f"predicted model error {self.model_error:.4f}",
        ]
        if speed is not None:
            parts.append(f"predicted speed-up {speed:.2f}x")
        if self.budget.fidelity:
            parts.append(self._verified_summary())
        return ", ".join(parts) + f" ({method} allocation)"

    @property
    def chosen_check(self) -> Verification | None:
        """The held-out check of the chosen allocation (None when it was not checked: every layer dense)."""
        return next((c for c in self.verified if c.choice == self.allocation.choice), None)

    def _verified_summary(self) -> str:
        rounds = f"{len(self.verified)} allocation{'s' if len(self.verified) != 1 else ''} checked on held-out data"
        if self.chosen_check is None:
            return f"every layer dense (exact; {rounds})"
        return f"measured {self.chosen_check.measured.summary().removeprefix('fidelity ')} ({rounds})"

    def table(self) -> str:
        rows = []
        for lo, o in zip(self.layers, self.chosen):
            rows.append(
                [
                    lo.name,
                    o.label,
                    f"{lo.dense.params:,}",
                    f"{o.params:,}",
                    "-" if o.seconds is None else f"{o.seconds * 1e3:.3f}",
                    "-" if lo.dense.seconds is None else f"{lo.dense.seconds * 1e3:.3f}",
                    f"{o.layer_error:.4f}",
                    f"{o.model_error:.4f}",
                ]
            )
        header = ["layer", "choice", "params dense", "params", "ms", "ms dense", "layer err", "model err"]
        return format_table(header, rows) + "\n" + self.summary()

    def to_recipe(self) -> dict[str, Any]:
        """A recipe (mapping; ``yaml.safe_dump`` it to keep it) with one ``name:`` rule per candidate layer that
        gives the chosen group and rank, or ``skip: true``: compressing with it reproduces this allocation
        without measuring the options again."""
        rules = []
        for lo, o in zip(self.layers, self.chosen):
            rule: dict[str, Any] = {"name": lo.name}
            if o.plan.form:
                default = LayerSettings()
                for f in fields(LayerSettings):  # the layer's settings where they differ from the defaults
                    value = getattr(o.plan.settings, f.name)
                    if value != getattr(default, f.name):
                        rule[f.name] = list(value) if isinstance(value, tuple) else value
            else:
                rule["skip"] = True
            rules.append(rule)
        return {"version": 1, "defaults": {"group": None}, "layers": rules}

    def frontier(self, points: int = 24) -> list[tuple[float, float, float]]:
        """``(params ratio, predicted model error, predicted speed-up or nan)`` of the best allocations for a
        sweep of parameter budgets from the smallest model to the dense one."""
        if points < 2:
            raise ValueError(
                f"frontier: points must be at least 2 (the smallest model and the dense one), got {points}"
            )
        costs = [[o.model_error**2 for o in lo.options] for lo in self.layers]
        weights = [[float(o.params) for o in lo.options] for lo in self.layers]
        dense = sum(lo.dense.params for lo in self.layers)
        low = sum(min(w) for w in weights)
        out = []
        for i in range(points):
            cap = low * (dense / low) ** (i / (points - 1))
            a = allocate(costs, weights, cap)
            chosen = [lo.options[j] for lo, j in zip(self.layers, a.choice)]
            out.append((dense / a.weight, math.sqrt(a.cost), self._speedup_of(chosen)))
        return out

    def _speedup_of(self, chosen: list[Option]) -> float:
        if self.model_seconds is None or any(o.seconds is None for o in chosen):
            return math.nan
        rest = _rest_seconds(self.model_seconds, self.layers)
        return self.model_seconds / (rest + sum(o.seconds for o in chosen))

    def plot(self, path: str | Path | None = None, uniform: Mapping[str, tuple[float, float]] | None = None):
        """Predicted model error against parameter ratio: the frontier, the chosen plan and ``uniform`` points
        (label -> (ratio, error)). Saves to ``path`` when given; returns the matplotlib figure."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        pts = self.frontier()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=3, label="budget frontier")
        ax.plot([self.params_ratio], [self.model_error], "r*", ms=12, label=f"chosen ({self.budget})")
        for label, (ratio, err) in (uniform or {}).items():
            ax.plot([ratio], [err], "s", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("times fewer weights in the candidate layers")
        ax.set_ylabel("predicted model output error")
        ax.legend(fontsize=7)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


def _rest_seconds(model_seconds: float, layers: list[LayerOptions]) -> float:
    """Model time outside the candidate layers (never below 0: layer timings are separate measurements)."""
    return max(model_seconds - sum(lo.dense.seconds for lo in layers), 0.0)


def rank_ladder(order: int, max_rank: int = 8) -> list[int]:
    """The ranks a budget tries for a group of this order, up to ``max_rank``: 1, 2, 4, ..., order / 2 (each step
    halves the compression), then order - order / 4, order - order / 8, ..., order - 1 (each step halves what is
    saved, so a layer can stay close to its dense size: C8 rank 6 and 7 keep 3/4 and 7/8 of its weights)."""
    ladder, r = [], 1
    while r <= order // 2:
        ladder.append(r)
        r *= 2
    step = order // 4
    while step >= 1:
        ladder.append(order - step)
        step //= 2
    return [r for r in ladder if r <= max_rank] or [1]


def _is_candidate(p: LayerPlan) -> bool:
    """A layer the budget chooses for: one the rules let through (not skipped, not ``group: null`` unless tied by
    conv_group) whose weight is not tied."""
    if p.settings is None or p.reason.startswith("weight tied"):
        return False
    return p.settings.group is not None or bool(p.form)  # without a group, only conv_group plans a layer


def _options(p: LayerPlan, groups: tuple[str, ...], max_rank: int) -> LayerOptions:
    """Keep-dense and every group/rank of ``groups`` that plans for this layer (sizes divide, or padding)."""
    dense = LayerPlan(p.name, p.module, p.handler, p.settings).skip("kept dense by the budget")
    options = [Option("dense", dense, p.params_before)]
    base = p.settings if p.settings.on_mismatch != "error" else replace(p.settings, on_mismatch="skip")  # checked after
    for g in groups:
        first = p.handler.plan(p.name, p.module, replace(base, group=g, rank=1), "budget")
        if not first.form:
            continue
        for r in rank_ladder(first.gm_group.order, max_rank):  # a conv tied by conv_group: that group's order
            candidate = first if r == 1 else p.handler.plan(p.name, p.module, replace(base, group=g, rank=r), "budget")
            options.append(Option(f"{candidate.group} r{r}", candidate, candidate.params_after))
    return LayerOptions(p.name, _unique(options))


def _unique(options: list[Option]) -> list[Option]:
    """One option per distinct layer form (a GMConv2d ignores the feature group: its ranks repeat)."""
    seen, out = set(), []
    for o in options:
        key = (o.plan.form, o.plan.group, o.plan.settings.rank if o.plan.form else None)
        if key not in seen:
            seen.add(key)
            out.append(o)
    return out


def plan_budget(
    plans: list[LayerPlan],
    model: nn.Module,
    graph_module: torch.fx.GraphModule | None,
    budget: Budget,
    calibration: list[object] | None,
    example_inputs: object = None,
    max_calibration_rows: int | None = None,
    progress: bool = True,
    heldout: Iterable[object] | torch.Tensor | None = None,
    calibration_mode: str = "sequential",
) -> BudgetOutcome:
    """Measure every option of every candidate layer of ``plans`` (the layers of ``model``, traced as
    ``graph_module`` when it traces) and allocate them under ``budget``: the outcome, whose
    :meth:`~BudgetOutcome.allocated` gives the plans with the chosen options. ``heldout``: the batches a fidelity
    budget is checked on (default: the last part of ``calibration``, :func:`~gmcompress.measure.fidelity.split_holdout`,
    which the fits then do not use); ``calibration_mode``: how the checked allocations are fitted (as ``compress``
    will). See the module doc."""
    if calibration is None:
        raise BudgetError("a budget needs calibration batches (calibration=...) to measure each option's error")
    if budget.kind == "speedup" and example_inputs is None:
        raise BudgetError(
            "Budget(speedup=...) needs example inputs to time the model and each option (example_inputs=..., or "
            "--example-shape / --example-inputs on the command line)"
        )
    batches = list(calibration)  # the list of batches.calibration_batches
    if not batches:
        raise BudgetError("the calibration batches are empty: a budget measures each option's error on them")
    batches, heldout_batches = _holdout(budget, batches, heldout)
    if any(p.is_meta for p in model.parameters()):
        raise BudgetError(
            "a budget fits and runs every option, so it needs the model's weights: this model is on the meta "
            "device (gm.plan without a budget shows the plan of a meta model)"
        )
    candidates = [p for p in plans if _is_candidate(p)]
    if not candidates:
        raise BudgetError(
            "no layer is left for the budget to choose for: include/exclude, recipe rules (skip, group: null), "
            "min_features or tied weights leave every dense layer as it is"
        )
    options = [_options(p, budget.groups, budget.max_rank) for p in candidates]
    for lo in options:
        if len(lo.options) == 1 and lo.dense.plan.settings.on_mismatch == "error":
            p = lo.dense.plan
            raise ValueError(
                f"layer {p.name!r} ({p.type} {p.shape}): no candidate group of {', '.join(budget.groups)} divides its "
                "sizes; add a group whose order divides them, on_mismatch='pad' or 'skip'"
            )
    layers = [lo for lo in options if len(lo.options) > 1]
    if not layers:
        raise BudgetError(f"no layer can take any of the groups {', '.join(budget.groups)}: nothing to allocate")
    root = measured_root(model, graph_module)
    with eval_mode(model), eval_mode(root), torch.random.fork_rng(devices=cuda_devices(model)):
        model_seconds = _time_options(root, layers, example_inputs) if budget.kind == "speedup" else None
        _check_reachable(budget, layers, model_seconds)
        heldout_reference = _heldout_reference(budget, root, heldout_batches)
        probe, reference = _measure_errors(root, layers, batches, max_calibration_rows, progress, heldout_batches)
        outcome = BudgetOutcome(budget, layers, None, model_seconds, probe, reference, batches, heldout_batches,
                                heldout_reference)  # fmt: skip
        if budget.fidelity:

            def check(allocation: Allocation) -> Verification:
                return _verify(outcome, plans, graph_module, root, allocation, calibration_mode, max_calibration_rows)

            outcome.allocation = _fidelity_allocation(budget, layers, check, outcome.verified)
        else:
            outcome.allocation = _allocate(budget, layers, model_seconds)
    return outcome


def _holdout(
    budget: Budget, batches: list[object], heldout: Iterable[object] | torch.Tensor | None
) -> tuple[list[object], list[object] | None]:
    """``(batches for the fits, held-out batches)``: ``heldout`` when given; else, for a fidelity budget, the
    calibration batches split by :func:`~gmcompress.measure.fidelity.split_holdout`; else no held-out batches."""
    if heldout is not None:
        return batches, as_batches(heldout)
    if not budget.fidelity:
        return batches, None
    try:
        return split_holdout(batches)
    except ValueError as err:
        raise BudgetError(f"Budget({budget}) is checked on held-out calibration samples: {err}") from None


def _heldout_reference(budget: Budget, root: nn.Module, heldout: list[object] | None) -> list[object] | None:
    """The original model's outputs on the held-out batches; an ``agreement`` budget needs them classifier-shaped."""
    if heldout is None:
        return None
    reference = reference_outputs(root, heldout)
    if budget.kind == "agreement" and not compare_outputs(reference, reference).classifier:
        shape = tuple(first_tensor(reference[0]).shape)
        raise ValueError(
            f"Budget({budget}) measures top-1 agreement, which needs classifier-shaped outputs ((batch, classes) "
            f"logits, at least 2 classes, rows not unit vectors); the first output of {type(root).__name__} has "
            f"shape {shape}: use Budget(max_error=...) for it"
        )
    return reference


def _verify(
    outcome: BudgetOutcome,
    plans: list[LayerPlan],
    graph_module: torch.fx.GraphModule | None,
    root: nn.Module,
    allocation: Allocation,
    mode: str,
    max_rows: int | None,
) -> Verification:
    """Fit ``allocation`` as ``compress`` will (``calibrate`` on the fit batches, in ``mode``) and measure the
    model on the held-out batches. Nothing is swapped: a forward hook on each original layer returns its fitted
    replacement's output while the fits and the measurement run, and is removed after."""
    chosen = {lo.name: lo.options[j].plan for lo, j in zip(outcome.layers, allocation.choice)}
    todo = [q for q in (chosen.get(p.name, p) for p in plans) if q.form]
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        calibrate(root, graph_module, todo, outcome.fit_batches, partial(install_by_hook, handles), mode, max_rows)
        measured = outcome.measured_fidelity(root)
    finally:
        for handle in handles:
            handle.remove()
    errors, params = _costs(outcome.layers)
    dense = sum(lo.dense.params for lo in outcome.layers)
    predicted = math.sqrt(_total(errors, allocation.choice))
    return Verification(allocation.choice, dense / _total(params, allocation.choice), predicted, measured)


def install_by_hook(handles: list[torch.utils.hooks.RemovableHandle], p: LayerPlan, stats: object) -> nn.Module:
    """Build the planned layer ``p`` from ``stats`` and make its dense layer return the fitted layer's output (a
    forward hook, appended to ``handles`` for removal): the ``install`` step of a checked allocation, which swaps
    nothing."""
    fitted = p.build(stats)
    handles.append(p.module.register_forward_hook(partial(_replace_output, fitted), with_kwargs=True))
    return fitted


def _replace_output(replacement: nn.Module, module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
    """A forward hook (``with_kwargs=True``) that returns ``replacement``'s output, called as the model called the
    layer: ``self.fc(h)`` or ``self.fc(input=h)``."""
    return replacement(*args, **kwargs)


def _costs(layers: list[LayerOptions]) -> tuple[list[list[float]], list[list[float]]]:
    """Each option's squared model error (capped: an option that broke the model is never chosen for its size)
    and its parameters."""
    errors = [[min(o.model_error, 1e6) ** 2 for o in lo.options] for lo in layers]
    return errors, [[float(o.params) for o in lo.options] for lo in layers]


def _total(values: list[list[float]], choice: Sequence[int]) -> float:
    return sum(v[j] for v, j in zip(values, choice))


def _fidelity_allocation(
    budget: Budget, layers: list[LayerOptions], check: Callable[[Allocation], Verification], checked: list[Verification]
) -> Allocation:
    """The allocation of a fidelity budget: the fewest weights whose measured fidelity on the held-out batches meets
    the target, searched over the cap on the summed squared model errors (:func:`_next_cap`): while no check has
    failed, the first cap; after a failure, a smaller cap (:func:`_tightened`, at most :data:`MAX_TIGHTEN` smaller);
    once one cap passes and a larger one fails, the geometric middle of the two, so the search closes in on the
    largest cap that passes. At most :data:`VERIFY_ROUNDS` checks; the lightest allocation that passed is kept. With
    ``min_params`` an allocation heavier than that is replaced by the least-error one at ``min_params``, and that one
    failing is a :class:`BudgetError` naming its measured value. Without ``min_params``, when no check passes, every
    layer stays dense (exact) with a warning. Every check is appended to ``checked``."""
    errors, params = _costs(layers)
    floor = None
    if budget.min_params is not None:
        floor = allocate(errors, params, sum(lo.dense.params for lo in layers) / budget.min_params)
    cap = budget.target**2 if budget.kind == "max_error" else AGREEMENT_START * (1.0 - budget.target)
    passed_cap = failed_cap = None
    best: Allocation | None = None
    seen: dict[tuple[int, ...], Verification] = {}
    for _ in range(4 * VERIFY_ROUNDS):  # a cap whose allocation was checked already costs no check
        allocation = allocate(params, errors, cap)
        if floor is not None and _total(params, allocation.choice) > floor.weight:
            allocation = floor
        if not any(allocation.choice):
            met = True  # every layer dense: exact
        elif allocation.choice in seen:
            met = _meets(budget, seen[allocation.choice])
        elif len(checked) >= VERIFY_ROUNDS:
            break
        else:
            checked.append(check(allocation))
            seen[allocation.choice] = checked[-1]
            met = _meets(budget, checked[-1])
        if not met and allocation is floor:
            raise _unreachable(budget, seen[floor.choice])
        if met:
            passed_cap = cap if passed_cap is None else max(passed_cap, cap)
            if any(allocation.choice) and (best is None or allocation.weight < best.weight):
                best = allocation
        else:  # caps at or above this allocation's summed error choose it or something lighter: taken to fail too
            spent = _total(errors, allocation.choice)
            failed_cap = spent if failed_cap is None else min(failed_cap, spent)
        if failed_cap is None:
            break  # the first cap passed: nothing suggests that a larger one would
        cap = _next_cap(budget, seen[allocation.choice] if allocation.choice in seen else None, passed_cap, failed_cap)
        if cap is None:
            break
    if best is not None:
        return best
    if floor is None:
        return _all_dense(budget, layers, checked)
    checked.append(check(floor))
    if _meets(budget, checked[-1]):
        return floor
    raise _unreachable(budget, checked[-1])


def _next_cap(
    budget: Budget,
    last: Verification | None,
    passed_cap: float | None,
    failed_cap: float,
) -> float | None:
    """The next cap to try: below the smallest failed cap by the measured shortfall (:func:`_tightened`, at most
    :data:`MAX_TIGHTEN` smaller) while nothing has passed; between the largest passed and the smallest failed
    cap (their geometric middle) once something has; None when the two are so close (:data:`CAP_RESOLUTION`)
    that no choice lies between them."""
    if passed_cap is None:
        shrink = _tightened(budget, last) if last is not None else 1.0 / MAX_TIGHTEN
        return failed_cap * max(min(shrink, TIGHTEN_MARGIN**2), 1.0 / MAX_TIGHTEN)
    if failed_cap <= passed_cap * CAP_RESOLUTION:
        return None
    return math.sqrt(passed_cap * failed_cap)


def _meets(budget: Budget, check: Verification) -> bool:
    value = check.value(budget.kind)
    return value <= budget.target if budget.kind == "max_error" else value >= budget.target


def _tightened(budget: Budget, check: Verification) -> float:
    """The factor on the failed allocation's summed squared error that gives the next cap: ``(target /
    measured)^2`` for ``max_error``; for ``agreement`` the disagreement taken as growing like the output error,
    ``((1 - target) / (1 - measured))^2``; both times :data:`TIGHTEN_MARGIN` squared."""
    value = check.value(budget.kind)
    ratio = budget.target / value if budget.kind == "max_error" else (1 - budget.target) / (1 - value)
    return (TIGHTEN_MARGIN * ratio) ** 2


def _unreachable(budget: Budget, check: Verification) -> BudgetError:
    value = check.value(budget.kind)
    if budget.kind == "max_error":
        quantity, ask, shown = "output error", "max_error >=", math.ceil(value * 1e4) / 1e4
    else:
        quantity, ask, shown = "top-1 agreement", "agreement <=", math.floor(value * 1e4) / 1e4
    return BudgetError(
        f"Budget({budget}) cannot be met: at {budget.min_params:g}x fewer weights the allocation with the least "
        f"predicted error ({check.params_ratio:.2f}x) has a {quantity} of {value:.4f} on the "
        f"{check.measured.samples} held-out samples; ask for {ask} {shown:g}, a smaller min_params or larger groups",
        value,
    )


def _all_dense(budget: Budget, layers: list[LayerOptions], checked: list[Verification]) -> Allocation:
    """Every layer dense (exact), with a warning naming the closest allocation checked."""
    closest = min(checked, key=lambda c: c.value(budget.kind) * (1 if budget.kind == "max_error" else -1))
    warnings.warn(
        f"gmcompress: budget {budget}: none of the {len(checked)} allocations checked on the held-out batches met "
        f"it (the closest: {closest.value(budget.kind):.4f} at {closest.params_ratio:.2f}x fewer weights), so every "
        "candidate layer stays dense; allow a larger error (or lower agreement), higher ranks or other groups",
        stacklevel=6,
    )
    dense = float(sum(lo.dense.params for lo in layers))
    return Allocation(tuple(0 for _ in layers), dense, 0.0, dense, True)


def measured_root(model: nn.Module, graph_module: torch.fx.GraphModule | None) -> nn.Module:
    """The module whose run calls the planned layers: the traced graph when there is one (it calls the layers
    lifted from ``F.linear``/``F.conv*d`` calls, and a bare ``nn.Linear`` model's own product, as modules; the
    user's model calls neither as a module, so hooks there would never fire), else the model itself."""
    return graph_module if graph_module is not None else model


def _time_options(root: nn.Module, layers: list[LayerOptions], example_inputs: object) -> float:
    """Seconds of the model, and of each option's fastest path on its layer's example input (unfitted layers):
    a layer's dense module and its options are timed in the same interleaved rounds (:func:`time_layers`)."""
    inputs = capture_layer_inputs(root, [lo.dense.plan for lo in layers], example_inputs)
    for lo in layers:
        x = inputs.get(lo.name)
        if x is None:
            raise BudgetError(f"layer {lo.name!r} is not called on example_inputs: it cannot be timed")
        module = lo.dense.plan.module
        device = next(module.parameters()).device
        shells = {str(i): o.plan.shell(device).to(x.dtype) for i, o in enumerate(lo.options) if i > 0}
        times = time_layers({"dense": module, **shells}, x)
        lo.dense.seconds = times["dense"]["dense"]
        for i, o in enumerate(lo.options[1:], start=1):
            o.seconds = min(times[str(i)].values())
    return measure_latency(root, example_inputs) / 1e3


def _check_reachable(budget: Budget, layers: list[LayerOptions], model_seconds: float | None) -> None:
    """Fail before any fit when no choice meets a size or speed budget, naming the closest achievable value."""
    dense = sum(lo.dense.params for lo in layers)
    size = "params" if budget.kind == "params" else "min_params"
    if getattr(budget, size) is not None:
        best = dense / sum(min(o.params for o in lo.options) for lo in layers)
        if best < getattr(budget, size):
            raise BudgetError(
                f"Budget({budget}) cannot be met: the smallest choice of {', '.join(budget.groups)} gives "
                f"{_floor2(best):.2f}x fewer weights in the {len(layers)} candidate layers; ask for at most "
                f"{size}={_floor2(best):g} or allow larger groups",
                best,
            )
    if budget.kind == "speedup":
        rest = _rest_seconds(model_seconds, layers)
        best = model_seconds / (rest + sum(min(o.seconds for o in lo.options) for lo in layers))
        if best < budget.target:
            raise BudgetError(
                f"Budget(speedup={budget.target:g}) cannot be met: with the fastest option of every one of the "
                f"{len(layers)} candidate layers the model is predicted {_floor2(best):.2f}x faster "
                f"({model_seconds * 1e3:.3f} ms now, {rest * 1e3:.3f} ms outside those layers); ask for at most "
                f"speedup={_floor2(best):g} or allow larger groups",
                best,
            )


def _floor2(value: float) -> float:
    """``value`` rounded down to 2 decimals (what is shown is then reachable), without float slips."""
    return math.floor(value * 100 + 1e-6) / 100


def _measure_errors(
    model: nn.Module,
    layers: list[LayerOptions],
    batches: list[object],
    max_rows: int | None,
    progress: bool,
    heldout: list[object] | None,
) -> tuple[object, torch.Tensor]:
    """Fit every option on the original model's statistics on ``batches``; its layer and model errors. Returns the
    probe batch (the first held-out batch, else the first calibration batch: a layer with fewer calibration rows
    than inputs fits the batches it saw far better than new ones) and the original model's output on it."""
    stats = capture_statistics(model, [lo.dense.plan for lo in layers], batches, max_rows)
    probe = batches[0] if heldout is None else heldout[0]
    reference = _output(model, probe)
    if not bool(torch.isfinite(reference).all()):
        raise BudgetError("the model's output on the probe batch is not finite: errors cannot be measured")
    total = sum(len(lo.options) - 1 for lo in layers)
    with tqdm(total=total, desc="gmcompress: budget options", disable=not progress, unit="fit") as bar:
        for lo in layers:
            layer_stats = stats.pop(lo.name, None)
            for o in lo.options[1:]:
                fitted = o.plan.build(layer_stats)
                o.layer_error = float(fitted.output_error if fitted.output_error is not None else fitted.fit_error)
                o.model_error = _model_error(model, lo.dense.plan.module, fitted, probe, reference)
                bar.update()
    return probe, reference


def _output(model: nn.Module, batch: object) -> torch.Tensor:
    """Every floating-point output tensor of ``model`` on ``batch``, flattened into one float64 vector (eval mode)."""
    with eval_mode(model), torch.no_grad():
        tensors = output_tensors(run_model(model, batch))
    if not tensors:
        raise BudgetError(f"the output of {type(model).__name__} holds no floating-point tensor to measure errors on")
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])


def _relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    err = float((out - reference).norm() / reference.norm().clamp_min(1e-300))
    return err if math.isfinite(err) else math.inf


def _model_error(
    model: nn.Module, module: nn.Module, replacement: nn.Module, probe: object, reference: torch.Tensor
) -> float:
    """``||y - y_ref|| / ||y_ref||`` of the model's output on ``probe`` with ``module``'s output replaced."""
    handle = module.register_forward_hook(partial(_replace_output, replacement), with_kwargs=True)
    try:
        out = _output(model, probe)
    finally:
        handle.remove()
    return _relative_error(out, reference)


def _allocate(budget: Budget, layers: list[LayerOptions], model_seconds: float | None) -> Allocation:
    errors, params = _costs(layers)
    dense = sum(lo.dense.params for lo in layers)
    try:
        if budget.kind == "params":
            return allocate(errors, params, dense / budget.target)
        if budget.kind == "speedup":
            seconds = [[o.seconds for o in lo.options] for lo in layers]
            return allocate(errors, seconds, model_seconds / budget.target - _rest_seconds(model_seconds, layers))
        return allocate(params, errors, budget.target**2)
    except Infeasible as err:  # size and speed were checked before the fits; dense options always meet max_error
        raise BudgetError(f"budget {budget} cannot be met: {err}") from None
