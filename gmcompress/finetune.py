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

from .fx import first_tensor, run_model
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


def _split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """A batch is ``inputs`` or ``(inputs, labels)``; a one-tensor TensorDataset batch is ``[inputs]``."""
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return batch[0], None
        if len(batch) == 2:
            return batch[0], batch[1]
    return batch, None


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


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


def _validate(
    lr: float,
    epochs: int | None,
    steps: int | None,
    loss: str,
    temperature: float,
    alpha: float,
    batch_size: int,
    warmup: float,
    teacher: nn.Module | None,
    clip: float | None,
) -> None:
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs or steps")
    if (epochs is not None and epochs < 1) or (steps is not None and steps < 1):
        raise ValueError(f"epochs/steps must be >= 1, got epochs={epochs}, steps={steps}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= warmup < 1:
        raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {warmup}")
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    if loss != "task" and teacher is None:
        raise ValueError(f"loss={loss!r} distils from a teacher: pass teacher=<the original model>")


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
    _validate(lr, epochs, steps, loss, temperature, alpha, batch_size, warmup, teacher, clip)
    dataset = _as_dataset(data)
    if len(dataset) < batch_size:
        raise ValueError(f"data has {len(dataset)} examples, fewer than one batch of {batch_size}")
    if amp not in (None, False, True, "bf16", "fp16"):
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    rank, world = _distributed()
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} must be a multiple of the number of processes {world}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None and rank == 0:
        ckpt.mkdir(parents=True, exist_ok=True)

    student.to(device)
    if teacher is not None:
        if next(iter(teacher.parameters()), torch.empty(0, device=device)).device != device:
            import copy

            teacher = copy.deepcopy(teacher).to(device)  # never move the user's model
        teacher_was_training = teacher.training
        teacher.eval()
    model: nn.Module = student
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    # a private generator: creating a loader iterator must not draw from the global RNG (dropout), or a
    # resumed run would diverge from an uninterrupted one
    loader = DataLoader(
        dataset,
        batch_size=batch_size // world,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate_fn or getattr(dataset, "collate", None),
        generator=torch.Generator().manual_seed(seed),
    )
    per_epoch = len(loader)
    total = steps if steps is not None else epochs * per_epoch
    warm = int(warmup * total)

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress_frac = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress_frac)))

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
        amp if isinstance(amp, str) else "", torch.bfloat16 if amp is True else None
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    result = FinetuneResult()
    step = 0
    torch.manual_seed(seed)

    if ckpt is not None and (ckpt / "trainer.pt").exists() and (ckpt / "last.pt").exists():
        state = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
        model_state = torch.load(ckpt / "last.pt", map_location="cpu", weights_only=True)["state_dict"]
        student.load_state_dict(model_state)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        step = int(state["step"])
        result.history = list(state["history"])
        result.best_metric = state["best_metric"]
        result.best_path = state["best_path"]
        result.resumed_from_step = step

    def write_checkpoint() -> None:
        if ckpt is None:
            return
        rngs = [torch.get_rng_state()]
        if world > 1:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, torch.get_rng_state())
            rngs = gathered
        if rank == 0:
            save(student, ckpt / "last.pt")
            atomic_torch_save(
                {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": rngs,
                    "step": step,
                    "history": result.history,
                    "best_metric": result.best_metric,
                    "best_path": result.best_path,
                },
                ckpt / "trainer.pt",
            )

    start = time.perf_counter()
    bar = tqdm(
        total=total, initial=step, desc="gmcompress: fine-tuning", disable=not progress or rank != 0, unit="step"
    )
    student_was_training = student.training
    running, count = 0.0, 0
    try:
        model.train()
        while step < total:
            epoch, skip = divmod(step, per_epoch)
            sampler.set_epoch(epoch)
            for i, batch in enumerate(loader):
                if i < skip:
                    continue  # resuming mid-epoch: same order, skip what was done
                inputs, labels = _split_batch(_to(batch, device))
                autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
                with autocast:
                    target = None
                    if teacher is not None and loss != "task":
                        with torch.no_grad():
                            target = first_tensor(run_model(teacher, inputs)).float()
                    out = first_tensor(run_model(model, inputs)).float()
                    value = _loss(loss, out, target, labels, temperature, alpha)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(value).backward()
                if clip is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                running, count = running + float(value.detach()), count + 1
                bar.update(1)
                bar.set_postfix(loss=f"{float(value.detach()):.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                if on_step is not None:
                    on_step(step)
                if step % checkpoint_every == 0 and step % per_epoch != 0:
                    write_checkpoint()
                if step >= total or step % per_epoch == 0:
                    break
            if step % per_epoch == 0 or step >= total:
                entry: dict[str, Any] = {
                    "epoch": math.ceil(step / per_epoch),
                    "step": step,
                    "loss": running / max(1, count),
                    "lr": scheduler.get_last_lr()[0],
                }
                running, count = 0.0, 0
                if eval_fn is not None and rank == 0:
                    student.eval()
                    metrics = eval_fn(student)
                    student.train()
                    entry.update(metrics)
                    key = best_metric or next(iter(metrics))
                    if result.best_metric is None or metrics[key] > result.best_metric:
                        result.best_metric = float(metrics[key])
                        if ckpt is not None:
                            save(student, ckpt / "best.pt")
                            result.best_path = str(ckpt / "best.pt")
                result.history.append(entry)
                write_checkpoint()
    except KeyboardInterrupt:
        write_checkpoint()
        bar.close()
        raise
    finally:
        student.train(student_was_training)
        if teacher is not None:
            teacher.train(teacher_was_training)
    bar.close()
    result.steps = step
    result.seconds = time.perf_counter() - start
    return result
