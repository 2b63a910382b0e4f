"""Torch layers built on group matrices."""

from .conv import GMConv2d, GMPointwiseConv2d, transform_feature_map
from .linear import GMLinear
from .pool import GMPool

__all__ = ["GMConv2d", "GMLinear", "GMPointwiseConv2d", "GMPool", "transform_feature_map"]
