"""The distillation and task losses, and the shape checks that keep them from broadcasting silently."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
