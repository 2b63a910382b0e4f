"""Feature distillation targets: :class:`FeatureTaps` makes a model's inner outputs part of what it returns."""

from __future__ import annotations

import torch
from torch import nn

from ..batches import first_tensor, forward_hooks


class FeatureTaps(nn.Module):
    """``model`` (shared, not copied) returning the outputs of its submodules ``names`` and its own output, each
    flattened per sample and concatenated: ``(B, sum of the sizes)``.

    Distilling a compressed model on these (``finetune(FeatureTaps(student, names), FeatureTaps(teacher, names),
    data, loss="mse")``) gives each compressed layer a target close to it, not only the logits. Measured on
    MNISTNet (benchmarks/recovery.py, ``--feature-epochs 8 --distill-epochs 0``): eight epochs on ``features.5``
    and nothing else end the fully compressed net 0.33-0.40 points below the original over three seeds, where
    distillation on the logits ends 0.6-0.9 below. Each forward registers its hooks and removes them when it
    returns, so the model itself is left as it was. ``names`` are module names as ``model.get_submodule`` takes
    them; a tap whose module is not called raises.
    """

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        if not names:
            raise ValueError("FeatureTaps needs at least one submodule name (e.g. ['features.5'])")
        self.model = model
        self.names = list(names)
        self._modules_tapped = [model.get_submodule(n) for n in self.names]  # raises on a name that is not there

    def forward(self, *args, **kwargs) -> torch.Tensor:
        seen: dict[int, torch.Tensor] = {}
        hooks = [(m, lambda mod, out, i=i: seen.setdefault(i, first_tensor(out))) for i, m in
                 enumerate(self._modules_tapped)]  # fmt: skip
        with forward_hooks(hooks, inputs=False):  # a tapped block may take its input by any keyword
            out = first_tensor(self.model(*args, **kwargs))
        missing = [n for i, n in enumerate(self.names) if i not in seen]
        if missing:
            raise RuntimeError(f"FeatureTaps: {', '.join(missing)} not called in the forward pass")
        parts = [seen[i] for i in range(len(self.names))] + [out]
        return torch.cat([p.flatten(1) for p in parts], dim=1)
