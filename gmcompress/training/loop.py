"""The training loop: :func:`finetune`, its epochs, and what each epoch end records, evaluates and saves."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from ..graph.batches import eval_mode
from ..io import save
from ..nn import GMModule
from .checkpoint import _checkpoint_on_interrupt, _rng_state, _write_checkpoint
from .epochs import _epoch_batches
from .prepare import EvalFn, _setup, check_arguments
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


def _train_mode(t: _Trainer) -> None:
    """The student in train mode, but its BatchNorm layers in eval mode with ``batchnorm="frozen"``: they normalise
    by their running statistics and keep them (their affine weights still train)."""
    t.model.train()
    if t.settings.batchnorm == "frozen":
        for module in t.student.modules():
            if isinstance(module, _BatchNorm):
                module.eval()


@contextlib.contextmanager
def _trainable_kept(student: nn.Module, trainable: str) -> Iterator[None]:
    """With ``trainable="compressed"``, only the GM layers' parameters require grad inside the block (the others'
    flags are restored on exit); ``"all"`` changes nothing. ValueError when the student has no GM layer."""
    if trainable != "compressed":
        yield
        return
    kept = {id(p) for m in student.modules() if isinstance(m, GMModule) for p in m.parameters() if p.requires_grad}
    if not kept:
        raise ValueError(
            f"finetune: trainable='compressed' trains the GM layers' parameters, but the student "
            f"({type(student).__name__}) has none that requires grad: pass a model from gmcompress.compress, or "
            "trainable='all'"
        )
    others = [p for p in student.parameters() if id(p) not in kept and p.requires_grad]
    try:
        for p in others:
            p.requires_grad_(False)
        yield
    finally:
        for p in others:
            p.requires_grad_(True)


@contextlib.contextmanager
def _modes_kept(*models: nn.Module | None) -> Iterator[None]:
    """Every module's train/eval flag restored on exit (``Module.train(flag)`` would set all children alike)."""
    flags = [(m, m.training) for model in models if model is not None for m in model.modules()]
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _epoch_end_pending(t: _Trainer) -> bool:
    """The last step of an epoch (or of the run) is done, but its end is not recorded: interrupted in between."""
    at_end = t.step > 0 and (t.step % t.per_epoch == 0 or t.step >= t.total)
    return at_end and not (t.result.history and t.result.history[-1]["step"] == t.step)


def _end_epoch(t: _Trainer, eval_fn: EvalFn | None, best_metric: str | None) -> None:
    """Record the epoch, evaluate (rank 0), keep ``best.pt``, and checkpoint."""
    t.busy = "ending an epoch"
    entry: dict[str, Any] = {
        "epoch": math.ceil(t.step / t.per_epoch),
        "step": t.step,
        "loss": t.loss_sum / max(1, t.loss_count),
        "lr": t.scheduler.get_last_lr()[0],
    }
    if eval_fn is not None and t.rank == 0:
        with eval_mode(t.student):
            metrics = eval_fn(t.student)
        entry.update(metrics)
        key = best_metric or next(iter(metrics))
        if t.result.best_metric is None or metrics[key] > t.result.best_metric:
            t.result.best_metric = float(metrics[key])
            if t.checkpoint_dir is not None:
                save(t.student, t.checkpoint_dir / "best.pt")
                t.result.best_path = str(t.checkpoint_dir / "best.pt")
    t.result.history.append(entry)
    t.loss_sum, t.loss_count = 0.0, 0
    _write_checkpoint(t)
    t.busy, t.rng_boundary = None, _rng_state(t)


def _run(
    t: _Trainer,
    bar: tqdm,
    eval_fn: EvalFn | None,
    best_metric: str | None,
    on_step: Callable[[int], None] | None,
) -> None:
    """The training loop, from ``t.step`` to ``t.total`` (first the end of an epoch a Ctrl-C cut off)."""
    _train_mode(t)
    t.rng_boundary = _rng_state(t)
    if _epoch_end_pending(t):
        _end_epoch(t, eval_fn, best_metric)
    while t.step < t.total:
        epoch, skip = divmod(t.step, t.per_epoch)
        for index, batch in _epoch_batches(t, epoch, skip):
            value = _train_step(t, batch, epoch, index)
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
        if _epoch_end_pending(t):
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
    eval_fn: EvalFn | None = None,
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
    batchnorm: str = "frozen",
    trainable: str = "all",
) -> FinetuneResult:
    """Fine-tune ``student`` (in place) to match ``teacher`` on ``data``; returns a :class:`FinetuneResult`.

    Losses: ``"kd"`` (KL between temperature-softened logits, times T^2), ``"mse"`` / ``"cosine"``
    (outputs or embeddings), ``"task"`` (cross-entropy on integer labels, mean squared error on float
    targets), ``"mix"`` (``alpha * kd + (1 - alpha) * task``). AdamW with linear warm-up (``warmup``
    fraction of the steps) then cosine decay to 0, gradient clipping at ``clip``. ``eval_fn(student)`` runs
    after each epoch (in eval mode) and returns a dict of metrics; the largest value of ``best_metric`` (default:
    its first key) is tracked. It is also called once before training, on the student as given, so that a failing
    ``eval_fn``, one that returns no dict of numbers, or a ``best_metric`` it does not return fails before any work
    (those metrics are ``FinetuneResult.initial_metrics``). ``amp``: None/False, "bf16" or "fp16" autocast.
    ``on_step(step)`` is called after every step. ``device``: None (CUDA when there is one), a name ("cpu",
    "cuda:1"), a CUDA index or a torch.device; one this machine lacks is a ValueError.

    ``batchnorm="frozen"`` (default): the student's BatchNorm layers stay in eval mode during the training steps,
    so they normalise by their running statistics and keep them, while their affine weights train. In train mode
    they would replace a pretrained network's statistics with those of the few fine-tuning batches (16 steps of
    KD on a pretrained BatchNorm network made its held-out KL worse, 5.98 -> 9.19; frozen, it stayed at 5.98).
    ``"adapt"``: train mode, the statistics are updated (for data unlike the pretraining data, or a long run).

    ``trainable="all"`` (default): the optimizer steps every parameter that requires grad. ``"compressed"``: only
    the GM layers' parameters (the others are held by ``requires_grad`` False during the run and restored after);
    the layers left dense keep their pretrained weights exactly. AdamW moves every parameter it steps by about
    ``lr`` a step whatever the size of its gradient, so layers the compression did not touch, whose gradients are
    small or only rounding noise, drift: an unchanged MobileNetV2 distilled from itself (zero loss, so its gradients
    are rounding noise) loses much of its agreement with itself within 10 steps at lr 2e-4 (``benchmarks/imagenet.py
    --drift``).

    ``features``: names of submodules (as ``named_modules()`` gives them, the same in student and teacher) whose
    outputs are distilled with the model's own: each side's tapped outputs and output, flattened per sample
    (:func:`~gmcompress.training.taps.tapped_parts`), compared part by part by ``loss="mse"`` or ``"cosine"``;
    a target next to every compressed layer, not only the logits (MNISTNet: ``["features.5"]``,
    benchmarks/recovery.py). The loss is the mean over the parts of each part's own loss, for ``"mse"`` its
    relative squared error ``mean((s - t)^2) / mean(t^2)`` (``t``: the teacher's part on this batch; the
    denominator is detached, and 1 where the teacher's part is all zeros), for ``"cosine"`` its mean ``1 - cos``;
    so every term is of order 1 whatever the part's size and scale, and a 62,720-value feature map does not
    drown 1,000 logits (as it did under one MSE of the concatenation).
    A container that the compressed graph calls through is followed to its last child when the teacher holds an
    ``nn.Sequential`` there (:func:`~gmcompress.training.taps.resolve_taps`); tapped outputs are copied, so a later
    in-place op does not change them. Checkpoints and ``best.pt`` hold the student itself. Everything is
    validated before any work (numbers must be finite, counts integers), the first batch included: student
    and teacher run on it (eval mode, no grad), and outputs whose shapes the loss cannot compare fail, as do
    an integer first output (an argmax before the logits) and class labels outside the student's classes (those
    are checked on every batch, before the loss).

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

    ``checkpoint_dir``: see :mod:`gmcompress.training` ('' is refused: it would mean the current directory; so
    is a path that is a file). A checkpoint records its run's fingerprint: the settings
    (all but ``checkpoint_every`` and ``nonfinite``), the data (kind and size, and the content of tensors and
    lists), the structure and initial weights of the student and of the teacher. ``resume="auto"`` resumes
    a checkpoint of this run, raises ValueError naming the directory and what differs for another run's, and
    starts afresh when there is none; ``"must"`` also raises when there is none; ``"never"`` deletes
    ``last.pt``, ``trainer.pt`` and ``best.pt`` there and starts afresh. An unreadable checkpoint raises
    ValueError naming the file. A Ctrl-C after an epoch's last step but before its end is recorded (its history
    entry, ``eval_fn`` and ``best.pt``) resumes with that epoch end, so the history matches an uninterrupted run.
    A full disk raises OSError (errno ENOSPC) naming the file; the previous checkpoint is kept.

    ``nonfinite="raise"``: a NaN/inf loss, or gradient (unless an fp16 GradScaler skips it, as it does on
    overflow), raises :class:`NonFiniteError` naming the step and the batch, before the weights change;
    the last checkpoint is kept. ``"skip"``: such a batch is skipped (it still counts as a step) and recorded
    in ``FinetuneResult.skipped``.
    """
    check_arguments(student, teacher, eval_fn, best_metric, on_step)
    settings = _Settings(
        epochs, steps, lr, batch_size, loss, temperature, alpha, warmup, weight_decay, clip, checkpoint_every, amp,
        seed, nonfinite, _feature_names(features), batchnorm, trainable,
    )  # fmt: skip
    with _modes_kept(student, teacher), _trainable_kept(student, trainable):
        t = _setup(student, teacher, data, settings, device, checkpoint_dir, collate_fn, resume, eval_fn, best_metric)
        start = time.perf_counter()
        bar = tqdm(
            total=t.total, initial=t.step, desc="gmcompress: fine-tuning", disable=not progress or t.rank != 0,
            unit="step",
        )  # fmt: skip
        try:
            _run(t, bar, eval_fn, best_metric, on_step)
        except KeyboardInterrupt:
            _checkpoint_on_interrupt(t)
            raise
        finally:
            bar.close()
    t.result.steps = t.step
    t.result.seconds = time.perf_counter() - start
    return t.result
