"""The fast activation-aware fit (gmcompress.aware) against the scipy reference, streamed statistics, and
layer-by-layer calibration."""

import numpy as np
import pytest
import torch
from torch import nn

import gmcompress as gm
from gmcompress.core.patterns import conv_pattern, regular_pattern
from gmcompress.fit import aware
from gmcompress.fit.plain import plain_fit
from gmcompress.fit.reference import project_pattern
from gmcompress.graph.calibration import capture_statistics
from gmcompress.nn import GMLinear


def anisotropic_rows(rng, samples, fan_in):
    mix = rng.standard_normal((fan_in, fan_in)) * np.linspace(0.05, 3, fan_in)
    return rng.standard_normal((samples, fan_in)) @ mix


def objective(w, fit, x, damping):
    """||(W - W_gm) X^T||^2 + mu ||W - W_gm||^2, mu = damping mean(diag(X^T X)), written out."""
    r = w - fit.dense()
    return np.linalg.norm(r @ x.T) ** 2 + damping * (x**2).sum(0).mean() * np.linalg.norm(r) ** 2


CASES = [  # (group, c_out, c_in, rank, modulate, support, samples, damping, subgroups)
    ("C4", 2, 3, 1, True, None, 100, 0.1, {}),
    ("C8", 3, 2, 3, True, None, 300, 0.1, {}),
    ("C4xC4", 2, 2, 2, True, None, 40, 0.1, {}),
    ("D4", 2, 2, 2, True, None, 50, 0.1, {}),
    ("S3", 2, 3, 2, True, None, 50, 0.0, {}),
    ("C8", 2, 2, 2, True, [0, 1, 7], 50, 0.1, {}),  # restricted support: the dense operator
    ("C4", 2, 3, 1, False, None, 100, 0.1, {}),
    ("D4", 2, 2, 2, True, None, 60, 0.1, {"in_subgroup": [0, 4], "out_subgroup": [0, 4]}),  # coset spaces
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-r{c[3]}-{'mod' if c[4] else 'exact'}")
def test_fast_fit_reaches_the_scipy_reference_minimum(case):
    spec, c_out, c_in, rank, modulate, support, samples, damping, sub = case
    rng = np.random.default_rng(0)
    pattern, _ = gm.structure.pattern_for(gm.group(spec), support, sub.get("in_subgroup"), sub.get("out_subgroup"))
    w = rng.standard_normal((c_out * pattern.n_out, c_in * pattern.n_in))
    x = anisotropic_rows(rng, samples, w.shape[1])
    kwargs = dict(rank=rank, modulate=modulate, support=support, inputs=x, damping=damping, **sub)
    ref = gm.structure.project(w, spec, max_iter=5000, **kwargs)
    fast = aware.project(w, spec, tol=1e-14, **kwargs)
    assert fast.activation_aware and np.allclose(fast.modulations, ref.modulations)
    assert objective(w, fast, x, damping) == pytest.approx(objective(w, ref, x, damping), rel=1e-9)
    assert objective(w, fast, x, damping) < 0.999 * objective(w, plain_fit_of(w, spec, kwargs), x, damping)
    assert fast.output_error == pytest.approx(np.linalg.norm((w - fast.dense()) @ x.T) / np.linalg.norm(w @ x.T))
    assert fast.relative_error == pytest.approx(np.linalg.norm(w - fast.dense()) / np.linalg.norm(w))


def plain_fit_of(w, spec, kwargs):
    args = {k: v for k, v in kwargs.items() if k not in ("inputs", "damping")}
    return gm.structure.project(w, spec, **args)


def test_fast_fit_of_a_group_convolution_pattern():
    rng = np.random.default_rng(1)
    pattern = conv_pattern(gm.group("C4"), 3, False)
    w = rng.standard_normal((8, 2 * pattern.n_in))
    x = anisotropic_rows(rng, 200, w.shape[1])
    ref = project_pattern(w, pattern, 2, inputs=x, max_iter=5000)
    fast = aware.project_pattern(w, pattern, 2, inputs=x, tol=1e-14)
    assert objective(w, fast, x, 0.1) == pytest.approx(objective(w, ref, x, 0.1), rel=1e-9)


@pytest.mark.parametrize("spec", ["C8", "D4", "S3", "C4xC4", "C2^3"])
def test_block_operator_equals_dense_operator(spec):
    """The block-basis Hessian and right-hand side are the dense ones (same objective, cheaper products)."""
    g = gm.group(spec)
    n, c_out, c_in, r = g.order, 3, 2, 2
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, c_in * n, generator=gen, dtype=torch.float64)
    hhat = x.T @ x / 50 + 0.1 * torch.eye(c_in * n, dtype=torch.float64)
    a = torch.randn(r, c_out, n, generator=gen, dtype=torch.float64)
    v = torch.randn(r, c_out, c_in, n, generator=gen, dtype=torch.float64)
    w = torch.randn(c_out * n, c_in * n, generator=gen, dtype=torch.float64)
    block = aware.BlockOperator(hhat, g, c_in)
    dense = aware.DenseOperator(hhat, regular_pattern(g), torch.arange(n), c_in)
    torch.testing.assert_close(block.hessian(v, a), dense.hessian(v, a))
    torch.testing.assert_close(block.adjoint(block.transform(w @ hhat), a), dense.adjoint(w @ hhat, a))
    # the preconditioner inverts the Hessian of constant modulations exactly
    ones = torch.ones(1, c_out, n, dtype=torch.float64)
    torch.testing.assert_close(block.precondition(block.hessian(v[:1], ones)), v[:1])
    torch.testing.assert_close(dense.precondition(dense.hessian(v[:1], ones)), v[:1])


def test_exact_group_matrix_fit_takes_one_step():
    """Without modulations the preconditioner is the Hessian: CG is done after one step."""
    rng = np.random.default_rng(2)
    g = gm.group("C8")
    w = torch.as_tensor(rng.standard_normal((16, 32)))
    stats = aware.InputStats.from_rows(anisotropic_rows(rng, 100, 32))
    fit = gm.structure.GMFit(regular_pattern(g), *plain_fit(w.numpy(), regular_pattern(g), 1, False), 0.0)
    one_step, err_one, *_ = aware.fit_kernels(w, fit, stats, group=g, max_iter=1)
    converged, err_converged, *_ = aware.fit_kernels(w, fit, stats, group=g, tol=1e-14)
    np.testing.assert_allclose(one_step, converged, rtol=1e-9, atol=1e-12)
    assert err_one == pytest.approx(err_converged, rel=1e-12) and err_one < 0.95 * fit_error(w, fit, stats)


def fit_error(w, fit, stats):
    r = w.numpy() - fit.dense()
    h = stats.gram.numpy()
    return np.sqrt(np.trace(r @ h @ r.T) / np.trace(w.numpy() @ h @ w.numpy().T))


def test_streamed_statistics_equal_the_all_rows_computation():
    rng = np.random.default_rng(3)
    x = torch.as_tensor(anisotropic_rows(rng, 300, 32))
    streamed = aware.InputStats.empty(32)
    for chunk in x.split(37):
        streamed.update(chunk)
    whole = aware.InputStats.from_rows(x)
    assert streamed.rows == whole.rows == 300
    torch.testing.assert_close(streamed.gram, whole.gram, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(whole.gram, x.T @ x, rtol=1e-12, atol=1e-10)
    # captured from a model batch by batch = the statistics of all the rows at once
    model = nn.Sequential(nn.Linear(32, 16))
    plans = gm.plan(model, group="C8").layers
    batches = [x[:100].float(), x[100:].float()]
    captured = capture_statistics(model, plans, batches)["0"]  # float32 activations: float32 batch products
    torch.testing.assert_close(captured.gram, aware.InputStats.from_rows(torch.cat(batches)).gram, rtol=1e-5, atol=1e-4)
    assert capture_statistics(model, plans, batches, max_rows=120)["0"].rows == 120
    # and a fit from them equals the fit from the rows
    w = model[0].weight.detach().double()
    fit_rows = aware.project(w, "C8", rank=2, inputs=x.float(), tol=1e-12)
    fit_stats = aware.project(w, "C8", rank=2, inputs=captured, tol=1e-12)
    np.testing.assert_allclose(fit_stats.kernels, fit_rows.kernels, rtol=1e-4, atol=1e-7)


class Branchy(nn.Module):
    """Two layers on the same input, then one on their (compressed) outputs."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.c(torch.relu(self.a(x)) * self.b(x))


class UntraceableBranchy(Branchy):
    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace this
            return x
        return super().forward(x)


@pytest.mark.parametrize("cls", [Branchy, UntraceableBranchy])
@pytest.mark.parametrize("mode", ["sequential", "original"])
def test_sequential_calibration_feeds_the_compressed_prefix(cls, mode):
    torch.manual_seed(0)
    model = cls().eval()
    batches = [torch.randn(40, 16) @ torch.diag(torch.linspace(0.1, 3, 16)) for _ in range(3)]
    with torch.no_grad(), pytest.warns() if cls is UntraceableBranchy else _nothing():
        out = gm.compress(  # held-out data given, so the fits see all three batches
            model, group="C8", calibration=batches, heldout=torch.randn(8, 16), calibration_mode=mode, progress=False
        )
    x = torch.cat(batches)
    prefix = out if mode == "sequential" else model  # whose a and b produce c's calibration inputs
    with torch.no_grad():
        c_inputs = torch.relu(prefix.a(x)) * prefix.b(x)
    for name, inputs in [("a", x), ("b", x), ("c", c_inputs)]:
        expected = GMLinear.from_dense(getattr(model, name), "C8", inputs=inputs)
        torch.testing.assert_close(getattr(out, name).kernels, expected.kernels, rtol=1e-5, atol=1e-6)
    if mode == "sequential":  # the compressed prefix really differs from the original one
        with torch.no_grad():
            assert not torch.allclose(c_inputs, torch.relu(model.a(x)) * model.b(x), atol=1e-3)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_unknown_calibration_mode_is_refused():
    with pytest.raises(ValueError, match="calibration_mode"):
        gm.compress(Branchy(), group="C8", calibration=[torch.randn(4, 16)], calibration_mode="later", progress=False)


def test_saved_size_is_counted_without_buffering_the_model():
    """The report sizes state dicts by counting bytes as torch.save streams them (no in-memory copy of a big model)."""
    import io

    from gmcompress.measure.counts import state_dict_bytes

    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    assert state_dict_bytes(model) == buffer.tell() > 64 * 32 * 4
