"""Calibration inputs for activation-aware fits: the rows each planned layer's weight multiplies."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from .batches import run_model
from .handlers import LayerPlan

__all__ = ["capture_inputs"]


def capture_inputs(
    model: nn.Module, plans: list[LayerPlan], calibration: Iterable[object] | torch.Tensor, max_rows: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Run ``model`` on every calibration batch and keep, per layer, at most ``max_rows`` of its input rows.

    Rows are what the handler says the weight multiplies (features, channels per position, patches),
    in float64; memory stays bounded by subsampling to ``2 * max_rows`` whenever ``4 * max_rows`` pile up.
    """
    rng = np.random.default_rng(seed)
    store: dict[str, list[torch.Tensor]] = {p.name: [] for p in plans}
    handles = []
    for p in plans:

        def hook(mod: nn.Module, args: tuple, p: LayerPlan = p) -> None:
            rows = p.handler.calibration_rows(mod, args[0].detach()).to(torch.float64).cpu()
            store[p.name].append(rows)
            if sum(len(t) for t in store[p.name]) > 4 * max_rows:
                allrows = torch.cat(store[p.name])
                store[p.name] = [allrows[rng.choice(len(allrows), 2 * max_rows, replace=False)]]

        handles.append(p.module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in [calibration] if isinstance(calibration, torch.Tensor) else calibration:
                run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, chunks in store.items():
        if chunks:
            rows = torch.cat(chunks).numpy()
            if len(rows) > max_rows:
                rows = rows[rng.choice(len(rows), max_rows, replace=False)]
            out[name] = rows
    return out
