"""The training loop: :func:`finetune`, its epochs, and what each epoch end records, evaluates and saves."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..io import save
from .checkpoint import _checkpoint_on_interrupt, _rng_state, _write_checkpoint
from .epochs import _epoch_batches
from .prepare import _setup
from .result import FinetuneResult
from .settings import _Settings
from .state import _Trainer
from .step import _train_step

__all__ = ["finetune"]


def _feature_names(features: Sequence[str] | None) -> object:
    """``features`` as the tuple the settings keep (any iterable but a string, whose characters would pass for
    names); anything else is left for :func:`~gmcompress.training.settings.check_feature_names` to reject."""
    if features is None or isinstance(features, (str, bytes)):
        return features
    try:
        return tuple(features)
    except TypeError:
        return features


def _end_epoch(t: _Trainer, eval_fn: Callable[[nn.Module], dict[str, float]] | None, best_metric: str | None) -> None:
    """Record the epoch, evaluate (rank 0), keep ``best.pt``, and checkpoint."""
    t.busy = "ending an epoch"
    entry: dict[str, Any] = {
        "epoch": math.ceil(t.step / t.per_epoch),
        "step": t.step,
        "loss": t.loss_sum / max(1, t.loss_count),
        "lr": t.scheduler.get_last_lr()[0],
    }
    if eval_fn is not None and t.rank == 0:
        t.student.eval()
        metrics = eval_fn(t.student)
        t.student.train()
        entry.update(metrics)
        key = best_metric or next(iter(metrics))
        if t.result.best_metric is None or metrics[key] > t.result.best_metric:
            t.result.best_metric = float(metrics[key])
            if t.checkpoint_dir is not None:
                save(t.student, t.checkpoint_dir / "best.pt")
                t.result.best_path = str(t.checkpoint_dir / "best.pt")
    t.result.history.append(entry)
    t.loss_sum, t.loss_count = 0.0, 0
    t.epoch_generators = [g.get_state() for g in t.data.generators]  # where the next epoch starts
    _write_checkpoint(t)
    t.busy, t.rng_boundary = None, _rng_state(t)


def _run(
    t: _Trainer,
    bar: tqdm,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None,
    best_metric: str | None,
    on_step: Callable[[int], None] | None,
) -> None:
    """The training loop, from ``t.step`` to ``t.total``."""
    t.model.train()
    t.rng_boundary = _rng_state(t)
    while t.step < t.total:
        epoch, skip = divmod(t.step, t.per_epoch)
        for index, batch in _epoch_batches(t, epoch, skip):
            value = _train_step(t, batch, epoch, index)
            if value is not None:
                t.loss_sum, t.loss_count = t.loss_sum + value, t.loss_count + 1
            bar.update(1)
            shown = f"{value:.4f}" if value is not None else "skipped"
            bar.set_postfix(loss=shown, lr=f"{t.scheduler.get_last_lr()[0]:.2e}")
            if on_step is not None:
                on_step(t.step)
            if t.step % t.settings.checkpoint_every == 0 and t.step % t.per_epoch != 0:
                _write_checkpoint(t)
            t.rng_boundary = _rng_state(t)  # what the next batch's fetch and step start from
            if t.step >= t.total or t.step % t.per_epoch == 0:
                break
        if t.step % t.per_epoch == 0 or t.step >= t.total:
            _end_epoch(t, eval_fn, best_metric)


def finetune(
    student: nn.Module,
    teacher: nn.Module | None = None,
    data: Any = None,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    lr: float = 1e-3,
    batch_size: int | None = None,
    loss: str = "kd",
    temperature: float = 4.0,
    alpha: float = 0.5,
    warmup: float = 0.05,
    weight_decay: float = 0.01,
    clip: float | None = 1.0,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    best_metric: str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    resume: str = "auto",
    nonfinite: str = "raise",
    device: str | torch.device | None = None,
    amp: bool | str | None = None,
    seed: int = 0,
    collate_fn: Callable | None = None,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    features: Sequence[str] | None = None,
) -> FinetuneResult:
    """Fine-tune ``student`` (in place) to match ``teacher`` on ``data``; returns a :class:`FinetuneResult`.

    Losses: ``"kd"`` (KL between temperature-softened logits, times T^2), ``"mse"`` / ``"cosine"``
    (outputs or embeddings), ``"task"`` (cross-entropy on integer labels, mean squared error on float
    targets), ``"mix"`` (``alpha * kd + (1 - alpha) * task``). AdamW with linear warm-up (``warmup``
    fraction of the steps) then cosine decay to 0, gradient clipping at ``clip``. ``eval_fn(student)`` runs
    after each epoch; the largest value of ``best_metric`` (default: its first key) is tracked. ``amp``:
    None/False, "bf16" or "fp16" autocast. ``on_step(step)`` is called after every step. ``features``: names of
    submodules (as ``named_modules()`` gives them, the same in student and teacher) whose outputs are distilled
    with the model's own: each side's tapped outputs and output, flattened per sample and concatenated
    (:func:`~gmcompress.training.taps.tapped_output`), compared by ``loss="mse"`` or ``"cosine"``; a target
    next to every compressed layer, not only the logits (MNISTNet: ``["features.5"]``, benchmarks/recovery.py).
    A container that the compressed graph calls through is followed to its last child when the teacher holds an
    ``nn.Sequential`` there (:func:`~gmcompress.training.taps.resolve_taps`); tapped outputs are copied, so a later
    in-place op does not change them. Checkpoints and ``best.pt`` hold the student itself. Everything is
    validated before any work (numbers must be finite, counts integers), the first batch included: student
    and teacher run on it (eval mode, no grad), and outputs whose shapes the loss cannot compare fail.

    ``data`` as examples: a map-style Dataset, a tensor or a tuple of tensors (inputs, labels), batched by
    ``batch_size`` (the global batch, default 64, split over DDP ranks), shuffled by ``seed`` and the epoch.
    ``data`` as batches: a DataLoader or any re-iterable with len() of batches (tensors, tuples, dicts of
    keyword inputs); one epoch is one pass; ``batch_size`` and ``collate_fn`` must not be given. (A list of
    tensors only is read as columns (inputs, labels), not batches.) Under torchrun, a DataLoader with a
    DistributedSampler (num_replicas = the number of processes) is iterated as is on each rank (set_epoch
    each epoch); any other iterable must yield the same batches in the same order on every rank (checked on
    the first batch of each epoch): rank r trains on batches r, r + world, ..., a step takes world batches,
    the last len % world batches of each epoch are dropped. Resuming mid-epoch fetches the batches already
    done again and drops them; it is exact for lists, sequential loaders, loaders with their own
    ``generator`` (its state at the epoch start is checkpointed) and loaders that draw from torch's global RNG
    (shuffle=True without a generator): finetune seeds those draws by ``seed`` and the epoch (made when the
    iterator starts and fetches its first batch). Python's and numpy's RNGs are not saved.

    ``checkpoint_dir``: see :mod:`gmcompress.training`. A checkpoint records its run's fingerprint: the settings
    (all but ``checkpoint_every`` and ``nonfinite``), the data (kind and size, and the content of tensors and
    lists), the structure and initial weights of the student and of the teacher. ``resume="auto"`` resumes
    a checkpoint of this run, raises ValueError naming the directory and what differs for another run's, and
    starts afresh when there is none; ``"must"`` also raises when there is none; ``"never"`` deletes
    ``last.pt``, ``trainer.pt`` and ``best.pt`` there and starts afresh. An unreadable checkpoint raises
    ValueError naming the file.

    ``nonfinite="raise"``: a NaN/inf loss, or gradient (unless an fp16 GradScaler skips it, as it does on
    overflow), raises :class:`NonFiniteError` naming the step and the batch, before the weights change;
    the last checkpoint is kept. ``"skip"``: such a batch is skipped (it still counts as a step) and recorded
    in ``FinetuneResult.skipped``.
    """
    settings = _Settings(
        epochs, steps, lr, batch_size, loss, temperature, alpha, warmup, weight_decay, clip, checkpoint_every, amp,
        seed, nonfinite, _feature_names(features),
    )  # fmt: skip
    student_was_training = student.training
    teacher_was_training = teacher.training if teacher is not None else False
    t = _setup(student, teacher, data, settings, device, checkpoint_dir, collate_fn, resume)
    start = time.perf_counter()
    bar = tqdm(
        total=t.total, initial=t.step, desc="gmcompress: fine-tuning", disable=not progress or t.rank != 0, unit="step"
    )
    try:
        _run(t, bar, eval_fn, best_metric, on_step)
    except KeyboardInterrupt:
        _checkpoint_on_interrupt(t)
        raise
    finally:
        bar.close()
        student.train(student_was_training)
        if teacher is not None:
            teacher.train(teacher_was_training)
    t.result.steps = t.step
    t.result.seconds = time.perf_counter() - start
    return t.result
