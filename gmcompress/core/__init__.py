"""The lowest layer: finite groups, group-matrix algebra and patterns, the block basis and dense materialisation
kernels, shared argument checks and text tables. Imports nothing else of gmcompress."""
