"""The hyper-parameters of one run and their validation: types, finite numbers, ranges, choices, amp."""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

LOSSES = ("kd", "mse", "cosine", "task", "mix")
FEATURE_LOSSES = ("mse", "cosine")  # the losses that compare feature vectors, not logits or labels
RESUME = ("auto", "never", "must")
NONFINITE = ("raise", "skip")
BATCHNORM = ("frozen", "adapt")  # running statistics of BatchNorm layers while training: kept, or updated
AMP = (None, False, True, "bf16", "fp16")  # mixed precision: off, bf16 (True), or the dtype named
TRAINABLE = ("all", "compressed")  # the parameters the optimizer steps: every one, or those of the GM layers
MAX_SEED = 2**63 - 1  # torch.manual_seed takes 64 bits; the epoch seeds stay below 2**63
DEFAULT_BATCH_SIZE = 64
_UNFINGERPRINTED = ("checkpoint_every", "nonfinite")  # they change when files are written / errors, not the weights


def _finite(name: str, value: Any) -> float:
    """``value`` as a float; ValueError unless it is a finite real number (bools are not numbers here)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _whole(name: str, value: Any) -> int:
    """``value`` as an int; ValueError unless it is an integer (not 1.5, "2" or True)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


@dataclass(frozen=True)
class _Settings:
    """The hyper-parameters of one run: all but ``_UNFINGERPRINTED`` must match a checkpoint to resume it."""

    epochs: int | None
    steps: int | None
    lr: float
    batch_size: int | None  # None: data given as batches, or DEFAULT_BATCH_SIZE for a Dataset
    loss: str
    temperature: float
    alpha: float
    warmup: float
    weight_decay: float
    clip: float | None
    checkpoint_every: int
    amp: bool | str | None
    seed: int
    nonfinite: str = "raise"
    features: tuple[str, ...] | None = None  # submodules whose outputs join the distilled output (taps.py)
    batchnorm: str = "frozen"  # BATCHNORM: BatchNorm layers in eval mode while training ("frozen"), or not
    trainable: str = "all"  # TRAINABLE: every parameter that requires grad, or only the GM layers' ones

    def validate(self, teacher: nn.Module | None) -> None:
        """Raise ValueError for the first bad setting: wrong type, NaN/inf, or out of range."""
        if _finite("lr", self.lr) <= 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give exactly one of epochs or steps")
        for name in ("epochs", "steps", "batch_size"):
            value = getattr(self, name)
            if value is not None and _whole(name, value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if _whole("checkpoint_every", self.checkpoint_every) < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if not 0 <= _whole("seed", self.seed) <= MAX_SEED:
            raise ValueError(f"seed must lie in 0..2**63 - 1 (torch seeds are 64-bit), got {self.seed}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if _finite("temperature", self.temperature) <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= _finite("alpha", self.alpha) <= 1:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}")
        if not 0 <= _finite("warmup", self.warmup) < 1:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if _finite("weight_decay", self.weight_decay) < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.clip is not None and _finite("clip", self.clip) <= 0:
            raise ValueError(f"clip must be > 0 or None, got {self.clip}")
        if self.nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE)}, got {self.nonfinite!r}")
        if self.batchnorm not in BATCHNORM:
            raise ValueError(f"batchnorm must be one of {', '.join(BATCHNORM)}, got {self.batchnorm!r}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {', '.join(TRAINABLE)}, got {self.trainable!r}")
        if self.loss != "task" and teacher is None:
            raise ValueError(f"loss={self.loss!r} distils from a teacher: pass teacher=<the original model>")
        if self.features is not None:
            check_feature_names(self.features)
            if self.loss not in FEATURE_LOSSES:
                raise ValueError(
                    f"features={list(self.features)} distils inner outputs concatenated with the model's output, "
                    f"which loss={self.loss!r} cannot compare: use loss='mse' (or 'cosine')"
                )
        _amp_dtype(self.amp)


def check_feature_names(names: object) -> None:
    """ValueError unless ``names`` (``finetune(features=...)``) is a non-empty list or tuple of non-empty strings."""
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"features must be a non-empty list of submodule names (e.g. ['features.5']), got {names!r}")


def _amp_dtype(amp: bool | str | None) -> torch.dtype | None:
    """None, or the autocast dtype of ``amp`` (True means bf16)."""
    if amp not in AMP:
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    if amp is True:
        return torch.bfloat16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp if isinstance(amp, str) else "")


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
