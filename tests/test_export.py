"""Compressed models deploy: torch.export and ONNX (run in onnxruntime) give the same outputs."""

import re
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


def onnx_session(path):
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(str(path))


def legacy_export(model, x, path):
    """The TorchScript-based exporter with a dynamic batch. A compressed model is a GraphModule, whose ``graph``
    torch's check of ``dynamic_axes`` takes for a TorchScript graph when input or output names are missing
    (AttributeError: 'Graph' object has no attribute 'outputs'): both are named."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )  # fmt: skip


def dynamo_export(model, x, path):
    pytest.importorskip("onnxscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), dynamo=True).save(str(path))


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
    """``torch.jit.trace`` runs the model twice and compares the graphs: every run must record the same graph (the
    weights derived from the parameters each time), and the trace must see later edits of the parameters."""
    small = gm.compress(build(), group="C8", rank=2, progress=False).eval()
    with torch.no_grad():
        small(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch 2.13 deprecates torch.jit.trace
            traced = torch.jit.trace(small, x)
        torch.testing.assert_close(traced(x), small(x), **TOLERANCE)
        # the trace recomputes the weights from the parameters it shares with the model: later edits are seen
        next(m for m in small.modules() if isinstance(m, gm.nn.GMLayer))._free().mul_(2)  # the stored kernels
        torch.testing.assert_close(traced(x), small(x), **TOLERANCE)


@pytest.mark.parametrize(
    "build,x,kwargs",
    [
        (mlp, torch.randn(4, 64), dict(group="C8", rank=2)),
        (cnn, torch.randn(2, 8, 8, 8), dict(group="C8", rank=1)),
        (cnn, torch.randn(2, 8, 8, 8), dict(group="D4", rank=2, conv_group="C4")),
    ],
)
def test_legacy_onnx_export_with_a_dynamic_batch(build, x, kwargs, tmp_path):
    small = gm.compress(build(), progress=False, **kwargs).eval()
    legacy_export(small, x, tmp_path / "m.onnx")
    session = onnx_session(tmp_path / "m.onnx")
    for batch in (x, torch.randn(5, *x.shape[1:])):  # the traced batch and another
        with torch.no_grad():
            expected = small(batch)
        torch.testing.assert_close(torch.from_numpy(session.run(None, {"x": batch.numpy()})[0]), expected, **TOLERANCE)


@pytest.mark.parametrize("export", [legacy_export, dynamo_export])
def test_onnx_export_of_the_fft_path_names_the_layer_and_the_way_out(export, tmp_path):
    small = gm.compress(mlp(), group="C8", rank=2, progress=False).eval()
    layer = getattr(small, "2")
    layer.impl = "fft"
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = small(x)
    message = (
        "GMLinear(in_features=128, out_features=32, group=C8, pattern=C8, rank=2, modulate=True, compression=3.8x, "
        "impl=fft, bias=True) runs its 'fft' path, which torch.onnx cannot export (neither its rfftn nor its complex "
        "bmm): set this layer's impl to 'blocks' (the same outputs up to rounding) or 'dense' before exporting, "
        "e.g. layer.impl = 'blocks'"
    )
    with pytest.raises(RuntimeError, match=re.escape(message)):
        export(small, x, tmp_path / "fft.onnx")
    layer.impl = "blocks"
    export(small, x, tmp_path / "blocks.onnx")
    session = onnx_session(tmp_path / "blocks.onnx")
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), expected, **TOLERANCE)
    layer.impl = "fft"  # only ONNX refuses the fft path: torch.export (strict or not) records it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for strict in (False, True):
            program = torch.export.export(small, (x,), strict=strict)
            assert any("fft" in str(node.target) for node in program.graph.nodes)
            torch.testing.assert_close(program.module()(x), expected, **TOLERANCE)
