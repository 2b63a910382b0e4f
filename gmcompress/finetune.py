"""Distillation fine-tuning of a compressed model against its original (the teacher).

One loop for one process or many: under ``torchrun`` (``WORLD_SIZE > 1``) the student is wrapped in
``DistributedDataParallel`` and the data sharded with ``DistributedSampler``; a single process uses the
same sampler with one replica, so a run with the same *global* batch sees the same batches (the
DDP ranks split each global batch) and reaches the same weights up to float summation order.

Checkpoints (``checkpoint_dir``): ``last.pt`` (the model, :func:`gmcompress.save` format) plus
``trainer.pt`` (optimizer, schedule, step, RNG state, history), written atomically every
``checkpoint_every`` steps, at each epoch end and when Ctrl-C interrupts; a new call with the same
directory resumes exactly where it stopped. ``best.pt`` holds the best model by ``eval_fn``.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset
from tqdm.auto import tqdm

from .batches import first_tensor, run_model, split_batch, to_device
from .io import atomic_torch_save, save

__all__ = ["finetune", "FinetuneResult", "LOSSES"]

LOSSES = ("kd", "mse", "cosine", "task", "mix")


@dataclass
class FinetuneResult:
    """What the run did: per-epoch history, the best metric and where its model is, the time spent."""

    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    best_metric: float | None = None
    best_path: str | None = None
    seconds: float = 0.0
    resumed_from_step: int | None = None


def _as_dataset(data: Any) -> Dataset:
    if data is None:
        raise ValueError("finetune needs data: a Dataset, a tensor, or a tuple of tensors (inputs, labels)")
    if isinstance(data, Dataset):
        return data
    if isinstance(data, torch.Tensor):
        return TensorDataset(data)
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        return TensorDataset(*data)
    if isinstance(data, Sequence) and len(data) > 0:
        return _ListDataset(list(data))
    raise ValueError(f"finetune data must be a Dataset, a tensor or a tuple of tensors, got {type(data).__name__}")


class _ListDataset(Dataset):
    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def _loss(
    kind: str,
    student_out: torch.Tensor,
    teacher_out: torch.Tensor | None,
    labels: torch.Tensor | None,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    def kd() -> torch.Tensor:
        t = temperature
        return (
            F.kl_div(
                F.log_softmax(student_out / t, -1),
                F.log_softmax(teacher_out / t, -1),
                reduction="batchmean",
                log_target=True,
            )
            * t
            * t
        )

    if kind == "kd":
        return kd()
    if kind == "mse":
        return F.mse_loss(student_out, teacher_out)
    if kind == "cosine":
        return (1 - F.cosine_similarity(student_out, teacher_out, dim=-1)).mean()
    if labels is None:
        raise ValueError(f"loss={kind!r} needs labels: give data as (inputs, labels)")
    if kind == "mix" and labels.is_floating_point():
        raise ValueError(
            "loss='mix' adds KD on logits to cross-entropy on class labels, but the labels are float "
            f"targets {tuple(labels.shape)} (regression): use loss='task' (MSE to the targets) or "
            "'mse' (to the teacher)"
        )
    # class labels -> cross-entropy; float targets (regression, e.g. forecasting) -> mean squared error
    task = F.mse_loss(student_out, labels) if labels.is_floating_point() else F.cross_entropy(student_out, labels)
    return task if kind == "task" else alpha * kd() + (1 - alpha) * task


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass(frozen=True)
class _Settings:
    """The hyper-parameters of one run (what a checkpoint must agree with to be resumed)."""

    epochs: int | None
    steps: int | None
    lr: float
    batch_size: int
    loss: str
    temperature: float
    alpha: float
    warmup: float
    weight_decay: float
    clip: float | None
    checkpoint_every: int
    amp: bool | str | None
    seed: int

    def validate(self, teacher: nn.Module | None) -> None:
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give exactly one of epochs or steps")
        if (self.epochs is not None and self.epochs < 1) or (self.steps is not None and self.steps < 1):
            raise ValueError(f"epochs/steps must be >= 1, got epochs={self.epochs}, steps={self.steps}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.clip is not None and self.clip <= 0:
            raise ValueError(f"clip must be > 0 or None, got {self.clip}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.loss != "task" and teacher is None:
            raise ValueError(f"loss={self.loss!r} distils from a teacher: pass teacher=<the original model>")
        _amp_dtype(self.amp)


@dataclass
class _Trainer:
    """The state of one run: what is trained, how, and where it is checkpointed."""

    settings: _Settings
    student: nn.Module
    model: nn.Module  # the student, or its DistributedDataParallel wrapper
    teacher: nn.Module | None
    loader: DataLoader
    sampler: DistributedSampler
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    device: torch.device
    rank: int = 0
    world: int = 1
    total: int = 0
    checkpoint_dir: Path | None = None
    result: FinetuneResult = field(default_factory=FinetuneResult)
    step: int = 0

    @property
    def per_epoch(self) -> int:
        return len(self.loader)


def _make_loader(
    dataset: Dataset, batch_size: int, world: int, rank: int, seed: int, collate_fn: Callable | None
) -> tuple[DataLoader, DistributedSampler]:
    """Shard with ``DistributedSampler`` (one replica in a single process, so both see the same global batches).

    The loader has a private generator: creating its iterator must not draw from the global RNG (dropout),
    or a resumed run would diverge from an uninterrupted one.
    """
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(
        dataset,
        batch_size=batch_size // world,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate_fn or getattr(dataset, "collate", None),
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler


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


def _restore(t: _Trainer) -> None:
    """Resume from ``last.pt`` + ``trainer.pt`` in the checkpoint directory, when both are there."""
    ckpt = t.checkpoint_dir
    if ckpt is None or not (ckpt / "trainer.pt").exists() or not (ckpt / "last.pt").exists():
        return
    state = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
    model_state = torch.load(ckpt / "last.pt", map_location="cpu", weights_only=True)["state_dict"]
    t.student.load_state_dict(model_state)
    t.optimizer.load_state_dict(state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    t.scaler.load_state_dict(state["scaler"])
    rngs = state["rng"]
    torch.set_rng_state(rngs[t.rank] if t.rank < len(rngs) else rngs[0])
    t.step = int(state["step"])
    t.result.history = list(state["history"])
    t.result.best_metric = state["best_metric"]
    t.result.best_path = state["best_path"]
    t.result.resumed_from_step = t.step


def _write_checkpoint(t: _Trainer) -> None:
    """Atomically write ``last.pt`` and ``trainer.pt`` (every rank's RNG state gathered to rank 0)."""
    if t.checkpoint_dir is None:
        return
    rngs = [torch.get_rng_state()]
    if t.world > 1:
        gathered: list[Any] = [None] * t.world
        dist.all_gather_object(gathered, torch.get_rng_state())
        rngs = gathered
    if t.rank == 0:
        save(t.student, t.checkpoint_dir / "last.pt")
        state = {
            "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(),
            "scaler": t.scaler.state_dict(),
            "rng": rngs,
            "step": t.step,
            "history": t.result.history,
            "best_metric": t.result.best_metric,
            "best_path": t.result.best_path,
        }
        atomic_torch_save(state, t.checkpoint_dir / "trainer.pt")


def _train_step(t: _Trainer, batch: Any, loss: str, temperature: float, alpha: float) -> float:
    """One optimizer step on one batch; returns the loss."""
    inputs, labels = split_batch(to_device(batch, t.device))
    autocast = torch.autocast(t.device.type, dtype=t.amp_dtype) if t.amp_dtype else contextlib.nullcontext()
    with autocast:
        target = None
        if t.teacher is not None and loss != "task":
            with torch.no_grad():
                target = first_tensor(run_model(t.teacher, inputs)).float()
        out = first_tensor(run_model(t.model, inputs)).float()
        value = _loss(loss, out, target, labels, temperature, alpha)
    t.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(value).backward()
    if (clip := t.settings.clip) is not None:
        t.scaler.unscale_(t.optimizer)
        torch.nn.utils.clip_grad_norm_(t.params, clip)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.scheduler.step()
    t.step += 1
    return float(value.detach())


def _end_epoch(
    t: _Trainer, mean_loss: float, eval_fn: Callable[[nn.Module], dict[str, float]] | None, best_metric: str | None
) -> None:
    """Record the epoch, evaluate (rank 0), keep ``best.pt``, and checkpoint."""
    entry: dict[str, Any] = {
        "epoch": math.ceil(t.step / t.per_epoch),
        "step": t.step,
        "loss": mean_loss,
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
    _write_checkpoint(t)


def _amp_dtype(amp: bool | str | None) -> torch.dtype | None:
    """None, or the autocast dtype of ``amp`` (True means bf16)."""
    if amp not in (None, False, True, "bf16", "fp16"):
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    if amp is True:
        return torch.bfloat16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp if isinstance(amp, str) else "")


def finetune(
    student: nn.Module,
    teacher: nn.Module | None = None,
    data: Any = None,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    lr: float = 1e-3,
    batch_size: int = 64,
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
    device: str | torch.device | None = None,
    amp: bool | str | None = None,
    seed: int = 0,
    collate_fn: Callable | None = None,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``student`` (in place) to match ``teacher`` on ``data``; returns a :class:`FinetuneResult`.

    Losses: ``"kd"`` (KL between temperature-softened logits, times T^2), ``"mse"`` / ``"cosine"``
    (outputs or embeddings), ``"task"`` (cross-entropy on integer labels, mean squared error on float
    targets), ``"mix"`` (``alpha * kd + (1 - alpha) * task``). AdamW with linear warm-up (``warmup``
    fraction of the steps) then cosine decay to 0, gradient clipping at ``clip``. ``batch_size`` is the
    global batch (split over DDP ranks). ``eval_fn(student)`` runs after each epoch; the largest value of
    ``best_metric`` (default: its first key) is tracked. ``amp``: None/False, "bf16" or "fp16" autocast.
    ``on_step(step)`` is called after every step.
    Everything is validated before any work.
    """
    settings = _Settings(
        epochs, steps, lr, batch_size, loss, temperature, alpha, warmup, weight_decay, clip, checkpoint_every, amp, seed
    )
    student_was_training = student.training
    teacher_was_training = teacher.training if teacher is not None else False
    t = _setup(student, teacher, data, settings, device, checkpoint_dir, collate_fn)
    start = time.perf_counter()
    bar = tqdm(
        total=t.total, initial=t.step, desc="gmcompress: fine-tuning", disable=not progress or t.rank != 0, unit="step"
    )
    running: list[float] = []
    try:
        t.model.train()
        while t.step < t.total:
            epoch, skip = divmod(t.step, t.per_epoch)
            t.sampler.set_epoch(epoch)
            for i, batch in enumerate(t.loader):
                if i < skip:
                    continue  # resuming mid-epoch: same order, skip what was done
                running.append(_train_step(t, batch, loss, temperature, alpha))
                bar.update(1)
                bar.set_postfix(loss=f"{running[-1]:.4f}", lr=f"{t.scheduler.get_last_lr()[0]:.2e}")
                if on_step is not None:
                    on_step(t.step)
                if t.step % settings.checkpoint_every == 0 and t.step % t.per_epoch != 0:
                    _write_checkpoint(t)
                if t.step >= t.total or t.step % t.per_epoch == 0:
                    break
            if t.step % t.per_epoch == 0 or t.step >= t.total:
                _end_epoch(t, sum(running) / max(1, len(running)), eval_fn, best_metric)
                running = []
    except KeyboardInterrupt:
        _write_checkpoint(t)
        bar.close()
        raise
    finally:
        student.train(student_was_training)
        if teacher is not None:
            teacher.train(teacher_was_training)
    bar.close()
    t.result.steps = t.step
    t.result.seconds = time.perf_counter() - start
    return t.result


def _setup(
    student: nn.Module,
    teacher: nn.Module | None,
    data: Any,
    s: _Settings,
    device: str | torch.device | None,
    checkpoint_dir: str | os.PathLike | None,
    collate_fn: Callable | None,
) -> _Trainer:
    """Validate everything, then build the loader, models, optimizer and schedule, and resume if asked."""
    s.validate(teacher)
    dataset = _as_dataset(data)
    if len(dataset) < s.batch_size:
        raise ValueError(f"data has {len(dataset)} examples, fewer than one batch of {s.batch_size}")
    rank, world = _distributed()
    if s.batch_size % world:
        raise ValueError(f"batch_size {s.batch_size} must be a multiple of the number of processes {world}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None and rank == 0:
        ckpt.mkdir(parents=True, exist_ok=True)

    model, teacher = _place_models(student, teacher, device, world)
    if teacher is not None:
        teacher.eval()
    loader, sampler = _make_loader(dataset, s.batch_size, world, rank, s.seed, collate_fn)
    total = s.steps if s.steps is not None else s.epochs * len(loader)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer, scheduler = _make_optimizer(params, s.lr, s.weight_decay, total, s.warmup)
    amp_dtype = _amp_dtype(s.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    t = _Trainer(s, student, model, teacher, loader, sampler, params, optimizer, scheduler, scaler, amp_dtype, device)
    t.rank, t.world, t.total, t.checkpoint_dir = rank, world, total, ckpt
    torch.manual_seed(s.seed)
    _restore(t)
    return t
