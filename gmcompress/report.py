"""What compression did: parameters, bytes, MACs, latency, fit and equivariance error, metrics.

MACs are counted with forward hooks on the layers that hold the weights: dense layers as their handler
(:mod:`gmcompress.handlers`) counts them, GM layers at their *real* cost on the path they run
(``GMLayer.macs``); matmuls written as functions (attention scores) are not counted by either side.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import benchmark

from .batches import eval_mode, forward_hooks, run_model
from .fidelity import Fidelity
from .handlers import handler_for
from .nn import GMLayer, NotApplicable

__all__ = [
    "LayerReport",
    "CompressionReport",
    "count_macs",
    "measure_latency",
    "measure_latencies",
    "interleaved_best",
    "block_seconds",
    "state_dict_bytes",
    "format_table",
    "equivariance_error",
]


@dataclass
class LayerReport:
    name: str
    type: str
    shape: str
    status: str  # "compressed" | "skipped" | "planned"
    form: str = ""
    group: str = ""
    rank: int | None = None
    params_before: int = 0
    params_after: int = 0
    fit_error: float | None = None
    output_error: float | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    equivariance_error: float | None = None
    padded: bool = False
    reason: str = ""
    path: str = ""  # the forward path the GM layer takes by its "auto" rule ("dense", "blocks", "grouped", ...)


@dataclass
class CompressionReport:
    """Per-layer rows and model totals; print it, or use :meth:`to_markdown` / :meth:`to_json` / :meth:`plot`."""

    layers: list[LayerReport] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None
    traced: bool = True
    trace_failure: str | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    budget: str | None = None  # the budget asked and what the plan predicts (gmcompress.budget)
    fidelity: Fidelity | None = None  # the whole model against the original on held-out data (gmcompress.fidelity)

    @property
    def compressed(self) -> list[LayerReport]:
        return [r for r in self.layers if r.status == "compressed"]

    @property
    def max_equivariance_error(self) -> float | None:
        errs = [r.equivariance_error for r in self.compressed if r.equivariance_error is not None]
        return max(errs) if errs else None

    def add_metric(self, name: str, before: float, after: float) -> None:
        self.metrics[name] = {"before": float(before), "after": float(after)}

    # ------------------------------------------------------------------ output
    def layer_rows(self) -> list[list[str]]:
        rows = []
        for r in self.layers:
            rows.append(
                [
                    r.name,
                    r.type,
                    r.shape,
                    r.status if r.status != "skipped" else f"skipped: {r.reason}",
                    f"{r.form} {r.group} r{r.rank}".strip() if r.form else "",
                    f"{r.params_before:,}",
                    f"{r.params_after:,}",
                    _fmt(r.fit_error),
                    _fmt(r.output_error),
                    _fmt(r.macs_before, "{:,}"),
                    _fmt(r.macs_after, "{:,}"),
                    _fmt(r.equivariance_error, "{:.1e}"),
                    r.path or "-",
                ]
            )
        return rows

    def total_rows(self) -> list[list[str]]:
        def ratio(a: float | None, b: float | None) -> str:
            return f"{a / b:.2f}x" if a and b else "-"

        return [
            [
                "parameters",
                f"{self.params_before:,}",
                f"{self.params_after:,}",
                ratio(self.params_before, self.params_after),
            ],
            [
                "bytes (state_dict)",
                f"{self.bytes_before:,}",
                f"{self.bytes_after:,}",
                ratio(self.bytes_before, self.bytes_after),
            ],
            [
                "MACs (per example input)",
                _fmt(self.macs_before, "{:,}"),
                _fmt(self.macs_after, "{:,}"),
                ratio(self.macs_before, self.macs_after),
            ],
            [
                "latency ms (median)",
                _fmt(self.latency_before_ms, "{:.3f}"),
                _fmt(self.latency_after_ms, "{:.3f}"),
                ratio(self.latency_before_ms, self.latency_after_ms),
            ],
        ] + [[f"metric: {k}", f"{v['before']:.4f}", f"{v['after']:.4f}", ""] for k, v in self.metrics.items()]

    LAYER_HEADER = [
        "layer",
        "type",
        "shape",
        "status",
        "form",
        "params before",
        "params after",
        "fit err",
        "calib out err",
        "MACs before",
        "MACs after",
        "equiv err",
        "path",
    ]
    TOTAL_HEADER = ["total", "original", "compressed", "ratio"]

    def to_markdown(self) -> str:
        parts = [_markdown(self.LAYER_HEADER, self.layer_rows()), "", _markdown(self.TOTAL_HEADER, self.total_rows())]
        parts += ["", self._notes()]
        return "\n".join(parts)

    def __str__(self) -> str:
        return "\n".join(
            [
                format_table(self.LAYER_HEADER, self.layer_rows()),
                "",
                format_table(self.TOTAL_HEADER, self.total_rows()),
                self._notes(),
            ]
        )

    def _notes(self) -> str:
        route = "torch.fx graph pass" if self.traced else f"eager fallback (model does not trace: {self.trace_failure})"
        eq = self.max_equivariance_error
        eq_note = f"; max equivariance error of the GM weights {eq:.1e}" if eq is not None else ""
        budget = f"\nPlanned under a {self.budget}." if self.budget else ""
        before, after = self.latency_before_ms, self.latency_after_ms
        if before and after and is_slower(before, after):
            budget += (
                f"\nSLOWER: the compressed model ran {before / after:.2f}x the original's speed on example_inputs "
                '(each layer on the path of its impl setting, "auto" by rule). Before serving, gm.freeze(model, '
                "example_inputs) times every layer's paths and its plain torch layer on your device and batch and "
                "keeps the fastest."
            )
        if self.fidelity is not None:
            lost = " LOST: the model no longer does what the original did." if self.fidelity.lost else ""
            budget += f"\nWhole model, {self.fidelity.summary()}.{lost}"
        return (
            f"{len(self.compressed)} of {len(self.layers)} layers compressed via {route}{eq_note}. "
            "Fit err = ||W - W_gm|| / ||W|| (weights); calib out err = ||(W - W_gm) X^T|| / ||W X^T|| on the "
            "calibration inputs X. An activation-aware fit (with calibration) minimises the output error, not the "
            "weight error, so fit err can exceed 1 (weights moved along input directions the data barely excite); "
            "read calib out err there. Equiv err = max over group elements h of ||f(h.x) - h.f(x)|| / ||f(x)|| for "
            "the structured weight (bias excluded) on random x: about 1e-7 for exact GMs (modulate: false), about 1 "
            "or more for relaxed ones, whose modulations break the symmetry on purpose." + budget
        )

    def to_json(self) -> str:
        data = asdict(self)
        data["max_equivariance_error"] = self.max_equivariance_error
        return json.dumps(data, indent=2)

    def plot(self, path: str | Path | None = None):
        """Bar chart of parameters (log scale) and fit error per layer; saved to ``path`` when given."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.layers
        names = [r.name for r in rows]
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6, 0.5 * len(rows) + 2), 6), sharex=True)
        xs = range(len(rows))
        ax1.bar([x - 0.2 for x in xs], [r.params_before for r in rows], 0.4, label="original")
        ax1.bar([x + 0.2 for x in xs], [r.params_after for r in rows], 0.4, label="compressed")
        ax1.set_yscale("log")
        ax1.set_ylabel("parameters")
        ax1.legend()
        ax2.bar(list(xs), [r.fit_error if r.fit_error is not None else 0.0 for r in rows], color="tab:red")
        ax2.set_ylabel("relative fit error")
        ax2.set_xticks(list(xs))
        ax2.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
            plt.close(fig)
        return fig


def _fmt(v: Any, pattern: str = "{:.3f}") -> str:
    return "-" if v is None else pattern.format(v)


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*["-" * w for w in widths])] + [fmt.format(*r) for r in rows])


# ---------------------------------------------------------------------- measurements


def layer_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int | None:
    """MACs of one call of a weight-holding layer (dense or GM), or None for other modules."""
    if isinstance(module, GMLayer):
        return module.macs(inp, out)
    handler = handler_for(module)
    return None if handler is None else handler.dense_macs(module, inp, out)


def equivariance_error(layer: nn.Module, max_elements: int = 16) -> float | None:
    """``layer.check_equivariance`` of the structured weight (bias excluded) on up to ``max_elements``
    group elements; None where it is not defined (padded layers, no group action)."""
    try:
        order = layer.group.order if getattr(layer, "group", None) is not None else max_elements
        with torch.no_grad(), eval_mode(layer):  # the derived weights are built once, not on every probe call
            return layer.check_equivariance(elements=range(min(order, max_elements)), bias=False)
    except NotApplicable:
        return None


def count_macs(model: nn.Module, example_inputs: object) -> tuple[int, dict[str, int]]:
    """Total and per-layer MACs of one forward on ``example_inputs``."""
    per_layer: dict[str, int] = {}

    def hook(mod: nn.Module, x: torch.Tensor, out: object, name: str) -> None:
        macs = layer_macs(mod, x, out)
        if macs is not None:
            per_layer[name] = per_layer.get(name, 0) + macs

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, GMLayer) or handler_for(m) is not None]
    with forward_hooks((m, partial(hook, name=n)) for n, m in layers), torch.inference_mode():
        run_model(model, example_inputs)
    return sum(per_layer.values()), per_layer


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


SLOWER_BELOW = 0.98  # a model is called slower below 0.98x the original: interleaved medians of one model differ ~1-2%


def is_slower(original_ms: float, compressed_ms: float) -> bool:
    """Whether ``compressed_ms`` is slower than ``original_ms`` beyond timing noise (:data:`SLOWER_BELOW`)."""
    return original_ms / compressed_ms < SLOWER_BELOW


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


class _ByteCounter(io.RawIOBase):
    """A write-only stream that only counts: sizing a saved model without holding a copy of it in memory."""

    def __init__(self) -> None:
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes ``torch.save(model.state_dict())`` writes (counted as they stream, never buffered)."""
    counter = _ByteCounter()
    torch.save(model.state_dict(), counter)
    return counter.size
