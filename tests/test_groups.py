import itertools

import numpy as np
import pytest
from conftest import SPECS, groups, left_translation
from hypothesis import given
from hypothesis import strategies as st

import gmcompress as gm


def assert_group_axioms(g: gm.groups.FiniteGroup) -> None:
    t = g.table
    n = g.order
    assert t.shape == (n, n) and t.min() >= 0 and t.max() < n
    for a, b, c in itertools.product(range(n), repeat=3) if n <= 16 else []:
        assert t[t[a, b], c] == t[a, t[b, c]]
    if n > 16:  # vectorised for larger groups
        assert np.array_equal(t[t[:, :, None], np.arange(n)], t[np.arange(n)[:, None, None], t[None]])
    e = g.identity
    assert all(t[e, a] == a and t[a, e] == a for a in range(n))
    assert all(t[a, g.inverse[a]] == e and t[g.inverse[a], a] == e for a in range(n))
    assert len(g.names) == n


@given(groups())
def test_every_constructor_gives_a_group(g):
    assert_group_axioms(g)


@pytest.mark.parametrize(
    "spec,order,abelian",
    [
        ("C8", 8, True),
        ("D4", 8, False),
        ("S3", 6, False),
        ("C4xC4", 16, True),
        ("D4xC2", 16, False),
        ("C2^3", 8, True),
        ("S5", 120, False),
        ("Z3", 3, True),
    ],
)
def test_parse_specs(spec, order, abelian):
    g = gm.group(spec)
    assert g.order == order and g.is_abelian == abelian
    assert_group_axioms(g)
    assert gm.group(g) is g


def test_dihedral_is_the_square_group():
    g = gm.groups.dihedral(4)
    r, s = 1, 4  # r^1 and s
    assert g.table[s, s] == g.identity
    # s r s = r^{-1}
    assert g.table[g.table[s, r], s] == 3
    orders = sorted(min(k for k in range(1, 9) if _power(g, a, k) == g.identity) for a in range(8))
    assert orders == [1, 2, 2, 2, 2, 2, 4, 4]


def _power(g, a, k):
    out = g.identity
    for _ in range(k):
        out = g.table[out, a]
    return out


def _element_permutations(g):
    """The permutation of each element of a from_permutations group, read from its name."""
    return [tuple(range(4)) if name == "e" else tuple(int(v) for v in name.strip("()").split()) for name in g.names]


def test_symmetric_matches_permutation_composition():
    """table[a, b] is the element i -> p_a[p_b[i]] (apply g_b first), as from_permutations documents."""
    g = gm.groups.symmetric(4)
    perms = _element_permutations(g)
    assert sorted(perms) == sorted(itertools.permutations(range(4)))
    index = {p: i for i, p in enumerate(perms)}
    for a, pa in enumerate(perms):
        for b, pb in enumerate(perms):
            assert g.table[a, b] == index[tuple(pa[pb[i]] for i in range(4))]


@pytest.mark.parametrize("bad", ["C0", "Q8", "C4*C4", "", "S6", "D", 8])
def test_unknown_spec_lists_accepted_forms(bad):
    with pytest.raises(ValueError, match="C4xC4"):
        gm.group(bad)


def test_from_table_validates():
    good = gm.groups.cyclic(3).table
    assert gm.groups.from_table(good).order == 3
    with pytest.raises(ValueError, match="permutation"):
        gm.groups.from_table([[0, 1], [0, 1]])
    with pytest.raises(ValueError, match="associative"):
        # a Latin square with identity 0 that is not associative (a quasigroup of order 5)
        gm.groups.from_table([[0, 1, 2, 3, 4], [1, 0, 3, 4, 2], [2, 4, 0, 1, 3], [3, 2, 4, 0, 1], [4, 3, 1, 2, 0]])
    with pytest.raises(ValueError, match="closure"):
        gm.groups.from_table([[0, 5], [1, 0]])


def test_semidirect_product_checks_the_action():
    with pytest.raises(ValueError, match="automorphism"):
        gm.groups.semidirect_product(
            gm.groups.cyclic(4), gm.groups.cyclic(2), lambda h, k: k if h == 0 else (k + 1) % 4
        )
    g = gm.groups.semidirect_product(gm.groups.cyclic(5), gm.groups.cyclic(2), lambda h, k: k if h == 0 else (-k) % 5)
    assert g.order == 10 and not g.is_abelian


@given(groups(), st.data())
def test_cosets_partition_the_group(g, data):
    gens = data.draw(st.lists(st.integers(0, g.order - 1), max_size=2))
    h = gm.groups.subgroup(g, gens)
    assert g.order % len(h) == 0
    cosets = gm.groups.left_cosets(g, h)
    assert cosets.shape == (g.order // len(h), len(h))
    assert sorted(cosets.ravel().tolist()) == list(range(g.order))
    for row in cosets:  # each row is a H for its first element a
        a = row[0]
        assert set(row.tolist()) == {int(g.table[a, x]) for x in h}


def test_pixel_cosets_of_stride_two_subgroup():
    g = gm.group("C4xC4")
    h = gm.groups.subgroup(g, [2 * 4, 2])  # (2, 0) and (0, 2)
    cosets = gm.groups.left_cosets(g, h)
    assert cosets.shape == (4, 4)
    assert cosets[0].tolist() == [0, 2, 8, 10]


def random_gm(g, rng):
    return gm.structure.group_matrix(rng.standard_normal(g.order), g)


@given(groups(), st.integers(0, 2**31 - 1))
def test_regular_basis_block_diagonalises_group_matrices(g, seed):
    rng = np.random.default_rng(seed)
    basis = gm.groups.regular_basis(g)
    q = basis.q
    assert np.allclose(q.T @ q, np.eye(g.order), atol=1e-10)
    assert sum(basis.blocks) == g.order
    mask = np.zeros((g.order, g.order), dtype=bool)
    for off, d in zip(basis.offsets, basis.blocks):
        mask[off : off + d, off : off + d] = True
    for _ in range(3):
        m = random_gm(g, rng)
        rotated = q.T @ m @ q
        assert np.abs(rotated[~mask]).max(initial=0) < 1e-10


@given(groups())
def test_group_matrices_commute_with_left_translations(g):
    rng = np.random.default_rng(g.order)
    m = gm.structure.group_matrix(rng.standard_normal(g.order), g)
    for h in range(g.order):
        lh = left_translation(g, h)
        assert np.allclose(m @ lh, lh @ m, atol=1e-12)


@pytest.mark.parametrize("spec", SPECS)
def test_regular_basis_is_cached(spec):
    g = gm.group(spec)
    assert gm.groups.regular_basis(g) is gm.groups.regular_basis(gm.group(spec))
