"""Run by test_finetune under torchrun (2 processes, gloo) or directly (1 process): tiny distillation runs.

Three ways to give the same data, each saved as its final state_dict: a Dataset (finetune shards it), a
DataLoader with a DistributedSampler (each rank loads its shard) and a list of batches with one NaN example,
skipped (rank r takes batches r, r + world, ...: under 2 processes, batches of 8 in pairs; in one process
the same pairs as batches of 16).
"""

import math
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import gmcompress as gm
from gmcompress.training import finetune

ARGS = {"steps": 6, "lr": 1e-2, "loss": "mix", "device": "cpu", "progress": False, "warmup": 0.0}


def build():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    student = gm.compress(teacher, group="C8", rank=2, progress=False)
    x = torch.randn(64, 16)
    y = torch.randint(0, 8, (64,))
    return student, teacher, (x, y)


def main(out_path: str) -> None:
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    out = {}
    student, teacher, data = build()
    finetune(student, teacher, data, batch_size=16, **ARGS)
    out["dataset"] = student.state_dict()

    student, teacher, (x, y) = build()
    dataset = TensorDataset(x, y)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    finetune(student, teacher, DataLoader(dataset, batch_size=16 // world, sampler=sampler, drop_last=True), **ARGS)
    out["loader"] = student.state_dict()

    student, teacher, (x, y) = build()
    x[20] = math.nan  # in the batch of examples 16..31: the second step of each epoch (4 steps per epoch)
    size = 16 // world
    batches = [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]
    result = finetune(student, teacher, batches, nonfinite="skip", **ARGS)
    out["list"] = student.state_dict()
    out["skipped"] = [b["step"] for b in result.skipped_batches]

    if rank == 0:
        torch.save(out, out_path)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
