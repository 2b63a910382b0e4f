"""Before the first step: processes, data, devices, the first-batch check, optimizer and schedule, resume."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..graph.batches import eval_mode, split_batch, to_device
from ..measure.paths import is_frozen
from .checkpoint import _restore
from .data import _END, _as_dataset, _batches_data, _Data, _dataset_data, _isolated_rng
from .fingerprint import _fingerprint
from .losses import _check_parts, _check_shapes
from .settings import DEFAULT_BATCH_SIZE, RESUME, _amp_dtype, _autocast, _Settings
from .state import _Trainer
from .taps import distilled_parts, resolve_taps

EvalFn = Callable[[nn.Module], Mapping[str, float]]


def check_arguments(student: object, teacher: object, eval_fn: object, best_metric: object, on_step: object) -> None:
    """TypeError (ValueError for a frozen student) naming the argument of :func:`finetune` that is of the wrong kind."""
    if not isinstance(student, nn.Module):
        raise TypeError(
            f"finetune: student must be a torch.nn.Module (the compressed model), got {type(student).__name__}"
        )
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(
            f"finetune: teacher must be a torch.nn.Module (the original model) or None, got {type(teacher).__name__}"
        )
    for name, value in (("eval_fn", eval_fn), ("on_step", on_step)):
        if value is not None and not callable(value):
            raise TypeError(f"finetune: {name} must be a function or None, got {type(value).__name__}")
    if best_metric is not None and not isinstance(best_metric, str):
        raise TypeError(f"finetune: best_metric must be the name of one of eval_fn's metrics, got {best_metric!r}")
    if best_metric is not None and eval_fn is None:
        raise ValueError(f"finetune: best_metric={best_metric!r} names a metric of eval_fn, but no eval_fn is given")
    if is_frozen(student):
        raise ValueError(
            f"finetune: the student ({type(student).__name__}) is an inference copy made by gmcompress.freeze (its "
            "parameters do not require grad and some layers may be plain torch layers): fine-tune the compressed "
            "model it was made from, then freeze that again"
        )
    if not any(p.requires_grad for p in student.parameters()):
        raise ValueError(
            f"finetune: the student ({type(student).__name__}) has no trainable parameter (requires_grad is False "
            "on every one): nothing to fine-tune; unfreeze the layers to train (p.requires_grad_(True))"
        )


def _resolve_device(device: object) -> torch.device:
    """``finetune(device=...)`` as a usable torch.device (None: CUDA when there is one); else TypeError/ValueError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(
            f"device must be None, a string ('cpu', 'cuda', 'cuda:1'), an int (a CUDA device index) or a torch.device, "
            f"got {device!r} ({type(device).__name__})"
        )
    try:
        resolved = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device={device!r} is not a device name: {str(err).splitlines()[0]}") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={device!r}: this machine has no CUDA device; use device='cpu' (or None)")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(
                f"device={device!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}: pick one"
            )
    try:
        torch.empty(0, device=resolved)
    except Exception as err:  # another accelerator type this torch build or machine lacks
        raise ValueError(f"device={device!r} cannot be used here: {str(err).splitlines()[0]}") from None
    return resolved


def _checkpoint_path(checkpoint_dir: object) -> Path | None:
    """``finetune(checkpoint_dir=...)`` as a Path (None: no checkpoints); a name that is not a usable directory fails
    here, before any work."""
    if checkpoint_dir is None:
        return None
    if not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(
            f"checkpoint_dir must be a path (str or os.PathLike) or None, got {type(checkpoint_dir).__name__}"
        )
    if os.fspath(checkpoint_dir) == "":
        raise ValueError(
            "checkpoint_dir is '' (it would mean the current directory, and resume='never' would delete ./last.pt): "
            "give a directory, e.g. 'checkpoints', or None for no checkpoints"
        )
    path = Path(checkpoint_dir)
    existing = next(p for p in (path, *path.parents) if p.exists())  # the root always exists
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is inside {existing}, which is a file"
        raise ValueError(f"checkpoint_dir {path} {where}, not a directory: give a directory for last.pt and trainer.pt")
    return path


def _check_eval_fn(
    student: nn.Module, eval_fn: EvalFn | None, best_metric: str | None, device: torch.device
) -> dict[str, float] | None:
    """Call ``eval_fn`` on the student as given (eval mode, RNGs untouched), so that a failing one, one that returns
    no metrics, or a ``best_metric`` it does not return fails before training. Returns its metrics."""
    if eval_fn is None:
        return None
    with _isolated_rng(None, device if device.type == "cuda" else None), eval_mode(student):
        metrics = eval_fn(student)
    where = f"eval_fn {getattr(eval_fn, '__name__', type(eval_fn).__name__)}"
    if not isinstance(metrics, Mapping) or not metrics:
        raise ValueError(
            f"{where} must return a non-empty dict of metric names to numbers, e.g. {{'accuracy': 0.93}}; called on "
            f"the student before training, it returned {metrics!r}"
        )
    bad = {k: v for k, v in metrics.items() if not _is_number(v)}
    if bad:
        raise ValueError(f"{where} returned metrics that are not numbers: {bad!r}")
    if best_metric is not None and best_metric not in metrics:
        raise ValueError(
            f"best_metric={best_metric!r} is not among the metrics eval_fn returns ({', '.join(map(repr, metrics))})"
        )
    return {str(k): float(v) for k, v in metrics.items()}


def _is_number(value: object) -> bool:
    """A real number, or a one-element tensor (what an eval_fn computing in torch may return)."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_complex()
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _make_optimizer(
    params: list[nn.Parameter], lr: float, weight_decay: float, total: int, warmup: float
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with a linear warm-up over ``warmup * total`` steps, then cosine decay to 0."""
    warm = int(warmup * total)

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress_frac = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress_frac)))

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def _place_models(
    student: nn.Module, teacher: nn.Module | None, device: torch.device, world: int
) -> tuple[nn.Module, nn.Module | None]:
    """Move the student to ``device`` (wrapped in DDP under torchrun); a teacher elsewhere is copied, not moved."""
    student.to(device)
    if teacher is not None:
        if next(iter(teacher.parameters()), torch.empty(0, device=device)).device != device:
            import copy

            teacher = copy.deepcopy(teacher).to(device)  # never move the user's model
    model: nn.Module = student
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    return model, teacher


def _preflight(
    student: nn.Module,
    teacher: nn.Module | None,
    data: _Data,
    s: _Settings,
    device: torch.device,
    taps: tuple[list[nn.Module], list[nn.Module]] = ([], []),
) -> None:
    """Run student and teacher (eval mode, no grad) on the first batch: the loss must be able to compare what
    they give it (with ``taps``, the student's and the teacher's tapped submodules, their outputs too).

    Nothing observable changes: the global RNGs and the loader's generators are restored afterwards.
    """
    states = [g.get_state() for g in data.generators]
    try:
        with _isolated_rng(s.seed, device if device.type == "cuda" else None):
            batch = next(iter(data.loader), _END)
            if batch is _END:
                raise ValueError(f"data ({type(data.loader).__name__}) yielded no batch")
            inputs, labels = split_batch(to_device(batch, device))
            with torch.no_grad(), _autocast(device, _amp_dtype(s.amp)), eval_mode(student):
                out = distilled_parts(student, inputs, taps[0], s.features or (), "student")
                target = None
                if teacher is not None and s.loss != "task":
                    target = distilled_parts(teacher, inputs, taps[1], s.features or (), "teacher")
    finally:
        for g, state in zip(data.generators, states):
            g.set_state(state)
    if s.features:
        _check_parts(s.features, out, target or [])
    else:
        _check_shapes(s.loss, out[0], target[0] if target is not None else None, labels)


def _setup(
    student: nn.Module,
    teacher: nn.Module | None,
    data: Any,
    s: _Settings,
    device: str | torch.device | None,
    checkpoint_dir: str | os.PathLike | None,
    collate_fn: Callable | None,
    resume: str,
    eval_fn: EvalFn | None = None,
    best_metric: str | None = None,
) -> _Trainer:
    """Validate everything (first batch and eval_fn included), then build the optimizer and schedule, and resume as
    asked."""
    s.validate(teacher)
    if resume not in RESUME:
        raise ValueError(f"resume must be one of {', '.join(RESUME)}, got {resume!r}")
    if resume == "must" and checkpoint_dir is None:
        raise ValueError("resume='must' needs a checkpoint_dir")
    ckpt = _checkpoint_path(checkpoint_dir)
    device = _resolve_device(device)
    rank, world = _distributed()
    dataset = _as_dataset(data)
    if dataset is not None:
        s = replace(s, batch_size=s.batch_size or DEFAULT_BATCH_SIZE)
        batches = _dataset_data(dataset, s, world, rank, collate_fn)
    else:
        batches = _batches_data(data, s, world, collate_fn)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    fingerprint = _fingerprint(student, teacher, batches.fingerprint, s)
    model, teacher = _place_models(student, teacher, device, world)
    if teacher is not None:
        teacher.eval()
    taps: tuple[list[nn.Module], list[nn.Module]] = ([], [])
    if s.features is not None:  # the teacher as placed (a copy when it was on another device)
        taps = (resolve_taps(student, s.features, "student", teacher), resolve_taps(teacher, s.features, "teacher"))
    _preflight(student, teacher, batches, s, device, taps)
    initial_metrics = _check_eval_fn(student, eval_fn, best_metric, device) if rank == 0 else None
    if ckpt is not None and rank == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
    total = s.steps if s.steps is not None else s.epochs * batches.per_epoch
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer, scheduler = _make_optimizer(params, s.lr, s.weight_decay, total, s.warmup)
    amp_dtype = _amp_dtype(s.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    t = _Trainer(
        s, student, model, teacher, batches, params, [n for n, _ in named], optimizer, scheduler, scaler, amp_dtype,
        device, rank=rank, world=world, total=total, checkpoint_dir=ckpt, fingerprint=fingerprint,
        student_taps=taps[0], teacher_taps=taps[1],
    )  # fmt: skip
    t.result.initial_metrics = initial_metrics
    torch.manual_seed(s.seed)
    _restore(t, resume)
    return t
