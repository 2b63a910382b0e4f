"""Which batches this rank trains on in an epoch: the epoch's seed, resuming mid-epoch, the DDP stride."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist

from .data import _END, _isolated_rng
from .fingerprint import _digest
from .state import _Trainer


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
