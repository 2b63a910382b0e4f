"""Compressed models deploy: torch.export and ONNX (run in onnxruntime) give the same outputs."""

import warnings

import pytest
import torch
from torch import nn

import gmcompress as gm

TOLERANCE = dict(atol=1e-5, rtol=1e-4)  # fp32; the graphs compute the same ops in another order at most


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1, padding_mode="reflect"),
        nn.ReLU(), nn.Conv2d(16, 8, 1), nn.Flatten(), nn.Linear(8 * 4 * 4, 16),
    )  # fmt: skip


def onnx_run(model, x, path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), dynamo=True).save(str(path))
    session = ort.InferenceSession(str(path))
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize(
    "build,x,kwargs",
    [
        (mlp, torch.randn(4, 64), dict(group="C8", rank=2)),
        (cnn, torch.randn(2, 8, 8, 8), dict(group="C8", rank=1)),
        (cnn, torch.randn(2, 8, 8, 8), dict(group="D4", rank=2)),
    ],
)
def test_torch_export_and_onnx_round_trip(build, x, kwargs, tmp_path):
    small = gm.compress(build(), progress=False, **kwargs).eval()
    assert any(isinstance(m, gm.nn.GMLayer) for m in small.modules())
    with torch.no_grad():
        expected = small(x)
    program = torch.export.export(small, (x,))
    torch.testing.assert_close(program.module()(x), expected, **TOLERANCE)
    torch.testing.assert_close(onnx_run(small, x, tmp_path / "m.onnx"), expected, **TOLERANCE)


@pytest.mark.slow
def test_mnistnet_exports(tmp_path, mnist):
    net, (_, _, x_te, _) = mnist
    small = gm.compress(net, group="C8", progress=False).eval()
    x = x_te[:8]
    with torch.no_grad():
        expected = small(x)
    torch.testing.assert_close(torch.export.export(small, (x,)).module()(x), expected, **TOLERANCE)
    torch.testing.assert_close(onnx_run(small, x, tmp_path / "mnist.onnx"), expected, **TOLERANCE)


@pytest.mark.parametrize("build,x", [(mlp, torch.randn(4, 64)), (cnn, torch.randn(2, 8, 8, 8))])
def test_torch_jit_trace_passes_its_checks_and_matches_eager(build, x):
    """``torch.jit.trace`` runs the model twice and compares the graphs: a layer serving its cache on the second
    run (after materialising its weights on the first) would record two different graphs and fail the check."""
    small = gm.compress(build(), group="C8", rank=2, progress=False).eval()
    with torch.no_grad():
        small(x)  # the eval caches are filled, as in a deployed model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch 2.13 deprecates torch.jit.trace
            traced = torch.jit.trace(small, x)
        torch.testing.assert_close(traced(x), small(x), **TOLERANCE)
        # the trace recomputes the weights from the parameters it shares with the model: later edits are seen
        next(m for m in small.modules() if isinstance(m, gm.nn.GMLayer)).kernels.mul_(2)
        torch.testing.assert_close(traced(x), small(x), **TOLERANCE)
