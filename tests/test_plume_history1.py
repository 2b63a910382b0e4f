"""The plume's one-frame study (benchmarks/plume.py --history1): its cases and data, the modulation and
asymmetry measurements, and the report's arithmetic."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def test_one_frame_cases_are_the_sweeps_cases_with_one_input_frame():
    import plume

    base = plume.PlumeConfig()
    sweep = plume.case_configs(base)
    cases = plume.one_frame_cases(base)
    assert list(cases) == ["beta 0", "background", "beta 0.6", "beta 0.9"]
    for tag, cfg in cases.items():
        assert cfg == replace(sweep[tag], history=1)
    assert (cases["background"].beta, cases["background"].background) == (0.0, 0.5)
    assert (cases["beta 0.9"].beta, cases["beta 0.9"].background) == (0.9, 0.0)
    quick = plume.one_frame_cases(plume.QUICK, quick=True)
    assert list(quick) == ["beta 0", "background"] and {c.history for c in quick.values()} == {1}
    assert quick["background"].res == plume.QUICK.res


def test_one_frame_study_reuses_the_sweeps_simulations():
    """The simulations do not depend on how many frames the models read: one cache file for 1 and 4 frames (the
    sweep's key), a new one for anything the simulation uses."""
    import plume

    cfg = plume.case_configs(plume.PlumeConfig())["background"]
    assert plume.cache_path(replace(cfg, history=1)) == plume.cache_path(cfg)
    assert plume.cache_path(replace(cfg, background=0.25)) != plume.cache_path(cfg)
    assert plume.cache_path(replace(cfg, res=32)) != plume.cache_path(cfg)


def test_one_frame_windows_pair_each_frame_with_the_next():
    """The study's training pairs: (frame t - 1, frame t) for every target t < stop that has an input frame."""
    import plume

    history = plume.one_frame_cases(plume.PlumeConfig())["background"].history
    sims = np.arange(2 * 6 * 3 * 3 * 2, dtype=np.float32).reshape(2, 6, 3, 3, 2)
    x, y = plume.windows(sims, history, 0, 5)
    # targets t = 1..4 (t = 0 has no input frame), each simulation in turn
    assert x.shape == (8, 1, 3, 3, 2) and y.shape == (8, 3, 3, 2)
    expected = [(s, t) for t in range(1, 5) for s in range(2)]
    for i, (s, t) in enumerate(expected):
        assert torch.equal(x[i, 0], torch.from_numpy(sims[s, t - 1]))
        assert torch.equal(y[i], torch.from_numpy(sims[s, t]))


def _relaxed_model():
    import plume

    torch.manual_seed(0)
    return plume.build("p4 relaxed r2", 2, 1)


def test_modulation_summary_per_layer_by_hand():
    import plume

    model = _relaxed_model()
    with torch.no_grad():
        for i, conv in enumerate(model.convs):
            conv.modulations.copy_(1 + 0.1 * (i + 1) * torch.randn(conv.modulations.shape))
    summary = plume.modulation_summary(model)
    assert len(summary) == len(model.convs) == 4
    for conv, (mean_off, max_off, spread) in zip(model.convs, summary):
        a = conv.modulations.detach().numpy()  # (rank, fibres, orientations)
        assert mean_off == pytest.approx(np.abs(a - 1).mean(), rel=1e-6)
        assert max_off == pytest.approx(np.abs(a - 1).max(), rel=1e-6)
        by_hand = np.mean([a[k, o].max() - a[k, o].min() for k in range(a.shape[0]) for o in range(a.shape[1])])
        assert spread == pytest.approx(by_hand, rel=1e-6)


def test_modulation_summary_spread_is_zero_for_a_level_that_keeps_equivariance():
    """``a`` constant over the orientations rescales a layer without breaking the symmetry: far from 1, spread 0."""
    import plume

    model = _relaxed_model()
    with torch.no_grad():
        for conv in model.convs:
            conv.modulations.fill_(1.5)
    assert plume.modulation_summary(model) == [pytest.approx([0.5, 0.5, 0.0])] * 4
    assert plume.equivariance_error(model, 1) < 1e-5


def test_modulation_summary_reads_rgroup_tables_and_skips_layers_without():
    import plume

    torch.manual_seed(0)
    rgroup = plume.build("RGroup L2", 2, 1)
    with torch.no_grad():
        rgroup.convs[2].relaxed_weights.copy_(torch.tensor([[1.0, 1.2, 0.6, 1.0], [0.9, 1.0, 1.0, 1.0]]))
    summary = plume.modulation_summary(rgroup)
    assert summary[2] == pytest.approx([(0.2 + 0.4 + 0.1) / 8, 0.4, (0.6 + 0.1) / 2])
    assert summary[0] == summary[1] == summary[3] == [0.0, 0.0, 0.0]
    assert plume.modulation_summary(plume.build("p4 exact", 2, 1)) == []
    assert plume.modulation_summary(plume.build("RPP", 2, 1)) == []
    assert plume.modulation_summary(plume.build("CNN", 4, 1)) == []


class ConstantChange(torch.nn.Module):
    """``f(v) = v_last + c`` for a fixed field ``c``: the change does not turn with the input."""

    def __init__(self, c: torch.Tensor) -> None:
        super().__init__()
        self.c = c

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return v[:, -1] + self.c


def test_change_asymmetry_of_a_fixed_field_is_how_much_the_field_changes_when_turned():
    import plume

    c = torch.randn(6, 6, 2, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 1, 6, 6, 2, generator=torch.Generator().manual_seed(1))
    turned = torch.stack([-torch.rot90(c, 1, (0, 1))[..., 1], torch.rot90(c, 1, (0, 1))[..., 0]], -1)  # R c by hand
    expected = float((c - turned).norm() / c.norm())
    assert plume.change_asymmetry(ConstantChange(c), x) == pytest.approx(expected, rel=1e-6)
    assert plume.change_asymmetry(ConstantChange(c), x, chunk=2) == pytest.approx(expected, rel=1e-6)
    uniform = torch.zeros(6, 6, 2)  # a uniform force along +x: turned, it points along +y
    uniform[..., 0] = 1.0
    assert plume.change_asymmetry(ConstantChange(uniform), x) == pytest.approx(math.sqrt(2), rel=1e-6)


def test_change_asymmetry_is_zero_for_exact_and_not_for_relaxed_modulations():
    import plume

    torch.manual_seed(0)
    x = 0.1 * torch.randn(4, 1, 8, 8, 2, generator=torch.Generator().manual_seed(2))
    exact = plume.build("p4 exact", 2, 1)
    with torch.no_grad():
        for conv in exact.convs:
            conv.bias.normal_(0, 0.1)
    assert plume.change_asymmetry(exact, x) < 1e-5
    relaxed = _relaxed_model()
    assert plume.change_asymmetry(relaxed, x) < 1e-5  # modulations at 1: still exact
    with torch.no_grad():
        relaxed.convs[1].modulations[:, :, 0] = 2.0
    assert plume.change_asymmetry(relaxed, x) > 1e-2


def test_mean_layers_averages_the_seeds_entry_by_entry():
    import plume

    seeds = [[[0.1, 0.2, 0.3], [1.0, 2.0, 3.0]], [[0.3, 0.4, 0.5], [3.0, 4.0, 5.0]]]
    assert plume.mean_layers(seeds) == [pytest.approx([0.2, 0.3, 0.4]), pytest.approx([2.0, 3.0, 4.0])]
    assert plume.mean_layers([seeds[0], None]) is None  # a seed from before the summary was kept
    assert plume.mean_layers([[], []]) is None  # a model without relaxation weights


def _result(params: int, future: float, spread: float = 0.0, layers=None, asymmetry: float = float("nan"),
            change: float = float("nan")):  # fmt: skip
    import plume

    return plume.Result(params, future, spread, future, 0.0, 0.0, 1.0, [(future, future)] * 3, change, layers=layers,
                        learnt_asymmetry=asymmetry)  # fmt: skip


def test_relaxed_vs_exact_takes_the_better_relaxed_model_that_ran():
    import plume

    results = {"p4 exact 5": _result(2000, 0.0200), "p4 relaxed r2 3": _result(1800, 0.0170),
               "p4 relaxed r4 2": _result(1850, 0.0190)}  # fmt: skip
    assert plume.relaxed_vs_exact(results, "p4 exact 5", ["p4 relaxed r2 3", "p4 relaxed r4 2"]) == (
        "`p4 relaxed r2 3` -15.0%"
    )
    del results["p4 relaxed r2 3"]
    assert plume.relaxed_vs_exact(results, "p4 exact 5", ["p4 relaxed r2 3", "p4 relaxed r4 2"]) == (
        "`p4 relaxed r4 2` -5.0%"
    )
    assert plume.relaxed_vs_exact({}, "p4 exact 5", ["p4 relaxed r2 3"]) == "-"


def test_spread_line_names_the_cells_over_the_limit():
    import plume

    sweep = {
        "beta 0": ({"p4 exact 5": _result(1, 0.02, 0.002), "CNN 8": _result(1, 0.04, 0.01)}, {}),
        "background": ({"p4 exact 5": _result(1, 0.02, 0.006)}, {}),
    }
    assert plume.spread_line(sweep) == (
        "Seed spread / mean over the 3 cells that ran: largest 30% (`p4 exact 5` on background); above 20%: "
        "`CNN 8` on beta 0 (25%), `p4 exact 5` on background (30%)."
    )
    sweep["background"][0]["p4 exact 5"] = _result(1, 0.02, 0.001)
    sweep["beta 0"][0]["CNN 8"] = _result(1, 0.04, 0.008)  # 20%: not over
    assert plume.spread_line(sweep).endswith("largest 20% (`CNN 8` on beta 0); above 20%: none.")
    assert plume.spread_line({"beta 0": ({}, {})}) == "Seed spread: no cell ran."


def test_history1_report_marks_missing_cells_and_compares_at_each_budget():
    """A partial study: the report says which cells did not run and compares what did, one and four frames."""
    import plume

    layers = [[0.01, 0.05, 0.02], [0.02, 0.06, 0.03], [0.03, 0.07, 0.04], [0.04, 0.08, 0.05]]
    one_bg = {"p4 exact 5": _result(2176, 0.0200, 0.002, asymmetry=0.0),
              "p4 relaxed r2 3": _result(1818, 0.0160, 0.002, layers, 0.25)}  # fmt: skip
    info = {"pairs": 264, "persistence": 0.05, "asymmetry": 0.87}
    four = {"background": {"p4 exact 5": _result(2716, 0.0181), "p4 relaxed r2 3": _result(2466, 0.0185, change=0.16)}}
    lines = plume.history1_lines(plume.PlumeConfig(), {"background": (one_bg, info)}, four, 60, 3, False, 1.0)
    text = "\n".join(lines)
    assert "| p4 exact 5 | 2,176 | 0.0200 ± 0.0020 (10%) |" in text
    assert "| CNN 8 |" not in text  # a model with no run in any case gets no row
    row = next(line for line in lines if line.startswith("| background | small |"))
    assert "not run" in row and "`p4 relaxed r2 3` -20.0% | `p4 relaxed r2 3` +2.2% |" in row
    large = next(line for line in lines if line.startswith("| background | large |"))
    assert large.endswith("| - | - |")
    mods = [line for line in lines if line.startswith("| background | p4 relaxed r2 3 |")]
    assert mods[0] == ("| background | p4 relaxed r2 3 | 1 | 0.0160 | -20.0% | 0.010 (0.05) / 0.020 (0.06) / "
                       "0.030 (0.07) / 0.040 (0.08) | 0.020 / 0.030 / 0.040 / 0.050 | 0.250 |")  # fmt: skip
    # a run kept before the per-layer summary: its largest change over all layers
    kept_before = "max over all layers 0.16 (per layer not kept)"
    assert mods[1] == f"| background | p4 relaxed r2 3 | 4 | 0.0185 | +2.2% | {kept_before} | - | - |"
    tables, block = [], []
    for line in [*lines, ""]:  # every row has as many cells as its table's header
        if line.startswith("|"):
            block.append(line.count("|"))
        elif block:
            tables.append(block)
            block = []
    assert len(tables) == 4 and all(set(t) == {t[0]} for t in tables)
    # no four-frame run kept anywhere: no column of dashes, the sweep's own report named instead
    lines = plume.history1_lines(
        plume.PlumeConfig(), {"background": (one_bg, info)}, {"background": {}}, 60, 3, False, 1.0
    )
    header = next(line for line in lines if line.startswith("| case | budget |"))
    assert "4 frames" not in header and any("results/plume.md" in line for line in lines)
    row = next(line for line in lines if line.startswith("| background | small |"))
    assert row.endswith("| `p4 relaxed r2 3` -20.0% |") and row.count("|") == header.count("|")


def test_kept_runs_keep_each_seeds_modulations_and_cached_reports_take_what_is_kept(tmp_path, monkeypatch):
    """Every run keeps its per-layer summary and learnt asymmetry; a cached report with ``min_seeds`` shows a model
    with its first seeds kept, and leaves out one with fewer."""
    import plume

    cfg = plume.PlumeConfig(res=6, frames=10, warmup=0, train_frames=6, history=1, horizon=2)
    rng = np.random.default_rng(0)
    sims = {k: 0.1 * rng.standard_normal((n, 10, 6, 6, 2)).astype(np.float32) for k, n in (("train", 2), ("domain", 1))}
    sims["pair"] = np.stack([sims["train"][0], plume.rotate_velocity(sims["train"][0])])
    monkeypatch.setattr(plume, "RUNS", tmp_path)
    monkeypatch.setattr(plume, "dataset", lambda _cfg: sims)
    trained, _ = plume.run_case(cfg, False, 4, 3, "t", ["p4 relaxed r2"], ["p4 relaxed r2 3"])
    files = sorted(tmp_path.glob("t-p4_relaxed_r2_3-s*.json"))
    assert len(files) == 3
    kept = [json.loads(f.read_text()) for f in files]
    assert all(len(run["modulations"]) == 4 and run["learnt_asymmetry"] >= 0 for run in kept)
    expected = np.mean([run["modulations"] for run in kept], axis=0)
    np.testing.assert_allclose(trained["p4 relaxed r2 3"].layers, expected)
    assert trained["p4 relaxed r2 3"].learnt_asymmetry == pytest.approx(np.mean([r["learnt_asymmetry"] for r in kept]))
    files[2].unlink()  # seed 2 not kept
    assert plume.run_case(cfg, False, 4, 3, "t", cached=True)[0] == {}
    partial, _ = plume.run_case(cfg, False, 4, 3, "t", cached=True, min_seeds=2)
    assert list(partial) == ["p4 relaxed r2 3"]
    assert [f for f, _ in partial["p4 relaxed r2 3"].seeds] == [kept[0]["future"], kept[1]["future"]]
    files[1].unlink()
    assert plume.run_case(cfg, False, 4, 3, "t", cached=True, min_seeds=2)[0] == {}
    two = [kept[0]["future"], kept[1]["future"]]
    mean, spread = np.mean(two), abs(two[1] - two[0])
    expected_cell = f"{mean:.4f} ± {spread:.4f} ({100 * spread / mean:.0f}%, 2 seeds)"
    assert plume.cell(partial, "p4 relaxed r2 3", 3) == expected_cell
    assert plume.cell(partial, "p4 relaxed r2 3", 2) == expected_cell.replace(", 2 seeds", "")
    assert plume.cell(partial, "p4 exact 5", 3) == "not run"
