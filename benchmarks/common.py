"""What every benchmark script shares: the "measured on" line of its tables and PNG plotting."""

from __future__ import annotations

import platform
import resource
import threading
import time
from pathlib import Path

import torch

from gmcompress.measure.timing import interleaved_best

STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
"""glibc settings of a long-running server: large blocks are reused, not mapped and faulted in afresh."""


def steady_allocator() -> None:
    """Re-run this script under :data:`STEADY_MALLOC` (glibc only; ``GM_DEFAULT_MALLOC=1`` keeps the defaults).

    With glibc's default adaptive thresholds a block of tens of MB is mapped afresh, and page-faulted,
    on every call once a process has been through certain allocation patterns: measured here, a
    grouped convolution took 10 ms where it takes 2 ms (both the dense and the GM path suffer, by different
    amounts, so ratios swing run to run). The timing scripts therefore run every path under the settings a
    tuned CPU inference server uses (or jemalloc / tcmalloc); ``measured_on`` states it.
    """
    import os
    import sys

    if sys.platform != "linux" or os.environ.get("GM_DEFAULT_MALLOC") == "1":
        return
    if any(os.environ.get(k) != v for k, v in STEADY_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **STEADY_MALLOC})


def allocator_note() -> str:
    """How the C allocator was set for the timings (see :func:`steady_allocator`)."""
    import os

    if all(os.environ.get(k) == v for k, v in STEADY_MALLOC.items()):
        return "glibc malloc with mmap/trim thresholds raised (benchmarks/common.py STEADY_MALLOC)"
    return "the default C allocator"


ROUNDS = {"rounds": 3}  # interleaved timing rounds; the --quick smoke runs set 1


def interleaved(timers: dict, rounds: int | None = None) -> dict:
    """Best of ``rounds`` (default ``ROUNDS["rounds"]``) interleaved rounds of every timing function in
    ``timers`` (each returns seconds): :func:`gmcompress.measure.timing.interleaved_best`."""
    return interleaved_best(timers, rounds or ROUNDS["rounds"])


def measured_on(device: str | None = None) -> str:
    """``Measured <date> on <host> (<device>), torch <version>``; the device defaults to the CPU and its threads."""
    device = device or f"{platform.machine()}, {torch.get_num_threads()} CPU threads"
    stamp = f"Measured {time.strftime('%Y-%m-%d')} on {platform.node() or 'host'} ({device}), torch {torch.__version__}"
    return f"{stamp}, {allocator_note()}"


def publish(text: str, out: Path, quick: bool) -> None:
    """Print a results text; unless it is a ``--quick`` run, write it to ``out`` and refresh the README regions."""
    print(text)
    if not quick:
        from readme import refresh

        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text if text.endswith("\n") else text + "\n")
        refresh()


def table_head(header: str) -> list[str]:
    """A markdown table's header line and its separator line."""
    return [header, "|" + "---|" * (header.count("|") - 1)]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: benchmarks write PNG files and never open a window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> None:
    """Lay out, write at 120 dpi (creating the folder) and close ``fig``."""
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def rss_mb() -> float:
    """Resident memory of this process now, MB (Linux ``/proc/self/status``; elsewhere the peak so far)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """``with PeakMemory() as peak: ...``; then ``peak.extra_mb``: the highest resident memory seen while the block
    ran (sampled every 5 ms) minus the memory when it started. ``ru_maxrss`` only ever grows, so it cannot give
    the peak of one step of a process; this can (a spike shorter than 5 ms may be missed)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.start_mb, self.peak_mb = interval, 0.0, 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, rss_mb())

    def __enter__(self) -> PeakMemory:
        self.start_mb = self.peak_mb = rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())

    @property
    def extra_mb(self) -> float:
        return self.peak_mb - self.start_mb
