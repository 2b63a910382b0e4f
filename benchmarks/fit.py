"""Fit error of group-matrix projection on a real pretrained layer, next to truncated SVD.

    python benchmarks/fit.py [--quick]

Layer: ccexam MNISTNet ``classifier.0`` (Linear 3136 -> 128). For every (group, rank) point the GM
parameter count (kernels + modulations) sets the rank of a truncated-SVD baseline with at most the
same parameters ``k (in + out)``. Errors are relative Frobenius errors ``||W - W_fit|| / ||W||``; the
"output err" column is the relative error of the layer's outputs on 1,000 held-out digits. A Gaussian
matrix of the same shape is fitted too, as a reference for "no structure at all".
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from readme import refresh

import gmcompress as gm
from gmcompress import zoo

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


def svd_error(w: np.ndarray, k: int) -> float:
    s = np.linalg.svd(w, compute_uv=False)
    return float(np.sqrt((s[k:] ** 2).sum() / (s**2).sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer points (CI smoke run)")
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
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
        refresh()


if __name__ == "__main__":
    main()
