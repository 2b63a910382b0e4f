"""The graph pass: functional layers on a module's own parameters are found, compressed and saved."""

import torch
import torch.nn.functional as F
from torch import nn

import gmcompress as gm


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(16, 16) / 4)
        self.b = nn.Parameter(torch.randn(16))
        self.head = nn.Module()
        self.head.w = nn.Parameter(torch.randn(8, 16) / 4)
        self.cw = nn.Parameter(torch.randn(16, 8, 3, 3) / 8)
        self.shared = nn.Parameter(torch.randn(16, 16))

    def forward(self, x, y):
        a = F.linear(torch.relu(F.linear(x, self.w, self.b)), self.head.w)
        c = F.conv2d(y, self.cw, padding=1, stride=2)
        return a, c, F.linear(x, self.shared) + F.linear(x, self.shared)  # used twice: stays as it is


def test_functional_layers_are_lifted_compressed_and_round_trip(tmp_path):
    model = Functional()
    x, y = torch.randn(4, 16), torch.randn(2, 8, 9, 9)
    out = gm.compress(model, group="C8", rank=8, progress=False)  # full rank: the same function
    rows = {r.name: r for r in out.gm_report.layers}
    assert {n: r.form for n, r in rows.items()} == {
        "w_linear": "GMLinear",
        "head_w_linear": "GMLinear",
        "cw_conv2d": "GMChannelConv",
    }
    for a, b in zip(out(x, y), model(x, y)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    names = {n for n, _ in out.named_parameters()}
    assert "w" not in names and "cw" not in names and "shared" in names  # no dense copy left behind
    assert [n for n, _ in model.named_parameters()] == ["w", "b", "cw", "shared", "head.w"]  # user's model intact
    gm.save(out, tmp_path / "f.pt")
    again = gm.load(tmp_path / "f.pt", Functional())
    for a, b in zip(again(x, y), out(x, y)):
        assert torch.equal(a, b)


class Annotated(nn.Module):
    """A forward annotated as a module under ``from __future__ import annotations`` writes it: the annotations are
    strings."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        return self.fc2(torch.relu(self.fc1(x)))


def test_a_compressed_model_with_string_annotations_saves_whole_with_torch_save(tmp_path):
    """torch.fx keeps string annotations as generated globals that torch.save of the GraphModule cannot write
    (MobileNetV2 from gmcompress.zoo failed so); the graph pass drops them, and the saved model computes the same."""
    out = gm.compress(Annotated(), group="C8", rank=2, progress=False)
    assert isinstance(out, torch.fx.GraphModule)
    torch.save(out, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    x = torch.randn(4, 16)
    assert torch.equal(loaded(x), out(x))
