"""Fit error of group-matrix projection on a real pretrained layer, next to truncated SVD; fit throughput.

    python benchmarks/fit.py [--quick] [--skip-reference]

Layer: ccexam MNISTNet ``classifier.0`` (Linear 3136 -> 128). For every (group, rank) point the GM
parameter count (kernels + modulations) sets the rank of a truncated-SVD baseline with at most the
same parameters ``k (in + out)``. Errors are relative Frobenius errors ``||W - W_fit|| / ||W||``; the
"output err" column is the relative error of the layer's outputs on 1,000 held-out digits. A Gaussian
matrix of the same shape is fitted too, as a reference for "no structure at all".

Throughput: activation-aware fits of Gaussian weights on synthetic calibration rows (a decaying rank-256
signal, isotropic noise and 8 outlier features: anisotropic like real activations), by layer size, rows
and rank, on the CPU (and CUDA when available). "fast" is ``gmcompress.fit.aware.project`` from the rows (the
``X^T X`` statistics included), "scipy LSQR" the previous solver (``gmcompress.fit.reference.project``, kept as
the reference); both in one run. weights/s = layer weights / seconds; peak = the highest resident memory
above the start of the fit; err ratio = fast output error / LSQR output error on the same layer.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from common import PeakMemory, measured_on, table_head
from readme import refresh

import gmcompress as gm
from gmcompress import zoo
from gmcompress.fit import aware

POINTS = [
    ("C2", 1),
    ("C4", 1),
    ("C8", 1),
    ("C8", 2),
    ("C8", 4),
    ("C16", 1),
    ("C16", 2),
    ("D4", 1),
    ("D4", 2),
    ("C4xC4", 1),
    ("C4xC4", 2),
    ("C64", 1),
]
QUICK = [("C4", 1), ("C8", 1), ("C8", 2), ("C16", 1), ("D4", 2)]


# (out, in, calibration rows, rank, also time the scipy LSQR reference)
THROUGHPUT = [
    (4096, 4096, 512, 1, True),
    (11008, 4096, 2048, 1, True),
    (4096, 11008, 2048, 1, False),
    (4096, 4096, 2048, 1, False),
    (4096, 4096, 8192, 1, False),
    (4096, 4096, 2048, 2, False),
]
THROUGHPUT_QUICK = [(512, 512, 512, 1, True), (1024, 1024, 1024, 1, False), (1024, 1024, 1024, 2, False)]


def calibration_rows(rows: int, fan_in: int, seed: int = 0) -> torch.Tensor:
    """Anisotropic rows: a rank-256 signal with decaying scales, 0.1 isotropic noise, 8 features 20x larger."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.arange(1, 257, dtype=torch.float32) ** -0.5
    x = (torch.randn(rows, 256, generator=gen) * scales) @ torch.randn(256, fan_in, generator=gen) / 16
    x += 0.1 * torch.randn(rows, fan_in, generator=gen)
    x[:, torch.randperm(fan_in, generator=gen)[:8]] *= 20
    return x


def timed_fit(fit: Callable[[], gm.structure.GMFit], device: str) -> tuple[gm.structure.GMFit, float, float]:
    """Run ``fit()``: its result, seconds and peak extra resident memory (MB; CUDA: peak allocated)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with PeakMemory() as peak:
        start = time.perf_counter()
        result = fit()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    extra = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak.extra_mb
    return result, seconds, extra


def throughput(points: list[tuple[int, int, int, int, bool]], devices: list[str], reference: bool) -> list[str]:
    """Markdown rows: the fast fit per device, and the scipy reference where asked."""
    lines = []
    for out_f, in_f, rows, rank, with_reference in points:
        torch.manual_seed(0)
        w = torch.randn(out_f, in_f) / in_f**0.5
        x = calibration_rows(rows, in_f)
        label = f"| {out_f}x{in_f} | C16 | {rank} | {rows:,} |"
        ref_err = None
        if reference and with_reference:
            slow = partial(gm.structure.project, w.double().numpy(), "C16", rank=rank, inputs=x.double().numpy())
            fit, sec, mem = timed_fit(slow, "cpu")
            ref_err = fit.output_error
            lines.append(f"{label} cpu | scipy LSQR | {_cells(w.numel(), sec, mem)} {fit.output_error:.4f} | 1 |")
        for device in devices:
            fit, sec, mem = timed_fit(
                partial(aware.project, w.to(device), "C16", rank=rank, inputs=x.to(device)), device
            )
            ratio = f"{fit.output_error / ref_err:.4f}" if ref_err else "-"
            lines.append(f"{label} {device} | fast | {_cells(w.numel(), sec, mem)} {fit.output_error:.4f} | {ratio} |")
    return lines


def throughput_section(quick: bool, reference: bool) -> list[str]:
    """The throughput table, on the CPU and on CUDA when there is one."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    start = time.perf_counter()
    rows = throughput(THROUGHPUT_QUICK if quick else THROUGHPUT, devices, reference)
    header = (
        "| layer (out x in) | group | rank | calibration rows | device | solver | seconds | weights/s | peak MB | "
        "output err | err ratio |"
    )
    return [
        "",
        "## Activation-aware fit throughput",
        "",
        f"{measured_on()}; {time.perf_counter() - start:.0f} s.",
        "",
        *table_head(header),
        *rows,
    ]


def _cells(weights: int, seconds: float, peak_mb: float) -> str:
    return f"{seconds:.1f} | {weights / seconds / 1e6:.2f} M | {peak_mb:,.0f} |"


def svd_error(w: np.ndarray, k: int) -> float:
    s = np.linalg.svd(w, compute_uv=False)
    return float(np.sqrt((s[k:] ** 2).sum() / (s**2).sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer points (CI smoke run)")
    parser.add_argument("--skip-reference", action="store_true", help="do not time the scipy LSQR reference")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fit.md")
    args = parser.parse_args()

    net = zoo.mnistnet()
    _, _, x_te, _ = zoo.mnist_split()
    with torch.no_grad():
        feats = net[1](net[0](x_te[:1000])).double().numpy()
    w = net[2][0].weight.detach().double().numpy()
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(w.shape)
    out_f, in_f = w.shape

    def out_err(approx: np.ndarray) -> float:
        return float(np.linalg.norm((w - approx) @ feats.T) / np.linalg.norm(w @ feats.T))

    rows = []
    start = time.perf_counter()
    for spec, rank in QUICK if args.quick else POINTS:
        fit = gm.structure.project(w, spec, rank=rank)
        params = fit.num_parameters
        k = max(1, params // (in_f + out_f))
        s = np.linalg.svd(w, full_matrices=False)
        low_rank = (s[0][:, :k] * s[1][:k]) @ s[2][:k]
        exact = gm.structure.project(w, spec, rank=1, modulate=False).relative_error if rank == 1 else float("nan")
        rows.append(
            (
                spec,
                rank,
                params,
                w.size / params,
                fit.relative_error,
                exact,
                out_err(fit.dense()),
                k,
                svd_error(w, k),
                out_err(low_rank),
                gm.structure.project(noise, spec, rank=rank).relative_error,
            )
        )
    elapsed = time.perf_counter() - start

    header = (
        "| group | rank | GM params | compression | GM err | exact-GM err | GM output err | SVD rank | "
        "SVD err | SVD output err | GM err on Gaussian |"
    )
    lines = [
        f"# Fit error on MNISTNet classifier.0 (Linear {in_f} -> {out_f}, {w.size:,} weights)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()} / {platform.processor() or 'cpu'}, "
        f"torch {torch.__version__}, numpy {np.__version__}; {elapsed:.1f} s.",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
    ]
    for spec, rank, params, ratio, err, exact, oerr, k, serr, soerr, nerr in rows:
        exact_s = f"{exact:.3f}" if np.isfinite(exact) else "-"
        lines.append(
            f"| {spec} | {rank} | {params:,} | {ratio:.1f}x | {err:.3f} | {exact_s} | {oerr:.3f} | {k} | "
            f"{serr:.3f} | {soerr:.3f} | {nerr:.3f} |"
        )
    lines += throughput_section(args.quick, not args.skip_reference)
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
        refresh()


if __name__ == "__main__":
    main()
