"""Careless and hostile use: each case was a silent wrong result, lost work or a crash deep in torch/numpy."""

import os
import stat
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gmcompress as gm
from gmcompress.cli import main as cli_main
from gmcompress.nn import GMChannelConv, GMLinear
from gmcompress.recipe import RecipeError, load_recipe, parse_recipe


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


# 1. stale weights (forward reads the live parameters) ---------------------------------------------------
@pytest.mark.parametrize("impl", ["dense", "blocks", "fft", "auto"])
@pytest.mark.parametrize(
    "update",
    [
        lambda layer: layer._free().data.mul_(0.5),
        lambda layer: layer._free().copy_(layer._free() * 0.5),
        lambda layer: layer.set_kernels(layer.kernels * 0.5),
        lambda layer: layer.load_state_dict({k: v * 0.5 for k, v in layer.state_dict().items()}),
        lambda layer: torch.optim.SGD(layer.parameters(), lr=0.1).step(),
    ],
    ids=["data", "copy_", "set_kernels", "load_state_dict", "optimizer"],
)
def test_in_place_updates_are_seen_by_the_next_call(impl, update):
    torch.manual_seed(0)
    layer = GMLinear(64, 64, "C8", rank=2, impl=impl).eval()
    for p in layer.parameters():
        p.grad = torch.ones_like(p)
    x = torch.randn(4, 64)
    with torch.no_grad():
        layer(x)
        update(layer)
        got = layer(x)
    expected = F.linear(x, layer.weight.detach(), layer.bias.detach())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_parametrized_kernel_is_read_through_its_parametrization():
    """A parametrized kernel (torch.nn.utils.parametrize) is read through its attribute: a change of the underlying
    tensor is seen. The layer then keeps its kernels as they are on a block path too (no spectrum to convert to)."""
    from torch.nn.utils import parametrize

    class Scale(nn.Module):
        def forward(self, k):
            return 2.0 * k

    torch.manual_seed(0)
    layer = GMLinear(64, 64, "C8", impl="dense").eval()
    parametrize.register_parametrization(layer, "kernels", Scale())
    layer.impl = "blocks"
    assert layer.stored_form == "kernels"
    x = torch.randn(3, 64)
    with torch.no_grad():
        first = layer(x)
        torch.testing.assert_close(first, F.linear(x, layer.weight, layer.bias))
        layer.parametrizations.kernels.original.mul_(0.5)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        assert not torch.allclose(layer(x), first)


@pytest.mark.parametrize("name", ["modulations", "bias"])
def test_a_parametrized_modulation_or_bias_is_read_through_its_parametrization(name):
    """On the block path of a layer that stores its spectrum, a parametrized modulation or bias is read through its
    attribute at few rows (the spectrum multiplied directly) and at many (Gauss's products), with leading dims."""
    from torch.nn.utils import parametrize

    class Scale(nn.Module):
        def forward(self, v):
            return 2.0 * v

    torch.manual_seed(0)
    layer = GMLinear(64, 64, "C8", rank=2, impl="blocks").eval()
    with torch.no_grad():
        layer.modulations.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1.0, 1.0)
    parametrize.register_parametrization(layer, name, Scale())
    assert layer.stored_form == "spectrum"
    with torch.no_grad():
        for shape in ((1, 64), (32, 64), (2, 3, 64)):
            x = torch.randn(shape)
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


def test_in_place_update_under_inference_mode_is_seen():
    torch.manual_seed(0)
    with torch.inference_mode():
        layer = GMLinear(64, 64, "C8", impl="dense").eval()
        x = torch.randn(4, 64)
        layer(x)
        layer.kernels.mul_(0.5)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("make", [
    lambda: GMLinear(64, 64, "C8", rank=2, impl="blocks"),
    lambda: GMChannelConv(16, 16, 3, "C8", rank=2, padding=1, impl="grouped"),
])  # fmt: skip
def test_a_call_in_inference_mode_leaves_input_gradients_working(make):
    torch.manual_seed(0)
    layer = make().eval()
    for p in layer.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 64) if isinstance(layer, GMLinear) else torch.randn(2, 16, 5, 5)
    with torch.inference_mode():
        layer(x)
    xi = x.clone().requires_grad_()
    (layer(xi) ** 2).sum().backward()  # saliency-style: gradients w.r.t. the input only
    ref = x.clone().requires_grad_()
    layer.impl = "dense"
    (layer(ref) ** 2).sum().backward()
    torch.testing.assert_close(xi.grad, ref.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_grouped_conv_under_bias_only_training_autocast_and_vmap(layout):
    """The grouped path's in-place writes stay out of the way of autograd (bias-only training), autocast and
    functorch transforms."""
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    grouped = GMChannelConv(16, 16, 3, "C8", rank=2, padding=1, impl="grouped")
    dense = GMChannelConv(16, 16, 3, "C8", rank=2, padding=1, impl="dense")
    dense.load_state_dict(grouped.state_dict())
    x = torch.randn(2, 16, 5, 5).contiguous(memory_format=fmt)
    for layer in (grouped, dense):
        layer._free().requires_grad_(False)  # the stored kernels (a spectrum on the grouped path)
        layer.modulations.requires_grad_(False)
        layer(x).square().sum().backward()
    torch.testing.assert_close(grouped.bias.grad, dense.bias.grad, atol=1e-4, rtol=1e-4)
    grouped.eval(), dense.eval()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = grouped(x)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), dense(x), atol=0.1, rtol=0.05)
        xs = torch.randn(3, 2, 16, 5, 5)
        torch.testing.assert_close(
            torch.func.vmap(grouped)(xs), torch.stack([dense(v) for v in xs]), atol=1e-5, rtol=1e-4
        )


def test_padded_grouped_conv_keeps_channels_last():
    torch.manual_seed(0)
    layer = GMChannelConv(12, 20, 3, "C8", padding=1, impl="grouped", pad=True)
    x = torch.randn(2, 12, 6, 6).contiguous(memory_format=torch.channels_last)
    y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.shape == (2, 20, 6, 6)
    layer.impl = "dense"
    torch.testing.assert_close(y, layer(x), atol=1e-5, rtol=1e-4)


# 5. unbatched input to a compressed 1x1 conv -----------------------------------------------------
@pytest.mark.parametrize("length", [16, 7])
def test_unbatched_pointwise_conv1d(length):
    torch.manual_seed(0)
    conv = nn.Conv1d(16, 16, 1)
    full = GMChannelConv.from_dense(conv, "C8", rank=8)  # full rank: equal to the dense conv
    x = torch.randn(16, length)  # (C, L), with L == C in the first case
    torch.testing.assert_close(full(x), conv(x), atol=1e-5, rtol=1e-5)
    message = r"GMChannelConv\(16, 16, kernel_size=\(1,\)\): expected input .* got shape \(3, 16\)"
    with pytest.raises(ValueError, match=message):
        full(torch.randn(3, 16))  # neither (C, L) nor (B, C, L) with C = 16... (3, 16) is (C=3, L=16)


@pytest.mark.parametrize(
    "stride,padding,mode",
    [(2, 0, "zeros"), (1, 1, "zeros"), (2, 1, "reflect"), (1, "same", "zeros"), (2, "valid", "zeros")],
)
def test_1x1_conv_with_stride_and_padding_is_compressed_exactly(stride, padding, mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 1, stride=stride, padding=padding, padding_mode=mode))
    out = gm.compress(model, group="C8", rank=8, progress=False)
    assert isinstance(out.get_submodule("0"), GMChannelConv)
    x = torch.randn(2, 16, 9, 9)
    torch.testing.assert_close(out(x), model(x), atol=1e-5, rtol=1e-5)


def test_shared_bias_for_tied_convolutions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1))
    recipe = {"version": 1, "defaults": {"conv_group": "C4", "bias": "shared", "modulate": False}}
    conv = gm.compress(model, recipe=recipe, progress=False).get_submodule("0")
    assert conv.bias.shape == (2,)
    torch.testing.assert_close(conv.bias, model[0].bias.detach().view(2, 4).mean(1))
    assert conv.check_equivariance() < 1e-5  # with its bias


# 6. frozen layers -------------------------------------------------------------------------------
def test_frozen_layers_stay_frozen():
    model = mlp()
    model[0].requires_grad_(False)
    model[2].weight.requires_grad_(False)
    out = gm.compress(model, group="C8", progress=False)
    assert not any(p.requires_grad for p in out.get_submodule("0").parameters())
    last = out.get_submodule("2")
    assert not last.kernels.requires_grad and not last.modulations.requires_grad and last.bias.requires_grad


# 7. tied weights --------------------------------------------------------------------------------
class TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 40, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.body(self.embed(ids))))


def test_tied_weights_stay_tied_and_dense():
    model = TiedHead()
    out = gm.compress(model, group="C8", progress=False)
    rows = {r.name: r for r in out.gm_report.layers}
    assert rows["head"].status == "skipped" and "tied to embed.weight" in rows["head"].reason
    assert rows["body"].status == "compressed"
    assert out.get_submodule("head").weight is out.get_submodule("embed").weight


def test_two_linears_sharing_a_parameter_stay_dense():
    a, b = nn.Linear(16, 16), nn.Linear(16, 16)
    b.weight = a.weight
    out = gm.compress(nn.Sequential(a, nn.ReLU(), b), group="C8", progress=False)
    assert [r.status for r in out.gm_report.layers] == ["skipped", "skipped"]
    assert out.get_submodule("0").weight is out.get_submodule("2").weight


# 8. file modes and symlinks ---------------------------------------------------------------------
def test_save_respects_umask_existing_mode_and_symlinks(tmp_path):
    model = gm.compress(mlp(), group="C8", progress=False)
    old = os.umask(0o022)
    try:
        gm.save(model, tmp_path / "a.pt")
        assert stat.S_IMODE((tmp_path / "a.pt").stat().st_mode) == 0o644
        os.chmod(tmp_path / "a.pt", 0o640)
        gm.save(model, tmp_path / "a.pt")
        assert stat.S_IMODE((tmp_path / "a.pt").stat().st_mode) == 0o640
    finally:
        os.umask(old)
    (tmp_path / "link.pt").symlink_to(tmp_path / "a.pt")
    gm.save(model, tmp_path / "link.pt")
    assert (tmp_path / "link.pt").is_symlink()
    assert (
        gm.load(tmp_path / "link.pt", mlp()).get_submodule("0").kernels.shape == model.get_submodule("0").kernels.shape
    )


# 9. meta-device models ---------------------------------------------------------------------------
def test_plan_a_meta_device_model():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4096, 4096), nn.GELU(), nn.Linear(4096, 1024))
    plan = gm.plan(model, group="C16")
    assert [p.form for p in plan.layers] == ["GMLinear", "GMLinear"]
    assert plan.report().params_after < plan.report().params_before / 10


# 10. ranks -------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [1.5, "2", True])
def test_non_integer_ranks_are_refused(rank):
    with pytest.raises(ValueError, match=r"rank.*expected int"):
        gm.compress(mlp(), group="C8", rank=rank, progress=False)
    with pytest.raises(TypeError, match="whole number"):
        GMLinear(16, 16, "C8", rank=rank)


# 12. huge groups ------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["C1000000", "C16^10", "C16^1000", "D9999xC2"])
def test_huge_groups_are_refused_before_allocating(spec):
    with pytest.raises(ValueError, match="order|powers above"):
        gm.compress(mlp(), group=spec, progress=False)


def test_cli_huge_group_is_one_line(capsys):
    assert cli_main(["plan", "--model", "torch.nn:Identity", "--group", "C1000000"]) == 2
    assert "largest supported order" in capsys.readouterr().err


# smaller cases ----------------------------------------------------------------------------------
@pytest.mark.parametrize("damping", [float("nan"), float("inf"), -1.0])
def test_bad_damping_is_refused(damping):
    with pytest.raises(ValueError, match="damping"):
        gm.compress(mlp(), group="C8", damping=damping, progress=False)
    with pytest.raises(RecipeError, match="defaults.damping"):
        parse_recipe({"version": 1, "defaults": {"group": "C8", "damping": damping}}, "r.yaml")


def test_include_that_matches_nothing_warns_and_regexes_match_whole_names():
    with pytest.warns(UserWarning, match="matches none"):
        out = gm.compress(mlp(), group="C8", include="lin", progress=False)
    assert all(r.status == "skipped" for r in out.gm_report.layers)
    out = gm.compress(mlp(), group="C8", include="0", progress=False)  # whole name "0", not "0" inside "10"
    assert [r.status for r in out.gm_report.layers] == ["compressed", "skipped"]


@pytest.mark.parametrize(
    "section,match",
    [
        ({"lr": -1}, r"finetune.lr: expected > 0"),
        ({"epochs": 0}, r"finetune.epochs: expected >= 1"),
        ({"alpha": 2.0}, r"finetune.alpha: expected in \[0, 1\]"),
        ({"lr": float("nan")}, r"finetune.lr: expected a finite number"),
        ({"loss": "l1"}, r"finetune.loss: expected one of"),
    ],
)
def test_recipe_finetune_values_are_checked_with_the_key_path(section, match):
    with pytest.raises(RecipeError, match="r.yaml: " + match):
        parse_recipe({"version": 1, "defaults": {"group": "C8"}, "finetune": section}, "r.yaml")


def test_binary_recipe_and_dict_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"\x80\x81\xfe\xff" * 10)
    with pytest.raises(RecipeError, match="not a text file"):
        load_recipe(path)
    out = gm.compress(mlp(), recipe={"version": 1, "defaults": {"group": "C8", "rank": 2}}, progress=False)
    assert out.gm_report.layers[0].rank == 2
    with pytest.raises(RecipeError, match="a YAML path, a dict or a Recipe"):
        gm.compress(mlp(), recipe=3, progress=False)


@pytest.mark.parametrize("content", [b"", b"garbage", b"PK\x03\x04broken-zip"])
def test_empty_or_corrupt_saved_file_gives_one_error_naming_it(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"bad.pt: not a readable gmcompress/torch file"):
        gm.load(path, mlp())


def test_failed_load_leaves_the_model_as_it_was(tmp_path):
    gm.save(gm.compress(mlp(), group="C8", inplace=True, progress=False), tmp_path / "a.pt")  # a module tree
    data = torch.load(tmp_path / "a.pt", weights_only=True)
    data["state_dict"].pop(next(k for k in data["state_dict"] if k.startswith("2.")))
    torch.save(data, tmp_path / "broken.pt")
    target = mlp()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"broken.pt: the weights do not fit this model \(missing: 2\."):
        gm.load(tmp_path / "broken.pt", target)
    assert [type(m) for m in target] == [nn.Linear, nn.ReLU, nn.Linear]
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_load_into_other_widths_is_refused(tmp_path):
    gm.save(gm.compress(mlp(), group="C8", progress=False), tmp_path / "a.pt")
    wider = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8))
    with pytest.raises(ValueError, match=r"layer '0' has out_features=64 in this model but 32 in the file"):
        gm.load(tmp_path / "a.pt", wider)


def test_scripted_model_is_refused_with_the_fix():
    with pytest.raises(TypeError, match="TorchScript.*compress the original"):
        gm.compress(torch.jit.script(mlp()), group="C8", progress=False)


class Locked(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.lock = threading.Lock()

    def forward(self, x):
        return self.fc(x)


def test_model_that_cannot_be_copied_says_use_inplace():
    with pytest.raises(TypeError, match="cannot be deep-copied.*inplace=True"):
        gm.compress(Locked(), group="C8", progress=False)
    out = gm.compress(Locked(), group="C8", inplace=True, progress=False)
    assert isinstance(out.fc, GMLinear)


def test_compress_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    gm.compress(mlp(), group="C8", progress=False)  # mlp() reseeds: draw the reference after it too
    torch.manual_seed(123)
    model = mlp()
    torch.manual_seed(123)
    gm.compress(model, group="C8", progress=False)
    assert torch.equal(torch.rand(3), expected)


class SamePadConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(F.pad(x, (1, 1, 1, 1)))


class MyLinear(nn.Linear):
    pass


def test_every_dense_layer_is_listed_with_a_reason():
    net = nn.Sequential(
        nn.Conv3d(2, 2, 1),
        nn.Flatten(1, 2),
        nn.ConvTranspose2d(8, 8, 2),
        SamePadConv(8, 8, 3),
        nn.Conv2d(8, 8, 3, groups=8),
        nn.Flatten(),
        MyLinear(8 * 2 * 2, 16),
        torch.nn.utils.parametrizations.weight_norm(nn.Linear(16, 16)),
    )
    out = gm.compress(net, group="C8", progress=False)
    rows = {r.name: r for r in out.gm_report.layers}
    assert set(rows) == {"0", "2", "3_weight_conv2d", "4", "6", "7"}  # the graph pass traces into SamePadConv
    assert "Conv3d is not supported" in rows["0"].reason
    assert "transposed" in rows["2"].reason
    assert rows["3_weight_conv2d"].status == "compressed"
    assert "depthwise" in rows["4"].reason
    assert rows["6"].status == "compressed"  # a subclass that only renames is compressed
    assert "parametrized" in rows["7"].reason
    x = torch.randn(2, 2, 4, 3, 3)
    assert out(x).shape == net(x).shape == (2, 16)


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    (tmp_path / "empty.pt").write_bytes(b"")
    cases = [
        (["report", "--model", "cli_models:mlp", "--checkpoint", str(tmp_path / "empty.pt")], "not a readable"),
        (["compress", "--model", "cli_models:mlp", "--group", "C8", "--out", str(tmp_path / "empty.pt" / "x.pt")],
         "is a file, not a directory"),
        (["compress", "--model", "cli_models:broken", "--group", "C8"], "building the model failed"),
    ]  # fmt: skip
    for argv, message in cases:
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_cli_in_a_subprocess_prints_no_traceback(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    run = subprocess.run(
        [sys.executable, "-m", "gmcompress.cli", "report", "--model", "torch.nn:Identity", "--checkpoint",
         str(tmp_path / "empty.pt")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 2 and "Traceback" not in run.stderr and "empty.pt" in run.stderr
