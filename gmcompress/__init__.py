"""gmcompress: compress pretrained PyTorch networks with (relaxed) group matrices."""

from .api import CompressionPlan, compress
from .finetune import FinetuneResult, finetune
from .groups import (
    FiniteGroup,
    cyclic,
    dihedral,
    direct_product,
    from_permutations,
    from_table,
    group,
    left_cosets,
    regular_basis,
    semidirect_product,
    subgroup,
    symmetric,
)
from .io import load, save
from .nn import GMConv2d, GMLinear, GMPointwiseConv, GMPointwiseConv2d, GMPool
from .recipe import Recipe, RecipeError, load_recipe
from .report import CompressionReport
from .structure import (
    GMFit,
    coefficients,
    displacement,
    displacement_rank,
    from_coefficients,
    group_matrix,
    project,
)

__version__ = "0.1.0"

__all__ = [
    "CompressionPlan",
    "CompressionReport",
    "Recipe",
    "RecipeError",
    "compress",
    "finetune",
    "FinetuneResult",
    "load",
    "load_recipe",
    "save",
    "GMPointwiseConv",
    "FiniteGroup",
    "GMConv2d",
    "GMLinear",
    "GMPointwiseConv2d",
    "GMPool",
    "GMFit",
    "coefficients",
    "cyclic",
    "dihedral",
    "direct_product",
    "displacement",
    "displacement_rank",
    "from_coefficients",
    "from_permutations",
    "from_table",
    "group",
    "group_matrix",
    "left_cosets",
    "project",
    "regular_basis",
    "semidirect_product",
    "subgroup",
    "symmetric",
]
