"""Forms chosen by measurement: the timers behind :func:`gmcompress.freeze` and the budget's latency.

:func:`time_forms` times every form a GM layer can take on its real input: each forward path it offers
(``GMLayer.impls()``: materialised dense weight, block-diagonal GEMMs, FFT, grouped convolutions) and the plain
torch layer it exports (``GMLayer.to_dense()``), in interleaved rounds of short blocks
(:func:`~gmcompress.measure.timing.block_seconds`: eval, inference mode; on a CUDA device each call is synchronised).
:func:`gmcompress.freeze` keeps the fastest form of each layer, then times the whole model (:func:`model_seconds`) in
three candidates: those forms (:data:`GM_FORMS`), the forms as compressed (:data:`AS_COMPRESSED`) and plain torch
layers (:data:`TORCH_LAYERS`); :class:`FreezeReport` says which serves and by how much.
``compress`` times no path: its layers take their documented ``"auto"`` rule. :func:`time_layers` serves budgets
(:mod:`gmcompress.budget`), which time every candidate option of every layer in the same rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from ..core.tables import format_table
from ..graph.batches import first_inputs, run_model
from ..nn import GMLayer, NotApplicable
from ..planning.handlers import LayerPlan
from .timing import block_seconds, interleaved_best

__all__ = [
    "PATH_SECONDS",
    "TORCH_LAYER",
    "AS_IS",
    "FormChoice",
    "FreezeReport",
    "FROZEN_ATTRIBUTE",
    "is_frozen",
    "capture_layer_inputs",
    "time_paths",
    "time_layers",
    "serving_form",
    "time_forms",
    "plain_layer",
    "model_seconds",
    "GM_FORMS",
    "AS_COMPRESSED",
    "TORCH_LAYERS",
]

PATH_SECONDS = 0.005  # seconds of one timed block (block_seconds takes the best of three) per path and round
PATH_ROUNDS = 2  # rounds over every candidate, interleaved; each keeps its best
TORCH_LAYER = "torch"  # the form "the plain torch layer of GMLayer.to_dense()" among the forms time_forms measures
FREEZE_SECONDS = 0.02  # gm.freeze times each form in longer blocks than a budget does: it decides what serves
FREEZE_ROUNDS = 3
FREEZE_MARGIN = 1.05  # a GM form serves only if measured at least 5% faster than the plain torch layer: on this
# project's shared 2-core VM one form timed twice differed by 10-25%, and a 10% "win" served 0.88x in the model
AS_IS = "as is"  # the form of a GM layer with one forward path (no impls()): the layer as it runs
GM_FORMS = "forms chosen layer by layer"  # the whole-model candidates of gm.freeze's last check
AS_COMPRESSED = "forms as compressed"  # each layer on the path its impl rule takes at this input
TORCH_LAYERS = "plain torch layers"
FREEZE_MODEL_SECONDS = 0.05  # one timed block of the whole model (at least one call)


@dataclass
class FormChoice:
    """One GM layer of a frozen model: the milliseconds of every form timed on its input (each path, or
    :data:`AS_IS`; :data:`TORCH_LAYER` for its plain torch layer) and the fastest, which it now takes."""

    name: str
    kind: str  # the GM layer's class name
    input_shape: tuple[int, ...]
    times_ms: dict[str, float]
    chosen: str
    by_model: bool = False  # the whole-model check gave the layer another form than its own timing chose

    @property
    def speedup(self) -> float | None:
        """The plain torch layer's time over the chosen form's (1.0 when the torch layer was chosen)."""
        return self.times_ms[TORCH_LAYER] / self.times_ms[self.chosen] if TORCH_LAYER in self.times_ms else None


@dataclass
class FreezeReport:
    """What :func:`gmcompress.freeze` chose, layer by layer (``frozen.freeze_report``; print it)."""

    device: str
    layers: list[FormChoice] = field(default_factory=list)
    not_called: list[str] = field(default_factory=list)  # GM layers example_inputs did not reach: left as they were
    model_ms: dict[str, float] = field(default_factory=dict)  # the whole model in each candidate (module doc)
    served: str = ""  # the candidate that serves

    @property
    def to_torch(self) -> list[str]:
        """The layers that became their plain torch layer."""
        return [c.name for c in self.layers if c.chosen == TORCH_LAYER]

    def __str__(self) -> str:
        rows = [
            [
                c.name,
                c.kind,
                "x".join(map(str, c.input_shape)),
                f"{c.chosen} (whole model)" if c.by_model else c.chosen,
                ", ".join(f"{form} {ms:.3f}" for form, ms in c.times_ms.items()),
                "-" if c.speedup is None else f"{c.speedup:.2f}x",
            ]
            for c in self.layers
        ]
        table = format_table(["layer", "kind", "input", "form", "ms per form", "vs torch layer"], rows)
        kept = len(self.layers) - len(self.to_torch)
        notes = [f"{kept} GM layer(s) kept a GM path, {len(self.to_torch)} became plain torch layers (measured on "
                 f"{self.device}, on the example inputs' batch)."]  # fmt: skip
        if self.model_ms:
            times = ", ".join(f"{label} {ms:.3f} ms" for label, ms in self.model_ms.items())
            notes.append(
                f"Whole model on the example inputs: {times}; serving: {self.served} (GM forms serve only when at "
                f"least {FREEZE_MARGIN:.2f}x faster than the plain torch layers)."
            )
        if self.not_called:
            notes.append(f"Not called on example_inputs, left as they were: {', '.join(self.not_called)}.")
        return "\n".join([table, *notes])


FROZEN_ATTRIBUTE = "freeze_report"  # where gmcompress.freeze leaves its FreezeReport on the model it returns


def is_frozen(model: nn.Module) -> bool:
    """Whether ``model`` was returned by :func:`gmcompress.freeze` (an inference copy)."""
    return isinstance(getattr(model, FROZEN_ATTRIBUTE, None), FreezeReport)


def capture_layer_inputs(model: nn.Module, plans: list[LayerPlan], example_inputs: object) -> dict[str, torch.Tensor]:
    """The input of the first call of every planned layer on ``example_inputs`` (a layer not called is left out)."""
    return first_inputs(model, example_inputs, {p.name: p.module for p in plans})


def time_paths(
    layer: nn.Module, x: torch.Tensor, min_run_time: float = PATH_SECONDS, rounds: int = PATH_ROUNDS
) -> dict[str, float]:
    """Best seconds of ``layer(x)`` on each of its paths (``GMLayer.impls()``; a layer with none, or a
    dense module, is timed as it is, under the key "dense") over ``rounds`` interleaved rounds: a burst of
    load on a shared machine then slows one round of every path, not one path. ``layer.impl`` is left at the
    last path timed."""
    return interleaved_best(_path_timers(layer, x, min_run_time), rounds)


def time_layers(
    layers: Mapping[str, nn.Module], x: torch.Tensor, min_run_time: float = PATH_SECONDS, rounds: int = PATH_ROUNDS
) -> dict[str, dict[str, float]]:
    """:func:`time_paths` of several layers on one input (name -> path -> best median seconds), every path of
    every layer in the same interleaved rounds, so the ratios between layers come from the same conditions
    (timed one layer after another, one burst of load made a layer read 8x faster than the dense one it
    replaces)."""
    timers = {
        (name, path): timer
        for name, layer in layers.items()
        for path, timer in _path_timers(layer, x, min_run_time).items()
    }
    times: dict[str, dict[str, float]] = {name: {} for name in layers}
    for (name, path), seconds in interleaved_best(timers, rounds).items():
        times[name][path] = seconds
    return times


def plain_layer(layer: nn.Module) -> nn.Module | None:
    """The plain torch layer computing what GM ``layer`` computes (``to_dense()``), or None where it has none."""
    try:
        return layer.to_dense()
    except NotApplicable:
        return None


def time_forms(
    layer: GMLayer,
    x: torch.Tensor,
    torch_layer: nn.Module | None,
    min_run_time: float = PATH_SECONDS,
    rounds: int = PATH_ROUNDS,
) -> dict[str, float]:
    """Best seconds of every form of GM ``layer`` on input ``x``: ``torch_layer`` (its plain torch layer, under
    :data:`TORCH_LAYER`, first, so it wins an exact tie) and each of its paths (:data:`AS_IS` for a layer with
    one), all in the same :data:`PATH_ROUNDS` interleaved rounds. ``layer.impl`` is left at the last path
    timed."""
    timers = {TORCH_LAYER: _path_timers(torch_layer, x, min_run_time)["dense"]} if torch_layer is not None else {}
    paths = _path_timers(layer, x, min_run_time)
    timers.update(paths if layer.impls() else {AS_IS: paths["dense"]})
    return interleaved_best(timers, rounds)


def serving_form(times: dict[str, float]) -> str:
    """The form :func:`gmcompress.freeze` keeps from :func:`time_forms`' ``times``: the fastest, except that a GM
    form must beat the plain torch layer (when there is one) by :data:`FREEZE_MARGIN`, else the torch layer
    serves (it computes the same product, so a choice inside timing noise could only make the model slower)."""
    fastest = min(times, key=times.get)
    if TORCH_LAYER in times and fastest != TORCH_LAYER and times[fastest] * FREEZE_MARGIN > times[TORCH_LAYER]:
        return TORCH_LAYER
    return fastest


def model_seconds(model: nn.Module, example_inputs: object) -> float:
    """Seconds of one forward of the whole ``model`` on ``example_inputs`` (:func:`block_seconds`, eval, inference
    mode; synchronised on CUDA): gm.freeze's last check, which times the model in each whole-model candidate."""
    devices = {t.device for t in [*model.parameters(), *model.buffers()] if t.device.type == "cuda"}

    def call() -> object:
        out = run_model(model, example_inputs)
        for device in devices:
            torch.cuda.synchronize(device)
        return out

    return block_seconds(call, model, FREEZE_MODEL_SECONDS)


def _path_timers(layer: nn.Module, x: torch.Tensor, min_run_time: float) -> dict[str, Callable[[], float]]:
    """One timing function per path of ``layer`` (each sets ``layer.impl`` first), or ``{"dense": ...}``."""
    impls = layer.impls() if hasattr(layer, "impls") else ()
    call = _synchronised(layer, x)

    def timer(impl: str | None) -> Callable[[], float]:
        def run() -> float:
            if impl is not None:
                layer.impl = impl
            return block_seconds(call, layer, min_run_time)

        return run

    return {impl: timer(impl) for impl in impls} if impls else {"dense": timer(None)}


def _synchronised(layer: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """``layer(x)``, waiting for the device on CUDA (a launch returns before the work is done)."""
    if x.device.type != "cuda":
        return partial(layer, x)

    def call() -> object:
        out = layer(x)
        torch.cuda.synchronize(x.device)
        return out

    return call
