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
    seen, betas = [], set()
    step = torch.optim.AdamW.step

    def record(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        betas.update(g["betas"] for g in self.param_groups)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    plume.train(model, (x, y), epochs=8, seed=0)
    assert plume.WARMUP == 0.25
    warm = int(0.25 * 16)
    assert seen[:warm] == pytest.approx([plume.LR * (s + 1) / warm for s in range(warm)])
    assert max(seen) == pytest.approx(plume.LR) and seen[-1] < seen[warm]
    assert betas == {(0.9, 0.99)}  # beta2 0.999 let loss spikes kill ReLU channels (plume.ADAM_BETAS)


def _hidden_pre_activations(model, v: torch.Tensor) -> list[torch.Tensor]:
    """The hidden layers' pre-activations, computed by running the layers by hand (not through hooks)."""
    import plume

    if isinstance(model, plume.PlainCNN):
        h = plume.to_channels(v / model.scale)
    else:
        h = plume.encode_regular(v / model.scale)
    out = []
    for conv in model.convs[:-1]:
        h = conv(h)
        out.append(h)
        h = torch.relu(h)
    return out


def by_hand_peaks(pre_activations: list[torch.Tensor]) -> list[torch.Tensor]:
    return [pre.amax(dim=(0, 2, 3)) for pre in pre_activations]


@pytest.mark.parametrize("family", ["CNN", "p4 exact", "p4 relaxed r2"])
def test_dead_channels_are_the_channels_off_on_every_input(family):
    """``hidden_peaks`` finds exactly the channels whose ReLU never fires: one killed by hand per hidden layer."""
    import plume

    torch.manual_seed(0)
    model = plume.build(family, 4 if family == "CNN" else 2, 3)  # 4 or 8 channels
    v = 0.1 * torch.randn(5, 3, 10, 10, 2, generator=torch.Generator().manual_seed(2))
    killed = []
    with torch.no_grad():
        for i, conv in enumerate(model.convs[:-1]):
            channel = i + 1
            if isinstance(conv, GMConv2d):  # a shared bias: one value per fibre of 4 channels
                conv.bias[channel // 4] = -100.0
                killed.append(set(range(4 * (channel // 4), 4 * (channel // 4) + 4)))
            else:
                conv.bias[channel] = -100.0
                killed.append({channel})
                if i == 0:  # a channel at exactly 0 everywhere is off too (ReLU'(0) = 0 in PyTorch)
                    conv.weight[0].zero_()
                    conv.bias[0] = 0.0
                    killed[-1].add(0)
        by_hand = _hidden_pre_activations(model, v)
    peaks = plume.hidden_peaks(model, v)
    assert len(peaks) == len(model.convs) - 1
    for peak, pre, dead in zip(peaks, by_hand, killed):
        torch.testing.assert_close(peak, pre.amax(dim=(0, 2, 3)))
        found = {int(c) for c in torch.nonzero(peak <= 0).flatten()}
        assert dead <= found == {c for c in range(pre.shape[1]) if bool((pre[:, c] <= 0).all())}
    assert plume.live_fractions(model, v) == [float((p > 0).float().mean()) for p in by_hand_peaks(by_hand)]
    assert all(not conv._forward_hooks for conv in model.convs), "hooks left behind"
    with pytest.raises(RuntimeError):
        plume.hidden_peaks(model, v[:, :2])  # too few frames: the first conv raises
    assert all(not conv._forward_hooks for conv in model.convs), "hooks left behind after an error"
    assert sum(len(d) for d in killed) <= plume.dead_channels(model, v) == sum(int((p <= 0).sum()) for p in peaks)
    torch.testing.assert_close(plume.hidden_peaks(model, v, chunk=2), peaks)  # in chunks: the same peaks


def test_one_step_rmse_is_the_rmse_over_every_pair():
    """In chunks of 64 pairs: 70 pairs check that the last, short chunk is counted once."""
    import plume

    torch.manual_seed(0)
    model = plume.build("CNN", 2, 2)
    x, y = 0.1 * torch.randn(70, 2, 6, 6, 2), 0.1 * torch.randn(70, 6, 6, 2)
    with torch.no_grad():
        expected = float(((model(x) - y) ** 2).mean().sqrt())
    assert plume.one_step_rmse(model, (x, y)) == pytest.approx(expected, rel=1e-5)


def test_epoch_rmse_is_the_training_rmse_over_the_epoch():
    """With a zero learning rate the model does not move: every epoch's RMSE is the RMSE over all the pairs
    (40 pairs: batches of 16, 16 and 8, so a mean over batches instead of pairs would differ)."""
    import plume

    torch.manual_seed(0)
    model = plume.build("p4 relaxed r2", 1, 2)
    x, y = 0.1 * torch.randn(40, 2, 8, 8, 2), 0.1 * torch.randn(40, 8, 8, 2)
    expected = plume.one_step_rmse(model, (x, y))
    curve: list[float] = []
    plume.train(model, (x, y), epochs=3, seed=0, lr=0.0, epoch_rmse=curve)
    assert curve == pytest.approx([expected] * 3, rel=1e-5)
