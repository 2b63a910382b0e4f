"""The forms of training data: examples (a Dataset, tensors) batched and sharded here, or batches as given.

Both become a :class:`_Data`: a re-iterable of one epoch's batches, how the ranks split it, and its
fingerprint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, TensorDataset

from .fingerprint import _digest
from .settings import _Settings

_END = object()


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
