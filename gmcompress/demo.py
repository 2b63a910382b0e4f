"""Fit a real pretrained layer (ccexam MNISTNet classifier.0) with group matrices and print the fit.

python -m gmcompress.demo [--group C8] [--rank 2]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from . import zoo
from .structure import project


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", default="C8")
    parser.add_argument("--rank", type=int, default=2)
    args = parser.parse_args(argv)

    net = zoo.mnistnet()
    x_tr, _, x_te, _ = zoo.mnist_split()
    with torch.no_grad():
        calib = net[1](net[0](x_tr[:1500])).double().numpy()
        held = net[1](net[0](x_te[:1000])).double().numpy()
    w = net[2][0].weight.detach().double().numpy()
    print(f"MNISTNet classifier.0: Linear({w.shape[1]}, {w.shape[0]}), group {args.group}, rank {args.rank}")
    for label, fit in (
        ("exact GM (rank 1, no modulation)", project(w, args.group, rank=1, modulate=False)),
        (f"relaxed GM (rank {args.rank})", project(w, args.group, rank=args.rank)),
        (f"relaxed GM (rank {args.rank}), activation-aware", project(w, args.group, rank=args.rank, inputs=calib)),
    ):
        out_err = np.linalg.norm((w - fit.dense()) @ held.T) / np.linalg.norm(w @ held.T)
        print(
            f"  {label:<48} params {fit.num_parameters:>8,} ({w.size / fit.num_parameters:4.1f}x fewer)  "
            f"weight err {fit.relative_error:.3f}  held-out output err {out_err:.3f}"
        )


if __name__ == "__main__":
    main()
