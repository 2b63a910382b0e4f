"""Paths chosen by measurement: each compressed layer keeps the forward path that is fastest on its real input.

With ``example_inputs``, :func:`choose_paths` runs the original model once to capture every planned layer's
input, then times the original dense layer and each path its GM replacement offers (``GMLayer.impls()``:
materialised dense weight, block-diagonal GEMMs, FFT, grouped convolutions) on that input
(:func:`~gmcompress.report.block_seconds`: short blocks, eval, inference mode), and keeps the fastest. The
captured input is cut to its first :data:`PATH_MAX_SAMPLES` samples, so timing costs a fraction of the fits
however large the example batch is. The dense path computes the same
product as the original layer, so a compressed layer is never slower than the original beyond noise.
Without example inputs each layer's documented ``"auto"`` rule decides.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from .batches import first_inputs
from .handlers import LayerPlan
from .report import block_seconds, interleaved_best

__all__ = [
    "PATH_SECONDS",
    "PATH_MAX_SAMPLES",
    "PathTiming",
    "capture_layer_inputs",
    "time_paths",
    "time_layers",
    "choose_path",
]

PATH_SECONDS = 0.005  # seconds of one timed block (block_seconds takes the best of three) per path and round
PATH_ROUNDS = 2  # rounds over the original and every path, interleaved; each keeps its best
PATH_MAX_SAMPLES = 16  # a captured input is timed on at most its first 16 samples


@dataclass
class PathTiming:
    """Median seconds of the original layer and of every path tried at batch size ``batch`` (a Linear's rows);
    ``chosen`` is the fastest path. ``small``: the same on one sample of the input (``None`` when it had one)."""

    original: float
    paths: dict[str, float]
    chosen: str
    batch: int
    small: PathTiming | None = None

    @property
    def speedup(self) -> float:
        return self.original / self.paths[self.chosen]


def capture_layer_inputs(
    model: nn.Module, plans: list[LayerPlan], example_inputs: object, max_samples: int | None = None
) -> dict[str, torch.Tensor]:
    """The input of the first call of every planned layer on ``example_inputs``; with ``max_samples``, cut to
    its first ``max_samples`` samples (compress times paths on :data:`PATH_MAX_SAMPLES`)."""
    seen = first_inputs(model, example_inputs, {p.name: p.module for p in plans})
    if max_samples is None:
        return seen
    return {name: x[:max_samples] if x.dim() > 1 else x for name, x in seen.items()}


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


def _path_timers(layer: nn.Module, x: torch.Tensor, min_run_time: float) -> dict[str, Callable[[], float]]:
    """One timing function per path of ``layer`` (each sets ``layer.impl`` first), or ``{"dense": ...}``."""
    impls = layer.impls() if hasattr(layer, "impls") else ()

    def timer(impl: str | None) -> Callable[[], float]:
        def run() -> float:
            if impl is not None:
                layer.impl = impl
            return block_seconds(partial(layer, x), layer, min_run_time)

        return run

    return {impl: timer(impl) for impl in impls} if impls else {"dense": timer(None)}


def choose_path(
    layer: nn.Module, original: nn.Module, x: torch.Tensor, min_run_time: float = PATH_SECONDS
) -> PathTiming:
    """Time ``original`` and every path of ``layer`` on ``x`` (interleaved rounds) and on its first sample
    ``x[:1]``, and keep the fastest: as ``layer.impl`` when both agree, else as ``layer.batch_paths`` (batch
    size -> path; ``impl="auto"`` then takes the path measured at the nearest batch size, see
    ``GMModule.path_for``). A path that wins on a batch of 64 can lose 3x on one sample (launch and transform
    overhead), and a model calibrated on a batch is often served one input at a time."""
    timing = _fastest(layer, original, x, min_run_time)
    if x.dim() > 1 and x.shape[0] > 1 and layer.batch_of(x[:1]) < layer.batch_of(x):
        timing.small = _fastest(layer, original, x[:1], min_run_time)
    if timing.small is None or timing.small.chosen == timing.chosen:
        layer.impl = timing.chosen
    else:
        layer.impl = "auto"
        layer.batch_paths = {timing.small.batch: timing.small.chosen, timing.batch: timing.chosen}
    return timing


def _fastest(layer: nn.Module, original: nn.Module, x: torch.Tensor, min_run_time: float) -> PathTiming:
    """The original and every path of ``layer`` on ``x``, in :data:`PATH_ROUNDS` interleaved rounds."""
    original_timer = _path_timers(original, x, min_run_time)["dense"]
    times = interleaved_best({"": original_timer, **_path_timers(layer, x, min_run_time)}, PATH_ROUNDS)
    before = times.pop("")
    return PathTiming(before, times, min(times, key=times.get), layer.batch_of(x))
