"""The smoke-plume baselines (benchmarks/plume_baselines.py): RPP and RGroup layers, and plume models built on them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from gmcompress.nn import GMConv2d

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from plume_baselines import RGroupConv2d, RPPConv2d  # noqa: E402


def turn(x: torch.Tensor) -> torch.Tensor:
    """A quarter turn of a C4-regular feature map, by hand: rot90 of the image, fibre shift new[h] = old[h - 1]."""
    b, c, n, m = x.shape
    out = torch.rot90(x, 1, dims=(-2, -1)).reshape(b, c // 4, 4, n, m)
    return out[:, :, [3, 0, 1, 2]].reshape(b, c, n, m)


@torch.no_grad()
def relative_turn_error(layer: torch.nn.Module, x: torch.Tensor) -> float:
    return float((layer(turn(x)) - turn(layer(x))).norm() / layer(x).norm())


def exact_weight(kernels: torch.Tensor, modulate: bool = False) -> torch.Tensor:
    """The dense 3x3 weight of an exact p4 GMConv2d (8 -> 12 channels) with these kernels."""
    exact = GMConv2d(8, 12, 3, "C4", kernels.shape[0], modulate, padding=1, bias=False, dtype=kernels.dtype)
    with torch.no_grad():
        exact.kernels.copy_(kernels)
    return exact.to_dense().weight


def dense_twin(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of the one plain 3x3 convolution each baseline layer is, built from its parts: RPP the
    exact path's dense weight plus the residual's; RGroup each bank's exact weight scaled by w_l(g) on output
    channel c * 4 + g, summed."""
    if isinstance(layer, RPPConv2d):
        exact = layer.exact.to_dense()
        return exact.weight + layer.residual.weight, exact.bias
    weight = 0
    for bank, w in enumerate(layer.relaxed_weights):
        weight = weight + w.repeat(3)[:, None, None, None] * exact_weight(layer.tied.kernels[bank : bank + 1])
    return weight, layer.tied.bias.repeat_interleave(4)


@pytest.mark.parametrize("layer", [RPPConv2d(8, 12), RGroupConv2d(8, 12, banks=3)], ids=["rpp", "rgroup"])
def test_outputs_equal_the_plain_convolution_of_the_layers_parts(layer):
    """On a non-square map (11 x 9, zero padding keeps the size) with a non-zero bias and, for RGroup, relaxed
    weights away from 1: the layer's output is the dense convolution its parts add up to."""
    torch.manual_seed(0)
    layer = layer.double()
    with torch.no_grad():
        (layer.exact.bias if isinstance(layer, RPPConv2d) else layer.tied.bias).normal_()
        if isinstance(layer, RGroupConv2d):
            layer.relaxed_weights.normal_()
    x = torch.randn(2, 8, 11, 9, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        weight, bias = dense_twin(layer)
        assert y.shape == (2, 12, 11, 9)
        torch.testing.assert_close(y, torch.nn.functional.conv2d(x, weight, bias, padding=1))


def test_rpp_exact_path_is_equivariant_and_the_residual_is_not():
    torch.manual_seed(0)
    layer = RPPConv2d(8, 8).double()
    with torch.no_grad():
        layer.exact.bias.normal_()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    assert relative_turn_error(layer.exact, x) < 1e-12  # the image really turned, fibres shifted
    assert relative_turn_error(layer, x) > 1e-3  # the residual pathway breaks the symmetry ...
    with torch.no_grad():
        layer.residual.weight.zero_()
    assert relative_turn_error(layer, x) < 1e-12  # ... and only it
    torch.testing.assert_close(layer(x), layer.exact(x))


def test_rpp_residual_starts_small_and_carries_the_stronger_prior():
    torch.manual_seed(0)
    layer = RPPConv2d(8, 8, residual_init=0.1)
    plain = torch.nn.Conv2d(8, 8, 3).weight
    assert layer.residual.weight.abs().max() <= 0.1 * plain.abs().max() * 1.5
    groups = layer.param_groups(0.01, 10.0)
    seen = [p for g in groups for p in g["params"]]
    assert len(seen) == len(list(layer.parameters())) and {id(p) for p in seen} == {id(p) for p in layer.parameters()}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(layer.residual.weight)] == 10.0
    assert decay[id(layer.exact.kernels)] == 0.01


def test_rgroup_is_the_relaxed_sum_of_exact_group_convolutions():
    """Psi(g, h) = sum_l w_l(g) psi_l(g^-1 h): output orientation g of bank l's exact convolution, scaled by w_l(g)."""
    torch.manual_seed(0)
    layer = RGroupConv2d(8, 12, banks=2).double()
    with torch.no_grad():
        layer.relaxed_weights.copy_(torch.randn(2, 4))
        layer.tied.bias.normal_()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    expected = 0
    for bank in range(2):
        exact = GMConv2d(8, 12, 3, "C4", 1, False, padding=1, bias=False, dtype=torch.float64)
        with torch.no_grad():
            exact.kernels.copy_(layer.tied.kernels[bank : bank + 1])
        w = layer.relaxed_weights[bank].repeat(3)  # channel c * 4 + g gets w_l(g)
        expected = expected + w[None, :, None, None] * exact(x)
    expected = expected + layer.tied.bias.repeat_interleave(4)[None, :, None, None]
    torch.testing.assert_close(layer(x), expected)


def test_rgroup_starts_equivariant_and_relaxes():
    torch.manual_seed(0)
    layer = RGroupConv2d(8, 8, banks=2).double()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    assert relative_turn_error(layer, x) < 1e-12  # relaxed weights all 1: an exact group convolution
    with torch.no_grad():
        layer.relaxed_weights[0, 1] = 2.0
    assert relative_turn_error(layer, x) > 1e-3
    assert sum(p.numel() for p in layer.parameters()) == 2 * 2 * 2 * 36 + 2 + 2 * 4  # banks, bias, relaxed weights


@pytest.mark.parametrize("kind", ["rpp", "rgroup"])
def test_plume_models_are_equivariant_when_their_relaxation_is_off(kind):
    """The whole plume model turns with its input (velocity fields) once the residual / relaxed weights are neutral."""
    import plume

    torch.manual_seed(0)
    model = plume.P4CNN(history=2, width=2, rank=2 if kind == "rgroup" else 1, kind=kind)
    for conv in model.convs:
        with torch.no_grad():
            if kind == "rpp":
                conv.residual.weight.zero_()
    assert plume.equivariance_error(model, 2) < 1e-5
    with torch.no_grad():
        for conv in model.convs:
            if kind == "rpp":
                conv.residual.weight.normal_()
            else:
                conv.relaxed_weights.normal_()
    assert plume.equivariance_error(model, 2) > 1e-3
