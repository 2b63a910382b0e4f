"""Every compressed zoo and benchmark model compiles to one graph (``fullgraph=True``: a graph break raises) and
is not recompiled between calls, in eval and in train mode; the compiled outputs equal the eager ones."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

import gmcompress as gm

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def _cnns():
    spec = importlib.util.spec_from_file_location("cnns", BENCHMARKS / "cnns.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compiles_once_per_mode(model: nn.Module, x: torch.Tensor) -> None:
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for mode in ("eval", "train"):
        model.train(mode == "train")
        torch.manual_seed(0)  # dropout draws the same mask in both runs
        eager = model(x)
        torch.manual_seed(0)
        out = compiled(x)
        frames = counter.frame_count
        assert frames >= 1
        torch.manual_seed(0)
        again = compiled(x)
        assert counter.frame_count == frames, f"{mode}: the second call recompiled"
        torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(again, eager, rtol=1e-4, atol=1e-5)
    model.eval()


def test_compressed_mnistnet_compiles_to_one_graph(mnist):
    net, (_, _, x_test, _) = mnist
    x = x_test[:8]
    _compiles_once_per_mode(gm.compress(net, group="C8", progress=False), x)
    _compiles_once_per_mode(gm.compress(net, recipe="recipes/mnistnet.yaml", progress=False), x)


@pytest.mark.parametrize("build", ["mobilenet_v2", "resnet18"])
def test_compressed_benchmark_cnns_compile_to_one_graph(build):
    torch.manual_seed(0)
    net = getattr(_cnns(), build)().eval()
    small = gm.compress(net, group="C8", progress=False)
    assert small.gm_report.compressed
    _compiles_once_per_mode(small, torch.randn(2, 3, 64, 64))


def test_compressed_wide_mlp_on_every_path_compiles_to_one_graph():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).eval()
    small = gm.compress(mlp, group="C16", progress=False)
    layers = [m for m in small.modules() if isinstance(m, gm.nn.GMLinear)]
    assert len(layers) == 2
    for impl in ("dense", "blocks", "packed", "fft"):
        for layer in layers:
            layer.impl = impl  # converts the stored form
        _compiles_once_per_mode(small, torch.randn(4, 256))
