"""gmcompress: compress pretrained PyTorch networks with (relaxed) group matrices.

The workflow lives here; the layers are in :mod:`gmcompress.nn`, the group-matrix math in
:mod:`gmcompress.structure` and :mod:`gmcompress.groups`, the per-kind layer handlers in
:mod:`gmcompress.handlers`, the offline demo models in :mod:`gmcompress.zoo`.
"""

from . import groups, nn, structure
from ._version import __version__
from .api import CompressionPlan, compress, plan
from .budget import Budget, BudgetError
from .groups import group
from .io import load, save
from .nn.base import frozen
from .recipe import Recipe
from .report import CompressionReport
from .training import FeatureTaps, FinetuneResult, NonFiniteError, finetune

__all__ = [
    "__version__",
    "compress",
    "plan",
    "Budget",
    "BudgetError",
    "finetune",
    "FeatureTaps",
    "frozen",
    "save",
    "load",
    "Recipe",
    "group",
    "CompressionPlan",
    "CompressionReport",
    "FinetuneResult",
    "NonFiniteError",
    "groups",
    "nn",
    "structure",
]
