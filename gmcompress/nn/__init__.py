"""Torch layers built on group matrices."""

from .conv import GMConv2d, GMPointwiseConv, GMPointwiseConv2d, is_pointwise, transform_feature_map
from .linear import GMLinear
from .pool import GMPool

__all__ = [
    "GMConv2d",
    "GMLinear",
    "GMPointwiseConv",
    "GMPointwiseConv2d",
    "GMPool",
    "is_pointwise",
    "transform_feature_map",
]
