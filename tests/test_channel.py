"""GMChannelConv: every path against the dense convolution, the projection it fits, real equivariance."""

import numpy as np
import pytest
import torch
from test_nn import kernel_grad  # the kernels' gradient from the stored form's
from torch import nn

import gmcompress as gm
from gmcompress.fit.reference import project
from gmcompress.nn import GMChannelConv

CONFIGS = [
    (2, 3, dict(padding=1)),
    (2, (3, 1), dict(stride=2, padding="valid")),
    (2, 3, dict(padding=2, dilation=2, padding_mode="reflect", stride=2)),
    (2, 3, dict(padding="same", padding_mode="circular")),
    (2, 1, dict(stride=2)),
    (1, 5, dict(padding="same", dilation=2)),
    (1, 3, dict(padding=1, padding_mode="replicate", stride=2)),
    (1, 1, dict(stride=3, padding="valid")),  # pointwise: the products run as matrix products
]


def dense_conv(dims, kernel, kwargs, c_in=16, c_out=24, seed=0):
    torch.manual_seed(seed)
    return (nn.Conv1d if dims == 1 else nn.Conv2d)(c_in, c_out, kernel, **kwargs)


@pytest.mark.parametrize("dims,kernel,kwargs", CONFIGS)
@pytest.mark.parametrize("group", ["C8", "D4", "C2xC2xC2"])
@pytest.mark.parametrize("impl", ["dense", "grouped", "packed"])
def test_full_rank_reproduces_the_convolution(dims, kernel, kwargs, group, impl):
    conv = dense_conv(dims, kernel, kwargs)
    layer = GMChannelConv.from_dense(conv, group, rank=8, impl=impl)
    x = torch.randn(3, 16, *([10] * dims))
    torch.testing.assert_close(layer(x), conv(x), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(layer(x[0]), conv(x[0]), atol=2e-5, rtol=1e-4)  # unbatched
    torch.testing.assert_close(layer.to_dense()(x), conv(x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dims,kernel,kwargs", CONFIGS[:3] + CONFIGS[5:])
@pytest.mark.parametrize("rank,modulate", [(1, False), (2, True)])
def test_grouped_path_equals_dense_path_forward_and_gradients(dims, kernel, kwargs, rank, modulate):
    conv = dense_conv(dims, kernel, kwargs)
    paths = [GMChannelConv.from_dense(conv, "C8", rank, modulate, impl=impl) for impl in ("dense", "grouped")]
    x = torch.randn(2, 16, *([9] * dims))
    outs, grads = [], []
    for layer in paths:
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        outs.append(y)
        others = [p.grad for name, p in layer.named_parameters() if name not in ("kernels", "spectrum")]
        grads.append([xi.grad, kernel_grad(layer, layer._free().grad), *others])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_from_dense_is_the_projection_of_the_offset_folded_matrix():
    """W.reshape(C_out, c_in, N, K).permute(0, 1, 3, 2) flattened, projected by structure.project."""
    conv = dense_conv(2, 3, dict(padding=1))
    layer = GMChannelConv.from_dense(conv, "D4", rank=3)
    w = conv.weight.detach().double().numpy().reshape(24, 2, 8, 9).transpose(0, 1, 3, 2).reshape(24, -1)
    fit = project(w, "D4", rank=3)
    np.testing.assert_allclose(layer.kernels.detach().double().numpy(), fit.kernels, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.modulations.detach().double().numpy(), fit.modulations, rtol=1e-5, atol=1e-6)
    back = fit.dense().reshape(24, 2, 9, 8).transpose(0, 1, 3, 2).reshape(24, 16, 3, 3)
    np.testing.assert_allclose(layer.weight.detach().double().numpy(), back, rtol=1e-5, atol=1e-6)
    assert layer.fit_error == pytest.approx(fit.relative_error, rel=1e-6)


@pytest.mark.parametrize("impl", ["dense", "grouped", "packed"])
@pytest.mark.parametrize("group", ["C8", "D4"])
def test_exact_form_commutes_with_permuting_every_channel_fibre(impl, group):
    g = gm.group(group)
    conv = dense_conv(2, 3, dict(padding=1))
    layer = GMChannelConv.from_dense(conv, g, 1, modulate=False, bias="shared", impl=impl)
    x = torch.randn(2, 16, 7, 7)
    y = layer(x)
    for h in range(g.order):
        # (h . x)[i, g_j] = x[i, h^{-1} g_j]; inverse found by search, independent of the library's helpers
        h_inv = next(a for a in range(g.order) if g.table[h, a] == g.identity)
        perm = torch.tensor([g.table[h_inv, j] for j in range(g.order)])
        hx = x.view(2, 2, 8, 7, 7)[:, :, perm].reshape(x.shape)
        hy = y.view(2, 3, 8, 7, 7)[:, :, perm].reshape(y.shape)
        torch.testing.assert_close(layer(hx), hy, atol=1e-5, rtol=1e-4)
    assert layer.check_equivariance() < 1e-5


def test_activation_aware_fit_lowers_the_output_error_on_its_calibration_patches():
    conv = dense_conv(2, 3, dict(padding=1))
    torch.manual_seed(1)
    # channels near a 4-dim subspace (not exactly in it: float32 calibration statistics resolve output errors
    # down to about 1e-3 of the output, and an exactly degenerate covariance would ask for less)
    x = torch.einsum("ck,bkhw->bchw", torch.randn(16, 4), torch.randn(64, 4, 6, 6)) + 0.03 * torch.randn(64, 16, 6, 6)
    from gmcompress.planning.handlers import handler_for

    rows = handler_for(conv).calibration_rows(conv, x)
    plain = GMChannelConv.from_dense(conv, "C8", rank=2)
    aware = GMChannelConv.from_dense(conv, "C8", rank=2, inputs=rows, damping=0.0)
    with torch.no_grad():
        ref = conv(x) - conv.bias.view(-1, 1, 1)
        err = [float((layer(x) - conv(x)).norm() / ref.norm()) for layer in (plain, aware)]
    assert err[1] < 0.5 * err[0]
    assert aware.output_error == pytest.approx(err[1], rel=1e-3)


def test_padded_channels_and_config_round_trip(tmp_path):
    conv = dense_conv(2, 3, dict(padding=1, stride=2), c_in=12, c_out=20)
    layer = GMChannelConv.from_dense(conv, "C8", rank=8, pad=True)
    x = torch.randn(2, 12, 9, 9)
    torch.testing.assert_close(layer(x), conv(x), atol=2e-5, rtol=1e-4)
    again = GMChannelConv.from_config(layer.config())
    again.load_state_dict(layer.state_dict())
    assert torch.equal(again(x), layer(x))


def test_compress_replaces_every_groups1_conv_and_reports_it():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv1d(8, 16, 5, padding=2), nn.ReLU(), nn.Conv1d(16, 16, 3, groups=16), nn.ReLU(), nn.Conv1d(16, 8, 1)
    )
    out = gm.compress(net, group="C4", rank=4, progress=False)
    rows = {r.name: r for r in out.gm_report.layers}
    assert rows["0"].form == rows["4"].form == "GMChannelConv"
    assert "depthwise" in rows["2"].reason
    x = torch.randn(2, 8, 20)
    torch.testing.assert_close(out(x), net(x), atol=1e-4, rtol=1e-4)  # rank N = exact


@pytest.mark.parametrize("impl", ["dense", "grouped", "packed"])
def test_gradcheck_float64(impl):
    torch.manual_seed(0)
    layer = GMChannelConv(8, 8, 3, "C4", rank=2, padding=1, stride=2, impl=impl, dtype=torch.float64)
    x = torch.randn(1, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, *p: layer(v), (x, *layer.parameters()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", ["dense", "grouped"])
def test_low_precision_matches_fp32(dtype, impl):
    conv = dense_conv(2, 3, dict(padding=1))
    layer = GMChannelConv.from_dense(conv, "C8", rank=2, impl=impl).eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        reference = layer(x)
        low = layer.to(dtype)(x.to(dtype)).float()
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - reference).norm() / reference.norm() < 2e-2


@pytest.mark.parametrize("group", ["C8", "D4"])
@pytest.mark.parametrize("rank,modulate,bias", [(1, False, True), (2, True, "shared"), (3, True, False)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kernel", [3, 1])
@pytest.mark.parametrize("impl", ["grouped", "packed"])
def test_grouped_path_in_both_memory_formats(group, rank, modulate, bias, layout, kernel, impl, monkeypatch):
    """The grouped path works in the input's memory format (and returns it): forward and gradients while
    training, and the inference path (cached weights, outputs written in place) against the dense path.
    Kernel 1: the pointwise products (matrix products on the strided pixels, image by image in inference).
    "packed" (C8): each 2x2 block one product of width two instead of Gauss's three of width one."""
    torch.manual_seed(0)
    kwargs = dict(stride=2, padding=kernel // 2, bias=bias)
    dense = GMChannelConv(16, 24, kernel, group, rank, modulate, impl="dense", **kwargs)
    with torch.no_grad():
        if dense.modulations is not None:
            dense.modulations.normal_()
    grouped = GMChannelConv(16, 24, kernel, group, rank, modulate, impl=impl, **kwargs)
    grouped.load_state_dict(dense.state_dict())
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(3, 16, 9, 11).contiguous(memory_format=fmt)
    outs, grads = [], []
    for layer in (dense, grouped):
        xi = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        y = layer(xi)
        (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        outs.append(y)
        others = [p.grad for name, p in layer.named_parameters() if name not in ("kernels", "spectrum")]
        grads.append([xi.grad, kernel_grad(layer, layer._free().grad), *others])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-4)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert outs[1].is_contiguous(memory_format=fmt)
    with torch.inference_mode():
        grouped.eval(), dense.eval()
        for chunk in (None, 1):  # the second call is served from the cache; then image by image
            if chunk:
                monkeypatch.setattr(gm.nn.functional, "CHUNK_BYTES", chunk)
            y = grouped(x)
            torch.testing.assert_close(y, dense(x), atol=1e-5, rtol=1e-4)
            assert y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("kernel", [3, 1])
def test_switching_paths_on_one_layer_converts_its_stored_kernels(kernel):
    """Path timing switches ``impl`` on one eval layer, also under inference_mode: each switch converts the stored
    kernels (spectrum on the block paths) and keeps the function; the parameters stay ordinary tensors, so the
    layer trains afterwards."""
    torch.manual_seed(0)
    layer = GMChannelConv(16, 24, kernel, "C8", rank=2, padding=kernel // 2).eval()
    x = torch.randn(2, 16, 6, 6)
    with torch.inference_mode():
        layer.impl = "dense"
        want = layer(x)
        for impl in ("grouped", "packed", "dense", "packed", "grouped"):
            layer.impl = impl
            assert layer.stored_form == ("kernels" if impl == "dense" else "spectrum")
            torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-4)
    assert not any(p.is_inference() for p in layer.parameters())
    layer.train()(x).sum().backward()
    assert layer.spectrum.grad is not None


@pytest.mark.parametrize("impl", ["grouped", "packed"])
@pytest.mark.parametrize("grad", [False, True])
def test_empty_batch_gives_an_empty_output_like_the_convolution(impl, grad):
    layer = GMChannelConv(16, 24, 3, "C8", padding=1, bias="shared", impl=impl).eval()
    x = torch.randn(0, 16, 5, 5)
    with torch.set_grad_enabled(grad):
        assert layer(x).shape == layer.to_dense()(x).shape == (0, 24, 5, 5)


def test_a_path_set_after_construction_is_checked():
    """ "packed" on a group without Gauss's form runs the grouped path (the same products); a path
    the layer does not have is an error naming the choices, not a silent fallback."""
    layer = GMChannelConv(16, 16, 1, "D4").eval()
    layer.impl = "packed"
    assert layer.resolved_impl() == "grouped"
    x = torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(layer(x), layer.to_dense()(x), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="no path 'blocks'.*'grouped'"):
        layer.impl = "blocks"
    assert layer.impl == "packed"


def test_outputs_are_contiguous_where_the_convolutions_are():
    """A Conv1d on a transposed (B, L, C) input and an unbatched Conv2d on a permuted (H, W, C) input: nn.Conv
    returns contiguous tensors there, so must the grouped path (``.view`` on the output must work)."""
    conv1 = GMChannelConv(16, 24, 3, "C8", padding=1, dims=1, impl="grouped")
    x1 = torch.randn(2, 7, 16).transpose(1, 2)
    conv2 = GMChannelConv(16, 24, 3, "C8", padding=1, impl="grouped")
    x2 = torch.randn(6, 7, 16).permute(2, 0, 1)
    for layer, x in ((conv1, x1), (conv2, x2)):
        y = layer(x)
        assert y.is_contiguous()
        torch.testing.assert_close(y, layer.to_dense()(x), atol=1e-5, rtol=1e-4)
