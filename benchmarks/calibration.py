"""Layer-by-layer ("sequential") against all-at-once ("original") calibration, before any fine-tuning.

    python benchmarks/calibration.py [--quick]

MNISTNet with ``recipes/mnistnet.yaml`` (only ``classifier.0`` is compressed, so the two modes must agree)
and ``recipes/mnistnet-equivariant.yaml`` (D4 group convolutions too): held-out accuracy
(``zoo.mnist_accuracy``). all-MiniLM-L6-v2 with ``recipes/minilm.yaml`` (12 feed-forward Linears): mean
embedding cosine to the original on the 500 held-out sentences (``zoo.minilm_cosine``). Calibration: the
zoo's default batches (4 x 256 digits; 4 x 32 sentences). Also the mean output error the report gives for
the compressed layers (each on its own calibration inputs) and the wall time of ``compress``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import measured_on, publish, table_head

import gmcompress as gm
from gmcompress import zoo

MODES = ("original", "sequential")
ROOT = Path(__file__).resolve().parent.parent


def run(name: str, build, recipe: str, calibration, metric) -> list[str]:
    """One table row per mode."""
    rows = []
    model = build()
    for mode in MODES:
        start = time.perf_counter()
        out = gm.compress(model, recipe=ROOT / recipe, calibration=calibration, calibration_mode=mode, progress=False)
        seconds = time.perf_counter() - start
        errors = [r.output_error for r in out.gm_report.compressed if r.output_error is not None]
        value = metric(out, model)
        rows.append(
            f"| {name} | `{recipe}` | {len(errors)} | {mode} | {value:.4f} | {sum(errors) / len(errors):.3f} | "
            f"{seconds:.0f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="MNISTNet with its shipped recipe only")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "calibration.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    accuracy = lambda out, ref: zoo.mnist_accuracy(out)["accuracy"]  # noqa: E731
    cosine = lambda out, ref: zoo.minilm_cosine(out, ref)["cosine"]  # noqa: E731
    mnist = zoo.mnist_calibration()
    rows = run("MNISTNet", zoo.mnistnet, "recipes/mnistnet.yaml", mnist, accuracy)
    if not args.quick:
        rows += run("MNISTNet", zoo.mnistnet, "recipes/mnistnet-equivariant.yaml", mnist, accuracy)
        rows += run("all-MiniLM-L6-v2", zoo.minilm, "recipes/minilm.yaml", zoo.minilm_calibration(), cosine)
    header = (
        "| model | recipe | compressed layers | calibration mode | accuracy / cosine before fine-tuning | "
        "mean calib output err | compress s |"
    )
    text = "\n".join(
        [
            f"{measured_on()}. MNISTNet: held-out accuracy (original 1.0000); MiniLM: held-out embedding cosine.",
            "",
            *table_head(header),
            *rows,
        ]
    )
    publish(text, args.out, args.quick)


if __name__ == "__main__":
    main()
