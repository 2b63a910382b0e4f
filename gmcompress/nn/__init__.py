"""Torch layers built on group matrices; every one follows the :class:`GMLayer` protocol."""

from .base import GM_LAYERS, GMLayer, GMModule, NotApplicable
from .conv import GMConv2d, transform_feature_map
from .linear import GMLinear
from .pointwise import GMPointwiseConv
from .pool import GMPool

__all__ = [
    "GM_LAYERS",
    "GMLayer",
    "GMModule",
    "NotApplicable",
    "GMConv2d",
    "GMLinear",
    "GMPointwiseConv",
    "GMPool",
    "transform_feature_map",
]
