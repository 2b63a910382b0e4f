"""GMConv2d's initialisation: a shared bias starts at 0, so deep p4 stacks never start with a dead layer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from gmcompress.nn import GMConv2d

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def test_shared_bias_starts_at_zero_and_a_per_feature_bias_as_nn_conv2d():
    torch.manual_seed(0)
    shared = GMConv2d(8, 8, 3, "C4", bias="shared")
    assert torch.equal(shared.bias, torch.zeros(2))
    plain = GMConv2d(8, 8, 3, "C4", bias=True)
    bound = 1 / (8 * 9) ** 0.5
    assert plain.bias.abs().max() <= bound and plain.bias.abs().max() > bound / 10


def test_no_p4_plume_model_starts_with_a_dead_hidden_layer():
    """With the old uniform shared bias, about 1 in 15 of these models had a hidden layer off everywhere."""
    import plume

    v = 0.17 * torch.randn(8, 4, 24, 24, 2, generator=torch.Generator().manual_seed(0))
    for seed in range(100):
        model = plume.build_p4(4, 2, 4, seed, uniform_bias=False)
        assert min(plume.live_fractions(model, v)) > 0, f"seed {seed}: a hidden layer is dead at initialisation"


def test_input_scale_is_a_change_of_units_and_keeps_equivariance():
    """``scale`` divides the history and multiplies the predicted change: model_s(v) = s model_1(v / s)."""
    import plume

    v = 0.2 * torch.randn(2, 3, 12, 12, 2, generator=torch.Generator().manual_seed(1))
    for family in ("CNN", "p4 exact", "p4 relaxed r2"):
        torch.manual_seed(0)
        unit = plume.build(family, 2, 3)
        scaled = plume.build(family, 2, 3, scale=0.25)
        scaled.load_state_dict(unit.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(scaled(v), 0.25 * unit(v / 0.25))
    exact = plume.build("p4 exact", 2, 3, scale=0.25)
    assert plume.equivariance_error(exact, 3) < 1e-5


def test_warm_up_is_a_fraction_of_the_steps(monkeypatch):
    """The learning rate rises linearly over the first ``warmup`` of the steps (25% by default), then decays."""
    import plume

    torch.manual_seed(0)
    model = plume.build("p4 exact", 1, 2)
    x, y = torch.randn(32, 2, 8, 8, 2), torch.randn(32, 8, 8, 2)  # 2 steps per epoch, 8 epochs: 16 steps
    seen = []
    step = torch.optim.AdamW.step

    def record(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    plume.train(model, (x, y), epochs=8, seed=0)
    assert plume.WARMUP == 0.25
    warm = int(0.25 * 16)
    assert seen[:warm] == pytest.approx([plume.LR * (s + 1) / warm for s in range(warm)])
    assert max(seen) == pytest.approx(plume.LR) and seen[-1] < seen[warm]
