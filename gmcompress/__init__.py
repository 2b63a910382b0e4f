"""gmcompress: compress pretrained PyTorch networks with (relaxed) group matrices.

The workflow lives here (``__all__``); the rest is reached through its namespace: the layers in
:mod:`gmcompress.nn`, the groups in :mod:`gmcompress.groups`, the group-matrix math in :mod:`gmcompress.structure`,
fine-tuning in :mod:`gmcompress.training`, saving in :mod:`gmcompress.io`, the offline demo models in
:mod:`gmcompress.zoo`. The package's layers, bottom to top, are in docs/design.md section 5.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__

if TYPE_CHECKING:
    from . import groups, nn
    from .api import CompressionPlan, compress, freeze, plan
    from .io import load, save
    from .measure.paths import FreezeReport
    from .planning.budget_spec import Budget, BudgetError
    from .recipe import Recipe
    from .report import CompressionReport
    from .training import FinetuneResult, NonFiniteError, finetune

# the module of each name, imported on first use: ``import gmcompress`` (and the command line's ``--help``, parsed
# before any work) does not import torch. ``group`` and ``FeatureTaps`` stay reachable here for existing code; their
# homes are gm.groups.group and gm.training.FeatureTaps
_EXPORTS = {
    "compress": "api", "plan": "api", "CompressionPlan": "api", "freeze": "api",
    "Budget": "planning.budget_spec", "BudgetError": "planning.budget_spec", "Recipe": "recipe",
    "finetune": "training", "FinetuneResult": "training", "NonFiniteError": "training", "FeatureTaps": "training",
    "save": "io", "load": "io", "group": "groups", "CompressionReport": "report", "FreezeReport": "measure.paths",
}  # fmt: skip

__all__ = [
    "compress",
    "plan",
    "freeze",
    "finetune",
    "save",
    "load",
    "Budget",
    "BudgetError",
    "Recipe",
    "CompressionPlan",
    "CompressionReport",
    "FreezeReport",
    "FinetuneResult",
    "NonFiniteError",
    "nn",
    "groups",
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
