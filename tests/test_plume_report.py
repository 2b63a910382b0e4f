"""The plume sweep's summary arithmetic: baselines moved to another parameter count, dead-channel counts."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def _result(params: int, future: float, dead: list[int] | None = None):
    import plume

    return plume.Result(params, future, 0.0, future, 0.0, 0.0, 1.0, [(future, future)], dead_channels=dead)


def test_rmse_at_follows_the_power_law_through_the_bracketing_widths():
    import plume

    results = {"RGroup L2 3": _result(2000, 0.02), "RGroup L2 5": _result(8000, 0.01), "RPP 2": _result(3000, 0.03)}
    assert plume.rmse_at(results, "RGroup L2", 2000) == pytest.approx(0.02)
    assert plume.rmse_at(results, "RGroup L2", 8000) == pytest.approx(0.01)
    # halfway in log(params) is halfway in log(RMSE): 4000 parameters give 0.02 / sqrt(2)
    assert plume.rmse_at(results, "RGroup L2", 4000) == pytest.approx(0.02 / math.sqrt(2))
    # outside the widths the same law extends: 16000 parameters, one more halving
    assert plume.rmse_at(results, "RGroup L2", 16000) == pytest.approx(0.02 / 2 / math.sqrt(2))
    assert plume.rmse_at(results, "RPP", 9999) == 0.03  # one width: nothing to extrapolate with
    results["RGroup L2 9"] = _result(32000, 0.01)  # flat above 8000: the pair that brackets 10000 is used
    assert plume.rmse_at(results, "RGroup L2", 10000) == pytest.approx(0.01)
    assert plume.rmse_at(results, "RGroup L2", 4000) == pytest.approx(0.02 / math.sqrt(2))
    assert plume.rmse_at(results, "RGroup L2", 1000) == pytest.approx(0.02 * math.sqrt(2))  # the lowest pair
    assert plume.rmse_at(results, "RGroup L2", 64000) == pytest.approx(0.01)  # the highest pair, flat


def test_budget_row_compares_with_the_baselines_at_the_relaxed_models_parameter_count():
    """A baseline with fewer parameters looks better than it is; moved to the relaxed model's count it is not."""
    import plume

    results = {
        "p4 exact 5": _result(2700, 0.0200),
        "p4 relaxed r2 3": _result(4000, 0.0100),  # the better relaxed model, and the smaller one
        "p4 relaxed r4 2": _result(5000, 0.0300),
        "RPP 2": _result(3200, 0.0400),
        "RGroup L2 3": _result(2000, 0.0099),
        "RGroup L2 5": _result(8000, 0.0099 / 2),
    }
    b = {"p4 exact": "p4 exact 5", "p4 relaxed r2": "p4 relaxed r2 3", "p4 relaxed r4": "p4 relaxed r4 2",
         "RPP": "RPP 2", "RGroup L2": "RGroup L2 3"}  # fmt: skip
    cells = [c.strip() for c in plume.budget_row("beta 0", "small", results, b).strip("|").split("|")]
    vs_exact, vs_base, vs_base_at = cells[7:10]
    assert vs_exact == "-50.0%"
    assert vs_base == f"{100 * (0.0100 / 0.0099 - 1):+.1f}%"  # as measured: RGroup has half the parameters
    assert vs_base_at == f"{100 * (0.0100 / (0.0099 / math.sqrt(2)) - 1):+.1f}%"  # RGroup at 4000 parameters


def test_dead_line_counts_the_runs_with_a_dead_channel_per_family():
    import plume

    sweep = {
        "beta 0": ({"p4 exact 5": _result(1, 0.1, [0, 0, 4]), "CNN 8": _result(1, 0.1, [0, 0, 0])}, {}),
        "beta 0.3": ({"p4 exact 5": _result(1, 0.1, [15, 0, 0]), "CNN 8": _result(1, 0.1, [0, 1, 0])}, {}),
    }
    assert plume.dead_line(sweep).endswith(": p4 exact 2 / 6 (15), CNN 1 / 6 (1).")
    assert plume.dead_line({"beta 0": ({"CNN 8": _result(1, 0.1)}, {})}) == "Dead channels: not kept by these runs."


def test_seed_variation_pools_each_familys_coefficients_of_variation():
    """RMS over cells of sample std / mean: cells with CV 0.1 and 0.2 pool to sqrt((0.01 + 0.04) / 2)."""
    import plume

    def cell(values, train=None):
        r = _result(1, float(sum(values) / len(values)))
        r.seeds = [(v, v) for v in values]
        r.train_rmse = train
        return r

    # values m - s, m, m + s have sample std s: CV s / m
    sweep = {
        "beta 0": ({"p4 exact 5": cell([0.7, 1.0, 1.3], [1.0, 1.0, 1.0])}, {}),
        "beta 0.3": ({"p4 exact 5": cell([0.8, 1.0, 1.2], [0.9, 1.0, 1.1])}, {}),
    }
    assert plume.seed_variation(sweep) == f"p4 exact {100 * ((0.09 + 0.04) / 2) ** 0.5:.1f}%"
    assert plume.seed_variation(sweep, "train") == f"p4 exact {100 * (0.01 / 2) ** 0.5:.1f}%"
    sweep["beta 0"][0]["p4 exact 5"].train_rmse = None  # not kept: left out, not counted as 0
    assert plume.seed_variation(sweep, "train") == "p4 exact 10.0%"
    with pytest.raises(ValueError, match="metric"):
        plume.seed_variation(sweep, "domain")


def test_summary_table_rows_have_as_many_cells_as_its_header():
    import plume

    names = ["CNN 8", "CNN 16", "p4 exact 5", "p4 exact 8", "p4 relaxed r2 3", "p4 relaxed r2 5", "p4 relaxed r4 2",
             "p4 relaxed r4 3", "RPP 2", "RPP 3", "RGroup L2 3", "RGroup L2 5"]  # fmt: skip
    results = {n: _result(1000 * (i + 1), 0.02 - 0.001 * i, [0, 0, 0]) for i, n in enumerate(names)}
    lines = plume.summary_lines({"beta 0": (results, {}), "background": (results, {})})
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + 2 * 2  # header, separator, two budgets per case
    assert {line.count("|") for line in table} == {table[0].count("|")}


def test_fit_forecast_correlation_is_taken_within_cells():
    """Two cells whose means differ a lot: the correlation is of each seed's deviation from its cell's mean."""
    import numpy as np
    import plume

    def cell(train, future):
        r = _result(1, float(np.mean(future)))
        r.seeds = [(f, f) for f in future]
        r.train_rmse = train
        return r

    # within each cell a better fit goes with a worse forecast; across cells both rise together
    a, b = cell([1.0, 2.0], [4.0, 2.0]), cell([100.0, 200.0], [400.0, 200.0])
    assert plume.fit_forecast_correlation({"x": ({"p4 exact 5": a}, {}), "y": ({"p4 exact 8": b}, {})}) == (
        "p4 exact -1.00"
    )
    c, d = cell([1.0, 2.0, 3.0], [1.0, 3.0, 2.0]), cell([5.0, 5.0, 5.0], [1.0, 1.0, 1.0])
    t, f = np.log([1.0, 2.0, 3.0]), np.log([1.0, 3.0, 2.0])
    expected = np.corrcoef(np.r_[t - t.mean(), 0, 0, 0], np.r_[f - f.mean(), 0, 0, 0])[0, 1]
    assert plume.fit_forecast_correlation({"x": ({"CNN 8": c, "CNN 16": d}, {})}) == f"CNN {expected:.2f}"
    c.train_rmse = None
    assert plume.fit_forecast_correlation({"x": ({"CNN 8": c}, {})}) == ""
