"""gm.freeze: an inference copy in which every GM layer takes its fastest measured form (a path, or the plain torch
layer), with the compressed model's outputs; compress itself times no path."""

import warnings

import pytest
import torch
from torch import nn

import gmcompress as gm
import gmcompress.measure.paths as paths
from gmcompress import zoo
from gmcompress.nn import GMChannelConv, GMConv2d, GMLayer, GMLinear
from gmcompress.report import CompressionReport


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 6 * 6, 64))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, batch_first=True, dropout=0.0)
        self.head = nn.Linear(64, 16)

    def forward(self, x):
        return self.head(self.block(x))


def quiet_compress(model: nn.Module, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lost-fidelity warnings of the uncalibrated fits: not what is tested here
        return gm.compress(model, progress=False, **kwargs)


def compressed(case: str) -> tuple[nn.Module, object]:
    """A compressed model and a batch to serve it."""
    torch.manual_seed(0)
    if case == "mnistnet C8":
        return quiet_compress(zoo.mnistnet(), group="C8"), zoo.mnist_example_inputs()[:16]
    if case == "mnistnet recipe":
        return quiet_compress(zoo.mnistnet(), recipe="recipes/mnistnet.yaml"), zoo.mnist_example_inputs()[:16]
    if case == "conv":
        return quiet_compress(conv_net(), group="C8", rank=2), torch.randn(4, 16, 6, 6)
    if case == "tied conv":
        return quiet_compress(conv_net(), group="C8", conv_group="C4"), torch.randn(4, 16, 6, 6)
    return quiet_compress(Encoder().eval(), group="C8", rank=2), torch.randn(3, 5, 64)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k].view(torch.uint8), v.view(torch.uint8)), k


def gm_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, GMLayer)}


@pytest.mark.parametrize("case", ["mnistnet C8", "mnistnet recipe", "conv", "tied conv", "transformer"])
def test_the_frozen_copy_computes_what_the_compressed_model_does(case):
    """Measured for real: whatever each layer chose, the outputs are the compressed model's up to float rounding;
    the compressed model keeps its weights (bit for bit), its modes and its parameters' requires_grad."""
    model, x = compressed(case)
    model.train()
    before, flags = state(model), {n: m.training for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    frozen = gm.freeze(model, x, progress=False)
    assert frozen is not model
    assert_same_state(model, before)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert not frozen.training and not any(m.training for m in frozen.modules())
    assert not any(p.requires_grad for p in frozen.parameters())
    report = frozen.freeze_report
    assert sorted(c.name for c in report.layers) == sorted(gm_layers(model)) and not report.not_called
    for choice in report.layers:
        layer = frozen.get_submodule(choice.name)
        if choice.chosen == paths.TORCH_LAYER:
            assert type(layer) in (nn.Linear, nn.Conv2d), choice
        else:
            assert isinstance(layer, GMLayer) and choice.chosen in (*layer.impls(), paths.AS_IS)
            assert choice.chosen == paths.AS_IS or layer.impl == choice.chosen
        times = choice.times_ms  # the fastest form, or the torch layer when no GM form beats it by the margin
        fastest = min(times, key=times.get)
        torch_kept = choice.chosen == paths.TORCH_LAYER and times[fastest] * paths.FREEZE_MARGIN > times[choice.chosen]
        assert choice.chosen == fastest or torch_kept or choice.by_model, choice  # by_model: the whole-model check
        assert paths.TORCH_LAYER in choice.times_ms and choice.name in str(report)
    model_ms = report.model_ms  # the whole-model check ran, and its rule holds
    best = min((label for label in model_ms if label != paths.TORCH_LAYERS), key=model_ms.get)
    torch_serves = model_ms[best] * paths.FREEZE_MARGIN > model_ms[paths.TORCH_LAYERS]
    assert report.served == (paths.TORCH_LAYERS if torch_serves else best), report
    with torch.no_grad():
        want = model.eval()(x)
        torch.testing.assert_close(frozen(x), want, rtol=1e-4, atol=1e-5)


def time_by_form(times: dict[str, float]):
    """A stand-in for the block timer: seconds by the timed layer's form (a GM layer's impl; "torch" for a plain
    torch layer); it runs the call once, as the real one does. A whole model (freeze's last check) takes the sum
    of its layers' times."""

    def form_seconds(layer: nn.Module) -> float:
        form = layer.impl if isinstance(layer, GMLayer) and layer.impls() else "as is"
        return times.get(form if isinstance(layer, GMLayer) else "torch", 2.0)

    def block_seconds(call, model, seconds):
        with torch.inference_mode():
            call()
        if isinstance(model, GMLayer) or not list(model.children()):
            return form_seconds(model)
        return sum(form_seconds(m) for m in model.modules() if isinstance(m, (GMLayer, nn.Linear, nn.Conv2d)))

    return block_seconds


class SharedLayer(nn.Module):
    """One Linear under two names (an argument with a default: compress swaps by name, not through a trace)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(8, 16, 3, padding=1), nn.Linear(16 * 4 * 4, 64)
        self.first = self.second = nn.Linear(64, 64)

    def forward(self, x, scale: float = 1.0):
        y = torch.tanh(self.fc(self.conv(x).flatten(1)))
        return self.second(torch.tanh(self.first(y))) * scale


def test_a_layer_fastest_as_its_plain_torch_layer_becomes_one_at_every_name(monkeypatch):
    """Torch layers measured fastest: each GM layer becomes exactly ``to_dense()``'s nn.Linear / nn.Conv2d (a layer
    under two names: the same module at both), and the outputs stay the compressed model's."""
    monkeypatch.setattr(paths, "block_seconds", time_by_form({"torch": 1.0}))
    torch.manual_seed(0)
    model = quiet_compress(SharedLayer(), group="C8")
    assert isinstance(model.first, GMLinear) and model.first is model.second
    x = torch.randn(3, 8, 4, 4)
    frozen = gm.freeze(model, x, progress=False)
    assert [type(m) for m in (frozen.conv, frozen.fc, frozen.first)] == [nn.Conv2d, nn.Linear, nn.Linear]
    assert frozen.first is frozen.second and not gm_layers(frozen)
    assert sorted(frozen.freeze_report.to_torch) == ["conv", "fc", "first"]
    for name in ("conv", "fc", "first"):
        dense = model.get_submodule(name).to_dense()
        assert torch.equal(frozen.get_submodule(name).weight, dense.weight)
        assert torch.equal(frozen.get_submodule(name).bias, dense.bias)
    assert not any(p.requires_grad for p in frozen.parameters())
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model.eval()(x), rtol=1e-4, atol=1e-5)
    assert "0 GM layer(s) kept a GM path, 3 became plain torch layers" in str(frozen.freeze_report)


@pytest.mark.parametrize("fastest", ["dense", "grouped", "blocks", "packed"])
def test_a_layer_fastest_on_a_path_takes_it(monkeypatch, fastest):
    times = {"torch": 4.0, "dense": 3.0, "grouped": 2.5, "blocks": 2.0, "packed": 2.2, "fft": 2.4, fastest: 1.0}
    monkeypatch.setattr(paths, "block_seconds", time_by_form(times))
    model, x = compressed("conv")
    frozen = gm.freeze(model, x, progress=False)
    conv, linear = frozen.get_submodule("0"), frozen.get_submodule("3")
    conv_best, linear_best = (min(layer.impls(), key=times.get) for layer in (conv, linear))
    assert fastest in (conv_best, linear_best)
    assert isinstance(conv, GMChannelConv) and isinstance(linear, GMLinear)
    assert (conv.impl, linear.impl) == (conv_best, linear_best)
    choices = {c.name: c for c in frozen.freeze_report.layers}
    assert choices["0"].chosen == conv_best and choices["0"].speedup == pytest.approx(4.0 / times[conv_best])
    assert set(choices["3"].times_ms) == {"torch", *linear.impls()}
    assert model.get_submodule("0").impl == "auto"  # the compressed model keeps its setting


@pytest.mark.parametrize(
    ("chosen_ms", "compressed_ms", "torch_ms", "served"),
    [(3.0, 3.5, 2.0, "torch"), (1.0, 1.5, 1.04, "torch"), (1.0, 1.5, 1.2, "blocks"), (1.5, 1.0, 1.2, "dense")],
)
def test_the_whole_model_serves_in_its_fastest_candidate(monkeypatch, chosen_ms, compressed_ms, torch_ms, served):
    """Layer by layer the block path wins (0.5 against the torch layer's 1.0; as compressed the layers run "dense",
    their "auto" rule at this size), but the model is timed whole at the end, with the forms chosen layer by layer,
    with the forms as compressed and with plain torch layers: the fastest serves, a GM candidate only when
    FREEZE_MARGIN faster than the torch layers."""
    import gmcompress.api as api

    times = {"torch": 1.0, "dense": 2.0, "grouped": 2.0, "blocks": 0.5, "packed": 2.0, "fft": 2.0}
    monkeypatch.setattr(paths, "block_seconds", time_by_form(times))
    by_form = {"blocks": chosen_ms, "dense": compressed_ms, "torch": torch_ms}

    def model_seconds(model, inputs):  # the candidate recognised by the form its two layers are in
        layers = [model.get_submodule(n) for n in ("0", "2")]
        forms = {m.impl if isinstance(m, GMLayer) else "torch" for m in layers}
        (form,) = forms
        return by_form[form]

    monkeypatch.setattr(api, "model_seconds", model_seconds)
    torch.manual_seed(0)
    model = quiet_compress(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)), group="C8")
    assert [model.get_submodule(n).path_for(4) for n in ("0", "2")] == ["dense", "dense"]
    x = torch.randn(4, 64)
    frozen = gm.freeze(model, x, progress=False)
    report = frozen.freeze_report
    labels = {"blocks": paths.GM_FORMS, "dense": paths.AS_COMPRESSED, "torch": paths.TORCH_LAYERS}
    assert report.model_ms == pytest.approx({labels[f]: ms * 1e3 for f, ms in by_form.items()})
    assert report.served == labels[served]
    if served == "torch":
        assert [type(frozen.get_submodule(n)) for n in ("0", "2")] == [nn.Linear, nn.Linear]
    else:
        assert [(type(m), m.impl) for m in (frozen.get_submodule("0"), frozen.get_submodule("2"))] == [
            (GMLinear, served)
        ] * 2
    assert [(c.chosen, c.by_model) for c in report.layers] == [(served, served != "blocks")] * 2
    assert f"serving: {labels[served]}" in str(report)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model.eval()(x), rtol=1e-4, atol=1e-5)


def test_a_layer_with_one_path_keeps_it_when_it_is_faster(monkeypatch):
    monkeypatch.setattr(paths, "block_seconds", time_by_form({"as is": 1.0}))
    model, x = compressed("tied conv")
    assert isinstance(model.get_submodule("0"), GMConv2d) and not model.get_submodule("0").impls()
    frozen = gm.freeze(model, x, progress=False)
    assert isinstance(frozen.get_submodule("0"), GMConv2d)
    assert {c.name: c.chosen for c in frozen.freeze_report.layers}["0"] == "as is"


def test_freezing_twice_training_and_finetuning_a_frozen_copy_are_refused_clearly():
    model, x = compressed("conv")
    frozen = gm.freeze(model, x, progress=False)
    with pytest.raises(ValueError, match=r"freeze: GraphModule.* is already frozen \(it has \.freeze_report.*freeze "
                                         r"the compressed model it came from"):  # fmt: skip
        gm.freeze(frozen, x, progress=False)
    frozen.train()  # allowed (e.g. dropout on); no parameter trains
    with pytest.raises(RuntimeError, match="does not require grad"):
        frozen(x).sum().backward()
    made_by_freeze = r"finetune: the student \(GraphModule.*\) is an inference copy made by gmcompress\.freeze"
    with pytest.raises(ValueError, match=made_by_freeze + r".*fine-tune the compressed model it was made from"):
        gm.finetune(frozen, conv_net(), [x], steps=1, progress=False)
    again = gm.freeze(model, x, progress=False)  # the compressed model can be frozen again, e.g. for another batch
    assert again.freeze_report is not frozen.freeze_report


def test_bad_arguments_name_the_fix():
    model, x = compressed("conv")
    with pytest.raises(TypeError, match=r"freeze needs example_inputs: one batch as it will be served"):
        gm.freeze(model, None)
    with pytest.raises(TypeError, match=r"freeze expects an nn.Module \(a compressed model\), got Tensor"):
        gm.freeze(x, x)
    with pytest.raises(TypeError, match="inplace"):
        gm.freeze(model, x, inplace=1)


def test_inplace_freezes_the_model_itself():
    model, x = compressed("conv")
    with torch.no_grad():
        want = model.eval()(x)
    assert gm.freeze(model, x, inplace=True, progress=False) is model and paths.is_frozen(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)


def test_a_model_without_gm_layers_comes_back_unchanged_with_a_warning():
    model = conv_net().train()
    before = state(model)
    with pytest.warns(UserWarning, match=r"freeze: Sequential has no GM layer \(compress it first\)"):
        frozen = gm.freeze(model, torch.randn(2, 16, 6, 6), progress=False)
    assert frozen is not model and model.training and not frozen.training
    assert_same_state(frozen, before)
    assert frozen.freeze_report.layers == [] and not any(p.requires_grad for p in frozen.parameters())


def test_a_layer_the_example_does_not_reach_is_named_and_left_as_it_was():
    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(64, 64), nn.Linear(64, 64)

        def forward(self, x, branch: bool = False):
            return self.unused(x) if branch else self.used(x)

    model = quiet_compress(Branches(), group="C8")
    frozen = gm.freeze(model, torch.randn(4, 64), progress=False)
    assert frozen.freeze_report.not_called == ["unused"] and [c.name for c in frozen.freeze_report.layers] == ["used"]
    assert "Not called on example_inputs, left as they were: unused" in str(frozen.freeze_report)
    assert isinstance(frozen.unused, GMLinear) and frozen.unused.impl == "auto"


def test_the_frozen_copy_compiles_in_one_graph():
    model, x = compressed("mnistnet C8")
    frozen = gm.freeze(model, x, progress=False)
    compiled = torch.compile(frozen, fullgraph=True)  # a graph break would raise
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), frozen(x), rtol=1e-4, atol=1e-5)


def test_compress_with_example_inputs_times_no_path(monkeypatch):
    """compress measures MACs, latency and fidelity on example_inputs, and leaves every layer on its "auto" rule."""

    def refuse(*args, **kwargs):
        raise AssertionError("compress timed a path")

    for timer in ("time_paths", "time_layers", "block_seconds"):  # every timer goes through block_seconds
        monkeypatch.setattr(paths, timer, refuse)
    out = quiet_compress(conv_net(), group="C8", example_inputs=torch.randn(2, 16, 6, 6))
    for name in ("0", "3"):
        layer = out.get_submodule(name)
        assert layer.impl == "auto"
        assert {r.name: r for r in out.gm_report.layers}[name].path == layer.resolved_impl()
    assert out.gm_report.latency_after_ms > 0


def test_a_slower_report_points_to_freeze():
    text = str(CompressionReport(latency_before_ms=1.0, latency_after_ms=1.25))
    assert "SLOWER: the compressed model ran 0.80x the original's speed" in text
    assert "gm.freeze(model, example_inputs) times every layer's paths and its plain torch layer" in text


def test_a_saved_frozen_copy_loads_with_every_layer_in_its_chosen_form(monkeypatch, tmp_path):
    monkeypatch.setattr(paths, "block_seconds", time_by_form({"blocks": 1.0, "torch": 1.5}))
    model, x = compressed("conv")
    frozen = gm.freeze(model, x, progress=False)
    assert type(frozen.get_submodule("0")) is nn.Conv2d and frozen.get_submodule("3").impl == "blocks"
    gm.save(frozen, tmp_path / "frozen.pt")
    again = gm.load(tmp_path / "frozen.pt", conv_net()).eval()
    assert type(again.get_submodule("0")) is nn.Conv2d and again.get_submodule("3").impl == "blocks"
    with torch.no_grad():
        torch.testing.assert_close(again(x), frozen(x), rtol=0, atol=0)


@pytest.mark.parametrize(("gm_seconds", "kept"), [(0.97, "torch"), (0.90, "blocks")])
def test_a_gm_form_serves_only_when_clearly_faster_than_the_torch_layer(monkeypatch, gm_seconds, kept):
    """Within timing noise (a GM form 3% faster) the plain torch layer serves: it computes the same product, so a
    choice inside the noise could only make the model slower; 10% faster, the GM form serves."""
    times = {"torch": 1.0, "dense": 2.0, "blocks": gm_seconds, "packed": 2.0, "fft": 2.0}
    monkeypatch.setattr(paths, "block_seconds", time_by_form(times))
    torch.manual_seed(0)
    model = quiet_compress(nn.Sequential(nn.Linear(64, 64)), group="C8")
    frozen = gm.freeze(model, torch.randn(4, 64), progress=False)
    assert [c.chosen for c in frozen.freeze_report.layers] == [kept]
    assert isinstance(frozen.get_submodule("0"), nn.Linear if kept == "torch" else GMLinear)
