"""The state of one run (:class:`_Trainer`): what is trained, how, where it stands and where it is saved."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import _Data
from .result import FinetuneResult
from .settings import _Settings


@dataclass
class _Trainer:
    """The state of one run: what is trained, how, and where it is checkpointed."""

    settings: _Settings
    student: nn.Module
    model: nn.Module  # the student, or its DistributedDataParallel wrapper
    teacher: nn.Module | None
    data: _Data
    params: list[nn.Parameter]
    param_names: list[str]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    device: torch.device
    rank: int = 0
    world: int = 1
    total: int = 0
    checkpoint_dir: Path | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)
    result: FinetuneResult = field(default_factory=FinetuneResult)
    step: int = 0
    loss_sum: float = 0.0  # this epoch's losses, for the history
    loss_count: int = 0
    epoch_generators: list[torch.Tensor] = field(default_factory=list)  # data.generators at the epoch start
    rng_boundary: dict[str, Any] | None = None  # RNG states at the last step boundary (saved on Ctrl-C)
    busy: str | None = None  # an interruption now would save an inconsistent state: it saves nothing
    checkpoint_step: int | None = None
    student_taps: list[nn.Module] = field(default_factory=list)  # settings.features in the student (taps.py)
    teacher_taps: list[nn.Module] = field(default_factory=list)  # ... and in the teacher

    @property
    def per_epoch(self) -> int:
        return self.data.per_epoch
