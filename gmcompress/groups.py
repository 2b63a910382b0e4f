"""``gm.groups``: finite groups for group matrices (the public namespace of :mod:`gmcompress.core.groups`).

``gm.groups.group("C8")``, ``gm.groups.dihedral(4)``, ``gm.groups.from_permutations(...)``; a model pickled whole
refers to its groups through this module, so it stays importable here.
"""

from .core.groups import *  # noqa: F403  (the names of core.groups.__all__)
from .core.groups import (
    __all__,  # noqa: F401
    _rebuild,  # noqa: F401  (whole-model pickles name gmcompress.groups._rebuild)
)
