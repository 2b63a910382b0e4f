"""Before the first step: processes, data, devices, the first-batch check, optimizer and schedule, resume."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..batches import split_batch, to_device
from .checkpoint import _restore
from .data import _END, _as_dataset, _batches_data, _Data, _dataset_data, _isolated_rng
from .fingerprint import _fingerprint
from .losses import _check_shapes
from .settings import DEFAULT_BATCH_SIZE, RESUME, _amp_dtype, _autocast, _Settings
from .state import _Trainer
from .taps import distilled_output, resolve_taps


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
    was_training = student.training
    try:
        with _isolated_rng(s.seed, device if device.type == "cuda" else None):
            batch = next(iter(data.loader), _END)
            if batch is _END:
                raise ValueError(f"data ({type(data.loader).__name__}) yielded no batch")
            inputs, labels = split_batch(to_device(batch, device))
            student.eval()
            with torch.no_grad(), _autocast(device, _amp_dtype(s.amp)):
                out = distilled_output(student, inputs, taps[0], s.features or (), "student")
                target = None
                if teacher is not None and s.loss != "task":
                    target = distilled_output(teacher, inputs, taps[1], s.features or (), "teacher")
    finally:
        student.train(was_training)
        for g, state in zip(data.generators, states):
            g.set_state(state)
    _check_shapes(s.loss, out, target, labels)


def _setup(
    student: nn.Module,
    teacher: nn.Module | None,
    data: Any,
    s: _Settings,
    device: str | torch.device | None,
    checkpoint_dir: str | os.PathLike | None,
    collate_fn: Callable | None,
    resume: str,
) -> _Trainer:
    """Validate everything (first batch included), then build the optimizer and schedule, and resume as asked."""
    s.validate(teacher)
    if resume not in RESUME:
        raise ValueError(f"resume must be one of {', '.join(RESUME)}, got {resume!r}")
    if resume == "must" and checkpoint_dir is None:
        raise ValueError("resume='must' needs a checkpoint_dir")
    rank, world = _distributed()
    dataset = _as_dataset(data)
    if dataset is not None:
        s = replace(s, batch_size=s.batch_size or DEFAULT_BATCH_SIZE)
        batches = _dataset_data(dataset, s, world, rank, collate_fn)
    else:
        batches = _batches_data(data, s, world, collate_fn)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
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
    torch.manual_seed(s.seed)
    _restore(t, resume)
    return t
