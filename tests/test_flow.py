"""One pass through compress: settings resolved once, a plan builds through its handler's named methods, the
budget returns its outcome (the plans it was given stay as they were), and on_mismatch is passed, not swapped."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gmcompress as gm
from gmcompress.budget import plan_budget
from gmcompress.graph.calibration import capture_statistics
from gmcompress.graph.fx import find_layers
from gmcompress.nn import GMLinear
from gmcompress.planning.budget_spec import Budget
from gmcompress.planning.handlers import handler_for
from gmcompress.planning.settings import LayerSettings
from gmcompress.recipe import Recipe


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 24)).eval()


def calibration() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(48, 32) for _ in range(4)]


def test_compress_resolves_its_settings_once(monkeypatch):
    calls = []
    original = Recipe.with_overrides
    monkeypatch.setattr(Recipe, "with_overrides", lambda self, **kw: calls.append(kw) or original(self, **kw))
    model = gm.compress(mlp(), "C4", 2, damping=0.2, progress=False)
    assert len(calls) == 1 and calls[0]["damping"] == 0.2
    assert [r.status for r in model.gm_report.layers] == ["compressed", "compressed"]


def test_a_plan_builds_and_shells_through_its_handler():
    net, cal = mlp(), calibration()
    fc = net[0]
    handler = handler_for(fc)
    plan = handler.plan("0", fc, LayerSettings(group="C4", rank=2), "defaults")
    assert plan.gm_type is GMLinear and plan.gm_group.order == 4 and plan.form == "GMLinear"
    stats = capture_statistics(net, [plan], cal)["0"]
    built, by_handler = plan.build(stats), handler.build(plan, stats)
    expected = GMLinear.from_dense(fc, "C4", 2, True, inputs=stats)  # the layer's own fit, called directly
    for layer in (built, by_handler):
        torch.testing.assert_close(layer.weight, expected.weight, rtol=0, atol=0)
    shell = plan.shell(torch.device("meta"))
    assert isinstance(shell, GMLinear) and sum(p.numel() for p in shell.parameters()) == plan.params_after


def test_a_skipped_plan_refuses_to_build_naming_the_layer_and_why():
    fc = mlp()[0]
    plan = handler_for(fc).plan("0", fc, None, "name rule '0'")
    with pytest.raises(ValueError, match=r"layer '0' \(Linear\) stays dense: skipped by name rule '0'"):
        plan.build(None)
    with pytest.raises(ValueError, match=r"layer '0' \(Linear\) stays dense: skipped by name rule '0'"):
        plan.shell(torch.device("meta"))


def test_on_mismatch_is_passed_and_the_settings_stay_as_given():
    fc = nn.Linear(30, 64)  # 30 inputs: not a multiple of |C4|
    settings = LayerSettings(group="C4", on_mismatch="error")
    with pytest.raises(ValueError, match=r"sizes in=30, out=64 are not multiples of \|C4\|=4"):
        handler_for(fc).plan("fc", fc, settings, "defaults")
    plan = handler_for(fc).plan("fc", fc, settings, "defaults", on_mismatch="skip")
    assert plan.form == "" and plan.reason == "sizes in=30, out=64 are not multiples of |C4|=4"
    assert plan.settings is settings  # the layer keeps its own settings: the budget checks "error" itself


def test_plan_budget_returns_its_outcome_and_leaves_the_plans_as_they_were():
    net, cal = mlp(), calibration()
    traced = find_layers(net)
    plans = [handler_for(m).plan(n, m, LayerSettings(group="C4"), "defaults") for n, m in traced.layers]
    before = [(p.name, p.form, p.group, p.settings) for p in plans]
    budget = Budget(params=2.0, groups=("C4",))
    outcome = plan_budget(plans, net, traced.graph_module, budget, cal, progress=False)
    assert [(p.name, p.form, p.group, p.settings) for p in plans] == before
    allocated = outcome.allocated(plans)
    assert [p.name for p in allocated] == ["0", "2"]
    assert allocated == [o.plan for o in outcome.chosen]  # every layer is a candidate here: each takes its choice
    by_api = gm.plan(net, "C4", budget=budget, calibration=cal, progress=False)
    assert [(p.form, p.group, p.settings.rank if p.form else None) for p in by_api.layers] == [
        (p.form, p.group, p.settings.rank if p.form else None) for p in allocated
    ]
