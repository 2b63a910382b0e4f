"""The checks every layer of gmcompress shares, and their limits: one home for each.

Each check raises a ``ValueError`` (``TypeError`` for a wrong type) whose message starts with ``what``
(the layer or argument it is about) and says how to fix it.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

__all__ = [
    "MAX_GROUP_ORDER",
    "check_finite",
    "check_rank",
    "check_group_order",
    "group_order_error",
    "check_nonnegative",
    "check_flag",
    "short_repr",
]

MAX_GROUP_ORDER = 4096
"""Largest group order accepted. A group is stored as its N x N Cayley table and its real block basis
as an N x N matrix, so N = 4096 already costs 128 MiB per table; a layer's features must also be a
multiple of N, so larger groups would not fit any real layer."""


def check_finite(values: np.ndarray | torch.Tensor, what: str, fix: str = "fix or retrain the model first") -> None:
    """Refuse NaN or inf entries. Tensors on the ``meta`` device hold no values and pass."""
    if isinstance(values, torch.Tensor):
        if values.is_meta:
            return
        ok = bool(torch.isfinite(values).all())
    else:
        ok = bool(np.isfinite(np.asarray(values)).all())
    if not ok:
        shape = tuple(values.shape)
        raise ValueError(f"{what}: values of shape {shape} contain NaN or inf; {fix}")


def check_rank(rank: object, max_rank: int, modulate: bool, what: str) -> int:
    """The rank as an int in ``1..max_rank``; rank > 1 needs ``modulate=True``."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"{what}: rank must be a whole number (1, 2, ...), got {rank!r} of type {type(rank).__name__}")
    rank = int(rank)
    if not modulate and rank != 1:
        raise ValueError(f"{what}: rank={rank} needs modulate=True (a sum of unmodulated group matrices is one GM)")
    if not 1 <= rank <= max_rank:
        raise ValueError(f"{what}: rank must lie in 1..{max_rank} (the group order bounds it), got {rank}")
    return rank


def check_group_order(order: int, spec: str) -> None:
    """Refuse groups larger than :data:`MAX_GROUP_ORDER` before anything of their size is allocated."""
    if order > MAX_GROUP_ORDER:
        # the size from the bit length: str() of an int of thousands of digits is slow (and refused by Python)
        shown = f"{order:,}" if order < 10**15 else f"about 10^{int((order.bit_length() - 1) * math.log10(2))}"
        raise group_order_error(spec, shown)


def group_order_error(spec: str, shown: str) -> ValueError:
    """The error for a group of order ``shown`` (more than :data:`MAX_GROUP_ORDER`), named by its spec."""
    return ValueError(
        f"group {short_repr(spec)} has order {shown}, more than the largest supported order {MAX_GROUP_ORDER:,} "
        f"(its Cayley table alone would not fit in memory); use a smaller group such as 'C16'"
    )


def check_nonnegative(value: object, what: str) -> float:
    """A finite number >= 0 (damping and similar knobs)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value!r}")
    return float(value)


def check_flag(value: object, what: str) -> bool:
    """A real bool (``True``/``False``, numpy's included): ``"no"`` or ``0`` is refused, not read as truthy."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what} must be True or False, got {value!r} of type {type(value).__name__}")
    return bool(value)


def short_repr(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, so that a huge wrong value does not flood its error message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
