"""MixedInputs: blends of pairs of examples as distillation inputs."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import gmcompress as gm
from gmcompress.training import MixedInputs


def _segment_weight(item: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float | None:
    """``w`` with ``item = w a + (1 - w) b`` (least squares), or None when ``item`` is off that line."""
    d = (a - b).flatten().double()
    w = float((item.flatten().double() - b.flatten().double()) @ d / (d @ d))
    off = (item.double() - (w * a.double() + (1 - w) * b.double())).norm() / item.double().norm()
    return w if off < 1e-5 else None


def test_each_item_is_a_convex_blend_of_its_example_and_exactly_one_other():
    x = torch.randn(12, 3, 5, 5)
    mixed = MixedInputs(x, seed=3)
    weights = []
    for i in range(len(mixed)):
        item = mixed[i]
        found = [(j, w) for j in range(len(x)) if j != i and (w := _segment_weight(item, x[i], x[j])) is not None]
        assert len(found) == 1, (i, found)  # found by search, not by asking the dataset
        j, w = found[0]
        assert 0.0 <= w <= 1.0
        assert (j, pytest.approx(w, abs=1e-5)) == mixed.partner(i)
        weights.append(w)
    assert min(weights) < 0.3 and max(weights) > 0.7  # the weights spread over [0, 1], not fixed at one value


def test_items_are_the_same_in_any_order_and_change_with_the_seed():
    x = TensorDataset(torch.randn(40, 8))  # 1-tuples are unpacked
    a, b = MixedInputs(x, seed=1), MixedInputs(x, seed=1)
    forward = [a[i] for i in range(40)]
    backward = [b[i] for i in reversed(range(40))][::-1]
    assert all(torch.equal(p, q) for p, q in zip(forward, backward))
    other = MixedInputs(x, seed=2)
    assert sum(torch.equal(other[i], forward[i]) for i in range(40)) < 4


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="at least 2"):
        MixedInputs(torch.randn(1, 4))
    labelled = MixedInputs(TensorDataset(torch.randn(4, 4), torch.arange(4)))
    with pytest.raises(TypeError, match="loss='kd'"):
        labelled[0]
    with pytest.raises(IndexError):
        MixedInputs(torch.randn(3, 4))[3]


def test_finetune_distils_on_mixed_inputs():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    student = gm.compress(teacher, group="C8", rank=1, progress=False)
    x = torch.randn(64, 16)

    def error() -> float:
        with torch.no_grad():
            return float(nn.functional.mse_loss(student(x), teacher(x)))

    before = error()
    gm.finetune(student, teacher, MixedInputs(x), loss="mse", steps=30, lr=1e-2, batch_size=16, progress=False)
    assert error() < 0.8 * before
