"""``gmcompress plan|compress|report|finetune``: the command line over :func:`gmcompress.compress`.

    gmcompress plan     --model gmcompress.zoo:mnistnet --recipe recipes/mnistnet.yaml
    gmcompress compress --model gmcompress.zoo:mnistnet --recipe recipes/mnistnet.yaml --out out/mnistnet.pt
    gmcompress report   --model gmcompress.zoo:mnistnet --checkpoint out/mnistnet.pt
    gmcompress finetune --model gmcompress.zoo:mnistnet --recipe recipes/mnistnet.yaml --out out/mnistnet-ft.pt

``--model package.module:NAME`` names a :class:`gmcompress.zoo.DemoModel` (a factory with hooks for
example inputs, calibration batches, ``evaluate(model, reference) -> dict`` and fine-tuning data: the
zoo's models are) or any function returning the pretrained model. ``--example-shape``,
``--example-inputs``, ``--calibration``, ``--eval`` and ``--data`` override the hooks.
Errors end with exit code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .api import compress, plan
from .budget import Budget
from .io import load, save
from .report import CompressionReport, count_macs, format_table, measure_latencies, state_dict_bytes
from .zoo import DemoModel


def _resolve(spec: str, what: str) -> Callable[..., Any]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not attr:
        raise ValueError(f"{what} must look like package.module:function, got {spec!r}")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{what}: cannot import {module_name!r} ({err})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _demo_model(spec: str) -> DemoModel:
    obj = _resolve(spec, "--model")
    if isinstance(obj, DemoModel):
        return obj
    if not callable(obj):
        raise ValueError(f"--model {spec!r} is a {type(obj).__name__}, not a function returning an nn.Module")
    return DemoModel(build=obj)


def _build(demo: DemoModel, spec: str) -> torch.nn.Module:
    try:
        model = demo.build()
    except Exception as err:
        raise ValueError(f"--model {spec}: building the model failed: {type(err).__name__}: {err}") from None
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"--model {spec} returned a {type(model).__name__}, not an nn.Module")
    return model


def _hooks(args: argparse.Namespace, factory: DemoModel) -> tuple[Any, Any, Callable | None]:
    example = None
    if args.example_shape:
        try:
            shape = tuple(int(v) for v in args.example_shape.split(","))
        except ValueError:
            raise ValueError(f"--example-shape must be comma-separated integers, got {args.example_shape!r}") from None
        example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    elif args.example_inputs:
        example = _resolve(args.example_inputs, "--example-inputs")()
    elif factory.example_inputs is not None:
        example = factory.example_inputs()
    calibration = None
    if getattr(args, "calibration", None) and getattr(args, "no_calibration", False):
        raise ValueError("--calibration and --no-calibration contradict each other: give one of them")
    if getattr(args, "calibration", None):
        calibration = _resolve(args.calibration, "--calibration")()
    elif factory.calibration is not None and not getattr(args, "no_calibration", False):
        calibration = factory.calibration()
    evaluate = _resolve(args.eval, "--eval") if args.eval else factory.evaluate
    return example, calibration, evaluate


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="package.module:factory returning the pretrained model")
    p.add_argument("--recipe", help="YAML recipe (see recipes/)")
    p.add_argument("--group", help="group for Linear / 1x1 layers, e.g. C8 (overrides the recipe)")
    p.add_argument("--rank", type=int, help="rank of the relaxed form (overrides the recipe)")
    p.add_argument("--conv-group", help="group of the square for k x k convolutions (C2, C4, D2, D4)")
    p.add_argument(
        "--calibration-mode",
        choices=("sequential", "original"),
        default="sequential",
        help="fit each layer on the compressed prefix's activations (sequential, default) or the original model's",
    )
    p.add_argument(
        "--budget",
        help="choose each layer's group and rank under a budget: params=4 (times fewer weights), speedup=2 "
        "(needs example inputs) or max_error=0.1; --group then names the candidates (C = cyclic orders 2-64)",
    )
    p.add_argument("--example-shape", help="comma-separated shape of a random example input, e.g. 1,1,28,28")
    p.add_argument("--example-inputs", help="package.module:function returning example inputs")
    p.add_argument("--eval", help="package.module:function(model, reference) -> dict of metrics")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gmcompress", description="Compress PyTorch models with group matrices.")
    parser.add_argument("--version", action="version", version=f"gmcompress {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="show which layers would be compressed and how (no fitting but a budget's)")
    _add_common(plan)
    plan.add_argument("--calibration", help="package.module:function returning calibration batches (budgets)")
    comp = sub.add_parser("compress", help="fit, swap and report; --out saves the result")
    _add_common(comp)
    comp.add_argument("--calibration", help="package.module:function returning calibration batches")
    comp.add_argument("--no-calibration", action="store_true", help="plain (not activation-aware) fits")
    comp.add_argument("--out", help="where to save the compressed model (gmcompress.save format)")
    comp.add_argument("--markdown", help="also write the report as markdown here")
    comp.add_argument("--plot", help="also save the per-layer figure (PNG) here")
    comp.add_argument("--quiet", action="store_true", help="no progress bar")
    rep = sub.add_parser("report", help="report on a saved compressed model against the original")
    _add_common(rep)
    rep.add_argument("--checkpoint", required=True, help="file written by 'gmcompress compress --out'")
    tune = sub.add_parser("finetune", help="distil a compressed model from the original (recipe 'finetune')")
    _add_common(tune)
    tune.add_argument("--checkpoint", help="start from this compressed file instead of compressing now")
    tune.add_argument("--data", help="package.module:function returning the training Dataset")
    tune.add_argument("--epochs", type=int, help="override the recipe's epochs")
    tune.add_argument("--checkpoint-dir", help="resumable checkpoints (Ctrl-C saves; rerun to resume)")
    tune.add_argument(
        "--features",
        help="comma-separated submodule names whose outputs are distilled with the model's own (overrides the "
        "recipe's features; sets loss=mse unless the recipe names mse or cosine), e.g. features.5",
    )
    tune.add_argument("--out", help="where to save the fine-tuned model")
    tune.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _compress(args: argparse.Namespace, original: torch.nn.Module, **kwargs: Any) -> Any:
    """:func:`compress` with the command line's group, rank, recipe and conv_group."""
    budget, group = _budget(args)
    return compress(
        original, group, args.rank, recipe=args.recipe, conv_group=args.conv_group, budget=budget,
        calibration_mode=args.calibration_mode, **kwargs,
    )  # fmt: skip


def _budget(args: argparse.Namespace) -> tuple[Budget | None, str | list[str] | None]:
    """``--budget`` parsed, and ``--group`` (with a budget, a comma-separated list names the candidates)."""
    budget = Budget.parse(args.budget) if args.budget else None
    group = args.group
    if group and "," in group:
        if budget is None:
            raise ValueError(f"--group {group}: several groups need --budget (which chooses among them per layer)")
        group = [g.strip() for g in group.split(",")]
    return budget, group


def _add_metrics(
    report: CompressionReport, evaluate: Callable | None, original: torch.nn.Module, model: torch.nn.Module
) -> None:
    if evaluate is not None:
        before, after = evaluate(original, original), evaluate(model, original)
        for key in after:
            report.add_metric(key, before[key], after[key])


def _finetune(args: argparse.Namespace, factory: DemoModel, original: torch.nn.Module) -> int:
    from .recipe import load_recipe
    from .training import finetune
    from .training.settings import FEATURE_LOSSES

    settings = dict(load_recipe(args.recipe).finetune or {}) if args.recipe else {}
    if args.epochs is not None:
        settings.pop("steps", None)
        settings["epochs"] = args.epochs
    if args.checkpoint_dir:
        settings["checkpoint_dir"] = args.checkpoint_dir
    if args.features is not None:  # "" is an empty name, rejected by finetune, not "no features"
        settings["features"] = [name.strip() for name in args.features.split(",")]
        if settings.get("loss") not in FEATURE_LOSSES:
            settings["loss"] = "mse"
    if "epochs" not in settings and "steps" not in settings:
        raise ValueError("no fine-tuning budget: give --epochs or a recipe with a finetune section")
    if args.data:
        data = _resolve(args.data, "--data")()
    elif factory.train_data is not None:
        data = factory.train_data()
    else:
        raise ValueError("no training data: give --data package.module:function")
    example, calibration, evaluate = _hooks(args, factory)
    if args.checkpoint:
        student = load(args.checkpoint, _build(factory, args.model))
        report = _totals(original, student, example)
    else:
        student = _compress(args, original, example_inputs=example, calibration=calibration, progress=not args.quiet)
        report = student.gm_report
    # a factory may name a richer distillation target than the model's output (MiniLM: token states)
    view = factory.distill_view
    trained, teacher = (view(student), view(original)) if view is not None else (student, original)
    eval_fn = (lambda _: evaluate(student, original)) if evaluate is not None else None
    before = eval_fn(student) if eval_fn else {}
    result = finetune(trained, teacher, data, eval_fn=eval_fn, progress=not args.quiet, **settings)
    after = eval_fn(student) if eval_fn else {}
    reference = evaluate(original, original) if evaluate is not None else {}
    rows = [[k, f"{reference[k]:.4f}", f"{before[k]:.4f}", f"{after[k]:.4f}"] for k in after]
    print(report if report.layers else format_table(report.TOTAL_HEADER, report.total_rows()))
    print()
    print(format_table(["metric", "original", "compressed", "fine-tuned"], rows))
    print(f"{result.steps} steps in {result.seconds / 60:.1f} min")
    if args.out:
        save(student, args.out)
        print(f"saved {args.out}")
    return 0


def _run(args: argparse.Namespace) -> int:
    factory = _demo_model(args.model)
    original = _build(factory, args.model)
    if args.command == "finetune":
        return _finetune(args, factory, original)
    if args.command == "plan":
        budget, group = _budget(args)
        example, calibration, _ = _hooks(args, factory) if budget is not None else (None, None, None)
        the_plan = plan(
            original, group, args.rank, recipe=args.recipe, conv_group=args.conv_group, budget=budget,
            calibration=calibration, example_inputs=example, progress=False,
        )  # fmt: skip
        print(the_plan)
        return 0
    example, calibration, evaluate = _hooks(args, factory)
    if args.command == "compress":
        model = _compress(args, original, example_inputs=example, calibration=calibration, progress=not args.quiet)
        report: CompressionReport = model.gm_report
        _add_metrics(report, evaluate, original, model)
        print(report)
        if args.out:
            save(model, args.out)
            print(f"saved {args.out}")
        if args.markdown:
            Path(args.markdown).write_text(report.to_markdown() + "\n")
        if args.plot:
            report.plot(args.plot)
        return 0
    model = load(args.checkpoint, _build(factory, args.model))
    report = _totals(original, model, example)
    _add_metrics(report, evaluate, original, model)
    print(format_table(report.TOTAL_HEADER, report.total_rows()))
    return 0


def _totals(original: torch.nn.Module, model: torch.nn.Module, example: Any) -> CompressionReport:
    """Model totals (parameters, bytes, MACs and latency on ``example``) of a loaded compressed model."""
    report = CompressionReport(
        params_before=sum(p.numel() for p in original.parameters()),
        params_after=sum(p.numel() for p in model.parameters()),
        bytes_before=state_dict_bytes(original),
        bytes_after=state_dict_bytes(model),
    )
    if example is not None:
        report.macs_before = count_macs(original, example)[0]
        report.macs_after = count_macs(model, example)[0]
        report.latency_before_ms, report.latency_after_ms = measure_latencies(original, model, example)
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("default", message="gmcompress:.*")
    try:
        return _run(args)
    except (ValueError, TypeError, KeyError, FileNotFoundError, ImportError, RuntimeError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"gmcompress: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
