"""Fidelity metrics against hand computations, the held-out split, and the report's fidelity line."""

import math

import numpy as np
import pytest
import torch
from scipy.special import log_softmax as np_log_softmax
from torch import nn

from gmcompress.measure.fidelity import Fidelity, compare_outputs, measure_fidelity, split_holdout


def _by_hand(ref: np.ndarray, new: np.ndarray) -> dict:
    top1 = np.mean([np.argmax(a) == np.argmax(b) for a, b in zip(ref, new)])
    overlaps = [len(set(np.argsort(-a)[:5]) & set(np.argsort(-b)[:5])) / 5 for a, b in zip(ref, new)]
    lp, lq = np_log_softmax(ref, axis=1), np_log_softmax(new, axis=1)
    kl = np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1))
    err = np.linalg.norm(new - ref) / np.linalg.norm(ref)
    return {"top1": top1, "top5": np.mean(overlaps), "kl": kl, "err": err}


def test_classifier_metrics_match_a_hand_computation():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(37, 12))
    new = ref + rng.normal(scale=0.8, size=ref.shape)
    # two batches: the metrics span both
    f = compare_outputs(
        [torch.tensor(ref[:20]), torch.tensor(ref[20:])], [torch.tensor(new[:20]), torch.tensor(new[20:])]
    )
    want = _by_hand(ref, new)
    assert f.samples == 37
    assert f.classifier
    assert f.top1_agreement == pytest.approx(want["top1"], abs=1e-12)
    assert 0 < f.top1_agreement < 1
    assert f.top5_overlap == pytest.approx(want["top5"], abs=1e-12)
    assert f.kl == pytest.approx(want["kl"], rel=1e-9)
    assert f.output_error == pytest.approx(want["err"], rel=1e-9)


def test_identical_outputs_are_perfect_and_collapse_is_lost():
    ref = torch.randn(16, 10)
    same = compare_outputs([ref], [ref.clone()])
    assert (same.top1_agreement, same.top5_overlap, same.kl, same.output_error) == (1.0, 1.0, 0.0, 0.0)
    assert not same.lost
    one_class = torch.zeros(16, 10)
    one_class[:, 3] = 5.0
    collapsed = compare_outputs([ref], [one_class])
    assert collapsed.lost
    assert collapsed.top1_agreement == pytest.approx(float((ref.argmax(1) == 3).float().mean()))


def test_embeddings_and_vectors_get_output_error_only():
    emb = nn.functional.normalize(torch.randn(8, 16), dim=1)  # unit rows: an embedding, not logits
    noisy = nn.functional.normalize(emb + 0.1 * torch.randn(8, 16), dim=1)
    f = compare_outputs([emb], [noisy])
    assert not f.classifier and f.top1_agreement is None and f.kl is None
    cos = float(np.mean([np.dot(a, b) for a, b in zip(emb.numpy(), noisy.numpy())]))
    assert f.cosine == pytest.approx(cos, rel=1e-6)
    images = compare_outputs([torch.ones(2, 3, 4)], [torch.ones(2, 3, 4) * 1.5])
    assert not images.classifier and images.output_error == pytest.approx(0.5)
    assert images.lost is False and Fidelity(4, 0.6).lost and Fidelity(4, math.nan).lost


def test_measure_fidelity_runs_both_models_on_every_batch():
    torch.manual_seed(0)
    a, b = nn.Linear(6, 5), nn.Linear(6, 5)
    xs = [torch.randn(4, 6), torch.randn(3, 6)]
    f = measure_fidelity(a, b, xs, source="test")
    with torch.no_grad():
        want = compare_outputs([a(x) for x in xs], [b(x) for x in xs])
    assert f == Fidelity(7, want.output_error, want.cosine, want.top1_agreement, want.top5_overlap, want.kl, "test")
    assert "fidelity on 7 test samples: top-1 agreement" in f.summary()


def test_split_holdout_by_batches_and_by_rows():
    batches = [torch.full((2, 3), float(i)) for i in range(8)]
    fit, held = split_holdout(batches)
    assert [int(b[0, 0]) for b in fit] == list(range(6)) and [int(b[0, 0]) for b in held] == [6, 7]
    x = torch.arange(40.0).reshape(20, 2)
    fit, held = split_holdout(x)
    assert torch.equal(torch.cat([fit, held]), x) and held.shape[0] == 5
    pair_fit, pair_held = split_holdout([(x, x + 1)])
    assert torch.equal(pair_held[0][1], x[15:] + 1) and torch.equal(pair_fit[0][0], x[:15])
    fit, held = split_holdout(batches[:2])
    assert len(fit) == 1 and len(held) == 1
    with pytest.raises(ValueError, match="holds 2 samples"):
        split_holdout(x[:2])


# ---------------------------------------------------------------------- in compress


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _quiet_compress(*args, **kwargs):
    import warnings

    import gmcompress as gm

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = gm.compress(*args, progress=False, **kwargs)
    return out, [str(w.message) for w in caught]


def test_calibration_holds_out_its_last_quarter_and_the_report_measures_it():
    torch.manual_seed(0)
    net = TwoLayer().eval()
    batches = [torch.randn(64, 32) for _ in range(4)]
    small, _ = _quiet_compress(net, group="C8", rank=2, calibration=batches)
    # the same fits as calibrating on the first three batches, with the fourth given as held-out data
    again, _ = _quiet_compress(net, group="C8", rank=2, calibration=batches[:3], heldout=batches[3])
    for (name, a), (_, b) in zip(small.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    f = small.gm_report.fidelity
    assert f == measure_fidelity(net, small, batches[3:], source="held-out calibration")
    assert f.samples == 64 and f.classifier
    assert "Whole model, fidelity on 64 held-out calibration samples" in str(small.gm_report)
    assert small.gm_report.to_json().count('"top1_agreement"') == 1


def test_a_lost_model_warns_naming_its_worst_layers():
    torch.manual_seed(0)
    net = TwoLayer().eval()
    x = torch.randn(128, 32)
    small, messages = _quiet_compress(net, group="C16", modulate=False, example_inputs=x)
    f = small.gm_report.fidelity
    assert f.source == "example-input" and f.samples == 128
    assert f.lost  # an exact C16 group matrix of a random layer keeps nothing
    lost = [m for m in messages if "lost the original's predictions" in m]
    assert len(lost) == 1 and "fc1 (" in lost[0] and "fc2 (" in lost[0] and "Budget(agreement=0.95)" in lost[0]
    kept, messages = _quiet_compress(net, group="C2", rank=2, example_inputs=x)  # full rank: exact
    assert kept.gm_report.fidelity.top1_agreement == 1.0
    assert not any("lost" in m for m in messages)


def test_fewer_calibration_rows_than_inputs_warns_per_layer():
    torch.manual_seed(0)
    net = TwoLayer().eval()
    _, messages = _quiet_compress(net, group="C8", calibration=torch.randn(40, 32))  # 30 fit rows, 32 inputs
    few = [m for m in messages if "fewer rows than input features" in m]
    assert len(few) == 1 and "fc1 (30 rows for 32 inputs)" in few[0] and "fc2 (30 rows for 64 inputs)" in few[0]
    _, messages = _quiet_compress(net, group="C8", calibration=torch.randn(400, 32))
    assert not any("fewer rows" in m for m in messages)


def test_no_held_out_data_means_no_fidelity_and_too_little_is_an_error():
    torch.manual_seed(0)
    net = TwoLayer().eval()
    small, _ = _quiet_compress(net, group="C8")
    assert small.gm_report.fidelity is None and "Whole model" not in str(small.gm_report)
    with pytest.raises(ValueError, match="holds 2 samples"):
        _quiet_compress(net, group="C8", calibration=torch.randn(2, 32))


def test_the_report_calls_out_a_slower_model():
    from gmcompress.report import CompressionReport

    slower = CompressionReport(latency_before_ms=2.0, latency_after_ms=2.5)
    assert "SLOWER: the compressed model ran 0.80x the original's speed" in str(slower)
    assert "SLOWER" not in str(CompressionReport(latency_before_ms=2.0, latency_after_ms=1.9))
    assert "SLOWER" not in str(CompressionReport(latency_before_ms=7.396, latency_after_ms=7.419))  # 1.00x: noise
    assert "SLOWER" in str(CompressionReport(latency_before_ms=2.0, latency_after_ms=2.1))  # 0.95x
    assert "SLOWER" not in str(CompressionReport())


@pytest.mark.parametrize("mode", ["original", "sequential"])
def test_a_layer_lifted_from_a_functional_call_is_fitted_on_its_calibration_inputs(mode):
    import gmcompress as gm
    from gmcompress.nn import GMLinear

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(64, 32) / 32**0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(x, self.w)

    torch.manual_seed(0)
    net = Functional()
    x = torch.randn(80, 32) @ torch.diag(torch.linspace(0.1, 3, 32))
    small = gm.compress(net, group="C8", calibration=x, heldout=x[:4], calibration_mode=mode, progress=False)
    want = GMLinear.from_dense(_linear_of(net.w), "C8", inputs=x)
    torch.testing.assert_close(small.w_linear.kernels, want.kernels, rtol=1e-5, atol=1e-6)


def _linear_of(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def test_mnistnet_compressed_everywhere_at_d4_is_reported_lost(mnist):
    """MNISTNet, every compressible layer exact D4 rank 1, no calibration: the report's fidelity line gives the
    agreement counted here on held-out digits, and compress warns that the model lost its predictions."""
    net, (_, _, x_test, _) = mnist
    digits = x_test[:256]
    small, messages = _quiet_compress(net, group="D4", modulate=False, example_inputs=digits)
    with torch.no_grad():
        same = (small.eval()(digits).argmax(1) == net.eval()(digits).argmax(1)).float().mean().item()
    f = small.gm_report.fidelity
    assert f.samples == 256 and f.top1_agreement == pytest.approx(same, abs=1e-9)
    assert f.lost and same < 0.9
    assert f"top-1 agreement {same:.3f}" in str(small.gm_report)
    lost = [m for m in messages if "lost the original's predictions" in m]
    assert len(lost) == 1 and "features." in lost[0] and "Fix: compress under a fidelity budget" in lost[0]
