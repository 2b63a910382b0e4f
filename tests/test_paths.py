"""Paths chosen by measurement: the fastest measured path is kept, and the report says which and by how much."""

import pytest
import torch
import torch.nn.functional as F
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

    monkeypatch.setattr(paths, "block_seconds", median_seconds)
    out = gm.compress(net(), group="C8", example_inputs=torch.randn(2, 16, 6, 6), progress=False)
    rows = {r.name: r for r in out.gm_report.layers}
    conv_best = fastest if fastest in ("dense", "grouped") else "grouped"
    linear_best = fastest if fastest != "grouped" else "blocks"
    assert out.get_submodule("0").impl == rows["0"].path == conv_best
    assert out.get_submodule("3").impl == rows["3"].path == linear_best
    assert rows["0"].layer_speedup == pytest.approx(4.0 / fake[conv_best])
    assert "path" in str(out.gm_report) and f"{4.0 / fake[conv_best]:.2f}x" in str(out.gm_report)


def test_fixed_impl_or_no_example_inputs_measure_nothing(monkeypatch):
    monkeypatch.setattr(paths, "block_seconds", lambda *a: pytest.fail("timed although it should not"))
    out = gm.compress(net(), group="C8", progress=False)
    assert out.get_submodule("0").impl == "auto" and out.gm_report.layers[0].path_times_ms is None
    recipe = {"version": 1, "defaults": {"group": "C8", "impl": "dense"}}
    out = gm.compress(net(), recipe=recipe, example_inputs=torch.randn(2, 16, 6, 6), progress=False)
    assert [out.get_submodule(n).impl for n in ("0", "3")] == ["dense", "dense"]


def test_measured_choice_survives_save_and_load(tmp_path, monkeypatch):
    monkeypatch.setattr(
        paths, "block_seconds", lambda call, model, t: 0.5 if getattr(model, "impl", "") == "dense" else 1.0
    )
    out = gm.compress(net(), group="C8", example_inputs=torch.randn(2, 16, 6, 6), progress=False)
    gm.save(out, tmp_path / "m.pt")
    again = gm.load(tmp_path / "m.pt", net())
    assert again.get_submodule("0").impl == "dense" and again.get_submodule("3").impl == "dense"


def by_batch(small_wins: str, large_wins: tuple[str, ...]):
    """A stand-in timer: on one sample path ``small_wins`` is fastest, on more the paths ``large_wins``; the
    original is slow."""

    def median_seconds(call, model, min_run_time):
        with torch.inference_mode():
            call()
        impl = getattr(model, "impl", "original")
        winners = (small_wins,) if call.args[0].shape[0] == 1 else large_wins
        return 1.0 if impl in winners else 3.0

    return median_seconds


def test_a_layer_keeps_the_fastest_path_of_each_batch_size_and_runs_it(monkeypatch, tmp_path):
    """Timed on the example batch and on one sample: when the winners differ, impl stays "auto" and the layer
    runs the path measured at the nearest batch size, checked by the cache entry each call fills; outputs stay
    the dense reference's; MACs follow the path; the choice survives save/load and shows in the report."""
    monkeypatch.setattr(paths, "block_seconds", by_batch("dense", ("blocks", "grouped")))
    example = torch.randn(8, 16, 6, 6)
    out = gm.compress(net(), group="C8", example_inputs=example, progress=False).eval()
    linear, conv = out.get_submodule("3"), out.get_submodule("0")
    assert linear.impl == "auto" and linear.batch_paths == {1: "dense", 8: "blocks"}
    assert conv.impl == "auto" and conv.batch_paths == {1: "dense", 8: "grouped"}
    row = {r.name: r for r in out.gm_report.layers}["3"]
    assert (row.path, row.small_path, row.small_batch) == ("blocks", "dense", 1)
    assert "blocks (one sample: dense)" in str(out.gm_report) and "3.00x (one sample: 3.00x)" in str(out.gm_report)
    assert "rows 1: dense, rows 8: blocks" in repr(linear) and "images 1: dense, images 8: grouped" in repr(conv)
    macs = {}
    for batch, path in [(1, "dense"), (2, "dense"), (3, "blocks"), (8, "blocks"), (64, "blocks")]:
        x = torch.randn(batch, 32 * 6 * 6)
        with torch.no_grad():
            y = linear(x)
        assert linear.path_for(batch) == path, batch  # sqrt(8) = 2.8: batches 1-2 nearer 1, 3 on nearer 8
        torch.testing.assert_close(y, F.linear(x, linear.weight, linear.bias), atol=1e-4, rtol=1e-4)
        macs[batch] = linear.macs(x, y) // batch
    assert macs[1] == macs[2] == 32 * 6 * 6 * 64 and macs[3] == macs[64] == linear.macs_per_row("blocks") < macs[1]
    for batch, path in [(1, "dense"), (8, "grouped")]:
        x = torch.randn(batch, 16, 6, 6)
        with torch.no_grad():
            y = conv(x)
        assert conv.path_for(batch) == path, batch
        torch.testing.assert_close(y, F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-4, rtol=1e-4)
        assert conv.macs(x, y) == (batch * 32 * 36 * 16 * 9 if path == "dense" else conv.macs(x, y))
    assert conv.macs(torch.randn(8, 16, 6, 6), y) < 8 * conv.macs(torch.randn(1, 16, 6, 6), y[:1])
    linear.impl = "blocks"  # an explicit path wins over the measured ones
    assert linear.path_for(1) == "blocks"
    linear.impl = "auto"
    gm.save(out, tmp_path / "m.pt")
    again = gm.load(tmp_path / "m.pt", net())
    assert again.get_submodule("3").batch_paths == {1: "dense", 8: "blocks"}
    assert again.get_submodule("0").batch_paths == {1: "dense", 8: "grouped"}


def test_one_winner_for_both_batch_sizes_is_a_plain_impl(monkeypatch):
    monkeypatch.setattr(paths, "block_seconds", by_batch("blocks", ("blocks",)))
    out = gm.compress(net(), group="C8", example_inputs=torch.randn(8, 16, 6, 6), progress=False)
    linear = out.get_submodule("3")
    assert linear.impl == "blocks" and linear.batch_paths == {}
    row = {r.name: r for r in out.gm_report.layers}["3"]
    assert row.small_path == "" and row.small_batch == 1 and row.path_cell() == "blocks"


def test_batch_paths_are_checked_and_ties_go_to_the_larger_batch():
    """Assigning batch paths checks them (sizes whole and >= 1, paths the layer has); between two measured sizes
    the boundary is their geometric mean, exactly (10 = sqrt(1 * 100) goes to 100, as 20 to 200)."""
    layer = gm.nn.GMLinear(64, 64, "C8")
    with pytest.raises(ValueError, match=r"paths among \('dense', 'blocks', 'packed', 'fft'\)"):
        layer.batch_paths = {1: "grouped"}
    with pytest.raises(ValueError, match="whole batch sizes >= 1"):
        layer.batch_paths = {0: "dense"}
    with pytest.raises(ValueError, match="whole batch sizes >= 1"):
        layer.batch_paths = {2.7: "dense"}
    with pytest.raises(ValueError, match="paths among"):
        gm.nn.GMLinear(64, 64, "D4").batch_paths = {1: "packed"}  # D4 has no packed path
    layer.batch_paths = {64: "packed", 1: "dense"}
    assert list(layer.batch_paths) == [1, 64] and "rows 1: dense, rows 64: packed" in repr(layer)
    assert [layer.path_for(b) for b in (1, 7, 8, 9, 1000)] == ["dense", "dense", "packed", "packed", "packed"]
    for lo, hi, tie in [(1, 100, 10), (2, 200, 20), (1, 484, 22), (3, 12, 6)]:
        layer.batch_paths = {lo: "dense", hi: "blocks"}
        assert [layer.path_for(b) for b in (tie - 1, tie)] == ["dense", "blocks"], (lo, hi)
    layer.batch_paths = {1: "dense", 8: "blocks", 64: "packed"}
    assert [layer.path_for(b) for b in (2, 3, 22, 23)] == ["dense", "blocks", "blocks", "packed"]
    layer.batch_paths = {}
    assert layer.path_for(1) == layer.resolved_impl()


def test_a_layer_with_batch_paths_exports_and_compiles_with_a_dynamic_batch():
    """A symbolic batch (torch.export with a dynamic dimension, torch.compile) takes the largest measured size's
    path: one graph for every batch, with the dense reference's outputs at other sizes."""
    from torch.export import Dim

    torch.manual_seed(0)
    layer = gm.nn.GMLinear(64, 64, "C8").eval()
    layer.batch_paths = {1: "dense", 8: "packed"}
    program = torch.export.export(layer, (torch.randn(8, 64),), dynamic_shapes=({0: Dim("b", min=1, max=1024)},))
    assert any("bmm" in str(n.target) for n in program.graph.nodes)  # the packed path's products
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for batch in (1, 3, 8, 100):
        x = torch.randn(batch, 64)
        want = F.linear(x, layer.weight, layer.bias)
        torch.testing.assert_close(program.module()(x), want, atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), want, atol=1e-4, rtol=1e-4)


def test_latency_before_and_after_are_measured_in_alternating_rounds(monkeypatch):
    """compress (not in place) times the user's untouched model and the compressed one alternately, keeping
    each one's best round; the user's model keeps its mode and weights."""
    import gmcompress.report as report

    calls = []
    times = iter([5.0, 4.0, 3.0, 6.0, 7.0, 2.5])  # before, after, before, after, before, after

    def fake(model, inputs, min_run_time=0.3):
        calls.append("gm" if any(isinstance(m, gm.nn.GMLinear) for m in model.modules()) else "dense")
        return next(times)

    monkeypatch.setattr(report, "measure_latency", fake)
    monkeypatch.setattr(paths, "block_seconds", lambda call, model, t: 1.0)
    model = net().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = gm.compress(model, group="C8", example_inputs=torch.randn(2, 16, 6, 6), progress=False)
    assert calls == ["dense", "gm"] * 3
    assert (out.gm_report.latency_before_ms, out.gm_report.latency_after_ms) == (3.0, 2.5)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_the_rule_takes_the_dense_path_on_cuda():
    """Without measurements, a layer on a CUDA device takes "dense" (cuBLAS/cuDNN won nearly every row measured on
    an H200); the same layer on the CPU takes its fast path. No GPU here: the kernels' device is stood in for."""
    from types import SimpleNamespace

    for build, fast in [
        (lambda impl: gm.nn.GMLinear(256, 256, "C16", impl=impl), "blocks"),
        (lambda impl: gm.nn.GMChannelConv(64, 64, 3, group="C8", padding=1, impl=impl), "grouped"),
    ]:
        for impl, path in [("auto", "dense"), (fast, fast)]:  # an explicit path is kept on any device
            layer = build(impl)
            assert layer.resolved_impl() == fast
            layer._parameters[layer.stored_form] = SimpleNamespace(device=torch.device("cuda"))
            assert layer.resolved_impl() == path


def test_capturing_inputs_never_changes_what_the_layers_compute():
    """A forward pre-hook that returns a value replaces the module's arguments: capturing each layer's first input
    must not feed that input to the layer's later calls (a layer called twice, as in a shared block)."""
    from gmcompress.batches import first_inputs

    torch.manual_seed(0)
    shared, head = nn.Linear(16, 16), nn.Linear(16, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared, head)
    x = torch.randn(3, 16)
    seen = first_inputs(model, x, {"shared": shared, "head": head})
    with torch.no_grad():
        torch.testing.assert_close(seen["shared"], x, rtol=0, atol=0)
        torch.testing.assert_close(seen["head"], shared(torch.tanh(shared(x))), rtol=0, atol=0)
    layer = gm.nn.GMConv2d(8, 8, 3, "C4", padding=1).eval()  # the GM layers take nn.Conv2d's keyword too
    xc = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(layer(input=xc), layer(xc), rtol=0, atol=0)
