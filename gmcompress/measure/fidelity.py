"""Fidelity: how far a compressed model's outputs are from the original's, on batches the fits did not see.

A compressed model can stop working while every layer's own fit looks fine (errors compound through the
layers), so ``compress`` measures the whole model against the original on held-out data and warns when it has
lost its predictions (:data:`MIN_AGREEMENT`, :data:`MAX_OUTPUT_ERROR`). The held-out data is the first of:
``compress(heldout=...)``, ``example_inputs``, or the last part of the calibration batches
(:func:`split_holdout`), which the fits then do not use.

Metrics (:class:`Fidelity`), over every held-out sample:

- ``output_error``: ``||y - y_ref|| / ||y_ref||`` over all floating-point output tensors as one vector;
- ``cosine``: the mean cosine similarity of each sample's first output vector with the original's;
- for *classifier-shaped* outputs (the first output tensor is ``(batch, classes)`` with at least
  :data:`MIN_CLASSES` classes and rows that are not unit vectors, which rules out normalised embeddings):
  ``top1_agreement`` (the fraction of samples whose arg-max class is the original's), ``top5_overlap`` (the
  mean fraction of the original's five most likely classes among the compressed model's five) and ``kl`` (the
  mean ``KL(p_ref || p)`` of the softmax distributions, in nats).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..graph.batches import call_arguments, first_tensor, output_tensors, run_model

__all__ = [
    "Fidelity",
    "measure_fidelity",
    "compare_outputs",
    "reference_outputs",
    "split_holdout",
    "HOLDOUT_FRACTION",
    "MIN_AGREEMENT",
    "MAX_OUTPUT_ERROR",
]

HOLDOUT_FRACTION = 0.25  # the share of the calibration samples kept out of the fits to measure fidelity
MIN_HOLDOUT_SAMPLES = 2  # fewer held-out samples than this measure nothing worth a number
MIN_AGREEMENT = 0.9  # top-1 agreement below this: compress warns that the model lost its predictions
MAX_OUTPUT_ERROR = 0.5  # relative output error above this (outputs that are not classifier-shaped): warns too
MIN_CLASSES = 2
TOP_K = 5


@dataclass(frozen=True)
class Fidelity:
    """The compressed model against the original on ``samples`` held-out samples (module docstring)."""

    samples: int
    output_error: float
    cosine: float | None = None
    top1_agreement: float | None = None
    top5_overlap: float | None = None
    kl: float | None = None
    source: str = ""  # where the held-out samples came from

    @property
    def classifier(self) -> bool:
        return self.top1_agreement is not None

    @property
    def lost(self) -> bool:
        """The model no longer does what the original did: top-1 agreement under :data:`MIN_AGREEMENT` for a
        classifier, else an output error over :data:`MAX_OUTPUT_ERROR`."""
        if self.classifier:
            return self.top1_agreement < MIN_AGREEMENT
        return not self.output_error <= MAX_OUTPUT_ERROR  # NaN counts as lost

    def summary(self) -> str:
        parts = []
        if self.classifier:
            parts += [f"top-1 agreement {self.top1_agreement:.3f}", f"top-5 overlap {self.top5_overlap:.3f}"]
            parts.append(f"KL {self.kl:.3g}")
        parts.append(f"output error {self.output_error:.3g}")
        if self.cosine is not None and not self.classifier:
            parts.append(f"cosine {self.cosine:.3f}")
        where = f" {self.source}" if self.source else ""
        return f"fidelity on {self.samples}{where} samples: " + ", ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


def split_holdout(batches: torch.Tensor | Sequence[object]) -> tuple[object, object]:
    """``(fit, heldout)``: the last :data:`HOLDOUT_FRACTION` of the samples held out (at least one batch, or
    one row of a single tensor), the rest for the fits. A list of batches is split by batches (the last
    ``ceil(len / 4)``); a single tensor, or a list of one batch, by rows along dim 0 (at least
    :data:`MIN_HOLDOUT_SAMPLES` rows held out). Raises ``ValueError`` when there are too few rows to keep some
    for each side."""
    if isinstance(batches, torch.Tensor) or (isinstance(batches, (list, tuple)) and len(batches) == 1):
        single = batches if isinstance(batches, torch.Tensor) else batches[0]
        rows = _batch_size(single)
        held = max(MIN_HOLDOUT_SAMPLES, math.ceil(rows * HOLDOUT_FRACTION))
        if rows - held < 1:
            raise ValueError(
                f"the calibration data holds {rows} samples: too few to keep {held} out of the fits for measuring "
                f"fidelity and fit on the rest; give at least {held + 1} samples, or pass held-out batches "
                "(heldout=...) or example_inputs"
            )
        fit, out = _take_rows(single, slice(0, rows - held)), _take_rows(single, slice(rows - held, rows))
        return (fit, out) if isinstance(batches, torch.Tensor) else ([fit], [out])
    batches = list(batches)
    held = math.ceil(len(batches) * HOLDOUT_FRACTION)  # 1 .. len - 1 for two or more batches
    return batches[: len(batches) - held], batches[len(batches) - held :]


def _batch_size(batch: object) -> int:
    args, kwargs = call_arguments(batch)
    for t in [*args, *kwargs.values()]:
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return t.shape[0]
    raise TypeError(f"a batch of type {type(batch).__name__} holds no tensor to count its samples")


def _take_rows(batch: object, rows: slice) -> object:
    if isinstance(batch, torch.Tensor):
        return batch[rows]
    if isinstance(batch, dict):
        return {k: _take_rows(v, rows) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_take_rows(v, rows) for v in batch)
    return batch


def as_batches(data: object) -> list[object]:
    """Held-out data as a list of batches: a tensor or a dict is one batch, a tuple is one batch of positional
    inputs, a list (or other iterable) holds batches."""
    if isinstance(data, (torch.Tensor, dict, tuple)):
        return [data]
    return list(data)  # type: ignore[arg-type]


@torch.no_grad()
def reference_outputs(model: nn.Module, batches: Iterable[object]) -> list[object]:
    """The outputs of ``model`` on each batch, detached (taken before a model is compressed in place)."""
    return [_detach(run_model(model, b)) for b in batches]


def _detach(out: object) -> object:
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, dict):
        return {k: _detach(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return [_detach(v) for v in out]
    return out


@torch.no_grad()
def measure_fidelity(
    reference: nn.Module, candidate: nn.Module, batches: Iterable[object], source: str = ""
) -> Fidelity:
    """:class:`Fidelity` of ``candidate`` against ``reference`` on ``batches`` (both run as they are: put them in
    eval mode first for inference behaviour)."""
    batches = as_batches(batches)
    return compare_outputs(reference_outputs(reference, batches), reference_outputs(candidate, batches), source)


def compare_outputs(reference: list[object], candidate: list[object], source: str = "") -> Fidelity:
    """:class:`Fidelity` from the outputs of the two models on the same batches (one output per batch)."""
    if len(reference) != len(candidate) or not reference:
        raise ValueError(f"fidelity needs the outputs of both models on the same batches: {len(reference)} and "
                         f"{len(candidate)} outputs")  # fmt: skip
    diff2 = ref2 = 0.0
    firsts_ref, firsts_new = [], []
    for r, c in zip(reference, candidate):
        r_all, c_all = output_tensors(r), output_tensors(c)
        if len(r_all) != len(c_all) or any(a.shape != b.shape for a, b in zip(r_all, c_all)):
            raise ValueError("the compressed model's outputs differ in number or shape from the original's")
        for a, b in zip(r_all, c_all):
            diff2 += float((b.double() - a.double()).pow(2).sum())
            ref2 += float(a.double().pow(2).sum())
        firsts_ref.append(first_tensor(r).detach().double())
        firsts_new.append(first_tensor(c).detach().double())
    y_ref, y = torch.cat([t.reshape(t.shape[0], -1) for t in firsts_ref]), torch.cat(
        [t.reshape(t.shape[0], -1) for t in firsts_new]
    )
    samples = y_ref.shape[0]
    output_error = math.sqrt(diff2 / ref2) if ref2 > 0 else (0.0 if diff2 == 0 else math.inf)
    cosine = float(nn.functional.cosine_similarity(y, y_ref, dim=1, eps=1e-12).mean())
    if not _classifier_shaped(firsts_ref):
        return Fidelity(samples, output_error, cosine, source=source)
    top1 = float((y.argmax(1) == y_ref.argmax(1)).double().mean())
    k = min(TOP_K, y.shape[1])
    ref_top, new_top = y_ref.topk(k, dim=1).indices, y.topk(k, dim=1).indices
    overlap = (ref_top.unsqueeze(2) == new_top.unsqueeze(1)).any(2).double().sum(1) / k
    log_p_ref, log_p = y_ref.log_softmax(1), y.log_softmax(1)
    kl = float((log_p_ref.exp() * (log_p_ref - log_p)).sum(1).mean())
    return Fidelity(samples, output_error, cosine, top1, float(overlap.mean()), kl, source)


def _classifier_shaped(outputs: list[torch.Tensor]) -> bool:
    """(batch, classes) logits: two dimensions, at least :data:`MIN_CLASSES` classes, not unit-norm rows."""
    if any(t.dim() != 2 or t.shape[1] < MIN_CLASSES for t in outputs):
        return False
    norms = torch.cat([t.norm(dim=1) for t in outputs])
    return not bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-3))
