"""What a budget asks for (:class:`Budget`: one target, the candidate groups, the highest rank) and
:class:`BudgetError`; the search that meets it is :mod:`gmcompress.budget`."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.groups import group as parse_group

__all__ = ["Budget", "BudgetError", "candidate_groups", "FAMILIES", "KINDS", "FIDELITY_KINDS"]

FAMILIES = {
    "C": tuple(f"C{2**k}" for k in range(1, 7)),  # cyclic orders 2 .. 64
    "D": tuple(f"D{2**k}" for k in range(1, 6)),  # dihedral orders 4 .. 64
}
KINDS = ("params", "speedup", "max_error", "agreement")
FIDELITY_KINDS = ("max_error", "agreement")  # verified on held-out batches after the allocation


class BudgetError(ValueError):
    """A budget that no allocation meets (``closest``: the best value any choice reaches), or a budget given
    without the data it needs (``closest`` None)."""

    def __init__(self, message: str, closest: float | None = None) -> None:
        super().__init__(message)
        self.closest = closest


def candidate_groups(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"C"`` (cyclic orders 2-64), ``"D"`` (dihedral orders 4-64), one group name or a list of names."""
    expected = "expected a family ('C', 'D'), a group name or a non-empty list of group names"
    if isinstance(spec, str):
        names = FAMILIES.get(spec, (spec,))
    elif isinstance(spec, (list, tuple)) and all(isinstance(n, str) for n in spec):
        names = tuple(spec)
    else:
        raise ValueError(f"budget groups: {expected}, got {spec!r}")
    if not names:
        raise ValueError(f"budget groups: {expected}")
    for n in names:
        parse_group(n)  # unknown names fail here, with the accepted forms
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class Budget:
    """One target: ``params`` (times fewer weights in the candidate layers), ``speedup`` (whole-model latency on
    ``example_inputs``, before / after), ``max_error`` (the largest relative change of the model's output) or
    ``agreement`` (the least top-1 agreement with the original, for classifiers). ``max_error`` and ``agreement``
    are fidelity budgets, checked on held-out batches (module doc); ``min_params`` asks them for at least that many
    times fewer weights too (else the all-dense model always meets them). ``groups``: the candidate groups (see
    :func:`candidate_groups`); ``max_rank`` caps the ranks tried (a fit's cost grows with rank squared, and C_N rank
    r has the size of C_N/2 rank r/2)."""

    params: float | None = None
    speedup: float | None = None
    max_error: float | None = None
    agreement: float | None = None
    groups: str | tuple[str, ...] = "C"
    max_rank: int = 8
    min_params: float | None = None

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"Budget takes exactly one of {', '.join(KINDS)}, got {given or 'none'}")
        value = self._number(given[0])
        if given[0] in ("params", "speedup") and value < 1:
            raise ValueError(f"Budget({given[0]}={value}): expected a factor >= 1 (e.g. {given[0]}=4.0)")
        if given[0] == "max_error" and value <= 0:
            raise ValueError(f"Budget(max_error={value}): expected a relative error > 0 (e.g. 0.1)")
        if given[0] == "agreement" and not 0 < value <= 1:
            raise ValueError(f"Budget(agreement={value}): expected a fraction of samples in (0, 1] (e.g. 0.95)")
        if self.min_params is not None:
            if given[0] not in FIDELITY_KINDS:
                raise ValueError(
                    f"Budget(min_params=...) goes with a fidelity budget ({', '.join(FIDELITY_KINDS)}); "
                    f"Budget({given[0]}=...) sets the size or speed itself"
                )
            if self._number("min_params") < 1:
                raise ValueError(f"Budget(min_params={self.min_params}): expected a factor >= 1 (e.g. 2.0)")
        object.__setattr__(self, "groups", candidate_groups(self.groups))
        if isinstance(self.max_rank, bool) or not isinstance(self.max_rank, int) or self.max_rank < 1:
            raise ValueError(f"Budget(max_rank={self.max_rank!r}): expected a whole number >= 1")

    def _number(self, key: str) -> float:
        """The value of ``key`` as a finite float (numpy scalars too), else a ValueError naming it."""
        value = getattr(self, key)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"Budget({key}=...): expected a finite number, got {value!r}")
        object.__setattr__(self, key, float(value))
        return float(value)

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def target(self) -> float:
        return float(getattr(self, self.kind))

    @property
    def fidelity(self) -> bool:
        """A budget on what the model computes, verified on held-out batches."""
        return self.kind in FIDELITY_KINDS

    def __str__(self) -> str:
        floor = f", min_params={self.min_params:g}" if self.min_params is not None else ""
        return f"{self.kind}={self.target:g}{floor}"

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any] | Budget) -> Budget:
        """A Budget from ``"params=4"`` or ``"agreement=0.95,min_params=2"`` (CLI), a mapping (recipe ``budget:``
        section) or a Budget."""
        if isinstance(spec, Budget):
            return spec
        if isinstance(spec, str):
            return cls(**dict(_parse_item(spec, item) for item in spec.split(",")))
        if not isinstance(spec, Mapping):
            raise TypeError(
                f"budget: expected a gm.Budget, a 'KIND=VALUE' string or a mapping, got {spec!r} "
                f"(e.g. gm.Budget(params=4.0))"
            )
        unknown = set(spec) - {*KINDS, "groups", "max_rank", "min_params"}
        if unknown:
            raise ValueError(
                f"unknown budget keys {sorted(unknown)} (expected {', '.join(KINDS)}, groups, max_rank, min_params)"
            )
        return cls(**dict(spec))


def _parse_item(spec: str, item: str) -> tuple[str, float]:
    """One ``KEY=VALUE`` of a budget string: a kind or ``min_params``, and a number."""
    key, sep, value = (part.strip() for part in item.partition("="))
    if not sep or key not in (*KINDS, "min_params"):
        raise ValueError(
            f"budget {spec!r}: expected KIND=VALUE with KIND one of {', '.join(KINDS)} (and optionally ,min_params=N)"
        )
    try:
        return key, float(value)
    except ValueError:
        raise ValueError(f"budget {spec!r}: {value!r} is not a number (e.g. {key}=4)") from None
