"""Every dense layer is seen: inside torch.nn containers, inside layer subclasses with their own forward, with tall
kernels; and compress gives every module back the train/eval flag it had."""

import torch
from torch import nn

import gmcompress as gm


def training_flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


# ---------------------------------------------------------------------------------------------- tall kernels
class Pitch(nn.Module):
    """Convolutions over a 1-D signal with kernels longer than 7 (a pitch tracker like CREPE), dilated too."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(4, 16, (64, 1), stride=(4, 1), padding=(32, 0))
        self.conv2 = nn.Conv2d(16, 16, (16, 1), padding=(8, 0))
        self.conv3 = nn.Conv2d(16, 16, (3, 1), dilation=(6, 1))
        self.conv4 = nn.Conv1d(16, 8, 9, dilation=2, padding="same")

    def forward(self, x):
        y = torch.relu(self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x))))))
        return self.conv4(y.squeeze(-1))


def test_tall_and_dilated_kernels_are_probed_with_an_input_they_accept():
    """The equivariance probe was 7 long on every axis: compress raised "Kernel size: (64 x 1)"."""
    model = Pitch().eval()
    out = gm.compress(model, group="C4", rank=1, modulate=False, progress=False)
    rows = out.gm_report.layers
    assert [r.name for r in rows if r.status == "compressed"] == ["conv1", "conv2", "conv3", "conv4"]
    for row in rows:
        assert row.equivariance_error is not None and row.equivariance_error < 1e-5, row.name  # exact layers
        layer = out.get_submodule(row.name)
        assert layer.check_equivariance(bias=False) < 1e-5  # the default probe
    modulated = gm.compress(model, group="C4", rank=2, progress=False)
    assert all(r.equivariance_error is not None for r in modulated.gm_report.layers)
