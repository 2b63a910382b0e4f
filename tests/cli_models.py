"""Tiny model factories for the CLI tests (imported as ``cli_models:...``)."""

import torch
from torch import nn

from gmcompress.zoo import DemoModel


def build_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def example_inputs() -> torch.Tensor:
    return torch.randn(4, 16, generator=torch.Generator().manual_seed(1))


def train_data() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(2)
    return torch.utils.data.TensorDataset(torch.randn(64, 16, generator=g), torch.randint(0, 8, (64,), generator=g))


def neg_mse(model: nn.Module, reference: nn.Module) -> dict:
    x = example_inputs()
    with torch.no_grad():
        return {"neg_mse": -float((model(x) - reference(x)).pow(2).mean())}


def broken() -> nn.Module:
    raise RuntimeError("no weights here")


mlp = DemoModel(build=build_mlp, example_inputs=example_inputs, train_data=train_data, evaluate=neg_mse)


def narrow_inputs() -> torch.Tensor:
    """Calibration rows that vary in 3 of the 16 features only (an activation-aware fit ignores the other 13)."""
    x = torch.zeros(256, 16)
    x[:, :3] = torch.randn(256, 3, generator=torch.Generator().manual_seed(3))
    return x
