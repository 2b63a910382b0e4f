"""``gm.groups``: finite groups for group matrices (the public namespace of :mod:`gmcompress.core.groups`).

``gm.groups.group("C8")``, ``gm.groups.dihedral(4)``, ``gm.groups.from_permutations(...)``; a model pickled whole
refers to its groups through this module, so it stays importable here.
"""

from .core.groups import (
    FiniteGroup,
    RegularBasis,
    _rebuild,  # noqa: F401  (whole-model pickles name gmcompress.groups._rebuild)
    cyclic,
    dihedral,
    direct_product,
    from_permutations,
    from_table,
    group,
    left_cosets,
    regular_basis,
    semidirect_product,
    spec_of,
    subgroup,
    symmetric,
)

__all__ = [
    "FiniteGroup",
    "RegularBasis",
    "cyclic",
    "dihedral",
    "symmetric",
    "direct_product",
    "semidirect_product",
    "from_table",
    "from_permutations",
    "group",
    "spec_of",
    "subgroup",
    "left_cosets",
    "regular_basis",
]
