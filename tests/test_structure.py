import numpy as np
import pytest
from conftest import gm_by_loops, groups
from hypothesis import given
from hypothesis import strategies as st

import gmcompress as gm


@given(groups(), st.integers(0, 2**31 - 1))
def test_group_matrix_matches_definition(g, seed):
    f = np.random.default_rng(seed).standard_normal(g.order)
    assert np.array_equal(gm.structure.group_matrix(f, g), gm_by_loops(f, g))


@given(groups(), st.integers(0, 2**31 - 1))
def test_coefficients_are_a_permutation_of_entries(g, seed):
    n = g.order
    m = np.random.default_rng(seed).permutation(n * n).reshape(n, n).astype(float)  # distinct entries
    f = gm.structure.coefficients(m, g)
    assert sorted(f.ravel()) == sorted(m.ravel())
    for x in range(n):
        for i in range(n):
            assert f[x, i] == m[i, g.table[i, x]]
    assert np.array_equal(gm.structure.from_coefficients(f, g), m)
    assert np.isclose(np.linalg.norm(f), np.linalg.norm(m))


def relaxed_by_loops(b, a, g):
    """sum_k diag(a_k) GM(b_k), built from the loop definition."""
    return sum(np.diag(a[k]) @ gm_by_loops(b[k], g) for k in range(len(b)))


@given(groups(), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_displacement_rank(g, r, seed):
    rng = np.random.default_rng(seed)
    n = g.order
    m = gm.structure.group_matrix(rng.standard_normal(n), g)
    assert gm.structure.displacement_rank(m, g) == 0
    assert np.abs(gm.structure.displacement(m, g)).max() < 1e-12
    relaxed = relaxed_by_loops(rng.standard_normal((r, n)), rng.standard_normal((r, n)), g)
    assert gm.structure.displacement_rank(relaxed, g) <= r
    if n > 1:
        assert gm.structure.displacement_rank(rng.standard_normal((n, n)), g) > 0


def stacked_coefficients_by_loops(w, g, c_out, c_in, support):
    """Per output channel: the (c_in |S|) x N matrix of F[o, c][s, i] = W[o, c][i, idx(g_i s)]."""
    n = g.order
    out = np.zeros((c_out, c_in * len(support), n))
    for o in range(c_out):
        for c in range(c_in):
            for si, s in enumerate(support):
                for i in range(n):
                    out[o, c * len(support) + si, i] = w[o * n + i, c * n + g.table[i, s]]
    return out


@given(groups(), st.integers(1, 3), st.integers(1, 2), st.integers(1, 4), st.booleans(), st.integers(0, 2**31 - 1))
def test_project_is_the_least_squares_optimum(g, c_out, c_in, rank, restrict, seed):
    rng = np.random.default_rng(seed)
    n = g.order
    rank = min(rank, n)
    w = rng.standard_normal((c_out * n, c_in * n))
    support = sorted(rng.choice(n, size=max(1, n // 2), replace=False).tolist()) if restrict else list(range(n))
    fit = gm.structure.project(w, g, rank=rank, support=support if restrict else None)
    # independent optimum: Eckart-Young on each stacked coefficient matrix + the off-support mass
    stacked = stacked_coefficients_by_loops(w, g, c_out, c_in, support)
    best = 0.0
    for o in range(c_out):
        s = np.linalg.svd(stacked[o], compute_uv=False)
        best += float((s[rank:] ** 2).sum())
    off = np.linalg.norm(w) ** 2 - np.linalg.norm(stacked) ** 2
    optimum = np.sqrt(best + off) / np.linalg.norm(w)
    assert fit.relative_error == pytest.approx(optimum, rel=1e-9, abs=1e-12)
    assert fit.relative_error == pytest.approx(np.linalg.norm(w - fit.dense()) / np.linalg.norm(w), rel=1e-12)
    assert fit.kernels.shape == (rank, c_out, c_in, len(support))
    assert fit.modulations.shape == (rank, c_out, n)
    # idempotent: projecting the projection changes nothing
    again = gm.structure.project(fit.dense(), g, rank=rank, support=support if restrict else None)
    assert np.allclose(again.dense(), fit.dense(), atol=1e-10)


@given(groups(), st.integers(0, 2**31 - 1))
def test_exact_projection_is_the_mean_along_group_diagonals(g, seed):
    rng = np.random.default_rng(seed)
    n = g.order
    w = rng.standard_normal((2 * n, n))
    fit = gm.structure.project(w, g, rank=1, modulate=False)
    for o in range(2):
        block = w[o * n : (o + 1) * n]
        kernel = np.zeros(n)
        for x in range(n):
            kernel[x] = np.mean([block[i, j] for i in range(n) for j in range(n) if g.table[i, x] == j])
        assert np.allclose(fit.dense()[o * n : (o + 1) * n], gm_by_loops(kernel, g), atol=1e-12)
    assert np.all(fit.modulations == 1.0)
    assert gm.structure.displacement_rank(fit.dense()[:n], g) == 0


@given(groups(), st.integers(0, 2**31 - 1))
def test_full_rank_reproduces_any_matrix(g, seed):
    w = np.random.default_rng(seed).standard_normal((g.order, 2 * g.order))
    fit = gm.structure.project(w, g, rank=g.order)
    assert fit.relative_error < 1e-10


def test_shape_errors_name_shapes_and_order():
    with pytest.raises(ValueError, match=r"out=10, in=16.*N=8"):
        gm.structure.project(np.zeros((10, 16)), "C8")
    with pytest.raises(ValueError, match="NaN"):
        gm.structure.project(np.full((8, 8), np.nan), "C8")
    with pytest.raises(ValueError, match="modulate=True"):
        gm.structure.project(np.zeros((8, 8)), "C8", rank=2, modulate=False)
    with pytest.raises(ValueError, match="rank"):
        gm.structure.project(np.zeros((8, 8)), "C8", rank=9)


def test_activation_aware_fit_beats_plain_fit_on_synthetic_inputs():
    rng = np.random.default_rng(0)
    g = gm.group("C4")
    w = rng.standard_normal((8, 16))
    mix = rng.standard_normal((16, 16)) * np.linspace(0.05, 3, 16)  # anisotropic inputs
    x_fit, x_held = rng.standard_normal((400, 16)) @ mix, rng.standard_normal((400, 16)) @ mix
    plain = gm.structure.project(w, g, rank=2)
    aware = gm.structure.project(w, g, rank=2, inputs=x_fit)
    assert aware.activation_aware and np.allclose(aware.modulations, plain.modulations)

    def out_err(fit, x):
        return np.linalg.norm((w - fit.dense()) @ x.T)

    assert out_err(aware, x_held) < 0.9 * out_err(plain, x_held)


@pytest.mark.slow
def test_activation_aware_fit_on_pretrained_mnist_layer(mnist):
    import torch

    net, (x_tr, _, x_te, _) = mnist
    layer = net[2][0]  # classifier.0: Linear(3136, 128)
    with torch.no_grad():
        feats_tr = net[1](net[0](x_tr[:1500])).double().numpy()
        feats_te = net[1](net[0](x_te[:1000])).double().numpy()
    w = layer.weight.detach().double().numpy()
    plain = gm.structure.project(w, "C8", rank=2)
    aware = gm.structure.project(w, "C8", rank=2, inputs=feats_tr)

    def out_err(fit):
        return np.linalg.norm((w - fit.dense()) @ feats_te.T) / np.linalg.norm(w @ feats_te.T)

    assert out_err(aware) < 0.8 * out_err(plain), (out_err(aware), out_err(plain))
