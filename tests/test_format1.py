"""A file saved in format 1 (gmcompress 0.1.0) loads: its 1x1 convolutions, stored as a GMLinear per pixel
(``GMPointwiseConv``, parameters under ``.linear.``), become :class:`GMChannelConv` layers of the dimension the
model gives, with the same tensors and the same outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import gmcompress as gm
from gmcompress.nn import GMChannelConv, GMLinear

DATA = Path(__file__).parent / "data"


class Format1Net(nn.Module):
    """The architecture of tests/data/model_format1.pt: a 1x1 Conv2d, a 1x1 Conv1d and a Linear.

    The file was written by gmcompress 0.1.0: ``torch.manual_seed(0)``, ``gm.compress(Format1Net().eval(),
    group="C8", rank=2)``, ``gm.save``; model_format1_io.pt holds ``torch.randn(5, 8, 4, 4)`` and that model's
    output on it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(8, 16, 1)
        self.conv1d = nn.Conv1d(16, 16, 1)
        self.fc = nn.Linear(256, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2d(x)).flatten(2)
        x = torch.relu(self.conv1d(x)).flatten(1)
        return self.fc(x)


@pytest.fixture(scope="module")
def saved() -> dict:
    return torch.load(DATA / "model_format1.pt", weights_only=True)


@pytest.fixture(scope="module")
def io_pair() -> dict:
    return torch.load(DATA / "model_format1_io.pt", weights_only=True)


def format1_linear(saved: dict, name: str) -> GMLinear:
    """The GMLinear that format 1 ran at every pixel of the 1x1 conv ``name``, built from the file's own config and
    tensors (independent of the upgrade)."""
    config = saved["manifest"]["layers"][name]["config"]["linear"]
    linear = GMLinear.from_config(config)
    prefix = f"{name}.linear."
    linear.load_state_dict({k.removeprefix(prefix): v for k, v in saved["state_dict"].items() if k.startswith(prefix)})
    return linear


def test_the_committed_file_is_format_1(saved: dict) -> None:
    meta = saved["manifest"]
    assert meta["format"] == "gmcompress/1" and meta["gmcompress_version"] == "0.1.0"
    assert {n: e["kind"] for n, e in meta["layers"].items()} == {
        "conv2d": "GMPointwiseConv", "conv1d": "GMPointwiseConv", "fc": "GMLinear",
    }  # fmt: skip
    assert "conv2d.linear.kernels" in saved["state_dict"] and "conv1d.linear.bias" in saved["state_dict"]


def test_a_format1_file_loads_with_its_tensors_bit_for_bit(saved: dict) -> None:
    model = gm.load(DATA / "model_format1.pt", Format1Net()).eval()
    assert [(type(model.conv2d), model.conv2d.dims), (type(model.conv1d), model.conv1d.dims)] == [
        (GMChannelConv, 2), (GMChannelConv, 1),
    ]  # fmt: skip
    assert model.conv2d.kernel_size == (1, 1) and model.conv1d.kernel_size == (1,)
    assert isinstance(model.fc, GMLinear)
    state = model.state_dict()
    expected = {k.replace(".linear.", "."): v for k, v in saved["state_dict"].items()}
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], v) for k, v in expected.items())


def test_a_format1_conv_is_the_linear_it_stored_at_every_pixel(saved: dict) -> None:
    """Each loaded 1x1 conv's weight is, bit for bit, the matrix of the GMLinear format 1 applied per pixel."""
    model = gm.load(DATA / "model_format1.pt", Format1Net()).eval()
    for name in ("conv2d", "conv1d"):
        conv, linear = getattr(model, name), format1_linear(saved, name)
        with torch.no_grad():
            weight = conv.weight
            assert torch.equal(weight.reshape(weight.shape[:2]), linear.weight)
            assert torch.equal(conv.bias, linear.bias)


def test_a_format1_file_gives_the_saved_outputs_and_saves_again_bit_for_bit(io_pair: dict, tmp_path: Path) -> None:
    """Against the output format 1 computed, to float rounding: format 1 ran each 1x1 conv as a GMLinear per pixel,
    this version as a convolution, and the sums are ordered differently (measured: 2.4e-8 at most). Saved again in
    today's format, bit for bit."""
    x = io_pair["input"]
    model = gm.load(DATA / "model_format1.pt", Format1Net()).eval()
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(y, io_pair["output"], atol=1e-6, rtol=1e-6)
    gm.save(model, tmp_path / "again.pt")
    assert torch.load(tmp_path / "again.pt", weights_only=True)["manifest"]["format"] == gm.io.FORMAT
    again = gm.load(tmp_path / "again.pt", Format1Net()).eval()
    with torch.no_grad():
        assert torch.equal(again(x), y)
