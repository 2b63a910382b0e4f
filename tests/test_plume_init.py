"""GMConv2d's initialisation: a shared bias starts at 0, so deep p4 stacks never start with a dead layer."""

from __future__ import annotations

import sys
from pathlib import Path

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
