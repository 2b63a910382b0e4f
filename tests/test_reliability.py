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
from gmcompress.nn import GMChannelConv, GMLinear, frozen
from gmcompress.recipe import RecipeError, load_recipe, parse_recipe


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


# 1. stale weights -------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["dense", "blocks", "fft", "auto"])
@pytest.mark.parametrize(
    "update",
    [
        lambda layer: layer.kernels.data.mul_(0.5),
        lambda layer: layer.kernels.copy_(layer.kernels * 0.5),
        lambda layer: layer.load_state_dict({k: v * 0.5 for k, v in layer.state_dict().items()}),
        lambda layer: torch.optim.SGD(layer.parameters(), lr=0.1).step(),
    ],
    ids=["data", "copy_", "load_state_dict", "optimizer"],
)
def test_in_place_updates_are_seen_by_the_eval_cache(impl, update):
    torch.manual_seed(0)
    layer = GMLinear(64, 64, "C8", rank=2, impl=impl).eval()
    for p in layer.parameters():
        p.grad = torch.ones_like(p)
    x = torch.randn(4, 64)
    with torch.no_grad():
        layer(x)  # fills the cache
        update(layer)
        got = layer(x)
    expected = F.linear(x, layer.weight.detach(), layer.bias.detach())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("index", [0, 1, 2, 3, -1])
@pytest.mark.parametrize("change", ["next float", "sign of zero"])
@pytest.mark.parametrize("features,group", [(64, "C8"), (9, "C3")])  # 27 kernel numbers: not 8-byte pairs
def test_the_eval_cache_sees_a_one_element_change_in_any_position(index, change, features, group):
    """The check compares bits (every byte, the last one included): a change to any single element, even the
    smallest one, must drop the cache. The next float up changes one bit pattern; -0.0 for 0.0 changes only
    the sign bit."""
    torch.manual_seed(0)
    layer = GMLinear(features, features, group, impl="dense").eval()
    flat = layer.kernels.data.view(-1)
    if change == "sign of zero":
        flat[index] = 0.0
    x = torch.randn(4, features)
    with torch.no_grad():
        layer(x)  # fills the cache
        value = flat[index].clone()
        flat[index] = -value if change == "sign of zero" else torch.nextafter(value, torch.tensor(float("inf")))
        got = layer(x)
        assert layer._snapshot[0].view(-1)[index].item() == flat[index].item()  # the check took the new values
        if change == "sign of zero":
            assert torch.signbit(layer._snapshot[0].view(-1)[index])
    torch.testing.assert_close(got, F.linear(x, layer.weight.detach(), layer.bias.detach()), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "offset view"])
def test_same_bytes_sees_every_bit_in_every_layout(dtype, layout):
    """same_bytes (the eval cache's check): memcmp on contiguous CPU tensors, integer views otherwise. Against an
    independent count: flipping any one bit of any one element, the first and the last included, is a change;
    -0.0 for 0.0 is a change; a NaN in place and equal copies are not."""
    from gmcompress.nn.bytecmp import same_bytes

    torch.manual_seed(0)
    base = torch.randn(6, 10, dtype=dtype)
    base[2, 3] = 0.0
    base[4, 5] = float("nan")

    def arrange(t):
        if layout == "transposed":
            return t.t().contiguous().t()  # same values, column-major memory
        if layout == "offset view":
            return torch.cat([t.new_zeros(1, 10), t])[1:]  # contiguous, at a storage offset
        return t.clone()

    a = arrange(base)
    assert same_bytes(a, arrange(base)) and same_bytes(a, a)
    assert a.is_contiguous() == (layout != "transposed")
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    real = torch.view_as_real(a) if dtype.is_complex else a
    bits = real.view(ints[real.element_size()])
    for index in [(0, 0), (2, 3), (5, 9)]:
        for bit in range(bits.element_size() * 8):
            b = arrange(base)
            b_bits = (torch.view_as_real(b) if dtype.is_complex else b).view(bits.dtype)
            b_bits[index] ^= 1 << bit if bit < bits.element_size() * 8 - 1 else -(1 << bit)
            assert not torch.equal(bits, b_bits)  # the independent count: the bits differ
            assert not same_bytes(a, b), (index, bit)
    other_layout = base.t().contiguous().t() if layout != "transposed" else base.clone()
    assert a.is_contiguous() != other_layout.is_contiguous() and same_bytes(a, other_layout)
    other_layout[5, 9] = other_layout[5, 9] + 1
    assert not same_bytes(a, other_layout)
    zero = arrange(base)
    zero[2, 3] = -0.0
    assert zero[2, 3] == a[2, 3] and not same_bytes(a, zero)
    other = {torch.float64: torch.float32, torch.complex64: torch.complex128}.get(dtype, torch.float64)
    assert not same_bytes(a, a.to(other))
    assert not same_bytes(a, a.reshape(10, 6)) and same_bytes(a[:0], a[:0].clone())


def test_a_tensor_subclass_parameter_is_compared_by_value_not_by_memory():
    """Wrapper subclasses (DTensor, FakeTensor, TwoTensor) report contiguous CPU storage at data_ptr 0: the memcmp
    path must not read it (it crashed the process), the cache must still see their changes. In a subprocess,
    so that a crash fails this test and not the session."""
    script = """
import torch, torch.nn.functional as F
from torch.testing._internal.two_tensor import TwoTensor
from gmcompress.nn import GMLinear
torch.manual_seed(0)
layer = GMLinear(64, 64, "C8", impl="dense").eval()
k = layer.kernels.detach()
layer.kernels = torch.nn.Parameter(TwoTensor(k.clone(), k.clone()))
x = torch.randn(2, 64)
with torch.no_grad():
    layer(x)
    layer(x)
    layer.kernels.mul_(0.5)
    got = layer(x)
    want = F.linear(x, layer.weight, layer.bias)
assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, F.linear(x, 2 * layer.weight, layer.bias))
print("same values")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "same values" in out.stdout, (out.returncode, out.stderr[-2000:])


def test_a_parametrized_kernel_is_read_through_its_parametrization():
    """The cache check reads kernels and modulations from the module's own parameters, and a parametrized one
    (torch.nn.utils.parametrize) through its attribute: a change of the underlying tensor is seen."""
    from torch.nn.utils import parametrize

    class Scale(nn.Module):
        def forward(self, k):
            return 2.0 * k

    torch.manual_seed(0)
    layer = GMLinear(64, 64, "C8", impl="blocks").eval()
    parametrize.register_parametrization(layer, "kernels", Scale())
    x = torch.randn(3, 64)
    with torch.no_grad():
        first = layer(x)
        torch.testing.assert_close(first, F.linear(x, layer.weight, layer.bias))
        layer.parametrizations.kernels.original.mul_(0.5)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        assert not torch.allclose(layer(x), first)


def test_in_place_update_under_inference_mode_is_seen():
    torch.manual_seed(0)
    with torch.inference_mode():
        layer = GMLinear(64, 64, "C8", impl="dense").eval()
        x = torch.randn(4, 64)
        layer(x)
        layer.kernels.mul_(0.5)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_frozen_checks_once_and_refuses_a_change_made_inside():
    """frozen(): served from the cache without the per-call check; a change inside is an error on exit."""
    torch.manual_seed(0)
    model = nn.Sequential(GMLinear(64, 64, "C8", rank=2, impl="blocks"), nn.ReLU()).eval()
    layer = model[0]
    x = torch.randn(4, 64)
    with torch.no_grad():
        layer(x)  # filled before the block
        layer.kernels.data.mul_(0.5)  # changed before the block: the block's first call sees it
        with frozen(model):
            first = layer(x)
            torch.testing.assert_close(first, F.linear(x, layer.weight, layer.bias))
            with frozen(model):  # nested blocks
                torch.testing.assert_close(layer(x), first)
            torch.testing.assert_close(layer(x), first)
        with pytest.raises(RuntimeError, match=r"parameters of 0 changed inside gmcompress\.frozen\(\)"):
            with frozen(model):
                layer(x)
                layer.kernels.data.mul_(0.5)
                stale = layer(x)  # documented: no per-call check inside the block
                torch.testing.assert_close(stale, first)
        fresh = layer(x)  # after the error the cache is rebuilt from the new values
    torch.testing.assert_close(fresh, F.linear(x, layer.weight, layer.bias))
    assert not torch.allclose(fresh, first)


def test_frozen_does_not_serve_an_inference_mode_cache_to_autograd():
    """A weight cached under inference_mode cannot be saved for backward: inside frozen() too, a call outside
    inference mode rebuilds it, so gradients with respect to the input work (and are right)."""
    torch.manual_seed(0)
    layer = GMLinear(64, 64, "C8", impl="dense").eval().requires_grad_(False)
    with frozen(layer):
        with torch.inference_mode():
            layer(torch.randn(2, 64))
        x = torch.randn(2, 64, requires_grad=True)
        layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(2, 64))


def test_frozen_lets_an_exception_through_and_leaves_the_layers_checking():
    torch.manual_seed(0)
    layer = GMLinear(32, 32, "C8", impl="dense").eval()
    x = torch.randn(2, 32)
    with torch.no_grad():
        with pytest.raises(KeyError), frozen(layer):
            layer(x)
            raise KeyError("user error")
        layer.kernels.data.mul_(2.0)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))  # checking again


def test_frozen_ignores_changes_made_outside_it_and_layers_it_did_not_call():
    torch.manual_seed(0)
    m = nn.ModuleDict(dict(enc=GMLinear(64, 64, "C8", impl="blocks"), head=GMLinear(64, 64, "C8", impl="blocks")))
    m.eval()
    x = torch.randn(2, 64)
    with torch.no_grad():
        m.head(x)
        m.head.kernels.mul_(0.5)  # outside any block
        with frozen(m):
            m.enc(x)  # head is not called: nothing stale can come from it
        m.load_state_dict({k: v * 2 for k, v in m.state_dict().items()})
        with frozen(m):
            pass
        with frozen(m):
            torch.testing.assert_close(m.head(x), F.linear(x, m.head.weight, m.head.bias))


def test_frozen_catches_a_stale_output_even_after_the_cache_was_dropped():
    """A stale output served inside the block is an error on exit, also when a later grad-enabled call (or a
    dtype change) dropped the cache; a copy made inside the block checks its values on every call."""
    import copy

    torch.manual_seed(0)
    layer = GMLinear(64, 64, "C8", rank=2, impl="blocks").eval()
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="changed inside"), frozen(layer):
        with torch.no_grad():
            layer(x)
        layer.kernels.data.mul_(2)
        with torch.no_grad():
            layer(x)  # stale (documented)
        layer(x)  # autograd on: the cache and its snapshot are dropped
    with pytest.raises(RuntimeError, match="changed inside"), frozen(layer):
        with torch.no_grad():
            layer(x)
            layer.kernels.data.mul_(2)
            layer(x)  # stale
        layer.double()  # a dtype change drops the cache too
    layer.float()
    with torch.no_grad(), frozen(layer):
        layer(x)
        twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.kernels.mul_(3)
        torch.testing.assert_close(twin(x), F.linear(x, twin.weight, twin.bias))


@pytest.mark.parametrize("make", [
    lambda: GMLinear(64, 64, "C8", rank=2, impl="blocks"),
    lambda: GMChannelConv(16, 16, 3, "C8", rank=2, padding=1, impl="grouped"),
])  # fmt: skip
def test_cache_filled_in_inference_mode_still_gives_input_gradients(make):
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
        layer.kernels.requires_grad_(False)
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


def test_bit_snapshot_decides_as_same_bytes_does():
    """BitSnapshot (the eval cache's per-call check) takes a shortcut for plain contiguous CPU tensors; on every
    kind of difference it must answer as same_bytes, tensor by tensor, and a different count is a difference."""
    from gmcompress.nn.bytecmp import BitSnapshot, same_bytes

    torch.manual_seed(0)
    base = torch.randn(6, 10)
    one_bit = base.clone()
    one_bit.view(torch.int32)[5, 9] ^= 1
    variants = {
        "equal copy": base.clone(),
        "the last bit of the last element": one_bit,
        "same bytes, other shape": base.clone().reshape(10, 6),
        "same bytes, other dtype": base.clone().view(torch.int32),
        "same values, column-major": base.t().contiguous().t(),
        "same values, lazily negated": torch._neg_view(-base),
        "float64": base.double(),
        "empty": base[:0].clone(),
        "a Parameter": torch.nn.Parameter(base.clone()),
    }
    for snapshot_of in (base, base.t().contiguous().t(), base[:0]):
        snapshot = BitSnapshot([snapshot_of])
        assert snapshot[0] is not snapshot_of and len(snapshot) == 1
        for name, tensor in variants.items():
            assert snapshot.matches([tensor]) == same_bytes(snapshot_of, tensor), name
    assert not BitSnapshot([base]).matches([base, base]) and not BitSnapshot([base]).matches([])
    assert BitSnapshot([base, base[4:]]).matches([base.clone(), base[4:].clone()])
    assert not BitSnapshot([base, base[4:]]).matches([base.clone(), one_bit[4:]])


def test_a_copied_layer_checks_its_own_snapshot():
    """deepcopy and pickling copy a layer's cache snapshot; the copy's check must read its own copies, not the
    memory of the original's (which may be freed and reused: here it is overwritten on purpose)."""
    import copy
    import pickle

    torch.manual_seed(0)
    layer = GMLinear(64, 64, "C8", impl="dense").eval()
    x = torch.randn(3, 64)
    with torch.no_grad():
        layer(x)  # fills the cache and its snapshot
        for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            layer._snapshot[0].view(-1)[0] += 1.0  # the original's snapshot memory changes
            assert twin._snapshot.matches(twin._structure_params())
            twin.kernels.data.view(-1)[0] += 1.0  # now equal to the original's snapshot, not to the twin's
            torch.testing.assert_close(twin(x), F.linear(x, twin.weight, twin.bias), rtol=0, atol=0)
