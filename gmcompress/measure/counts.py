"""Counts of a model: multiply-accumulates per layer (dense layers through their handler, GM layers through
``GMLayer.macs``), the bytes of its saved state, and a GM layer's equivariance error."""

from __future__ import annotations

import io
from functools import partial

import torch
from torch import nn

from ..graph.batches import eval_mode, forward_hooks, run_model
from ..nn import GMLayer, NotApplicable
from ..planning.handlers import handler_for

__all__ = ["layer_macs", "count_macs", "equivariance_error", "state_dict_bytes"]


def layer_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int | None:
    """MACs of one call of a weight-holding layer (dense or GM), or None for other modules."""
    if isinstance(module, GMLayer):
        return module.macs(inp, out)
    handler = handler_for(module)
    return None if handler is None else handler.dense_macs(module, inp, out)


def equivariance_error(layer: nn.Module, max_elements: int = 16) -> float | None:
    """``layer.check_equivariance`` of the structured weight (bias excluded) on up to ``max_elements``
    group elements; None where it is not defined (padded layers, no group action)."""
    try:
        order = layer.group.order if getattr(layer, "group", None) is not None else max_elements
        with torch.no_grad(), eval_mode(layer):  # the derived weights are built once, not on every probe call
            return layer.check_equivariance(elements=range(min(order, max_elements)), bias=False)
    except NotApplicable:
        return None


def count_macs(model: nn.Module, example_inputs: object) -> tuple[int, dict[str, int]]:
    """Total and per-layer MACs of one forward on ``example_inputs``."""
    per_layer: dict[str, int] = {}

    def hook(mod: nn.Module, x: torch.Tensor, out: object, name: str) -> None:
        macs = layer_macs(mod, x, out)
        if macs is not None:
            per_layer[name] = per_layer.get(name, 0) + macs

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, GMLayer) or handler_for(m) is not None]
    with forward_hooks((m, partial(hook, name=n)) for n, m in layers), torch.inference_mode():
        run_model(model, example_inputs)
    return sum(per_layer.values()), per_layer


class _ByteCounter(io.RawIOBase):
    """A write-only stream that only counts: sizing a saved model without holding a copy of it in memory."""

    def __init__(self) -> None:
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes ``torch.save(model.state_dict())`` writes (counted as they stream, never buffered)."""
    counter = _ByteCounter()
    torch.save(model.state_dict(), counter)
    return counter.size
