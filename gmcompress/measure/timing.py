"""Timing: a model's median latency, interleaved rounds of several timers, and the cheap block timer that chooses
among a layer's forward paths."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils import benchmark

from ..graph.batches import eval_mode, run_model

__all__ = [
    "measure_latency", "measure_latencies", "interleaved_best", "median_seconds", "block_seconds", "settle_allocator",
]  # fmt: skip


def measure_latency(model: nn.Module, example_inputs: object, min_run_time: float = 0.3) -> float:
    """Median milliseconds of one forward (eval, inference mode, after a warm-up call), measured by
    ``torch.utils.benchmark`` with the process's thread count, as the model will run."""
    return median_seconds(lambda: run_model(model, example_inputs), model, min_run_time) * 1e3


LATENCY_ROUNDS = 3  # interleaved rounds of measure_latencies


def interleaved_best(timers: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """The best of ``rounds`` rounds of every timing function in ``timers``, called in turn each round: a burst of
    load on a shared machine then slows one round of every candidate, not one candidate."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, timer in timers.items():
            best[name] = min(best.get(name, math.inf), timer())
    return best


def measure_latencies(
    original: nn.Module, compressed: nn.Module, example_inputs: object, min_run_time: float = 0.3
) -> tuple[float, float]:
    """Median milliseconds of ``original`` and of ``compressed`` (as :func:`measure_latency`), each the best of
    :data:`LATENCY_ROUNDS` alternating rounds (:func:`interleaved_best`; measured one after the other, the same
    MNISTNet pair read 0.89x and 1.10x)."""
    best = interleaved_best(
        {
            "original": lambda: measure_latency(original, example_inputs, min_run_time),
            "compressed": lambda: measure_latency(compressed, example_inputs, min_run_time),
        },
        LATENCY_ROUNDS,
    )
    return best["original"], best["compressed"]


SETTLE_BYTES = 31 * 2**20  # just under glibc's largest adaptive mmap threshold (32 MiB on 64-bit)


def settle_allocator() -> None:
    """Put the C allocator in the state of a process that has run for a while, before timing.

    glibc serves an allocation at or above its adaptive mmap threshold (128 KiB at start) with fresh pages,
    which fault on first touch, and raises the threshold to the size of the largest such block freed.
    A process that has not yet freed a block larger than its temporaries keeps mapping each one anew:
    a layer with three 3 MB temporaries then measured 2 to 3x slower than the same layer later in the
    same process (and 20x for a plain fill). Allocating and freeing one block of :data:`SETTLE_BYTES`
    (never touched, so it costs no page faults) moves the threshold to where a warmed-up process has it.
    Harmless with other allocators.
    """
    block = torch.empty(SETTLE_BYTES, dtype=torch.uint8)
    del block


def median_seconds(call: Callable[[], object], model: nn.Module, min_run_time: float) -> float:
    """``torch.utils.benchmark`` median of ``call()`` with ``model`` in eval and inference mode (one warm-up
    call, after :func:`settle_allocator`)."""
    settle_allocator()
    with eval_mode(model), torch.inference_mode():
        call()
        timer = benchmark.Timer("call()", globals={"call": call}, num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=min_run_time).median


def block_seconds(call: Callable[[], object], model: nn.Module, block_seconds: float, blocks: int = 3) -> float:
    """Seconds of one ``call()``: the least mean over ``blocks`` timed blocks of about ``block_seconds`` each
    (one warm-up call sizes the blocks), with ``model`` in eval and inference mode. A cheap timer for choosing
    among paths: ``torch.utils.benchmark``'s ``blocked_autorange`` spends about 60 ms sizing its block even for
    a 50 us call, which made timing paths cost more than fitting them."""
    settle_allocator()
    with eval_mode(model), torch.inference_mode():
        start = time.perf_counter()
        call()
        number = max(1, int(block_seconds / max(time.perf_counter() - start, 1e-7)))
        best = math.inf
        for _ in range(blocks):
            start = time.perf_counter()
            for _ in range(number):
                call()
            best = min(best, (time.perf_counter() - start) / number)
        return best
