"""Paths chosen by measurement: the fastest measured path is kept, and the report says which and by how much."""

import pytest
import torch
from torch import nn

import gmcompress as gm
import gmcompress.paths as paths


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 6 * 6, 64))


@pytest.mark.parametrize("fastest", ["dense", "grouped", "blocks", "fft"])
def test_the_fastest_measured_path_is_kept(monkeypatch, fastest):
    fake = {"original": 4.0, "dense": 3.0, "grouped": 2.5, "blocks": 2.0, "fft": 2.2}
    fake[fastest] = 1.0

    def median_seconds(call, model, min_run_time):  # deterministic stand-in for the timer
        with torch.inference_mode():
            call()
        return fake.get(getattr(model, "impl", "original"), fake["original"])

    monkeypatch.setattr(paths, "median_seconds", median_seconds)
    out = gm.compress(net(), group="C8", example_inputs=torch.randn(2, 16, 6, 6), progress=False)
    rows = {r.name: r for r in out.gm_report.layers}
    conv_best = fastest if fastest in ("dense", "grouped") else "grouped"
    linear_best = fastest if fastest != "grouped" else "blocks"
    assert out.get_submodule("0").impl == rows["0"].path == conv_best
    assert out.get_submodule("3").impl == rows["3"].path == linear_best
    assert rows["0"].layer_speedup == pytest.approx(4.0 / fake[conv_best])
    assert "path" in str(out.gm_report) and f"{4.0 / fake[conv_best]:.2f}x" in str(out.gm_report)


def test_fixed_impl_or_no_example_inputs_measure_nothing(monkeypatch):
    monkeypatch.setattr(paths, "median_seconds", lambda *a: pytest.fail("timed although it should not"))
    out = gm.compress(net(), group="C8", progress=False)
    assert out.get_submodule("0").impl == "auto" and out.gm_report.layers[0].path_times_ms is None
    recipe = {"version": 1, "defaults": {"group": "C8", "impl": "dense"}}
    out = gm.compress(net(), recipe=recipe, example_inputs=torch.randn(2, 16, 6, 6), progress=False)
    assert [out.get_submodule(n).impl for n in ("0", "3")] == ["dense", "dense"]


def test_measured_choice_survives_save_and_load(tmp_path, monkeypatch):
    monkeypatch.setattr(
        paths, "median_seconds", lambda call, model, t: 0.5 if getattr(model, "impl", "") == "dense" else 1.0
    )
    out = gm.compress(net(), group="C8", example_inputs=torch.randn(2, 16, 6, 6), progress=False)
    gm.save(out, tmp_path / "m.pt")
    again = gm.load(tmp_path / "m.pt", net())
    assert again.get_submodule("0").impl == "dense" and again.get_submodule("3").impl == "dense"
