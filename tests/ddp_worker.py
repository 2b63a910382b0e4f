"""Run by test_finetune under torchrun (2 processes, gloo) or directly (1 process): tiny distillation run."""

import sys

import torch
import torch.distributed as dist
from torch import nn

import gmcompress as gm
from gmcompress.finetune import finetune


def build():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    student = gm.compress(teacher, group="C8", rank=2, progress=False)
    x = torch.randn(64, 16)
    y = torch.randint(0, 8, (64,))
    return student, teacher, (x, y)


def main(out_path: str) -> None:
    student, teacher, data = build()
    finetune(
        student, teacher, data, steps=6, batch_size=16, lr=1e-2, loss="mix", device="cpu", progress=False, warmup=0.0
    )
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(student.state_dict(), out_path)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
