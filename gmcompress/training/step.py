"""One optimizer step on one batch, and what happens when its loss or a gradient is not finite."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist

from ..graph.batches import split_batch, to_device
from .checkpoint import _rng_state
from .losses import _feature_loss, _loss
from .result import NonFiniteError
from .settings import _autocast, _Settings
from .state import _Trainer
from .taps import distilled_parts


def _nonfinite_loss(t: _Trainer, value: torch.Tensor) -> str | None:
    """'loss (nan)' (or similar) when the loss is not finite on this rank or another one; else None."""
    local = not bool(torch.isfinite(value.detach()))
    anywhere = local
    if t.world > 1:  # every rank must skip (or stop) together, or DDP's gradient all-reduce would hang
        flag = torch.tensor(float(local), device=t.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        anywhere = bool(flag.item())
    if not anywhere:
        return None
    return f"loss ({float(value.detach()):g})" if local else "loss (on another rank)"


def _unscale_check_clip(t: _Trainer) -> str | None:
    """Unscale and clip the gradients; name the first non-finite one (None with an fp16 GradScaler: it skips those)."""
    clip = t.settings.clip
    if t.scaler.is_enabled():  # inf/NaN gradients are the scaler's normal overflow signal: it skips the step
        if clip is not None:
            t.scaler.unscale_(t.optimizer)
            torch.nn.utils.clip_grad_norm_(t.params, clip)
        return None
    grads = [(n, p.grad) for n, p in zip(t.param_names, t.params) if p.grad is not None]
    if grads:
        finite = torch.stack([g.isfinite().all() for _, g in grads])
        if not bool(finite.all()):
            return f"gradient (first in {grads[int((~finite).nonzero()[0])][0]})"
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(t.params, clip)
    return None


def _train_step(t: _Trainer, batch: Any, epoch: int, index: int) -> float | None:
    """One optimizer step on one batch; returns the loss, or None when the batch was skipped (``nonfinite``).

    A non-finite loss or gradient never reaches the weights: NonFiniteError, or (``nonfinite="skip"``) the
    batch counts as a step without an update (the schedule advances, so epochs stay aligned).
    """
    s = t.settings
    inputs, labels = split_batch(to_device(batch, t.device))
    with _autocast(t.device, t.amp_dtype):
        target = None
        if t.teacher is not None and s.loss != "task":
            with torch.no_grad():
                target = distilled_parts(t.teacher, inputs, t.teacher_taps, s.features or (), "teacher")
        out = distilled_parts(t.model, inputs, t.student_taps, s.features or (), "student")
        value = _step_loss(s, out, target, labels)
    t.optimizer.zero_grad(set_to_none=True)
    bad = _nonfinite_loss(t, value)
    if bad is None:
        t.scaler.scale(value).backward()
        bad = _unscale_check_clip(t)
    if bad is not None:
        t.optimizer.zero_grad(set_to_none=True)
        _on_nonfinite(t, bad, epoch, index)
    t.busy = "updating the weights"
    if bad is None:
        t.scaler.step(t.optimizer)
        t.scaler.update()
    with warnings.catch_warnings():  # a skipped step (ours or the GradScaler's) still advances the schedule
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
        t.scheduler.step()
    t.step += 1
    if bad is None:
        t.loss_sum, t.loss_count = t.loss_sum + float(value.detach()), t.loss_count + 1
    if t.step % t.per_epoch == 0:  # the epoch's batches are all drawn: its loader's RNGs are where the next starts
        t.epoch_generators = [g.get_state() for g in t.data.generators]
    t.busy, t.rng_boundary = None, _rng_state(t)  # a step and its record are one: Ctrl-C saves both or neither
    return None if bad is not None else float(value.detach())


def _step_loss(
    s: _Settings, out: list[torch.Tensor], target: list[torch.Tensor] | None, labels: torch.Tensor | None
) -> torch.Tensor:
    """The loss of one batch: on the model's output, or part by part with ``features`` (losses._feature_loss)."""
    out = [_as_float32(p) for p in out]
    if s.features:
        return _feature_loss(s.loss, out, [_as_float32(p) for p in target or []])
    teacher_out = _as_float32(target[0]) if target is not None else None
    return _loss(s.loss, out[0], teacher_out, labels, s.temperature, s.alpha)


def _as_float32(x: torch.Tensor) -> torch.Tensor:
    """Floating point outputs in float32 for the loss (under amp they may be half); others left for its checks."""
    return x.float() if x.is_floating_point() else x


def _on_nonfinite(t: _Trainer, what: str, epoch: int, index: int) -> None:
    """Record a skipped batch (``nonfinite="skip"``) or raise NonFiniteError."""
    if t.settings.nonfinite == "skip":
        t.result.skipped_batches.append({"step": t.step + 1, "epoch": epoch + 1, "batch": index})
        t.result.skipped += 1
        return
    kept = (
        f"the checkpoint of step {t.checkpoint_step} in {t.checkpoint_dir} is kept"
        if t.checkpoint_step is not None
        else "no checkpoint was written"
    )
    raise NonFiniteError(
        f"non-finite {what} at step {t.step + 1} of {t.total} (batch index {index} of epoch {epoch + 1}): training "
        f"stopped before the weights changed, and {kept}. Pass nonfinite='skip' to skip such batches",
        t.step + 1,
        epoch + 1,
        index,
    )
