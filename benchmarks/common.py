"""What every benchmark script shares: the "measured on" line of its tables and PNG plotting."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch


def measured_on(device: str | None = None) -> str:
    """``Measured <date> on <host> (<device>), torch <version>``; the device defaults to the CPU and its threads."""
    device = device or f"{platform.machine()}, {torch.get_num_threads()} CPU threads"
    return f"Measured {time.strftime('%Y-%m-%d')} on {platform.node() or 'host'} ({device}), torch {torch.__version__}"


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
