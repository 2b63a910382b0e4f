"""Distillation fine-tuning of a compressed model against its original (the teacher).

One loop for one process or many: under ``torchrun`` (``WORLD_SIZE > 1``) the student is wrapped in
``DistributedDataParallel``. Data given as a Dataset (or tensors) is sharded with ``DistributedSampler``; a
single process uses the same sampler with one replica, so a run with the same *global* batch sees the same
batches (the DDP ranks split each global batch) and reaches the same weights up to float summation order.
Data given as batches (a DataLoader, a list of batches) is used as it comes: see :func:`finetune`.

Checkpoints (``checkpoint_dir``): ``last.pt`` (the model, :func:`gmcompress.save` format) plus
``trainer.pt`` (optimizer, schedule, step, RNG states, history and the run's *fingerprint*), written by
rank 0 every ``checkpoint_every`` steps, at each epoch end and when Ctrl-C interrupts; a new call with the
same directory and the same run (same fingerprint) resumes exactly where it stopped, a different run fails
(see ``resume``). ``best.pt`` holds the best model by ``eval_fn``. Weights that are not finite are never saved.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import numbers
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, TensorDataset
from tqdm.auto import tqdm

from .batches import first_tensor, run_model, split_batch, to_device
from .io import atomic_torch_save, save

__all__ = ["finetune", "FinetuneResult", "NonFiniteError", "LOSSES"]

LOSSES = ("kd", "mse", "cosine", "task", "mix")
RESUME = ("auto", "never", "must")
NONFINITE = ("raise", "skip")
DEFAULT_BATCH_SIZE = 64
_FORMAT = "gmcompress.finetune/2"
_TRAINER_KEYS = frozenset(
    {"format", "fingerprint", "weights", "optimizer", "scheduler", "scaler", "rng", "step", "history"}
    | {"best_metric", "best_path", "skipped_batches", "epoch_generators", "loss_sum", "loss_count"}
)
_FRESH = "Pass resume='never' to start afresh (it overwrites that checkpoint), or use another checkpoint_dir."
_UNFINGERPRINTED = ("checkpoint_every", "nonfinite")  # they change when files are written / errors, not the weights
_END = object()


@dataclass
class FinetuneResult:
    """What the run did: per-epoch history, the best metric and where its model is, the time spent.

    ``skipped`` counts the batches skipped for a non-finite loss or gradient (``nonfinite="skip"``), and
    ``skipped_batches`` names them: ``{"step": ..., "epoch": ..., "batch": ...}`` (step and epoch from 1, the
    batch index in the epoch from 0). Both include the steps done before a resume.
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    best_metric: float | None = None
    best_path: str | None = None
    seconds: float = 0.0
    resumed_from_step: int | None = None
    skipped: int = 0
    skipped_batches: list[dict[str, int]] = field(default_factory=list)


class NonFiniteError(FloatingPointError):
    """A loss or gradient was NaN or infinite (``nonfinite="raise"``): training stopped before the weights changed.

    ``step`` (from 1), ``epoch`` (from 1) and ``batch_index`` (in the epoch, from 0) say where.
    """

    def __init__(self, message: str, step: int, epoch: int, batch_index: int) -> None:
        super().__init__(message)
        self.step, self.epoch, self.batch_index = step, epoch, batch_index


def _loss(
    kind: str,
    student_out: torch.Tensor,
    teacher_out: torch.Tensor | None,
    labels: torch.Tensor | None,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    _check_shapes(kind, student_out, teacher_out, labels)

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
    # class labels -> cross-entropy; float targets (regression, e.g. forecasting) -> mean squared error
    task = F.mse_loss(student_out, labels) if labels.is_floating_point() else F.cross_entropy(student_out, labels)
    return task if kind == "task" else alpha * kd() + (1 - alpha) * task


def _check_shapes(
    kind: str, student_out: torch.Tensor, teacher_out: torch.Tensor | None, labels: torch.Tensor | None
) -> None:
    """Raise ValueError when ``kind`` would compare tensors of different shapes (or broadcast them silently)."""
    if kind != "task" and teacher_out is not None and student_out.shape != teacher_out.shape:
        raise ValueError(
            f"loss={kind!r} compares the student's output {tuple(student_out.shape)} with the teacher's output "
            f"{tuple(teacher_out.shape)}, but their shapes differ: the teacher must give what the student gives "
            "(e.g. the same logits)"
        )
    if kind in ("task", "mix") and labels is not None and labels.is_floating_point():
        if kind == "mix":
            raise ValueError(
                "loss='mix' adds KD on logits to cross-entropy on class labels, but the labels are float "
                f"targets {tuple(labels.shape)} (regression): use loss='task' (MSE to the targets) or "
                "'mse' (to the teacher)"
            )
        if student_out.shape != labels.shape:
            raise ValueError(
                f"loss='task' compares the student's output {tuple(student_out.shape)} with the float targets "
                f"{tuple(labels.shape)}, but their shapes differ"
            )


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
        _whole("seed", self.seed)
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
        if self.loss != "task" and teacher is None:
            raise ValueError(f"loss={self.loss!r} distils from a teacher: pass teacher=<the original model>")
        _amp_dtype(self.amp)


@dataclass
class _Data:
    """The batches of one epoch and how this rank takes them: batch ``i`` is ours when ``i % stride == rank``."""

    loader: Iterable  # re-iterable: one pass is one epoch
    batches: int  # len(loader): batches per pass on this rank
    stride: int  # 1 (the loader shards itself, or one process) or the number of processes
    sampler: Any  # something with set_epoch(epoch) (a DistributedSampler), or None
    generators: list[torch.Generator]  # the loader's own RNGs, reset to their epoch-start state on resume
    fingerprint: dict[str, Any]

    @property
    def per_epoch(self) -> int:
        return self.batches // self.stride


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

    @property
    def per_epoch(self) -> int:
        return self.data.per_epoch


def _digest(obj: Any) -> str:
    """sha256 of nested tensors (dtype, shape, bytes), arrays, numbers and strings, in order; other objects by type."""
    h = hashlib.sha256()

    def feed(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach()
            h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
            if t.layout == torch.strided and t.device.type != "meta":
                h.update(t.reshape(-1).cpu().contiguous().view(torch.uint8).numpy())
        elif isinstance(o, np.ndarray):
            h.update(f"A{o.dtype}{o.shape};".encode() + np.ascontiguousarray(o).tobytes())
        elif isinstance(o, dict):
            h.update(b"{")
            for k, v in o.items():
                feed(k)
                feed(v)
            h.update(b"}")
        elif isinstance(o, (list, tuple)):
            h.update(b"[")
            for v in o:
                feed(v)
            h.update(b"]")
        elif isinstance(o, (str, bytes, numbers.Number, type(None))):
            h.update(repr(o).encode() + b";")
        else:
            h.update(type(o).__qualname__.encode() + b";")

    feed(obj)
    return h.hexdigest()


def _structure(model: nn.Module) -> list[str]:
    """The module types by name and the state_dict entries (shape, dtype, trainable) of ``model``."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    modules = [f"{name or '<root>'}: {type(m).__qualname__}" for name, m in model.named_modules()]
    tensors = [
        f"{name} {tuple(v.shape)} {v.dtype}{' trainable' if name in trainable else ''}"
        for name, v in model.state_dict().items()
    ]
    return modules + tensors


def _fingerprint(student: nn.Module, teacher: nn.Module | None, data: _Data, s: _Settings) -> dict[str, Any]:
    """What makes a run this run: settings, data, the student's structure and initial weights, the teacher."""
    used_teacher = teacher if s.loss != "task" else None
    return {
        "settings": {k: v for k, v in asdict(s).items() if k not in _UNFINGERPRINTED},
        "data": data.fingerprint,
        "student": _structure(student),
        "student_weights": _digest(student.state_dict())[:16],
        "teacher": _structure(used_teacher) if used_teacher is not None else None,
        "teacher_weights": _digest(used_teacher.state_dict())[:16] if used_teacher is not None else None,
    }


def _list_diff(what: str, old: list[str] | None, new: list[str] | None) -> str | None:
    if old == new:
        return None
    if old is None or new is None:
        return f"{what}: {'none' if old is None else 'one'} in the checkpoint, {'none' if new is None else 'one'} now"
    gone = [e for e in old if e not in set(new)]
    added = [e for e in new if e not in set(old)]
    parts = []
    for label, items in (("the checkpoint's has", gone), ("this one has", added)):
        if items:
            parts.append(f"{label} {items[0]!r}" + (f" and {len(items) - 1} more" if len(items) > 1 else ""))
    return f"{what} differs ({'; '.join(parts) or 'same entries in another order'})"


def _fingerprint_diffs(old: Any, new: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's fingerprint and this run's, in words."""
    if not isinstance(old, dict):
        return ["the checkpoint has no run fingerprint"]
    diffs = []
    for group, prefix in (("settings", ""), ("data", "data ")):
        o, n = old.get(group) or {}, new[group]
        for key in list(n) + [k for k in o if k not in n]:
            if o.get(key) != n.get(key):
                diffs.append(f"{prefix}{key}: {o.get(key)!r} in the checkpoint, {n.get(key)!r} now")
    for who in ("student", "teacher"):
        if (d := _list_diff(f"{who} model structure", old.get(who), new[who])) is not None:
            diffs.append(d)
        elif old.get(f"{who}_weights") != new[f"{who}_weights"]:
            diffs.append(
                f"{who}'s initial weights differ (hash {old.get(f'{who}_weights')} in the checkpoint, "
                f"{new[f'{who}_weights']} now)"
            )
    return diffs


def _as_dataset(data: Any) -> Dataset | None:
    """``data`` as a map-style Dataset of examples, or None when it is given as batches."""
    if data is None:
        raise ValueError(
            "finetune needs data: a Dataset, a tensor, a tuple of tensors (inputs, labels), a DataLoader or a list "
            "of batches"
        )
    if isinstance(data, IterableDataset):
        raise ValueError(
            f"data is an IterableDataset ({type(data).__name__}): wrap it in a DataLoader(dataset, batch_size=...); "
            "finetune needs the number of batches per epoch, so the dataset must define __len__"
        )
    if isinstance(data, Dataset):
        return data
    if isinstance(data, torch.Tensor):
        return TensorDataset(data)
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        sizes = [tuple(t.shape[:1]) for t in data]
        if len(set(sizes)) != 1:
            raise ValueError(
                f"a tuple or list of tensors is read as the columns (inputs, labels, ...) of one dataset, but their "
                f"first dimensions differ: {[s[0] if s else None for s in sizes]}. Give batches as a list of tuples "
                "or dicts, or as a DataLoader"
            )
        return TensorDataset(*data)
    return None


def _epoch_sampler(loader: Any) -> Any:
    """The loader's sampler with ``set_epoch`` (a DistributedSampler), or None."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    for sampler in (getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
        if callable(getattr(sampler, "set_epoch", None)):
            return sampler
    return None


def _generators(loader: Any) -> list[torch.Generator]:
    """The torch.Generators a DataLoader (or its samplers) draws from, each once."""
    found: list[torch.Generator] = []
    batch_sampler = getattr(loader, "batch_sampler", None)
    for owner in (loader, getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in found):
            found.append(g)
    return found


def _batches_data(data: Any, s: _Settings, world: int, collate_fn: Callable | None) -> _Data:
    """Data given as batches: a DataLoader or another re-iterable with len() (see :func:`finetune`)."""
    kind = type(data).__name__
    if isinstance(data, (str, bytes, dict)) or not isinstance(data, Iterable):
        raise ValueError(
            "finetune data must be a Dataset, a tensor, a tuple of tensors, a DataLoader or a re-iterable of "
            f"batches (e.g. a list of tensors, tuples or dicts), got {kind}"
        )
    if isinstance(data, Iterator):
        raise ValueError(
            f"data is a one-shot iterator ({kind}): finetune iterates the data once per epoch (and again to "
            "resume); give a list of batches or a DataLoader"
        )
    if s.batch_size is not None or collate_fn is not None:
        raise ValueError(
            f"batch_size and collate_fn apply to a Dataset; data given as batches ({kind}) is already batched: "
            "leave them out (set them on the DataLoader)"
        )
    try:
        n = len(data)
    except TypeError:
        raise ValueError(
            f"data of type {kind} has no len(): finetune needs the number of batches per epoch (a DataLoader over "
            "an IterableDataset needs the dataset's __len__)"
        ) from None
    sampler = _epoch_sampler(data)
    sharded = isinstance(sampler, DistributedSampler)
    if sharded and sampler.num_replicas != world:
        raise ValueError(
            f"the DataLoader's DistributedSampler has num_replicas={sampler.num_replicas}, but {world} process(es) run"
        )
    stride = 1 if sharded else world
    if n < stride or n == 0:
        raise ValueError(f"data has {n} batches, fewer than one per process ({world}): nothing to train on")
    fingerprint: dict[str, Any] = {"data": kind, "batches": n, "processes": world}
    if isinstance(data, DataLoader):
        fingerprint["batch_size"] = data.batch_size
        with contextlib.suppress(TypeError):
            fingerprint["examples"] = len(data.dataset)  # type: ignore[arg-type]
    elif isinstance(data, (list, tuple)):
        fingerprint["content"] = _digest(data)[:16]
    return _Data(data, n, stride, sampler if sharded else None, _generators(data), fingerprint)


def _dataset_data(dataset: Dataset, s: _Settings, world: int, rank: int, collate_fn: Callable | None) -> _Data:
    """Data given as examples: batched and sharded by :func:`_make_loader`."""
    if len(dataset) < s.batch_size:
        raise ValueError(f"data has {len(dataset)} examples, fewer than one batch of {s.batch_size}")
    if s.batch_size % world:
        raise ValueError(f"batch_size {s.batch_size} must be a multiple of the number of processes {world}")
    loader, sampler = _make_loader(dataset, s.batch_size, world, rank, s.seed, collate_fn)
    fingerprint: dict[str, Any] = {"data": type(dataset).__name__, "examples": len(dataset)}
    if isinstance(dataset, TensorDataset):
        fingerprint["content"] = _digest(list(dataset.tensors))[:16]
    return _Data(loader, len(loader), 1, sampler, _generators(loader), fingerprint)


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


@contextlib.contextmanager
def _isolated_rng(seed: int | None = None, device: torch.device | None = None) -> Iterator[None]:
    """Random draws inside do not touch torch's global CPU RNG (nor ``device``'s); ``seed`` seeds the CPU RNG inside."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.default_generator.manual_seed(seed)  # CPU only: the CUDA RNG (dropout) must not move
        yield


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % 2**63


def _epoch_batches(t: _Trainer, epoch: int, skip: int) -> Iterator[tuple[int, Any]]:
    """This rank's batches of ``epoch`` with their index in the epoch, from step ``skip`` of the epoch on.

    The loader's iterator starts (and its first batch is fetched: a shuffling sampler draws its seed then) with
    torch's CPU RNG seeded by ``seed`` and the epoch, inside a fork: a loader without its own generator shuffles
    the same way in a run, its resumption and on every rank, and never moves the dropout RNG. The batches of a
    resumed epoch that were already trained on are fetched again (same order) inside the fork and dropped.
    """
    d = t.data
    if d.sampler is not None:
        d.sampler.set_epoch(epoch)
    if skip == 0:
        t.epoch_generators = [g.get_state() for g in d.generators]
    else:
        for g, state in zip(d.generators, t.epoch_generators):
            g.set_state(state)
    start, stop = skip * d.stride, d.per_epoch * d.stride
    with _isolated_rng(_epoch_seed(t.settings.seed, epoch)):
        it = iter(d.loader)
        first = next(it, _END)
        done = 0 if first is _END else 1
        while done < start and next(it, _END) is not _END:
            done += 1
    if start == 0 and d.stride > 1 and first is not _END:
        _check_same_batches(t, first, epoch)
    i = min(start, done)
    for batch in itertools.chain([first] if start == 0 and first is not _END else [], it):
        if i >= stop:
            return
        if i % d.stride == t.rank % d.stride:
            yield i, batch
        i += 1
    if i < stop:
        raise ValueError(
            f"data yielded {i} batches in epoch {epoch + 1}, but its len() is {d.batches}: each pass over the data "
            "must yield len() batches"
        )


def _check_same_batches(t: _Trainer, batch: Any, epoch: int) -> None:
    """Under torchrun, batches taken every ``world``-th need the same batch sequence on every rank."""
    digests: list[Any] = [None] * t.world
    dist.all_gather_object(digests, _digest(batch))
    if any(x != digests[0] for x in digests):
        raise ValueError(
            f"under torchrun, data given as batches must yield the same batches in the same order on every rank "
            f"(rank r trains on batches r, r + {t.world}, ...), but the first batch of epoch {epoch + 1} differs "
            "between ranks: give the loader a generator seeded the same on every rank, or shard it with a "
            "DistributedSampler"
        )


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


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()


def _preflight(student: nn.Module, teacher: nn.Module | None, data: _Data, s: _Settings, device: torch.device) -> None:
    """Run student and teacher (eval mode, no grad) on the first batch: the loss must be able to compare them.

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
                out = first_tensor(run_model(student, inputs))
                target = None
                if teacher is not None and s.loss != "task":
                    target = first_tensor(run_model(teacher, inputs))
    finally:
        student.train(was_training)
        for g, state in zip(data.generators, states):
            g.set_state(state)
    _check_shapes(s.loss, out, target, labels)


def _rng_state(t: _Trainer) -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state(t.device) if t.device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def _read(path: Path, keys: frozenset[str]) -> dict[str, Any]:
    """Load a checkpoint file (weights only); one ValueError naming it when it is unreadable or not ours."""
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
        problem = "" if isinstance(obj, dict) and keys <= obj.keys() else " (it lacks the expected entries)"
    except Exception as e:  # unpickling, zip and EOF errors all mean the same here
        problem = f" ({type(e).__name__} while reading it)"
    if problem:
        raise ValueError(
            f"{path} is corrupt, or not a gmcompress fine-tuning checkpoint of this version{problem}. Delete it, "
            f"or {_FRESH[0].lower()}{_FRESH[1:]}"
        )
    if obj.get("format", _FORMAT) != _FORMAT:
        raise ValueError(f"{path} has format {obj.get('format')!r}, expected {_FORMAT!r}. {_FRESH}")
    return obj


def _restore(t: _Trainer, resume: str) -> None:
    """Resume from ``last.pt`` + ``trainer.pt`` in the checkpoint directory as ``resume`` says (see finetune)."""
    ckpt = t.checkpoint_dir
    if ckpt is None:
        return
    files = {name: (ckpt / name).exists() for name in ("trainer.pt", "last.pt")}
    if resume == "never":
        if t.rank == 0:
            for name in ("trainer.pt", "last.pt", "best.pt"):
                (ckpt / name).unlink(missing_ok=True)
        return
    if not any(files.values()):
        if resume == "must":
            raise ValueError(f"{ckpt}: resume='must', but there is no checkpoint there (trainer.pt and last.pt)")
        return
    if not all(files.values()):
        have, lack = sorted(files, key=lambda name: not files[name])
        raise ValueError(f"{ckpt}: {have} without {lack}, an incomplete checkpoint. {_FRESH}")
    state = _read(ckpt / "trainer.pt", _TRAINER_KEYS)
    diffs = _fingerprint_diffs(state["fingerprint"], t.fingerprint)
    if diffs:
        raise ValueError(f"{ckpt}: the checkpoint there is from a different run: {'; '.join(diffs)}. {_FRESH}")
    model_state = _read(ckpt / "last.pt", frozenset({"state_dict"}))["state_dict"]
    if _digest(model_state) != state["weights"]:
        raise ValueError(
            f"{ckpt}: last.pt does not hold the weights trainer.pt was written with (written at different "
            f"steps). {_FRESH}"
        )
    _apply_checkpoint(t, state, model_state)


def _apply_checkpoint(t: _Trainer, state: dict[str, Any], model_state: dict[str, torch.Tensor]) -> None:
    t.student.load_state_dict(model_state)
    t.optimizer.load_state_dict(state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    t.scaler.load_state_dict(state["scaler"])
    rngs = state["rng"]
    mine = rngs[t.rank] if t.rank < len(rngs) else rngs[0]
    torch.set_rng_state(mine["cpu"])
    if mine["cuda"] is not None and t.device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], t.device)
    t.epoch_generators = list(state["epoch_generators"])
    for g, g_state in zip(t.data.generators, t.epoch_generators):
        g.set_state(g_state)
    t.step = t.checkpoint_step = int(state["step"])
    t.loss_sum, t.loss_count = float(state["loss_sum"]), int(state["loss_count"])
    t.result.history = list(state["history"])
    t.result.best_metric = state["best_metric"]
    t.result.best_path = state["best_path"]
    t.result.skipped_batches = list(state["skipped_batches"])
    t.result.skipped = len(t.result.skipped_batches)
    t.result.resumed_from_step = t.step


def _weights_finite(t: _Trainer) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in t.student.parameters() if p.is_floating_point())


def _write_checkpoint(t: _Trainer, rng: dict[str, Any] | None = None) -> None:
    """Write ``last.pt`` and ``trainer.pt`` on rank 0 (every rank's RNG state gathered to it).

    Both files are written beside their targets first, then renamed one after the other, so a crash leaves
    at worst a pair from different steps, which resuming detects (``trainer.pt`` holds the hash of the
    weights). ``rng``: the RNG states to save (default: the current ones). Non-finite weights are never
    written: FloatingPointError instead.
    """
    if t.checkpoint_dir is None:
        return
    if not _weights_finite(t):
        raise FloatingPointError(f"the weights are not finite at step {t.step}: not saved to {t.checkpoint_dir}")
    rngs = [rng or _rng_state(t)]
    if t.world > 1:
        gathered: list[Any] = [None] * t.world
        dist.all_gather_object(gathered, rngs[0])
        rngs = gathered
    if t.rank == 0:
        state = {
            "format": _FORMAT,
            "fingerprint": t.fingerprint,
            "weights": _digest(t.student.state_dict()),
            "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(),
            "scaler": t.scaler.state_dict(),
            "rng": rngs,
            "step": t.step,
            "history": t.result.history,
            "best_metric": t.result.best_metric,
            "best_path": t.result.best_path,
            "skipped_batches": t.result.skipped_batches,
            "epoch_generators": t.epoch_generators,  # at the start of this epoch, or of the next at an epoch end
            "loss_sum": t.loss_sum,
            "loss_count": t.loss_count,
        }
        last, trainer = (Path(os.path.realpath(t.checkpoint_dir / n)) for n in ("last.pt", "trainer.pt"))
        save(t.student, last.with_name(last.name + ".next"))
        atomic_torch_save(state, trainer.with_name(trainer.name + ".next"))
        os.replace(last.with_name(last.name + ".next"), last)
        os.replace(trainer.with_name(trainer.name + ".next"), trainer)
    t.checkpoint_step = t.step


def _checkpoint_on_interrupt(t: _Trainer) -> None:
    """Ctrl-C: save the state of the last step boundary, unless the weights are half updated (or not finite)."""
    if t.checkpoint_dir is None:
        return
    kept = f"the checkpoint of step {t.checkpoint_step} is kept" if t.checkpoint_step is not None else "none written"
    problem = f"while {t.busy}" if t.busy is not None else None
    if problem is None and not _weights_finite(t):
        problem = "with non-finite weights"
    if problem is not None:
        warnings.warn(f"gmcompress: fine-tuning interrupted {problem}: no checkpoint written, {kept}", stacklevel=3)
        return
    _write_checkpoint(t, t.rng_boundary)


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
                target = first_tensor(run_model(t.teacher, inputs)).float()
        out = first_tensor(run_model(t.model, inputs)).float()
        value = _loss(s.loss, out, target, labels, s.temperature, s.alpha)
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
    t.busy, t.rng_boundary = None, _rng_state(t)
    return None if bad is not None else float(value.detach())


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


def _amp_dtype(amp: bool | str | None) -> torch.dtype | None:
    """None, or the autocast dtype of ``amp`` (True means bf16)."""
    if amp not in (None, False, True, "bf16", "fp16"):
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    if amp is True:
        return torch.bfloat16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp if isinstance(amp, str) else "")


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
) -> FinetuneResult:
    """Fine-tune ``student`` (in place) to match ``teacher`` on ``data``; returns a :class:`FinetuneResult`.

    Losses: ``"kd"`` (KL between temperature-softened logits, times T^2), ``"mse"`` / ``"cosine"``
    (outputs or embeddings), ``"task"`` (cross-entropy on integer labels, mean squared error on float
    targets), ``"mix"`` (``alpha * kd + (1 - alpha) * task``). AdamW with linear warm-up (``warmup``
    fraction of the steps) then cosine decay to 0, gradient clipping at ``clip``. ``eval_fn(student)`` runs
    after each epoch; the largest value of ``best_metric`` (default: its first key) is tracked. ``amp``:
    None/False, "bf16" or "fp16" autocast. ``on_step(step)`` is called after every step. Everything is
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

    ``checkpoint_dir``: see the module docstring. A checkpoint records its run's fingerprint: the settings
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
        seed, nonfinite,
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
    fingerprint = _fingerprint(student, teacher, batches, s)
    model, teacher = _place_models(student, teacher, device, world)
    if teacher is not None:
        teacher.eval()
    _preflight(student, teacher, batches, s, device)
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
    )  # fmt: skip
    torch.manual_seed(s.seed)
    _restore(t, resume)
    return t
