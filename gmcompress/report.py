"""What compression did (the report types): parameters, bytes, MACs, latency, fit and equivariance error, metrics.

The numbers are measured by :mod:`gmcompress.measure`: MACs are counted with forward hooks on the layers that hold
the weights (:mod:`gmcompress.measure.counts`: dense layers as their handler counts them, GM layers at their *real*
cost on the path they run, ``GMLayer.macs``; matmuls written as functions, such as attention scores, are not
counted by either side), latency by :mod:`gmcompress.measure.timing`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .core.tables import format_table
from .measure.counts import count_macs
from .measure.fidelity import Fidelity

# count_macs: also gm.report.count_macs, as before the measurements moved to gmcompress.measure
__all__ = ["LayerReport", "CompressionReport", "format_table", "count_macs", "is_slower", "SLOWER_BELOW"]


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
    fidelity: Fidelity | None = None  # the whole model against the original on held-out data (measure.fidelity)

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
    """A Markdown table; a ``|`` inside a cell (a skip reason naming ``|C8|``) is escaped so it stays one cell."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


SLOWER_BELOW = 0.98  # a model is called slower below 0.98x the original: interleaved medians of one model differ ~1-2%


def is_slower(original_ms: float, compressed_ms: float) -> bool:
    """Whether ``compressed_ms`` is slower than ``original_ms`` beyond timing noise (:data:`SLOWER_BELOW`)."""
    return original_ms / compressed_ms < SLOWER_BELOW
