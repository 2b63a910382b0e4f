"""Compression under a budget: the allocation is optimal, the budget is met, impossible budgets fail early."""

from __future__ import annotations

import itertools
import math
import random
import re

import pytest
import torch
from torch import nn

import gmcompress as gm
from gmcompress.budget import rank_ladder
from gmcompress.planning import allocation
from gmcompress.planning.budget_spec import Budget, BudgetError
from gmcompress.planning.handlers import LayerPlan


def matplotlib_image():
    """``matplotlib.image`` on the Agg backend (the tests never open a window)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image

    return matplotlib.image


def brute_force(costs, weights, capacity):
    """The optimum by enumerating every choice (independent of the DP and the Lagrangian)."""
    feasible = [
        (sum(c[j] for c, j in zip(costs, ch)), ch)
        for ch in itertools.product(*[range(len(c)) for c in costs])
        if sum(w[j] for w, j in zip(weights, ch)) <= capacity
    ]
    return min(feasible)


@pytest.mark.parametrize("seed", range(40))
def test_allocation_equals_brute_force_and_the_lagrangian_bound_holds(seed):
    rng = random.Random(seed)
    sizes = [rng.randint(1, 5) for _ in range(rng.randint(1, 5))]
    costs = [[rng.random() for _ in range(k)] for k in sizes]
    weights = [[rng.randint(1, 20) for _ in range(k)] for k in sizes]
    low = sum(min(w) for w in weights)
    capacity = rng.randint(low, low + 30)
    best, _ = brute_force(costs, weights, capacity)
    exact = allocation.allocate(costs, weights, capacity)
    assert exact.exact and exact.cost == pytest.approx(best, abs=1e-12) and exact.weight <= capacity
    lagrangian = allocation._lagrangian(costs, weights, capacity)  # the large-problem method, on a small one
    assert lagrangian.weight <= capacity
    assert lagrangian.bound <= best + 1e-9 <= lagrangian.cost + 2e-9  # the stated gap brackets the optimum


def test_frontier_overflow_falls_back_to_the_lagrangian_with_a_gap():
    rng = random.Random(0)
    costs = [[rng.random() for _ in range(6)] for _ in range(8)]
    weights = [[rng.random() for _ in range(6)] for _ in range(8)]
    a = allocation.allocate(costs, weights, 3.0, max_frontier=10)
    b = allocation.allocate(costs, weights, 3.0)
    assert not a.exact and b.exact
    assert a.bound <= b.cost + 1e-12 <= a.cost + 1e-12 and a.gap == pytest.approx(a.cost - a.bound)

    def dual(lam):  # the Lagrangian dual function, maximised over a grid: the bound the fallback must state
        return sum(min(c + lam * w for c, w in zip(cs, ws)) for cs, ws in zip(costs, weights)) - lam * 3.0

    assert a.bound == pytest.approx(max(dual(i / 1000) for i in range(20000)), abs=1e-3)
    assert a.gap > 1e-3  # a real duality gap on this instance (a bound equal to the cost would claim optimality)


def test_infeasible_capacity_names_the_lightest_choice():
    with pytest.raises(allocation.Infeasible) as info:
        allocation.allocate([[0.0, 1.0], [0.0, 1.0]], [[5.0, 2.0], [4.0, 3.0]], 4.0)
    assert info.value.lightest == 5.0


def test_budget_validation_and_parsing():
    assert Budget.parse("params=4") == Budget(params=4.0)
    assert Budget.parse({"speedup": 2, "groups": ["C4", "C8"]}).groups == ("C4", "C8")
    assert Budget(max_error=0.1).groups == tuple(f"C{2**k}" for k in range(1, 7))
    for bad in [dict(), dict(params=4, speedup=2), dict(params=0.5), dict(max_error=0), dict(params=math.nan)]:
        with pytest.raises(ValueError, match="Budget"):
            Budget(**bad)
    with pytest.raises(ValueError, match="KIND=VALUE"):
        Budget.parse("fast=2")
    with pytest.raises(ValueError):
        Budget(params=2, groups="Q7")
    assert rank_ladder(16) == [1, 2, 4, 8] and rank_ladder(2) == [1] and rank_ladder(64) == [1, 2, 4, 8]
    assert rank_ladder(64, max_rank=2) == [1, 2] and rank_ladder(4) == [1, 2, 3] and rank_ladder(8) == [1, 2, 4, 6, 7]
    assert rank_ladder(16, max_rank=16) == [1, 2, 4, 8, 12, 14, 15]
    with pytest.raises(ValueError, match="max_rank"):
        Budget(params=2, max_rank=0)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).eval()


def calibration(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(48, 32, generator=gen) for _ in range(2)]


GROUPS = ("C2", "C4", "C8")
HELD = calibration(seed=2)[:1]  # held-out data given to compress, so that its fits use every calibration batch


def test_params_budget_is_met_and_the_choice_is_the_best_of_all_measured_options():
    net = mlp()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    budget = Budget(params=3.0, groups=GROUPS)
    the_plan = gm.plan(net, budget=budget, calibration=calibration(), heldout=HELD, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert not any(m._forward_hooks for m in net.modules())  # the probes' hooks are gone
    out = the_plan.budget
    dense = sum(lo.dense.params for lo in out.layers)
    costs = [[o.model_error**2 for o in lo.options] for lo in out.layers]
    weights = [[o.params for o in lo.options] for lo in out.layers]
    best, choice = brute_force(costs, weights, dense / 3.0)
    assert out.allocation.choice == choice and out.allocation.cost == pytest.approx(best)
    assert len(set(choice)) > 1  # not a uniform answer: the layers' sensitivities differ
    model = gm.compress(  # held-out data given: compress fits on every calibration batch, as the plan did
        net, budget=Budget(params=3.0, groups=GROUPS), calibration=calibration(), heldout=HELD, progress=False
    )
    rows = model.gm_report.layers
    assert [f"{r.group} r{r.rank}" if r.form else "dense" for r in rows] == [o.label for o in out.chosen]
    after = sum(r.params_after for r in rows)
    assert dense / after >= 3.0 and dense / after == pytest.approx(out.params_ratio)
    assert "budget params=3" in str(model.gm_report)


def test_a_gentle_size_budget_keeps_most_of_a_layer_instead_of_half():
    """Between dense and half the weights the ladder has ranks above N/2 (C4 r3, C8 r6 and r7): a 1.2x budget on
    one layer takes the most accurate of those that meet it, not the 2x option the target does not need."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(128, 128)).eval()
    cal = [torch.randn(256, 128) for _ in range(2)]
    out = gm.plan(net, budget=Budget(params=1.2, groups=("C2", "C4", "C8")), calibration=cal, progress=False).budget
    (lo,) = out.layers
    assert {"C4 r3", "C8 r6", "C8 r7"} <= {o.label for o in lo.options}
    dense = lo.dense.params
    meets = [o for o in lo.options if o.params <= dense / 1.2]
    chosen = out.chosen[0]
    assert chosen.label in {"C4 r3", "C8 r6", "C8 r7"} and chosen.model_error == min(o.model_error for o in meets)
    half = next(o for o in lo.options if o.label == "C2 r1")
    assert chosen.model_error < 0.8 * half.model_error and 1.2 <= dense / chosen.params < 2


def test_report_gives_the_measured_model_error_and_warns_over_max_error(monkeypatch):
    net, cal = mlp(), calibration()
    model = gm.compress(net, budget=Budget(max_error=0.6, groups=GROUPS), calibration=cal, progress=False)
    with torch.no_grad():  # on the held-out batch: the last of the two calibration batches
        ref = net(cal[1])
        measured = float((model(cal[1]) - ref).norm() / ref.norm())
    assert f"measured model error {measured:.4f}" in model.gm_report.budget
    import gmcompress.budget as budget_module

    monkeypatch.setattr(budget_module.BudgetOutcome, "measured_error", lambda self, m: 0.9)
    with pytest.warns(UserWarning, match=r"max_error=0.6: the compressed model's output error .* is 0.9000"):
        gm.compress(net, budget=Budget(max_error=0.6, groups=GROUPS), calibration=cal, progress=False)


def test_to_recipe_reproduces_the_allocation_without_measuring_again(monkeypatch):
    net, cal = mlp(), calibration()
    out = gm.plan(net, budget=Budget(params=3.0, groups=GROUPS), damping=0.3, calibration=cal, progress=False).budget
    recipe = out.to_recipe()
    import gmcompress.budget as budget_module

    monkeypatch.setattr(budget_module, "plan_budget", None)  # no budget planning on this route
    model = gm.compress(net, recipe=recipe, calibration=cal, progress=False)
    rows = model.gm_report.layers
    assert [f"{r.group} r{r.rank}" if r.form else "dense" for r in rows] == [o.label for o in out.chosen]
    assert all(r["damping"] == 0.3 for r in recipe["layers"] if not r.get("skip"))  # the layer's own settings


def test_the_model_error_of_an_option_is_the_output_change_with_only_that_layer_compressed():
    net, cal = mlp(), calibration()
    out = gm.plan(net, budget=Budget(params=2.0, groups=("C4",)), calibration=cal, progress=False).budget
    lo = out.layers[1]
    option = next(o for o in lo.options if o.label == "C4 r2")
    single = gm.compress(
        net, "C4", 2, include=lo.name, calibration=cal, heldout=HELD, calibration_mode="original", progress=False
    )  # an independent route: compress() with that one layer (fitted on every batch), then compare the outputs
    with torch.no_grad():
        ref = net(cal[0])
        measured = float((single(cal[0]) - ref).norm() / ref.norm())
    assert option.model_error == pytest.approx(measured, rel=1e-4)
    assert option.layer_error == pytest.approx(single.gm_report.layers[1].output_error, rel=1e-6)


def test_calibration_given_as_a_generator_reaches_the_final_fits_too():
    net = mlp()
    model = gm.compress(net, budget=Budget(params=2.0, groups=("C4",)), calibration=iter(calibration()), progress=False)
    assert all(r.output_error is not None for r in model.gm_report.compressed)  # activation-aware final fits


def test_max_error_budget_takes_the_fewest_weights_under_the_error():
    net = mlp()
    out = gm.plan(net, budget=Budget(max_error=0.6, groups=GROUPS), calibration=calibration(), progress=False).budget
    assert out.model_error <= 0.6
    errors = [[o.model_error**2 for o in lo.options] for lo in out.layers]
    params = [[o.params for o in lo.options] for lo in out.layers]
    best, _ = brute_force(params, errors, 0.36)
    assert sum(o.params for o in out.chosen) == best


def _no_fits(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("a layer was fitted before the budget was found impossible")

    monkeypatch.setattr(LayerPlan, "build", property(lambda self: refuse, lambda self, v: None), raising=False)


def test_impossible_size_budget_fails_before_any_fit_naming_the_closest(monkeypatch):
    net = mlp()
    _no_fits(monkeypatch)
    with pytest.raises(BudgetError, match=r"params=100\) cannot be met.* (\d+\.\d+)x fewer weights.*at most params="):
        gm.compress(net, budget=Budget(params=100.0, groups=GROUPS), calibration=calibration(), progress=False)


def test_impossible_speed_budget_fails_before_any_fit(monkeypatch):
    net = mlp()
    _no_fits(monkeypatch)
    with pytest.raises(BudgetError, match=r"speedup=50\) cannot be met.*predicted \d+\.\d+x faster"):
        gm.plan(
            net,
            budget=Budget(speedup=50.0, groups=("C4",)),
            calibration=calibration(),
            example_inputs=calibration()[0],
            progress=False,
        )


def _fake_clock(monkeypatch):
    """Deterministic timings (no timed asserts): a dense 1024x1024 layer 1 ms, a GM layer 1 ms on its dense path
    and 1/8 ms on its block path, the model 2.1 ms (0.1 ms outside its two layers)."""
    from gmcompress import budget as budget_module

    def seconds(call, model, min_run_time):
        if isinstance(model, nn.Linear):
            return 1e-3
        return 1e-3 if model.impl == "dense" else 1e-3 / 8

    from gmcompress.measure import paths

    monkeypatch.setattr(paths, "block_seconds", seconds)
    monkeypatch.setattr(budget_module, "measure_latency", lambda model, inputs: 2.1)


def test_speed_budget_options_are_timed_and_the_prediction_uses_them(monkeypatch):
    _fake_clock(monkeypatch)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024)).eval()
    x = torch.randn(64, 1024)

    def budget_plan(speedup):
        groups = ("C8",)
        return gm.plan(net, budget=Budget(speedup=speedup, groups=groups), calibration=[x], example_inputs=x).budget

    free = budget_plan(1.0)
    assert [[o.seconds for o in lo.options] for lo in free.layers] == [[1e-3] + [1e-3 / 8] * 5] * 2  # C8 r1, 2, 4, 6, 7
    assert [o.label for o in free.chosen] == ["dense", "dense"]  # speed-up 1 costs nothing: no error taken
    assert free.predicted_speedup == pytest.approx(1.0)
    one = budget_plan(1.5)  # needs one layer on its block path: 2.1 / (0.1 + 1 + 0.125) = 1.71
    assert sorted(o.label == "dense" for o in one.chosen) == [False, True]
    assert one.predicted_speedup == pytest.approx(2.1 / 1.225)
    both = budget_plan(2.0)  # needs both
    assert not any(o.label == "dense" for o in both.chosen)
    with pytest.raises(BudgetError, match=r"predicted 6\.00x faster.*at most speedup=6"):
        budget_plan(6.5)


def test_budget_needs_calibration_and_rank_is_refused():
    net = mlp()
    with pytest.raises(BudgetError, match="calibration"):
        gm.plan(net, budget="params=2")
    with pytest.raises(BudgetError, match="example_inputs"):
        gm.plan(net, budget="speedup=2", calibration=calibration())
    with pytest.raises(BudgetError, match="meta device"):
        gm.plan(nn.Linear(64, 64, device="meta"), budget="params=2", calibration=torch.randn(4, 64))
    with pytest.raises(ValueError, match="the budget chooses each layer's rank"):
        gm.compress(net, rank=2, budget="params=2", calibration=calibration())


def test_recipe_budget_section_and_errors(tmp_path):
    recipe = {"version": 1, "defaults": {"damping": 0.1}, "budget": {"params": 2.5, "groups": ["C4", "C8"]}}
    out = gm.plan(mlp(), recipe=recipe, calibration=calibration(), progress=False).budget
    assert out.budget == Budget(params=2.5, groups=("C4", "C8")) and out.params_ratio >= 2.5
    with pytest.raises(ValueError, match="budget: unknown budget keys"):
        gm.plan(mlp(), recipe={"version": 1, "budget": {"parms": 2}})


def test_cli_budget_flag(tmp_path, capsys):
    from gmcompress import cli

    rc = cli.main(
        [
            "compress",
            "--model",
            "cli_models:build_mlp",
            "--budget",
            "params=2",
            "--group",
            "C2,C4",
            "--example-inputs",
            "cli_models:example_inputs",
            "--calibration",
            "cli_models:example_inputs",
            "--quiet",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "budget params=2" in out.out
    rc = cli.main(["plan", "--model", "cli_models:build_mlp", "--budget", "params=2", "--group", "C2,C4"]
                  + ["--calibration", "cli_models:example_inputs"])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "choice" in out.out and "budget params=2: planned" in out.out


def test_frontier_points_are_the_best_allocations_of_their_caps_and_the_plot_draws_them(tmp_path):
    out = gm.plan(mlp(), budget=Budget(params=3.0, groups=GROUPS), calibration=calibration(), progress=False).budget
    points = 8
    pts = out.frontier(points=points)
    ratios, errors = [p[0] for p in pts], [p[1] for p in pts]
    costs = [[o.model_error**2 for o in lo.options] for lo in out.layers]
    weights = [[o.params for o in lo.options] for lo in out.layers]
    dense, smallest = sum(lo.dense.params for lo in out.layers), sum(min(w) for w in weights)
    for i, (ratio, error, speedup) in enumerate(pts):  # caps spaced geometrically from the smallest model to dense
        best, choice = brute_force(costs, weights, smallest * (dense / smallest) ** (i / (points - 1)))
        assert error == pytest.approx(math.sqrt(best), rel=1e-9, abs=1e-12)
        assert ratio == pytest.approx(dense / sum(w[j] for w, j in zip(weights, choice)))
        assert math.isnan(speedup)  # nothing was timed: no example inputs
    assert ratios[0] == pytest.approx(dense / smallest) and ratios[-1] == pytest.approx(1.0) and errors[-1] == 0.0
    assert all(a >= b - 1e-12 for a, b in zip(errors, errors[1:]))  # more weights never cost error
    assert out.params_ratio >= 3.0 and any(r > out.params_ratio for r in ratios)
    # the chosen plan is the best at its size: no point of the frontier is both smaller and more accurate
    assert all(e >= out.model_error - 1e-12 for r, e in zip(ratios, errors) if r >= out.params_ratio)

    fig = out.plot(tmp_path / "frontier.png")
    frontier_line, chosen = fig.axes[0].lines[:2]
    drawn = out.frontier()
    assert list(frontier_line.get_xdata()) == [p[0] for p in drawn]
    assert list(frontier_line.get_ydata()) == [p[1] for p in drawn]
    assert (list(chosen.get_xdata()), list(chosen.get_ydata())) == ([out.params_ratio], [out.model_error])
    image = matplotlib_image().imread(tmp_path / "frontier.png")
    assert image.shape == (480, 720, 4)  # 6 x 4 inches at 120 dpi
    red = (image[..., 0] > 0.9) & (image[..., 1] < 0.1) & (image[..., 2] < 0.1)
    assert red.sum() > 20  # the chosen plan's red star (and its legend entry) is in the file


# ---------------------------------------------------------------- what a careless-user probe found (each one failed)
def test_conv_group_bounds_the_ranks_of_tied_convolutions():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    cal = torch.randn(4, 8, 12, 12)
    out = gm.plan(net, budget=Budget(params=2.0), conv_group="C4", calibration=cal, progress=False).budget
    ranks = {o.plan.settings.rank for lo in out.layers for o in lo.options[1:] if o.plan.form == "GMConv2d"}
    assert ranks == {1, 2, 3}  # C4 bounds the ranks of a GMConv2d to 1..4, the ladder to 1, 2, 3


def test_plan_keeps_every_module_mode_and_the_rng():
    net = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.Linear(64, 16)).train()
    net[1].eval()  # a frozen BatchNorm in a training model
    modes = [m.training for m in net.modules()]
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    gm.plan(net, budget=Budget(params=2.0, groups=("C4",)), calibration=calibration(), progress=False)
    assert torch.equal(torch.rand(3), expected)
    assert [m.training for m in net.modules()] == modes


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 16), nn.Linear(64, 16)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return {"first": self.a(h), "second": self.b(h)}


def test_model_error_counts_every_output_tensor():
    net, cal = TwoHeads().eval(), calibration()
    out = gm.plan(net, budget=Budget(params=2.0, groups=("C8",)), calibration=cal, progress=False).budget
    head_b = next(lo for lo in out.layers if lo.name == "b")
    assert all(o.model_error > 0.05 for o in head_b.options[1:])  # the second output changes


def test_empty_calibration_group_null_rules_and_mismatch_errors():
    with pytest.raises(BudgetError, match="calibration batches are empty"):
        gm.plan(mlp(), budget="params=2", calibration=iter([]))
    recipe = {"version": 1, "layers": [{"name": "2", "group": None}]}
    out = gm.plan(mlp(), recipe=recipe, budget=Budget(params=1.5, groups=GROUPS), calibration=calibration()).budget
    assert [lo.name for lo in out.layers] == ["0", "4"]  # group: null keeps layer 2 out of the budget
    odd = nn.Sequential(nn.Linear(30, 48), nn.ReLU(), nn.Linear(48, 20)).eval()
    x = torch.randn(16, 30)
    for groups in (("C2", "C4"), ("C4", "C2")):  # the order of the candidates does not matter
        p = gm.plan(odd, budget=Budget(params=1.5, groups=groups), on_mismatch="error", calibration=x, progress=False)
        assert {o.label for o in p.budget.layers[0].options} == {"dense", "C2 r1"}
    with pytest.raises(ValueError, match=r"layer '0' \(Linear 48x30\): no candidate group of C4, C8 divides"):
        gm.plan(odd, budget=Budget(params=1.5, groups=("C4", "C8")), on_mismatch="error", calibration=x)


def test_budget_messages_name_the_value_and_the_form():
    with pytest.raises(ValueError, match=r"'4x' is not a number \(e.g. params=4\)"):
        Budget.parse("params=4x")
    with pytest.raises(ValueError, match="budget groups: expected a family"):
        Budget(params=2, groups=4)
    with pytest.raises(TypeError, match="expected a gm.Budget"):
        Budget.parse(4)
    assert Budget(params=__import__("numpy").float32(4)).params == 4.0
    out = gm.plan(mlp(), budget=Budget(params=2.0, groups=("C4",)), calibration=calibration(), progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        out.budget.frontier(points=1)
    with pytest.raises(BudgetError, match="no layer is left"):
        gm.plan(mlp(), budget="params=2", exclude=".*", calibration=calibration())
    with pytest.raises(BudgetError) as info:  # the value shown is the value suggested: both reachable
        gm.plan(mlp(), budget=Budget(params=50, groups=GROUPS), calibration=calibration())
    shown, suggested = re.search(r"gives (\d+\.\d+)x .* params=(\d+\.?\d*)", str(info.value)).groups()
    assert float(shown) == float(suggested) <= info.value.closest


def test_cli_contradicting_calibration_flags_are_one_line(capsys):
    from gmcompress import cli

    argv = ["compress", "--model", "cli_models:mlp", "--group", "C8", "--calibration", "cli_models:example_inputs"]
    assert cli.main([*argv, "--no-calibration"]) == 2
    assert "contradict" in capsys.readouterr().err


# ---------------------------------------------------------------- layers the original does not call as modules
class FunctionalNet(nn.Module):
    """A product written as ``F.linear(x, self.w)``: the graph pass lifts it into the module ``w_linear``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(64, 32) / 32**0.5)
        self.head = nn.Linear(64, 16)

    def forward(self, x):
        return self.head(torch.relu(nn.functional.linear(x, self.w)))


class KeywordNet(nn.Module):
    """Layers called by keyword, as some model code does (``self.fc(input=h)``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.fc = nn.Linear(32, 64), nn.Linear(64, 16)

    def forward(self, x):
        return self.fc(input=torch.relu(self.body(input=x)))


def _single_layer_error(net, name, group, rank, cal):
    """||y - y_ref|| / ||y_ref|| on the first batch with only layer ``name`` compressed by compress() itself (in
    sequential mode: the prefix before the one layer is the original model's, as for the option)."""
    single = gm.compress(net, group, rank, include=name, calibration=cal, heldout=HELD, progress=False)
    with torch.no_grad():
        ref = net(cal[0])
        return float((single(cal[0]) - ref).norm() / ref.norm())


@pytest.mark.parametrize("make, name", [(FunctionalNet, "w_linear"), (lambda: nn.Linear(32, 16), "weight_linear")])
def test_model_error_of_a_layer_the_model_calls_as_a_function(make, name):
    net, cal = make().eval(), calibration()
    out = gm.plan(net, budget=Budget(params=2.0, groups=("C4",)), calibration=cal, progress=False).budget
    option = next(o for lo in out.layers if lo.name == name for o in lo.options if o.label == "C4 r1")
    expected = _single_layer_error(net, name, "C4", 1, cal)
    assert expected > 0.1 and option.model_error == pytest.approx(expected, rel=1e-4)


def test_speed_budget_times_a_layer_lifted_from_a_functional_call(monkeypatch):
    _fake_clock(monkeypatch)
    net, x = FunctionalNet().eval(), calibration()[0]
    out = gm.plan(net, budget=Budget(speedup=1.0, groups=("C4",)), calibration=[x], example_inputs=x).budget
    lifted = next(lo for lo in out.layers if lo.name == "w_linear")
    assert lifted.dense.seconds == 1e-3 and all(o.seconds == 1e-3 / 8 for o in lifted.options[1:])


def test_layers_called_by_keyword_are_measured():
    net, cal = KeywordNet().eval(), calibration()
    out = gm.plan(net, budget=Budget(params=2.0, groups=("C4",)), calibration=cal, progress=False).budget
    option = next(o for o in out.layers[1].options if o.label == "C4 r2")
    assert option.model_error == pytest.approx(_single_layer_error(net, "fc", "C4", 2, cal), rel=1e-4)


def test_speed_budget_times_the_dense_layer_and_its_options_in_the_same_rounds(monkeypatch):
    from gmcompress.measure import paths

    calls = []
    monkeypatch.setattr(paths, "block_seconds", lambda call, model, t: calls.append(model) or 1e-3)
    monkeypatch.setattr(gm.budget, "measure_latency", lambda model, inputs: 2.1)
    torch.manual_seed(0)
    net, x = nn.Sequential(nn.Linear(64, 64)).eval(), torch.randn(8, 64)
    out = gm.plan(net, budget=Budget(speedup=1.0, groups=("C4",)), calibration=[x], example_inputs=x).budget
    dense, options = out.layers[0].dense.plan.module, [o for o in out.layers[0].options[1:]]
    paths_per_round = len(calls) // paths.PATH_ROUNDS
    rounds = [calls[i * paths_per_round : (i + 1) * paths_per_round] for i in range(paths.PATH_ROUNDS)]
    assert len(options) == 3 and paths_per_round > 3  # C4 r1, r2, r3, each with several paths
    for timed in rounds:  # every round times the dense layer, then every path of every option
        assert timed[0] is dense and dense not in timed[1:]
        assert [m for m in timed[1:]] == rounds[0][1:]


def test_recipe_with_a_budget_takes_a_family_or_a_list_in_defaults_group():
    cal = calibration()
    recipe = {"version": 1, "defaults": {"group": "C"}, "budget": {"params": 2}}
    out = gm.plan(mlp(), recipe=recipe, calibration=cal, progress=False).budget
    assert out.budget.groups == Budget(params=2).groups  # C2 .. C64, as compress(group="C", budget=...)
    recipe["defaults"]["group"] = ["C4", "C8"]
    out = gm.plan(mlp(), recipe=recipe, calibration=cal, progress=False).budget
    assert out.budget.groups == ("C4", "C8")
    assert {o.plan.group for lo in out.layers for o in lo.options[1:]} == {"C4", "C8"}
    with pytest.raises(ValueError, match=r"defaults.group: \['C4', 'C8'\] and budget.groups 'C2' both name"):
        gm.plan(mlp(), recipe={**recipe, "budget": {"params": 2, "groups": "C2"}}, calibration=cal)
    with pytest.raises(ValueError, match=r"defaults.group: expected str or FiniteGroup or null, got \[.C4., .C8.\]"):
        gm.plan(mlp(), recipe={"version": 1, "defaults": {"group": ["C4", "C8"]}})
