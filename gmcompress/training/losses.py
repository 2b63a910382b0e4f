"""The distillation and task losses, and the checks that keep them from broadcasting or indexing silently."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE_LABEL = -100  # F.cross_entropy's default ignore_index: such labels are left out of the task loss


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


def _feature_loss(
    kind: str, student_parts: Sequence[torch.Tensor], teacher_parts: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``finetune(features=...)``: the mean over the parts (each tap's output, then the model's, ``(B, size)``) of
    each part's own loss, so that no part drowns the others whatever its size or scale.

    ``"mse"``: the part's relative squared error ``mean((s - t)^2) / mean(t^2)`` (the teacher's mean square on this
    batch, detached; a part the teacher gives as all zeros falls back to plain MSE); ``"cosine"``: ``1 - cos``
    per sample, averaged. Both are invariant to scaling a part's student and teacher values by one constant.
    """
    terms = []
    for s, t in zip(student_parts, teacher_parts):
        if kind == "cosine":
            terms.append((1 - F.cosine_similarity(s, t, dim=-1)).mean())
            continue
        scale = t.detach().pow(2).mean()
        terms.append(F.mse_loss(s, t) / torch.where(scale > 0, scale, torch.ones_like(scale)))
    return torch.stack(terms).mean()


def _check_output_dtype(out: torch.Tensor, who: str) -> None:
    """ValueError unless the output the loss compares (``who``: "student" or "teacher") is floating point."""
    if not out.is_floating_point():
        raise ValueError(
            f"the {who}'s first output tensor is {out.dtype} {tuple(out.shape)}, not floating point: finetune "
            f"distils the first tensor a model returns (e.g. its logits), and no gradient flows through integers "
            "(an argmax). Make the model return its logits first, e.g. (logits, argmax) instead of (argmax, logits)"
        )


def _check_class_labels(kind: str, student_out: torch.Tensor, labels: torch.Tensor) -> None:
    """Class labels must index the student's classes, or be IGNORE_LABEL. The classes are the output's dimension 1
    (dimension 0 of a 1-D output), where ``F.cross_entropy`` reads them: ``(B, C)`` logits, ``(B, C, H, W)`` maps."""
    if labels.is_floating_point() or labels.numel() == 0:
        return
    classes = student_out.shape[1] if student_out.dim() > 1 else student_out.shape[0]
    used = labels[labels != IGNORE_LABEL]
    if not used.numel():
        return
    low, high = torch.stack(torch.aminmax(used)).tolist()  # one device sync
    if not 0 <= low <= high < classes:
        raise ValueError(
            f"loss={kind!r}: the data's class labels must lie in 0..{classes - 1} (the student's output has {classes} "
            f"classes in its dimension 1) or be {IGNORE_LABEL} (ignored), but they range from {low} to {high}: "
            "check the labels, or the model's number of classes"
        )


def _check_shapes(
    kind: str, student_out: torch.Tensor, teacher_out: torch.Tensor | None, labels: torch.Tensor | None
) -> None:
    """Raise ValueError when ``kind`` would compare tensors of different shapes (or broadcast them silently), an
    output is not floating point, or class labels do not index the student's classes."""
    _check_output_dtype(student_out, "student")
    if teacher_out is not None:
        _check_output_dtype(teacher_out, "teacher")
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
    if kind in ("task", "mix") and labels is not None:
        _check_class_labels(kind, student_out, labels)


def _check_parts(
    names: Sequence[str], student_parts: Sequence[torch.Tensor], teacher_parts: Sequence[torch.Tensor]
) -> None:
    """``finetune(features=names)``: each tapped output, and the model's own, has the same shape on both sides and
    is floating point (ValueError naming the tap)."""
    for name, s, t in zip([*names, "the output"], student_parts, teacher_parts):
        what = name if name == "the output" else f"tap {name!r}"
        for who, part in (("student", s), ("teacher", t)):
            if not part.is_floating_point():
                raise ValueError(
                    f"features: {what} of the {who} is {part.dtype}, not floating point: nothing to distil"
                )
        if s.shape != t.shape:
            raise ValueError(
                f"features: {what} has shape {tuple(s.shape)} in the student but {tuple(t.shape)} in the teacher "
                "(flattened per sample): a tapped submodule must give the same output in both"
            )
