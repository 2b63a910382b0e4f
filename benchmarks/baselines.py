"""Baselines at equal parameter counts: truncated-SVD low rank and magnitude pruning (real counts).

Both store only what they use: ``LowRankLinear`` two factors (``k (in + out)`` weights),
``PrunedLinear`` the kept values plus their flat indices as a buffer (``nnz`` parameters; the int64
indices are counted in bytes, not in parameters, as a sparse format would store them).
"""

from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """``W ~= U V`` from the truncated SVD (the best rank-k approximation in Frobenius norm)."""

    def __init__(self, linear: nn.Linear, k: int) -> None:
        super().__init__()
        u, s, vh = torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)
        root = s[:k].sqrt()
        self.v = nn.Parameter((vh[:k] * root[:, None]).to(linear.weight.dtype))
        self.u = nn.Parameter((u[:, :k] * root[None, :]).to(linear.weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.v.t()) @ self.u.t()
        return y if self.bias is None else y + self.bias


class PrunedLinear(nn.Module):
    """The ``nnz`` largest-magnitude weights of a Linear, stored as values + flat indices."""

    def __init__(self, linear: nn.Linear, nnz: int) -> None:
        super().__init__()
        w = linear.weight.detach()
        self.out_features, self.in_features = w.shape
        idx = torch.topk(w.abs().flatten(), nnz).indices.sort().values
        self.values = nn.Parameter(w.flatten()[idx].clone())
        self.register_buffer("index", idx)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.zeros(self.out_features * self.in_features, dtype=self.values.dtype, device=self.values.device)
        w = w.index_put((self.index,), self.values).view(self.out_features, self.in_features)
        return nn.functional.linear(x, w, self.bias)


def replace_layers(model: nn.Module, names: list[str], budget: dict[str, int], kind: str) -> nn.Module:
    """A copy of ``model`` with each named Linear replaced by ``kind`` ("svd" | "prune") at ``budget[name]``
    weights (bias excluded, as for the GM layers' kernels + modulations)."""
    import copy

    from gmcompress.graph.fx import swap

    out = copy.deepcopy(model)
    for name in names:
        layer = out.get_submodule(name)
        if kind == "svd":
            k = max(1, budget[name] // (layer.in_features + layer.out_features))
            swap(out, name, LowRankLinear(layer, k))
        else:
            swap(out, name, PrunedLinear(layer, max(1, budget[name])))
    return out
