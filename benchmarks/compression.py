"""Accuracy / embedding cosine against parameter count: GM compression vs truncated SVD vs magnitude pruning.

    python benchmarks/compression.py [--quick] [--only mnist|minilm]

For every GM point (group, rank) the compressed layers' GM parameter count (kernels + modulations) is the
budget the baselines get, layer by layer: truncated-SVD factors ``k (in + out) <= budget`` and the
``budget`` largest-magnitude weights (stored values; their indices are not counted). Every model is
evaluated before and after the *same* distillation budget (from the original model). Layers: MNISTNet
``classifier.0`` (holds 95% of the weights); MiniLM's 12 feed-forward Linears. Writes a markdown table
and one Pareto plot per model to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import gmcompress as gm
from gmcompress import zoo

sys.path.insert(0, str(Path(__file__).parent))
from baselines import replace_layers  # noqa: E402
from common import measured_on, pyplot, save_figure  # noqa: E402
from readme import refresh  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def gm_budget(model: torch.nn.Module, names: list[str]) -> dict[str, int]:
    """Weights (no bias) of each compressed layer of a GM model."""
    out = {}
    for name in names:
        layer = model.get_submodule(name)
        out[name] = layer.num_structured_parameters
    return out


def run_model_family(label: str, original, names, gm_points, recipe_for, evaluate, tune, quick, key):
    rows = []
    for spec, rank in gm_points:
        torch.manual_seed(0)
        compressed = gm.compress(original, recipe=recipe_for(spec, rank), calibration=None, progress=False)
        budget = gm_budget(compressed, names)
        weights = sum(budget.values())
        dense = sum(original.get_submodule(n).weight.numel() for n in names)
        candidates = [
            (f"GM {spec} r{rank}", compressed),
            ("SVD", replace_layers(original, names, budget, "svd")),
            ("pruning", replace_layers(original, names, budget, "prune")),
        ]
        for method, model in candidates:
            before = evaluate(model)[key]
            start = time.perf_counter()
            tune(model)
            after = evaluate(model)[key]
            params = sum(p.numel() for p in model.parameters())
            rows.append(
                dict(
                    method=method,
                    point=f"{spec} r{rank}",
                    layer_weights=weights,
                    dense_weights=dense,
                    params=params,
                    before=before,
                    after=after,
                    seconds=time.perf_counter() - start,
                )
            )
            print(f"{label}: {method:>14} at {weights:>9,} weights: {key} {before:.4f} -> {after:.4f}", flush=True)
    return rows


def table(label: str, key: str, rows: list[dict], reference: float) -> list[str]:
    lines = [
        f"### {label} (original {key} {reference:.4f})",
        "",
        f"| point | method | compressed-layer weights | ratio | model params | {key} before FT | "
        f"{key} after FT | FT seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['point']} | {r['method']} | {r['layer_weights']:,} | "
            f"{r['dense_weights'] / r['layer_weights']:.1f}x | {r['params']:,} | {r['before']:.4f} | "
            f"{r['after']:.4f} | {r['seconds']:.0f} |"
        )
    return lines


def plot(rows: list[dict], key: str, title: str, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, color in (("GM", "tab:blue"), ("SVD", "tab:orange"), ("pruning", "tab:green")):
        pts = sorted((r for r in rows if r["method"].startswith(method)), key=lambda r: r["layer_weights"])
        xs = [r["layer_weights"] for r in pts]
        ax.plot(xs, [r["after"] for r in pts], "o-", color=color, label=f"{method} after fine-tuning")
        ax.plot(xs, [r["before"] for r in pts], "x--", color=color, alpha=0.5, label=f"{method} before")
    ax.set_xscale("log")
    ax.set_xlabel("weights in the compressed layers")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def mnist(quick: bool) -> list[str]:
    net = zoo.mnistnet()
    names = ["classifier.0"]
    points = [("C16", 1)] if quick else [("C4", 1), ("C8", 1), ("C16", 1), ("C32", 1), ("C64", 1)]
    data = zoo.mnist_augmented(copies=1)
    if quick:
        data = torch.utils.data.TensorDataset(*data[:1024])

    def recipe_for(spec, rank):
        return gm.recipe.parse_recipe(
            {
                "version": 1,
                "defaults": {"group": None},
                "layers": [{"name": "classifier.0", "group": spec, "rank": rank}],
            }
        )

    def tune(model):
        gm.finetune(model, net, data, epochs=1, lr=5e-3, batch_size=128, loss="mix", progress=False, device="cpu")

    rows = run_model_family("MNISTNet", net, names, points, recipe_for, zoo.mnist_accuracy, tune, quick, "accuracy")
    reference = zoo.mnist_accuracy(net)["accuracy"]
    if not quick:
        plot(rows, "held-out accuracy", "MNISTNet classifier.0", RESULTS / "compression_mnist.png")
    budget = (
        "1 epoch over 7,000 digits (the 3,500 training digits and one shifted/rotated copy of each), "
        "AdamW lr 5e-3, KD+CE"
    )
    return table("MNISTNet, held-out accuracy", "accuracy", rows, reference) + ["", f"Fine-tuning budget: {budget}."]


def minilm(quick: bool) -> list[str]:
    teacher = zoo.minilm()
    names = [f"bert.encoder.layer.{i}.{part}.dense" for i in range(6) for part in ("intermediate", "output")]
    points = [("C8", 1)] if quick else [("C4", 1), ("C8", 1), ("C16", 1)]
    train, _ = zoo.split_sentences()
    data = zoo.SentenceDataset(train[:32] if quick else train[:512])

    def recipe_for(spec, rank):
        return gm.recipe.parse_recipe(
            {
                "version": 1,
                "defaults": {"group": None},
                "layers": [
                    {"regex": r"bert\.encoder\.layer\.\d+\.(intermediate|output)\.dense", "group": spec, "rank": rank}
                ],
            }
        )

    def tune(model):
        gm.finetune(model, teacher, data, epochs=1, lr=5e-4, batch_size=32, loss="cosine", progress=False, device="cpu")

    def evaluate(model):
        return zoo.minilm_cosine(model, teacher)

    rows = run_model_family("MiniLM", teacher, names, points, recipe_for, evaluate, tune, quick, "cosine")
    if not quick:
        plot(rows, "embedding cosine", "all-MiniLM-L6-v2 feed-forward layers", RESULTS / "compression_minilm.png")
    budget = f"1 epoch over {len(data):,} Lee sentences, AdamW lr 5e-4, cosine loss"
    return table("all-MiniLM-L6-v2, held-out embedding cosine", "cosine", rows, 1.0) + [
        "",
        f"Fine-tuning budget: {budget}.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["mnist", "minilm"])
    args = parser.parse_args()
    start = time.perf_counter()
    lines = []
    if args.only in (None, "mnist"):
        lines += mnist(args.quick) + [""]
    if args.only in (None, "minilm"):
        lines += minilm(args.quick) + [""]
    header = [
        f"{measured_on()}; {(time.perf_counter() - start) / 60:.1f} min.",
        "",
    ]
    text = "\n".join(header + lines)
    print(text)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        name = f"compression_{args.only}.md" if args.only else "compression.md"
        (RESULTS / name).write_text(text)
        refresh()


if __name__ == "__main__":
    main()
