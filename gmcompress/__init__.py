"""gmcompress: compress pretrained PyTorch networks with (relaxed) group matrices.

The workflow lives here; the layers are in :mod:`gmcompress.nn`, the group-matrix math in
:mod:`gmcompress.structure` and :mod:`gmcompress.groups`, the per-kind layer handlers in
:mod:`gmcompress.handlers`, the offline demo models in :mod:`gmcompress.zoo`.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from . import groups, nn, structure
    from .api import CompressionPlan, compress, freeze, plan
    from .budget import Budget, BudgetError
    from .groups import group
    from .io import load, save
    from .paths import FreezeReport
    from .recipe import Recipe
    from .report import CompressionReport
    from .training import FeatureTaps, FinetuneResult, NonFiniteError, finetune

# the module of each name of the workflow, imported on first use: ``import gmcompress`` (and the command line's
# ``--help``, parsed before any work) does not import torch
_EXPORTS = {
    "compress": "api", "plan": "api", "CompressionPlan": "api", "Budget": "budget", "BudgetError": "budget",
    "finetune": "training", "FeatureTaps": "training", "FinetuneResult": "training", "NonFiniteError": "training",
    "freeze": "api", "save": "io", "load": "io", "Recipe": "recipe", "group": "groups",
    "CompressionReport": "report", "FreezeReport": "paths",
}  # fmt: skip

__all__ = [
    "__version__",
    "compress",
    "plan",
    "Budget",
    "BudgetError",
    "finetune",
    "FeatureTaps",
    "freeze",
    "save",
    "load",
    "Recipe",
    "group",
    "CompressionPlan",
    "CompressionReport",
    "FreezeReport",
    "FinetuneResult",
    "NonFiniteError",
    "groups",
    "nn",
    "structure",
]


def __getattr__(name: str) -> Any:
    """A workflow name from its module, or a submodule (``gm.nn``, ``gm.report``), imported on first use."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
