"""``gmcompress plan|compress|report|finetune``: the command line over :func:`gmcompress.compress`.

    gmcompress plan     --model gmcompress.zoo:mnistnet --recipe recipes/mnistnet.yaml
    gmcompress compress --model gmcompress.zoo:mnistnet --recipe recipes/mnistnet.yaml --out out/mnistnet.pt
    gmcompress report   --model gmcompress.zoo:mnistnet --checkpoint out/mnistnet.pt
    gmcompress finetune --model gmcompress.zoo:mnistnet --recipe recipes/mnistnet.yaml --out out/mnistnet-ft.pt

``--model module:NAME`` names a :class:`gmcompress.zoo.DemoModel` (a factory with hooks for example inputs,
calibration batches, ``evaluate(model, reference) -> dict`` and fine-tuning data: the zoo's models are) or
any function returning the pretrained model; the module may be a file in the current directory
(``--model mymodels:build``), as under ``python -m``. ``--example-shape``, ``--example-inputs``,
``--calibration``, ``--eval`` and ``--data`` override the hooks. Each subcommand takes only the options it
uses, spelled out in full (no abbreviations). The arguments are parsed before torch is imported, so
``--help`` is quick. Errors end with exit code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from torch import nn

    from .measure.paths import FreezeReport
    from .planning.budget_spec import Budget
    from .report import CompressionReport
    from .zoo import DemoModel

# the options that shape a new compression: finetune --checkpoint (already compressed) refuses them
COMPRESSION_OPTIONS = ("group", "rank", "conv_group", "budget", "calibration", "no_calibration", "calibration_mode")


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


def _current_directory_importable() -> None:
    """The current directory first on ``sys.path`` (as ``python -m`` puts it), so ``--model mymodels:build``
    finds ``./mymodels.py`` also when run as the ``gmcompress`` script."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _demo_model(spec: str) -> DemoModel:
    from .zoo import DemoModel

    obj = _resolve(spec, "--model")
    if isinstance(obj, DemoModel):
        return obj
    if not callable(obj):
        raise ValueError(f"--model {spec!r} is a {type(obj).__name__}, not a function returning an nn.Module")
    return DemoModel(build=obj)


def _build(demo: DemoModel, spec: str) -> nn.Module:
    from torch import nn

    try:
        model = demo.build()
    except Exception as err:
        raise ValueError(f"--model {spec}: building the model failed: {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec} returned a {type(model).__name__}, not an nn.Module")
    return model


def _example(args: argparse.Namespace, factory: DemoModel) -> Any:
    """The example inputs: ``--example-shape`` (random), ``--example-inputs``, or the model's hook."""
    if args.example_shape:
        import torch

        try:
            shape = tuple(int(v) for v in args.example_shape.split(","))
        except ValueError:
            raise ValueError(f"--example-shape must be comma-separated integers, got {args.example_shape!r}") from None
        return torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    if args.example_inputs:
        return _resolve(args.example_inputs, "--example-inputs")()
    return factory.example_inputs() if factory.example_inputs is not None else None


def _calibration(args: argparse.Namespace, factory: DemoModel) -> Any:
    """The calibration batches: ``--calibration``, or the model's hook unless ``--no-calibration``."""
    refused = getattr(args, "no_calibration", False)
    if args.calibration and refused:
        raise ValueError("--calibration and --no-calibration contradict each other: give one of them")
    if args.calibration:
        return _resolve(args.calibration, "--calibration")()
    return factory.calibration() if factory.calibration is not None and not refused else None


def _evaluate(args: argparse.Namespace, factory: DemoModel) -> Callable | None:
    return _resolve(args.eval, "--eval") if args.eval else factory.evaluate


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="module:NAME, NAME a gmcompress.zoo.DemoModel or a function returning the pretrained nn.Module; the "
        "module may be a file in the current directory (mymodels:build for ./mymodels.py)",
    )


def _add_compression(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="YAML recipe (see recipes/)")
    p.add_argument("--group", help="group for Linear / 1x1 layers, e.g. C8 (overrides the recipe)")
    p.add_argument("--rank", type=int, help="rank of the relaxed form (overrides the recipe)")
    p.add_argument("--conv-group", help="group of the square for k x k convolutions (C2, C4, D2, D4)")
    p.add_argument(
        "--budget",
        help="choose each layer's group and rank under a budget: params=4 (times fewer weights), speedup=2 "
        "(needs example inputs) or max_error=0.1; --group then names the candidates (C = cyclic orders 2-64)",
    )


def _add_calibration(p: argparse.ArgumentParser) -> None:
    """The fitting options of the commands that compress (compress, finetune)."""
    p.add_argument("--calibration", help="module:function returning calibration batches (activation-aware fits)")
    p.add_argument("--no-calibration", action="store_true", help="plain (not activation-aware) fits")
    p.add_argument(
        "--calibration-mode",
        choices=("sequential", "original"),
        help="fit each layer on the compressed prefix's activations (sequential, default) or the original model's",
    )


def _add_inputs(p: argparse.ArgumentParser, used_for: str) -> None:
    shape_help = f"comma-separated shape of a random example input, e.g. 1,1,28,28 ({used_for})"
    p.add_argument("--example-shape", help=shape_help)
    p.add_argument("--example-inputs", help=f"module:function returning example inputs ({used_for})")


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval", help="module:function(model, reference) -> dict of metrics")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand, each with only the options it uses; imports nothing heavy."""
    parser = argparse.ArgumentParser(
        prog="gmcompress", description="Compress PyTorch models with group matrices.", allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"gmcompress {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, allow_abbrev=False)
        _add_model(p)
        return p

    plan = command("plan", "show which layers would be compressed and how (no fitting but a budget's)")
    _add_compression(plan)
    _add_inputs(plan, "speedup budgets")
    plan.add_argument("--calibration", help="module:function returning calibration batches (budgets)")
    comp = command("compress", "fit, swap and report; --out saves the result")
    _add_compression(comp)
    _add_calibration(comp)
    _add_inputs(comp, "MACs, latency and fidelity")
    _add_eval(comp)
    comp.add_argument("--out", help="where to save the compressed model (gmcompress.save format)")
    comp.add_argument("--markdown", help="also write the report as markdown here")
    comp.add_argument("--plot", help="also save the per-layer figure (PNG) here")
    comp.add_argument("--quiet", action="store_true", help="no progress bar")
    rep = command("report", "report on a saved compressed model against the original")
    rep.add_argument("--checkpoint", required=True, help="file written by 'gmcompress compress --out'")
    _add_inputs(rep, "MACs and latency")
    _add_eval(rep)
    tune = command("finetune", "distil a compressed model from the original (recipe 'finetune')")
    _add_compression(tune)
    _add_calibration(tune)
    _add_inputs(tune, "MACs, latency and fidelity")
    _add_eval(tune)
    tune.add_argument(
        "--checkpoint", help="start from this compressed file instead of compressing now (the recipe then gives "
        "only the finetune section)",
    )  # fmt: skip
    tune.add_argument("--data", help="module:function returning the training Dataset")
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


def _group_needed(err: ValueError, command: str) -> ValueError:
    """The Python API's "needs a group (e.g. group='C8')" in the command line's words; other errors as they are."""
    if "needs a group (e.g. group='C8')" not in str(err):
        return err
    return ValueError(f"{command} needs a group: give --group (e.g. --group C8) or --recipe FILE whose defaults or "
                      "rules set one (see recipes/)")  # fmt: skip


def _compress(args: argparse.Namespace, original: nn.Module, **kwargs: Any) -> nn.Module:
    """:func:`compress` with the command line's group, rank, recipe, conv_group, budget and calibration mode."""
    from .api import compress

    budget, group = _budget(args)
    if args.calibration_mode is not None:
        kwargs["calibration_mode"] = args.calibration_mode
    try:
        return compress(
            original, group, args.rank, recipe=args.recipe, conv_group=args.conv_group, budget=budget, **kwargs
        )
    except ValueError as err:
        raise _group_needed(err, args.command) from None


def _plan(args: argparse.Namespace, factory: DemoModel, original: nn.Module) -> int:
    from .api import plan

    budget, group = _budget(args)
    example, calibration = (_example(args, factory), _calibration(args, factory)) if budget else (None, None)
    try:
        the_plan = plan(
            original, group, args.rank, recipe=args.recipe, conv_group=args.conv_group, budget=budget,
            calibration=calibration, example_inputs=example, progress=False,
        )  # fmt: skip
    except ValueError as err:
        raise _group_needed(err, args.command) from None
    print(the_plan)
    return 0


def _budget(args: argparse.Namespace) -> tuple[Budget | None, str | list[str] | None]:
    """``--budget`` parsed, and ``--group`` (with a budget, a comma-separated list names the candidates)."""
    from .planning.budget_spec import Budget

    budget = Budget.parse(args.budget) if args.budget else None
    group = args.group
    if group and "," in group:
        if budget is None:
            raise ValueError(f"--group {group}: several groups need --budget (which chooses among them per layer)")
        group = [g.strip() for g in group.split(",")]
    return budget, group


def _add_metrics(report: CompressionReport, evaluate: Callable | None, original: nn.Module, model: nn.Module) -> None:
    if evaluate is not None:
        before, after = evaluate(original, original), evaluate(model, original)
        for key in after:
            report.add_metric(key, before[key], after[key])


def _refuse_compression_options(args: argparse.Namespace) -> None:
    """``finetune --checkpoint`` starts from a compressed file: options that shape a compression would be ignored."""
    given = [name for name in COMPRESSION_OPTIONS if getattr(args, name) not in (None, False)]
    if given:
        flags = ", ".join(
            f"--{name.replace('_', '-')}" + ("" if getattr(args, name) is True else f" {getattr(args, name)}")
            for name in given
        )
        raise ValueError(f"finetune --checkpoint {args.checkpoint} fine-tunes a model compressed already: {flags} "
                         "would be ignored; drop it, or drop --checkpoint to compress now")  # fmt: skip


def _finetune_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe's finetune section with the command line's overrides."""
    from .recipe import load_recipe
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
    return settings


def _finetune(args: argparse.Namespace, factory: DemoModel, original: nn.Module) -> int:
    from . import training
    from .core.tables import format_table
    from .io import load, save

    if args.checkpoint:
        _refuse_compression_options(args)
    settings = _finetune_settings(args)
    if args.data:
        data = _resolve(args.data, "--data")()
    elif factory.train_data is not None:
        data = factory.train_data()
    else:
        raise ValueError("no training data: give --data package.module:function")
    example, evaluate = _example(args, factory), _evaluate(args, factory)
    if args.checkpoint:
        student = load(args.checkpoint, _build(factory, args.model))
        report = _totals(original, student, example)
    else:
        calibration = _calibration(args, factory)
        student = _compress(args, original, example_inputs=example, calibration=calibration, progress=not args.quiet)
        report = student.gm_report
    # what compression did, before the minutes of fine-tuning
    print(report if report.layers else format_table(report.TOTAL_HEADER, report.total_rows()), flush=True)
    # a factory may name a richer distillation target than the model's output (MiniLM: token states)
    view = factory.distill_view
    trained, teacher = (view(student), view(original)) if view is not None else (student, original)
    eval_fn = (lambda _: evaluate(student, original)) if evaluate is not None else None
    before = eval_fn(student) if eval_fn else {}
    result = training.finetune(trained, teacher, data, eval_fn=eval_fn, progress=not args.quiet, **settings)
    after = eval_fn(student) if eval_fn else {}
    reference = evaluate(original, original) if evaluate is not None else {}
    rows = [[k, f"{reference[k]:.4f}", f"{before[k]:.4f}", f"{after[k]:.4f}"] for k in after]
    print()
    print(format_table(["metric", "original", "compressed", "fine-tuned"], rows))
    print(f"{result.steps} steps in {result.seconds / 60:.1f} min")
    if example is not None:
        _print_served(original, student, example, args.quiet)
    if args.out:
        save(student, args.out)
        print(f"saved {args.out}")
    return 0


def _print_served(original: nn.Module, student: nn.Module, example: Any, quiet: bool) -> None:
    """The fine-tuned model as it would serve: ``gm.freeze`` on the example batch (each layer's fastest form,
    measured), its latency against the original's in the same rounds. The saved model stays trainable."""
    from .api import freeze
    from .measure.timing import measure_latencies

    served = freeze(student, example, progress=not quiet)
    before, after = measure_latencies(original, served, example)
    print(_served_line(served.freeze_report, before, after))


def _served_line(report: FreezeReport, before: float, after: float) -> str:
    """The finetune command's last line: the frozen model's forms and latency against the original's. When every
    compressed layer serves as its plain torch layer the frozen model runs the original's computation, so a
    SLOWER reading there is the machine's timing noise, and the line says so."""
    from .measure.paths import TORCH_LAYER
    from .report import is_slower

    forms = ", ".join(f"{c.name}: {c.chosen}" for c in report.layers)
    line = (f"served (gm.freeze on the example batch; {forms}): latency {after:.3f} ms against the original's "
            f"{before:.3f} ms, {before / after:.2f}x")  # fmt: skip
    if not is_slower(before, after):
        return line
    if report.layers and not report.not_called and all(c.chosen == TORCH_LAYER for c in report.layers):
        return line + (
            " (SLOWER as timed, but every compressed layer serves as its plain torch layer: the same computation as "
            "the original's, so the gap is timing noise)"
        )
    return line + " (SLOWER)"


def _compress_command(args: argparse.Namespace, factory: DemoModel, original: nn.Module) -> int:
    from .io import save

    example, calibration, evaluate = _example(args, factory), _calibration(args, factory), _evaluate(args, factory)
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


def _report(args: argparse.Namespace, factory: DemoModel, original: nn.Module) -> int:
    from .core.tables import format_table
    from .io import load

    model = load(args.checkpoint, _build(factory, args.model))
    report = _totals(original, model, _example(args, factory))
    _add_metrics(report, _evaluate(args, factory), original, model)
    print(format_table(report.TOTAL_HEADER, report.total_rows()))
    return 0


COMMANDS = {"plan": _plan, "compress": _compress_command, "report": _report, "finetune": _finetune}


def _run(args: argparse.Namespace) -> int:
    _current_directory_importable()
    factory = _demo_model(args.model)
    original = _build(factory, args.model)
    return COMMANDS[args.command](args, factory, original)


def _totals(original: nn.Module, model: nn.Module, example: Any) -> CompressionReport:
    """Model totals (parameters, bytes, MACs and latency on ``example``) of a loaded compressed model."""
    from .measure.counts import count_macs, state_dict_bytes
    from .measure.timing import measure_latencies
    from .report import CompressionReport

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
