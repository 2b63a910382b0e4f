"""Compression under a budget: per-layer groups and ranks chosen from measured sensitivity and latency.

``compress(model, budget=Budget(params=4.0), calibration=..., example_inputs=...)`` (or ``plan(...)`` for the
plan alone). For every layer the plan would compress, the options are "keep dense" and every group of
``Budget.groups`` whose order divides the layer's sizes at ranks ``1, 2, 4, ..., min(N/2, max_rank)`` (a
ladder: each step halves the compression, and ``C_N`` rank r has the size of ``C_2N`` rank 2r, so the groups
together cover every power-of-two ratio). Each option is measured, then one option per layer is allocated
(:func:`gmcompress.allocation.allocate`, a multiple-choice knapsack):

* **size**: parameters from the planned layer (no fit);
* **latency** (``speedup`` budgets): each option's fastest forward path, timed on the layer's real input
  from ``example_inputs`` on an unfitted layer of its shape, as :mod:`gmcompress.paths` does; the model's
  latency is predicted as ``T_model - sum_l t_dense_l + sum_l t_l`` (``T_model`` measured);
* **sensitivity** (needs ``calibration``): each option fitted activation-aware on the original model's
  calibration statistics; its *layer error* ``||(W - W_gm) X^T|| / ||W X^T||`` and its *model error*, the
  relative change of the model's output tensors (all of them) on the first calibration batch when only this
  layer is replaced (a forward hook swaps the output; the user's model, its modules' modes and the RNG are left
  as they were). Model errors of different layers are treated as independent: the squared errors add.

Allocation: ``params``: least summed squared model error with at most ``dense / params`` weights in the
candidate layers; ``speedup``: least error with a predicted latency at most ``T_model / speedup``;
``max_error``: fewest weights with ``sqrt(sum of squared model errors) <= max_error``. Budgets that no choice
meets fail before any fit (size and latency are known first) with the closest achievable value.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import Allocation, Infeasible, allocate
from .batches import output_tensors, run_model
from .calibration import capture_statistics
from .groups import group as parse_group
from .groups import square_group
from .handlers import LayerPlan
from .paths import capture_layer_inputs, time_layers
from .report import format_table, measure_latency
from .settings import LayerSettings

if TYPE_CHECKING:
    from .api import CompressionPlan

__all__ = ["Budget", "BudgetError", "Option", "LayerOptions", "BudgetOutcome", "candidate_groups", "plan_budget"]

FAMILIES = {
    "C": tuple(f"C{2**k}" for k in range(1, 7)),  # cyclic orders 2 .. 64
    "D": tuple(f"D{2**k}" for k in range(1, 6)),  # dihedral orders 4 .. 64
}
KINDS = ("params", "speedup", "max_error")


class BudgetError(ValueError):
    """A budget that no allocation meets (``closest``: the best value any choice reaches), or a budget given
    without the data it needs (``closest`` None)."""

    def __init__(self, message: str, closest: float | None = None) -> None:
        super().__init__(message)
        self.closest = closest


def candidate_groups(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"C"`` (cyclic orders 2-64), ``"D"`` (dihedral orders 4-64), one group name or a list of names."""
    expected = "expected a family ('C', 'D'), a group name or a non-empty list of group names"
    if isinstance(spec, str):
        names = FAMILIES.get(spec, (spec,))
    elif isinstance(spec, (list, tuple)) and all(isinstance(n, str) for n in spec):
        names = tuple(spec)
    else:
        raise ValueError(f"budget groups: {expected}, got {spec!r}")
    if not names:
        raise ValueError(f"budget groups: {expected}")
    for n in names:
        parse_group(n)  # unknown names fail here, with the accepted forms
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class Budget:
    """One target: ``params`` (times fewer weights in the candidate layers), ``speedup`` (whole-model latency on
    ``example_inputs``, before / after) or ``max_error`` (the largest relative change of the model's output on
    calibration data). ``groups``: the candidate groups (see :func:`candidate_groups`); ``max_rank`` caps the
    ranks tried (a fit's cost grows with rank squared, and C_N rank r has the size of C_N/2 rank r/2)."""

    params: float | None = None
    speedup: float | None = None
    max_error: float | None = None
    groups: str | tuple[str, ...] = "C"
    max_rank: int = 8

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"Budget takes exactly one of {', '.join(KINDS)}, got {given or 'none'}")
        value = getattr(self, given[0])
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            object.__setattr__(self, given[0], float(value))  # numpy scalars too
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"Budget({given[0]}=...): expected a finite number, got {value!r}")
        if given[0] != "max_error" and value < 1:
            raise ValueError(f"Budget({given[0]}={value}): expected a factor >= 1 (e.g. {given[0]}=4.0)")
        if given[0] == "max_error" and value <= 0:
            raise ValueError(f"Budget(max_error={value}): expected a relative error > 0 (e.g. 0.1)")
        object.__setattr__(self, "groups", candidate_groups(self.groups))
        if isinstance(self.max_rank, bool) or not isinstance(self.max_rank, int) or self.max_rank < 1:
            raise ValueError(f"Budget(max_rank={self.max_rank!r}): expected a whole number >= 1")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def target(self) -> float:
        return float(getattr(self, self.kind))

    def __str__(self) -> str:
        return f"{self.kind}={self.target:g}"

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any] | Budget) -> Budget:
        """A Budget from ``"params=4"`` (CLI), a mapping (recipe ``budget:`` section) or a Budget."""
        if isinstance(spec, Budget):
            return spec
        if isinstance(spec, str):
            key, sep, value = spec.partition("=")
            if not sep or key.strip() not in KINDS:
                raise ValueError(f"budget {spec!r}: expected KIND=VALUE with KIND one of {', '.join(KINDS)}")
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"budget {spec!r}: {value.strip()!r} is not a number (e.g. {key.strip()}=4)") from None
            return cls(**{key.strip(): number})
        if not isinstance(spec, Mapping):
            raise TypeError(
                f"budget: expected a gm.Budget, a 'KIND=VALUE' string or a mapping, got {spec!r} "
                f"(e.g. gm.Budget(params=4.0))"
            )
        unknown = set(spec) - {*KINDS, "groups", "max_rank"}
        if unknown:
            raise ValueError(f"unknown budget keys {sorted(unknown)} (expected {', '.join(KINDS)}, groups, max_rank)")
        return cls(**dict(spec))


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
class BudgetOutcome:
    """The measured options of every candidate layer, the allocation and what it achieves (predicted)."""

    budget: Budget
    layers: list[LayerOptions]
    allocation: Allocation
    model_seconds: float | None = None  # the original model on example_inputs
    probe: object = field(default=None, repr=False)  # the calibration batch the model errors are measured on
    reference: torch.Tensor | None = field(default=None, repr=False)  # the original model's output on it

    def measured_error(self, model: nn.Module) -> float:
        """``||y - y_ref|| / ||y_ref||`` of ``model``'s output on the probe batch: what the plan predicted."""
        return _relative_error(_output(model, self.probe), self.reference)

    @property
    def chosen(self) -> list[Option]:
        return [lo.options[j] for lo, j in zip(self.layers, self.allocation.choice)]

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
        """The planned value of the budgeted quantity."""
        return {"params": self.params_ratio, "speedup": self.predicted_speedup, "max_error": self.model_error}[
            self.budget.kind
        ]

    def summary(self) -> str:
        method = "exact" if self.allocation.exact else f"Lagrangian, optimality gap {self.allocation.gap:.2e}"
        speed = self.predicted_speedup
        parts = [
            f"budget {self.budget}: planned {self.params_ratio:.2f}x fewer weights in {len(self.layers)} layers",
            f"predicted model error {self.model_error:.4f}",
        ]
        if speed is not None:
            parts.append(f"predicted speed-up {speed:.2f}x")
        return ", ".join(parts) + f" ({method} allocation)"

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
    """Ranks 1, 2, 4, ... up to order / 2 (just 1 for groups of order 2) and ``max_rank``."""
    ranks, r = [], 1
    while r <= min(max(order // 2, 1), max_rank):
        ranks.append(r)
        r *= 2
    return ranks


def _is_candidate(p: LayerPlan) -> bool:
    """A layer the budget chooses for: one the rules let through (not skipped, not ``group: null`` unless tied by
    conv_group) whose weight is not tied."""
    if p.settings is None or p.reason.startswith("weight tied"):
        return False
    return p.settings.group is not None or p.form == "GMConv2d"


def _options(p: LayerPlan, groups: tuple[str, ...], max_rank: int) -> LayerOptions:
    """Keep-dense and every group/rank of ``groups`` that plans for this layer (sizes divide, or padding)."""
    dense = LayerPlan(p.name, p.module, p.handler, p.settings).skip("kept dense by the budget")
    options = [Option("dense", dense, p.params_before)]
    base = p.settings if p.settings.on_mismatch != "error" else replace(p.settings, on_mismatch="skip")  # checked after
    for g in groups:
        first = p.handler.plan(p.name, p.module, replace(base, group=g, rank=1), "budget")
        if not first.form:
            continue
        tied = first.form == "GMConv2d"  # a k x k conv tied by conv_group: its ranks are bounded by that group
        order = square_group(base.conv_group).order if tied else parse_group(g).order
        for r in rank_ladder(order, max_rank):
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
    the_plan: CompressionPlan,
    budget: Budget,
    calibration: Iterable[object] | torch.Tensor | None,
    example_inputs: object = None,
    max_calibration_rows: int | None = None,
    progress: bool = True,
) -> BudgetOutcome:
    """Measure every option of every candidate layer of ``the_plan`` and allocate them under ``budget``;
    ``the_plan.layers`` are replaced by the chosen plans. See the module doc."""
    if calibration is None:
        raise BudgetError("a budget needs calibration batches (calibration=...) to measure each option's error")
    if budget.kind == "speedup" and example_inputs is None:
        raise BudgetError(
            "Budget(speedup=...) needs example inputs to time the model and each option (example_inputs=..., or "
            "--example-shape / --example-inputs on the command line)"
        )
    model = the_plan.model
    batches = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration)
    if not batches:
        raise BudgetError("the calibration batches are empty: a budget measures each option's error on them")
    if any(p.is_meta for p in model.parameters()):
        raise BudgetError(
            "a budget fits and runs every option, so it needs the model's weights: this model is on the meta "
            "device (gm.plan without a budget shows the plan of a meta model)"
        )
    candidates = [p for p in the_plan.layers if _is_candidate(p)]
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
    root = measured_root(the_plan)
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with eval_mode(model), eval_mode(root), torch.random.fork_rng(devices=cuda):
        model_seconds = _time_options(root, layers, example_inputs) if budget.kind == "speedup" else None
        _check_reachable(budget, layers, model_seconds)
        probe, reference = _measure_errors(root, layers, batches, max_calibration_rows, progress)
    allocation = _allocate(budget, layers, model_seconds)
    outcome = BudgetOutcome(budget, layers, allocation, model_seconds, probe, reference)
    chosen = {lo.name: o.plan for lo, o in zip(layers, outcome.chosen)}
    the_plan.layers = [chosen.get(p.name, p) for p in the_plan.layers]
    return outcome


def measured_root(the_plan: CompressionPlan) -> nn.Module:
    """The module whose run calls the planned layers: the traced graph when there is one (it calls the layers
    lifted from ``F.linear``/``F.conv*d`` calls, and a bare ``nn.Linear`` model's own product, as modules; the
    user's model calls neither as a module, so hooks there would never fire), else the model itself."""
    return the_plan.graph_module if the_plan.graph_module is not None else the_plan.model


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
    if budget.kind == "params":
        best = dense / sum(min(o.params for o in lo.options) for lo in layers)
        if best < budget.target:
            raise BudgetError(
                f"Budget(params={budget.target:g}) cannot be met: the smallest choice of {', '.join(budget.groups)} "
                f"gives {_floor2(best):.2f}x fewer weights in the {len(layers)} candidate layers; ask for at most "
                f"params={_floor2(best):g} or allow larger groups",
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
) -> tuple[object, torch.Tensor]:
    """Fit every option on the original model's calibration statistics; its layer and model errors. Returns the
    probe batch (the first calibration batch) and the original model's output on it."""
    stats = capture_statistics(model, [lo.dense.plan for lo in layers], batches, max_rows)
    probe = batches[0]
    reference = _output(model, probe)
    if not bool(torch.isfinite(reference).all()):
        raise BudgetError("the model's output on the first calibration batch is not finite: errors cannot be measured")
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


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode inside; each module's own ``training`` flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    err = float((out - reference).norm() / reference.norm().clamp_min(1e-300))
    return err if math.isfinite(err) else math.inf


def _model_error(
    model: nn.Module, module: nn.Module, replacement: nn.Module, probe: object, reference: torch.Tensor
) -> float:
    """``||y - y_ref|| / ||y_ref||`` of the model's output on ``probe`` with ``module``'s output replaced."""
    handle = module.register_forward_hook(
        lambda mod, args, kwargs, out: replacement(*args, **kwargs), with_kwargs=True
    )  # called as the model calls the layer: self.fc(h) or self.fc(input=h)
    try:
        out = _output(model, probe)
    finally:
        handle.remove()
    return _relative_error(out, reference)


def _allocate(budget: Budget, layers: list[LayerOptions], model_seconds: float | None) -> Allocation:
    errors = [[min(o.model_error, 1e6) ** 2 for o in lo.options] for lo in layers]
    params = [[float(o.params) for o in lo.options] for lo in layers]
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
