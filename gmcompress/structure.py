"""``gm.structure``: group-matrix math on numpy, one namespace for the algebra (:mod:`gmcompress.core.algebra`), the
patterns (:mod:`gmcompress.core.patterns`) and the numpy/scipy reference fits (:mod:`gmcompress.fit.plain`,
:mod:`gmcompress.fit.reference`). A GM layer pickled whole refers to its :class:`Pattern` through this module.
"""

from .core.algebra import coefficients, displacement, displacement_rank, from_coefficients, group_matrix
from .core.patterns import (
    GMFit,
    Pattern,
    channel_counts,
    conv_pattern,
    coset_pattern,
    pattern_for,
    regular_pattern,
    relaxed_dense,
    resolve_support,
)
from .fit.plain import plain_fit
from .fit.reference import project, project_pattern

__all__ = [
    "GMFit",
    "group_matrix",
    "coefficients",
    "from_coefficients",
    "displacement",
    "displacement_rank",
    "Pattern",
    "regular_pattern",
    "coset_pattern",
    "conv_pattern",
    "relaxed_dense",
    "channel_counts",
    "resolve_support",
    "pattern_for",
    "project",
    "project_pattern",
    "plain_fit",
]
