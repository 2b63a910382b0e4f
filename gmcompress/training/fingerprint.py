"""A run's fingerprint (settings, data, student and teacher) and, in words, how two fingerprints differ."""

from __future__ import annotations

import hashlib
import numbers
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import nn

from .settings import _UNFINGERPRINTED, _Settings


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


def _fingerprint(student: nn.Module, teacher: nn.Module | None, data: dict[str, Any], s: _Settings) -> dict[str, Any]:
    """What makes a run this run: settings, the data's fingerprint, the student's structure and weights, the teacher."""
    used_teacher = teacher if s.loss != "task" else None
    return {
        "settings": {k: v for k, v in asdict(s).items() if k not in _UNFINGERPRINTED},
        "data": data,
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
