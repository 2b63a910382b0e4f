"""Torch layers built on group matrices; every one follows the :class:`GMLayer` protocol."""

from .base import GM_LAYERS, GMLayer, GMModule, NotApplicable
from .channel import GMChannelConv
from .conv import GMConv2d, transform_feature_map
from .linear import IMPLS as IMPLS  # the forward paths a layer setting may name (planning.settings)
from .linear import GMLinear
from .pool import GMPool

__all__ = [
    "GM_LAYERS",
    "GMLayer",
    "GMModule",
    "NotApplicable",
    "GMChannelConv",
    "GMConv2d",
    "GMLinear",
    "GMPool",
    "transform_feature_map",
]
