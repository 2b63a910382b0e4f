"""Calibration for activation-aware fits: per-layer input statistics, captured all at once or layer by layer.

Each planned layer keeps ``H = X^T X`` of the rows its weight multiplies (:class:`~gmcompress.fit.aware.InputStats`,
summed batch by batch), never the rows themselves. Two modes (``compress(..., calibration_mode=...)``):

* ``"original"``: one pass of the original model over the calibration batches collects every layer's
  statistics (memory: the sum of ``fan_in^2`` over the layers).
* ``"sequential"`` (GPTQ's order): layers are fitted in call order, and each one's statistics come from
  the *compressed* prefix, so it is fitted to the inputs it will really see. Its target stays the dense
  layer's own map, ``||(W - W_gm) X_c^T||`` with X_c the compressed prefix's outputs (as GPTQ): fitting
  ``W X_orig`` instead would ask a constrained layer to also undo the prefix's error, away from W, and
  would need the original model's activations alongside. A traced model is stepped node by node through
  its torch.fx graph for all batches at once (one forward pass in all, one layer's statistics in
  memory); a model that does not trace is re-run per group of layers that share an input tensor,
  stopping each pass at the first layer of the next group.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable

import torch
from torch import fx, nn

from ..fit.aware import InputStats
from ..planning.handlers import LayerPlan
from .batches import calibration_batches, call_arguments, forward_hooks, layer_input, run_model

__all__ = ["MODES", "check_mode", "capture_statistics", "calibrate"]

MODES = ("sequential", "original")
Install = Callable[[LayerPlan, "InputStats | None"], nn.Module]


def check_mode(mode: object) -> None:
    """ValueError unless ``mode`` is one of :data:`MODES` (``compress(calibration_mode=...)``)."""
    if mode not in MODES:
        raise ValueError(f"calibration_mode must be one of {MODES}, got {mode!r}")


class _Accumulator:
    """Adds a layer's calibration rows to its statistics, at most ``max_rows`` rows (random ones from the
    batch that crosses the limit, fixed seed)."""

    def __init__(self, max_rows: int | None, seed: int = 0) -> None:
        self.max_rows = max_rows
        self.generator = torch.Generator().manual_seed(seed)
        self.stats: dict[str, InputStats] = {}
        self.shared: tuple[tuple, LayerPlan, InputStats] | None = None  # the last (key, owner, statistics)

    def add(self, plan: LayerPlan, module: nn.Module, x: torch.Tensor, source: object = None) -> None:
        """Add the rows of input ``x``. Consecutive layers given the same ``source`` (the input's identity in this
        pass) whose rows agree (:meth:`~gmcompress.planning.handlers.LayerHandler.rows_key`) share one statistics
        object."""
        key = None if source is None else (source, plan.handler.rows_key(module))
        if key is not None and self.shared is not None and self.shared[0] == key and self.shared[1] is not plan:
            self.stats[plan.name] = self.shared[2]
            return
        rows = plan.handler.calibration_rows(module, x.detach())
        stats = self.stats.get(plan.name)
        if stats is None:
            stats = self.stats[plan.name] = InputStats.empty(rows.shape[1], rows.device)
        if self.max_rows is not None:
            room = self.max_rows - stats.rows
            if room <= 0:
                return
            if rows.shape[0] > room:
                rows = rows[torch.randperm(rows.shape[0], generator=self.generator)[:room].to(rows.device)]
        stats.update(rows)
        if key is not None:
            self.shared = (key, plan, stats)


def capture_statistics(
    model: nn.Module, plans: list[LayerPlan], calibration: Iterable[object] | torch.Tensor, max_rows: int | None = None
) -> dict[str, InputStats]:
    """One pass of ``model`` over the calibration batches (forms: :func:`~.batches.calibration_batches`):
    the input statistics of every layer in ``plans``."""
    acc = _Accumulator(max_rows)
    hooks = [(p.module, lambda mod, x, p=p: acc.add(p, mod, x)) for p in plans]
    with forward_hooks(hooks, pre=True), torch.no_grad():
        for batch in calibration_batches(model, calibration):
            run_model(model, batch)
    return acc.stats


def calibrate(
    model: nn.Module,
    graph_module: fx.GraphModule | None,
    plans: list[LayerPlan],
    calibration: Iterable[object] | torch.Tensor | None,
    install: Install,
    mode: str = "sequential",
    max_rows: int | None = None,
) -> None:
    """Fit every layer of ``plans`` through ``install(plan, stats)`` (which swaps the fitted layer in).

    Plans that are not activation-aware get ``None`` (a plain fit), as does every plan without calibration or
    whose layer the calibration never reaches. ``mode`` is one of :data:`MODES`.
    """
    check_mode(mode)
    done: set[str] = set()
    if calibration is not None:
        aware = [p for p in plans if p.settings.activation_aware]
        if mode == "original":
            # on the graph, which calls the layers lifted from functional calls (the model itself never does)
            stats = capture_statistics(graph_module or model, aware, calibration, max_rows)
            for p in plans:
                install(p, stats.pop(p.name, None))
            return
        sequential = _graph_sequential if graph_module is not None else _hook_sequential
        batches = calibration_batches(model, calibration)
        done = sequential(graph_module or model, plans, batches, install, max_rows)
    for p in plans:
        if p.name not in done:
            install(p, None)


class _Stepper(fx.Interpreter):
    """Runs a GraphModule on one batch a node at a time, freeing values after their last use."""

    def __init__(self, gm: fx.GraphModule, batch: object) -> None:
        super().__init__(gm, garbage_collect_values=True)
        args, kwargs = call_arguments(batch)
        signature = inspect.signature(gm.forward)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        flat: list[object] = []
        for name, value in bound.arguments.items():
            star = signature.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL
            flat.extend(value) if star else flat.append(value)
        self.args_iter = iter(flat)

    def inputs(self, node: fx.Node) -> tuple[tuple, dict]:
        return self.fetch_args_kwargs_from_env(node)

    def step(self, node: fx.Node, module: nn.Module | None = None) -> None:
        """Evaluate ``node`` (calling ``module`` instead of its target when given)."""
        if module is None:
            self.env[node] = self.run_node(node)
        else:
            args, kwargs = self.fetch_args_kwargs_from_env(node)
            self.env[node] = module(*args, **kwargs)
        for dead in self.user_to_last_uses.get(node, []):
            del self.env[dead]


def _graph_sequential(
    gm: fx.GraphModule, plans: list[LayerPlan], batches: list[object], install: Install, max_rows: int | None
) -> set[str]:
    """Step the graph for all batches together; at a planned layer's first call, fit it on the inputs the
    compressed prefix gives it, then run the fitted layer. The planned layers inside a module the graph calls whole
    are fitted there by :func:`_hook_sequential` on that call's inputs. Returns the names fitted."""
    by_module = {id(p.module): p for p in plans}
    steppers = [_Stepper(gm, batch) for batch in batches]
    fitted: dict[int, nn.Module] = {}
    acc = _Accumulator(max_rows)
    inside: set[str] = set()
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "output":
                break
            plan = by_module.get(id(gm.get_submodule(node.target))) if node.op == "call_module" else None
            if node.op == "call_module" and plan is None:  # a container called whole (nn.TransformerEncoder)
                inner = [p for p in plans if p.name.startswith(f"{node.target}.") and p.name not in inside]
                if inner:
                    container = gm.get_submodule(node.target)
                    calls = [s.inputs(node) for s in steppers]
                    inside |= _hook_sequential(lambda a, k, c=container: c(*a, **k), inner, calls, install, max_rows)
            if plan is not None and id(plan.module) not in fitted:
                if plan.settings.activation_aware:
                    for s in steppers:
                        source = node.args[0] if node.args else node.kwargs.get("input")
                        acc.add(plan, plan.module, layer_input(*s.inputs(node)), source=source)
                fitted[id(plan.module)] = install(plan, acc.stats.pop(plan.name, None))
            module = fitted.get(id(plan.module)) if plan is not None else None
            for s in steppers:
                s.step(node, module)
    return {p.name for p in plans if id(p.module) in fitted} | inside


class _Stop(Exception):
    """Raised by a calibration hook to end a forward pass early."""


def _hook_sequential(
    model: nn.Module, plans: list[LayerPlan], batches: list[object], install: Install, max_rows: int | None
) -> set[str]:
    """Layer-by-layer calibration by re-running ``model``: each pass collects the next group of layers in call
    order (the first pending layer called, and the pending layers called on that very input tensor), stops
    at the first other pending layer, fits and swaps the group in. Returns the names fitted."""
    pending = list(plans)
    done: set[str] = set()
    while pending:
        group = _next_group(model, pending, batches, _Accumulator(max_rows))
        if not group:
            break  # the calibration batches reach none of the pending layers
        for p, stats in group:
            install(p, stats)
            done.add(p.name)
        names = {p.name for p, _ in group}
        pending = [p for p in pending if p.name not in names]
    return done


def _next_group(
    model: nn.Module, pending: list[LayerPlan], batches: list[object], acc: _Accumulator
) -> list[tuple[LayerPlan, InputStats | None]]:
    """One pass per batch with hooks on the pending layers: the group of the first pending call, with stats."""
    members: list[LayerPlan] = []

    def hook(mod: nn.Module, x: torch.Tensor, p: LayerPlan, state: dict) -> None:
        if state.get("anchor") is None:
            state["anchor"] = x
        elif x is not state["anchor"] or p.name in state["seen"]:
            raise _Stop
        state["seen"].add(p.name)
        if first and p not in members:
            members.append(p)
        if p in members and p.settings.activation_aware:
            acc.add(p, mod, x, source="anchor")

    for i, batch in enumerate(batches):
        first, state = i == 0, {"seen": set()}
        hooks = [(p.module, lambda m, x, p=p, s=state: hook(m, x, p, s)) for p in pending]
        with forward_hooks(hooks, pre=True), torch.no_grad(), contextlib.suppress(_Stop):
            run_model(model, batch)
    return [(p, acc.stats.get(p.name)) for p in members]
