"""How one layer is compressed (:class:`LayerSettings`) and the one place each setting is checked.

Recipes (YAML) and the keyword arguments of :func:`gmcompress.compress` both go through
:func:`check_setting`, so a bad value gets the same message either way (recipes add the file and key path).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any

from ..core.groups import FiniteGroup, spec_of
from ..core.groups import group as parse_group
from ..fit.aware import DAMPING
from ..nn import IMPLS

__all__ = ["LayerSettings", "ON_MISMATCH", "BIAS", "SETTING_TYPES", "check_setting"]

ON_MISMATCH = ("skip", "pad", "error")
BIAS = ("keep", "shared")


@dataclass(frozen=True)
class LayerSettings:
    """How one layer is compressed.

    ``group`` (a spec such as ``"C8"`` or a :class:`~gmcompress.groups.FiniteGroup`, of order >= 2) applies over
    the features of Linear layers and the channels of 1x1 convolutions; k x k Conv2d layers use ``conv_group`` (a
    group of the square: C2, C4, D2, D4, tying the kernel's rotations) and stay dense when it is None.
    ``support`` restricts kernels to those group elements.
    ``on_mismatch`` says what happens when a size is not a multiple of the group order. ``activation_aware``
    uses the calibration batches when ``compress`` gets some; ``damping`` is the ridge of that fit.
    ``bias="shared"`` replaces the bias by its mean over each channel's group axis (exactly
    equivariant), ``"keep"`` copies it. ``impl`` picks the forward path: ``"dense"`` (materialised weight),
    ``"blocks"`` (the block-diagonal fast path: batched GEMMs for Linear, grouped convolutions for convs),
    ``"packed"`` (abelian groups: the block path without Gauss's three-product trick, fewer and wider
    products; elsewhere the block path),
    ``"fft"`` (Linear over abelian groups; convs take the block path) or ``"auto"`` (the documented rule of
    each layer; ``gmcompress.freeze`` later measures every path for serving).
    """

    group: str | FiniteGroup | None = None
    rank: int = 1
    modulate: bool = True
    support: tuple[int, ...] | None = None
    min_features: int = 0
    on_mismatch: str = "skip"
    impl: str = "auto"
    conv_group: str | FiniteGroup | None = None
    lifting: bool | None = None
    activation_aware: bool = True
    damping: float = DAMPING
    bias: str = "keep"


SETTING_TYPES: dict[str, tuple[type, ...]] = {
    "group": (str, FiniteGroup, type(None)),
    "rank": (int,),
    "modulate": (bool,),
    "support": (list, tuple, type(None)),
    "min_features": (int,),
    "on_mismatch": (str,),
    "impl": (str,),
    "conv_group": (str, FiniteGroup, type(None)),
    "lifting": (bool, type(None)),
    "activation_aware": (bool,),
    "damping": (float, int),
    "bias": (str,),
}
assert set(SETTING_TYPES) == {f.name for f in fields(LayerSettings)}


def _type_names(types: tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _checked_group(key: str, value: str | FiniteGroup) -> str | FiniteGroup:
    """A group setting: a spec, or a FiniteGroup (kept as its spec when one rebuilds it, so plans and reports name
    it); a group of order 1 is refused, since its layers would only grow."""
    g = parse_group(value)
    if g.order == 1:
        raise ValueError(
            f"{key}: {value!r} has order 1, and a group of order 1 saves nothing (its layers keep every weight and "
            f"gain modulations); use a group of order >= 2 such as 'C8', or {key}=None to keep the layers dense"
        )
    if isinstance(value, FiniteGroup):
        return spec_of(value) or value
    return value


def check_setting(key: str, value: Any) -> Any:
    """The checked (normalised) value of one layer setting, or a ValueError that says what was expected."""
    if key not in SETTING_TYPES:
        raise ValueError(f"unknown setting {key!r} (expected one of {', '.join(sorted(SETTING_TYPES))})")
    types = SETTING_TYPES[key]
    numeric = int in types and isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not numeric and (isinstance(value, bool) and bool not in types or not isinstance(value, types)):
        raise ValueError(f"{key}: expected {_type_names(types)}, got {value!r}")
    if key in ("group", "conv_group") and value is not None:
        return _checked_group(key, value)
    if key in ("rank", "min_features"):
        value = int(value)
        if value < (1 if key == "rank" else 0):
            raise ValueError(f"{key}: expected a whole number >= {1 if key == 'rank' else 0}, got {value}")
    if key == "damping":
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"damping: expected a finite number >= 0, got {value!r}")
        return float(value)
    choices = {"on_mismatch": ON_MISMATCH, "impl": IMPLS, "bias": BIAS}.get(key)
    if choices and value not in choices:
        raise ValueError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
    if key == "support" and value is not None:
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            raise ValueError(f"support: expected a non-empty list of element indices, got {value!r}")
        return tuple(value)
    return value
