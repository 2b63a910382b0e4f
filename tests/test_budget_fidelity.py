"""Fidelity budgets: the allocation is checked on held-out batches, tightened until it holds, and an impossible
one fails before the final fits naming the closest measured value."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gmcompress as gm
from gmcompress.planning.budget_spec import Budget, BudgetError


def relative_error(model, reference, batches):
    """||y - y_ref|| / ||y_ref|| over every batch, computed here (not by gmcompress.fidelity)."""
    with torch.no_grad():
        diff = sum(float((model(b) - reference(b)).double().pow(2).sum()) for b in batches)
        ref = sum(float(reference(b).double().pow(2).sum()) for b in batches)
    return (diff / ref) ** 0.5


def agreement(model, reference, batches):
    with torch.no_grad():
        same = sum(int((model(b).argmax(1) == reference(b).argmax(1)).sum()) for b in batches)
    return same / sum(len(b) for b in batches)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).eval()


def calibration(batches=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(48, 32, generator=gen) for _ in range(batches)]


def test_fidelity_budget_values_and_parsing():
    assert Budget.parse("agreement=0.95,min_params=2") == Budget(agreement=0.95, min_params=2.0)
    assert Budget.parse({"max_error": 0.1, "min_params": 3}).min_params == 3.0
    assert str(Budget(max_error=0.1, min_params=2)) == "max_error=0.1, min_params=2"
    with pytest.raises(ValueError, match=r"Budget\(agreement=1.5\): expected a fraction of samples in \(0, 1\]"):
        Budget(agreement=1.5)
    with pytest.raises(ValueError, match=r"min_params=\.\.\.\) goes with a fidelity budget"):
        Budget(params=2, min_params=2)
    with pytest.raises(ValueError, match=r"Budget\(min_params=0.5\): expected a factor >= 1"):
        Budget(max_error=0.1, min_params=0.5)


def test_agreement_budget_needs_classifier_outputs():
    torch.manual_seed(0)
    regressor = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1)).eval()
    with pytest.raises(ValueError, match=r"agreement=0.95\) measures top-1 agreement.*shape \(48, 1\).*max_error"):
        gm.plan(regressor, budget=Budget(agreement=0.95, groups=("C4",)), calibration=calibration(), progress=False)


def test_min_params_that_no_allocation_meets_fails_naming_the_measured_closest(monkeypatch):
    net, cal = mlp(), calibration()
    final_fits = []
    budget = Budget(max_error=0.01, min_params=2.0, groups=("C4",))
    with monkeypatch.context() as patch, pytest.raises(BudgetError, match=r"min_params=2\) cannot be met") as info:
        patch.setattr(gm.api, "apply_plan", lambda *a, **k: final_fits.append(1))
        gm.compress(net, budget=budget, calibration=cal, progress=False)
    assert not final_fits  # it failed before the final fits
    # independently: the least-error allocation at 2x (a params budget), fitted on the first three batches by
    # compress, measured here on the held-out fourth
    floor = gm.plan(net, budget=Budget(params=2.0, groups=("C4",)), calibration=cal[:3], heldout=cal[3:])
    model = gm.compress(net, recipe=floor.budget.to_recipe(), calibration=cal[:3], heldout=cal[3:], progress=False)
    assert info.value.closest == pytest.approx(relative_error(model, net, cal[3:]), rel=1e-5)
    assert "at 2x fewer weights the allocation with the least predicted error" in str(info.value)
    assert f"error of {info.value.closest:.4f} on the 48 held-out samples; ask for max_error >=" in str(info.value)


def mnist_batches(mnist, batches=8, size=64):
    """Training digits in batches: the last quarter is held out from the fits."""
    x_tr = mnist[1][0]
    return [x_tr[i * size : (i + 1) * size] for i in range(batches)]


MNIST_OPTIONS = dict(groups=("C2", "C4", "C8"), max_rank=2)  # features.3 and classifier.2 (classifier.0 is slow)


def test_max_error_budget_holds_on_held_out_digits(mnist):
    net, cal = mnist[0], mnist_batches(mnist)
    fit, held = cal[:6], cal[6:]
    budget = Budget(max_error=0.32, **MNIST_OPTIONS)
    model = gm.compress(net, budget=budget, calibration=fit, heldout=held, exclude="classifier.0", progress=False)
    error = relative_error(model, net, held)
    assert error <= 0.32
    assert f"output error {error:.3g} (2 allocations checked" in model.gm_report.budget  # the first one missed
    assert model.gm_report.params_after < model.gm_report.params_before  # not the all-dense answer


def test_agreement_budget_holds_on_held_out_digits(mnist):
    net, cal = mnist[0], mnist_batches(mnist, size=128)
    fit, held = cal[:6], cal[6:]
    budget = Budget(agreement=0.935, **MNIST_OPTIONS)
    model = gm.compress(net, budget=budget, calibration=fit, heldout=held, exclude="classifier.0", progress=False)
    assert agreement(model, net, held) >= 0.935
    assert "(2 allocations checked" in model.gm_report.budget  # the first one missed on new digits
    assert f"top-1 agreement {agreement(model, net, held):.4f}" in model.gm_report.budget
    assert model.gm_report.params_after < model.gm_report.params_before  # not the all-dense answer


def test_agreement_search_keeps_compressing_when_the_first_allocation_misses_far():
    """Disagreement grows much faster than the summed layer errors predict (a threshold, as on an ImageNet CNN):
    the search must not jump from a far miss straight to every layer dense, but close in on the lightest
    allocation that meets the target, within VERIFY_ROUNDS checks."""
    from gmcompress.budget import VERIFY_ROUNDS, LayerOptions, Option, Verification, _fidelity_allocation
    from gmcompress.measure.fidelity import Fidelity

    squared = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32]  # each layer's squared model error when compressed (2x fewer)
    layers = [
        LayerOptions(f"l{i}", [Option("dense", None, 100), Option("C2 r1", None, 50, model_error=e**0.5)])
        for i, e in enumerate(squared)
    ]

    def check(allocation):  # the "real" model: agreement 1 - 2 sum(e^2); >= 0.95 only for sums <= 0.025
        total = sum(e for e, c in zip(squared, allocation.choice) if c)
        fidelity = Fidelity(samples=100, output_error=total**0.5, top1_agreement=max(0.0, 1 - 2 * total))
        return Verification(allocation.choice, 600 / allocation.weight, total**0.5, fidelity)

    checked = []
    allocation = _fidelity_allocation(Budget(agreement=0.95), layers, check, checked)
    assert sum(allocation.choice) == 1  # one layer compressed: the most any passing allocation can
    assert 1 - 2 * sum(e for e, c in zip(squared, allocation.choice) if c) >= 0.95
    assert 2 <= len(checked) <= VERIFY_ROUNDS
    assert checked[0].measured.top1_agreement < 0.5  # the first guess missed far
    assert any(c.choice == allocation.choice for c in checked)
