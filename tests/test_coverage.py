"""Every dense layer is seen: inside torch.nn containers, inside layer subclasses with their own forward, with tall
kernels; and compress gives every module back the train/eval flag it had."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gmcompress as gm
from gmcompress.nn import GMChannelConv, GMLayer, GMLinear


def training_flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


# ---------------------------------------------------------------------------------------------- train/eval flags
class Mixed(nn.Module):
    """A model in train mode with a BatchNorm, a Linear and a functional weight's owner in eval mode."""

    def __init__(self, functional: bool):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(8, 16, 1)
        self.bn = nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16, 8)
        self.head = nn.Module()
        self.head.w = nn.Parameter(torch.randn(8, 8) / 4)
        self.functional = functional

    def forward(self, x):
        y = self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).mean((2, 3)))
        return F.linear(y, self.head.w) if self.functional else y


def mixed_modes() -> Mixed:
    model = Mixed(functional=True).train()
    model.bn.eval(), model.fc.eval(), model.head.eval()
    return model


def test_compress_gives_each_module_its_own_training_flag_back():
    """compress put every module in the flag of the root: a BatchNorm in eval inside a model in train came back
    training (its running statistics then moved at the next call), and so did the user's own model, through the
    latency measurement."""
    model = mixed_modes()
    before = training_flags(model)
    x = torch.randn(4, 8, 4, 4)
    out = gm.compress(model, group="C8", example_inputs=x, progress=False)
    assert training_flags(model) == before  # the user's model
    assert isinstance(out.conv, GMChannelConv) and isinstance(out.fc, GMLinear)
    assert isinstance(out.head_w_linear, GMLinear)  # lifted from F.linear(y, self.head.w)
    assert out.training and out.conv.training and out.drop.training  # as the model and the dense conv
    assert not out.bn.training and not out.fc.training  # BatchNorm; a GM layer takes its dense layer's flag
    assert not out.head_w_linear.training  # a lifted layer takes the flag of the module that held its weight


@pytest.mark.parametrize("root_training", [True, False])
def test_compress_in_place_restores_every_modules_flag(root_training):
    model = Mixed(functional=False).train(root_training)
    model.bn.train(not root_training), model.fc.train(not root_training)
    before = training_flags(model)
    out = gm.compress(model, group="C8", inplace=True, progress=False)
    assert out is model and isinstance(model.fc, GMLinear) and isinstance(model.conv, GMChannelConv)
    assert training_flags(model) == before  # the GM layers included: fc and conv are the names of the dense layers


# ---------------------------------------------------------------------------------------------- transformers
def materialised(original: nn.Module, compressed: nn.Module) -> nn.Module:
    """``original`` with each GM layer of ``compressed`` put back at its name as its ``to_dense()`` module."""
    reference = copy.deepcopy(original)
    for name, layer in compressed.named_modules():
        if isinstance(layer, GMLayer):
            parent, _, attr = name.rpartition(".")
            setattr(reference.get_submodule(parent), attr, layer.to_dense())
    return reference


def assert_same_outputs(out: nn.Module, reference: nn.Module, *inputs: torch.Tensor, valid=None) -> None:
    """Equal outputs in eval mode under no_grad (torch's fused paths in the dense reference), in eval mode with grad,
    and in train mode (dropout 0); ``valid`` selects the positions the fused path computes (not padding)."""
    for training, grad in [(False, False), (False, True), (True, True)]:
        out.train(training), reference.train(training)
        with torch.set_grad_enabled(grad):
            got, want = out(*inputs), reference(*inputs)
        if valid is not None:
            got, want = got[valid], want[valid]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 3)

    def forward(self, x, padding):
        return self.enc(x, src_key_padding_mask=padding)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # the dense reference's fast path
def test_transformer_encoder_lists_every_linear_and_compresses_the_feed_forward(monkeypatch, tmp_path):
    """The tracer kept the encoder whole, so none of its Linears was listed ("0 -> 0"). Its feed-forward Linears are
    now compressed; the eval fast paths (the fused layer and the nested-tensor encoder), which read their weights
    (a shared bias has the wrong shape there), are turned off above them, and the output equals the dense model's
    with the GM layers materialised."""
    model = Encoder().eval()
    names = [f"enc.layers.{i}.{n}" for i in range(3) for n in ("self_attn.in_proj", "self_attn.out_proj", "linear1",
                                                                  "linear2")]  # fmt: skip
    the_plan = gm.plan(model, group="C4")
    assert [p.name for p in the_plan.layers] == names
    assert [p.shape for p in the_plan.layers[:4]] == ["96x32", "32x32", "64x32", "32x64"]
    dense = sum(p.numel() for n, p in model.named_parameters() if ".norm" not in n)  # all but the LayerNorms
    assert the_plan.report().params_before == dense
    recipe = {"version": 1, "defaults": {"group": "C4", "rank": 2, "bias": "shared"}}
    out = gm.compress(model, recipe=recipe, progress=False)
    rows = {r.name: r for r in out.gm_report.layers}
    for name in names:
        if name.endswith(("linear1", "linear2")):
            assert rows[name].status == "compressed" and isinstance(out.get_submodule(name), GMLinear)
        else:
            assert rows[name].status == "skipped" and "MultiheadAttention reads" in rows[name].reason
    x = torch.randn(2, 5, 32)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    reference = materialised(model, out)
    assert_same_outputs(out, reference, x, padding, valid=~padding)
    assert_same_outputs(out, reference, x, torch.zeros(2, 5, dtype=torch.bool))

    def fused(*args, **kwargs):
        raise AssertionError("a fused path read the GM layers' weights")

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", fused)
    monkeypatch.setattr(torch, "_nested_tensor_from_mask", fused)
    out.eval()
    gm.save(out, tmp_path / "encoder.pt")
    again = gm.load(tmp_path / "encoder.pt", Encoder()).eval()  # its fused paths are turned off as its layers load
    with torch.no_grad():
        assert torch.equal(again(x, padding), out(x, padding))  # the GM layers run


@pytest.mark.parametrize("mode", ["sequential", "original"])
def test_layers_inside_a_transformer_encoder_are_calibrated(mode):
    """With a padding mask, the dense encoder packs its batch into a nested tensor: the calibration hooks on linear1
    then received one (compress failed in reshape). Sequential calibration stepped the graph past the encoder, which
    it calls whole, and gave its layers no statistics at all."""
    model = Encoder().eval()
    x, padding = torch.randn(4, 5, 32), torch.zeros(4, 5, dtype=torch.bool)
    padding[1, 3:] = True
    recipe = {"version": 1, "defaults": {"group": "C4", "rank": 2, "impl": "dense"}}  # (no path timing)
    out = gm.compress(model, recipe=recipe, calibration=[(x, padding)], calibration_mode=mode, progress=False)
    rows = {r.name: r for r in out.gm_report.layers}
    assert all(rows[f"enc.layers.{i}.{n}"].output_error is not None for i in range(3) for n in ("linear1", "linear2"))
    assert model.enc.use_nested_tensor and model.enc.layers[0].activation_relu_or_gelu  # the user's model as it was
    assert not out.enc.use_nested_tensor and not out.enc.layers[0].activation_relu_or_gelu


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.dec = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.attn = nn.MultiheadAttention(32, 2, batch_first=True)

    def forward(self, tgt, memory):
        y = self.dec(tgt, memory)
        return self.attn(y, y, y, need_weights=False)[0]


def test_transformer_decoder_layer_and_a_traced_attention_list_every_linear():
    model = Decoder().eval()
    out = gm.compress(model, group="C4", rank=2, progress=False)
    assert out.gm_report.traced
    rows = {r.name: r for r in out.gm_report.layers}
    kept = ["dec.self_attn.in_proj", "dec.self_attn.out_proj", "dec.multihead_attn.in_proj",
            "dec.multihead_attn.out_proj", "attn.in_proj", "attn.out_proj"]  # fmt: skip
    assert set(rows) == {*kept, "dec.linear1", "dec.linear2"}
    assert all(rows[n].status == "skipped" and "MultiheadAttention reads" in rows[n].reason for n in kept)
    assert isinstance(out.dec.linear1, GMLinear) and isinstance(out.dec.linear2, GMLinear)
    assert_same_outputs(out, materialised(model, out), torch.randn(2, 5, 32), torch.randn(2, 7, 32))


# ---------------------------------------------------------------------------------------------- tall kernels
class Pitch(nn.Module):
    """Convolutions over a 1-D signal with kernels longer than 7 (a pitch tracker like CREPE), dilated too."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(4, 16, (64, 1), stride=(4, 1), padding=(32, 0))
        self.conv2 = nn.Conv2d(16, 16, (16, 1), padding=(8, 0))
        self.conv3 = nn.Conv2d(16, 16, (3, 1), dilation=(6, 1))
        self.conv4 = nn.Conv1d(16, 8, 9, dilation=2, padding="same")

    def forward(self, x):
        y = torch.relu(self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x))))))
        return self.conv4(y.squeeze(-1))


def test_tall_and_dilated_kernels_are_probed_with_an_input_they_accept():
    """The equivariance probe was 7 long on every axis: compress raised "Kernel size: (64 x 1)"."""
    model = Pitch().eval()
    out = gm.compress(model, group="C4", rank=1, modulate=False, progress=False)
    rows = out.gm_report.layers
    assert [r.name for r in rows if r.status == "compressed"] == ["conv1", "conv2", "conv3", "conv4"]
    for row in rows:
        assert row.equivariance_error is not None and row.equivariance_error < 1e-5, row.name  # exact layers
        layer = out.get_submodule(row.name)
        assert layer.check_equivariance(bias=False) < 1e-5  # the default probe
    modulated = gm.compress(model, group="C4", rank=2, progress=False)
    assert all(r.equivariance_error is not None for r in modulated.gm_report.layers)


# ---------------------------------------------------------------------------------------------- own forward
class SameConv(nn.Conv2d):
    """TensorFlow's "SAME" padding, as ported image nets write it: pad, then convolve without padding."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
        self.pads = [total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2]

    def forward(self, x):
        x = F.pad(x, self.pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class PaddingModuleConv(nn.Conv2d):
    """The same with a padding module (EfficientNet-PyTorch's static same padding)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)  # fmt: skip


class DynamicSameConv(nn.Conv2d):
    """Padding computed from the input's size: the pad amounts are data for torch.fx, so this forward does not trace."""

    def forward(self, x):
        pads = [max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
                for n, s, k, d in zip(x.shape[-2:], self.stride, self.kernel_size, self.dilation)]  # fmt: skip
        if pads[0] > 0 or pads[1] > 0:
            x = F.pad(x, [pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias) * 0.5


class SamePadded(nn.Module):
    def __init__(self, dynamic: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.stem = SameConv(8, 16, 3, stride=2)
        self.block = nn.Sequential(
            SameConv(16, 16, 1), nn.ReLU(), PaddingModuleConv(16, 16, 2), SameConv(16, 16, 3, dilation=2)
        )
        self.depthwise = SameConv(16, 16, 3, groups=16)
        self.dynamic = DynamicSameConv(16, 16, 3, stride=2) if dynamic else nn.Identity()
        self.head = ScaledLinear(16, 8)

    def forward(self, x):
        return self.head(self.dynamic(self.depthwise(self.block(self.stem(x)))).mean((2, 3)))


def test_layer_subclasses_with_their_own_forward_are_compressed_with_their_padding(tmp_path):
    """A Conv2d subclass that pads and then calls F.conv2d(x, self.weight, ...) was kept whole and never compressed
    (one TF-ported EfficientNet: 1 dense layer of 34). The graph pass traces into it and lifts the call; at full rank
    the model computes the same function."""
    model = SamePadded().eval()
    out = gm.compress(model, group="C4", rank=4, progress=False)
    rows = {r.name: r for r in out.gm_report.layers}
    convs = ["stem_weight_conv2d", "block_0_weight_conv2d", "block_2_weight_conv2d", "block_3_weight_conv2d"]
    assert list(rows) == [*convs, "depthwise_weight_conv2d", "head_weight_linear"]
    assert all(rows[n].status == "compressed" and isinstance(getattr(out, n), GMChannelConv) for n in convs)
    assert "depthwise" in rows["depthwise_weight_conv2d"].reason
    assert isinstance(out.head_weight_linear, GMLinear)
    x = torch.randn(2, 8, 11, 11)
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)
    gm.save(out, tmp_path / "same.pt")
    again = gm.load(tmp_path / "same.pt", SamePadded())
    with torch.no_grad():
        assert torch.equal(again(x), out(x))


def test_a_subclass_whose_forward_does_not_trace_is_listed_with_the_reason():
    model = SamePadded(dynamic=True).eval()
    out = gm.compress(model, group="C4", rank=4, progress=False)
    assert out.gm_report.traced  # the rest of the model still traces
    rows = {r.name: r for r in out.gm_report.layers}
    assert rows["dynamic"].status == "skipped"
    assert "DynamicSameConv subclasses Conv2d with its own forward, which the graph pass could not trace into" in (
        rows["dynamic"].reason
    )
    assert rows["stem_weight_conv2d"].status == "compressed"
    x = torch.randn(2, 8, 11, 11)
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)


def test_in_place_a_lifted_layer_stays_dense_with_the_reason():
    """In place the model's own forward runs, which calls F.conv2d: compress failed (KeyError: no submodule
    'stem_weight_conv2d')."""
    model = SamePadded().eval()
    x = torch.randn(2, 8, 11, 11)
    with torch.no_grad():
        expected = model(x)
    out = gm.compress(model, group="C4", rank=4, inplace=True, progress=False)
    assert out is model
    rows = [r for r in out.gm_report.layers if r.name != "depthwise_weight_conv2d"]
    assert len(rows) == 5 and all(r.status == "skipped" and "in place it stays dense" in r.reason for r in rows)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
