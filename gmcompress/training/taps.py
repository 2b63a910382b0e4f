"""Feature distillation targets: a model's inner outputs made part of what it returns.

:func:`tapped_output` runs a model with forward hooks on some of its submodules and returns their outputs and the
model's own, each flattened per sample and concatenated: ``(B, sum of the sizes)``. ``finetune(...,
features=names)`` distils on that (the student's taps against the teacher's); :class:`FeatureTaps` is the same as
a module, for any other loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..batches import first_tensor, forward_hooks, run_model


def resolve_taps(model: nn.Module, names: Sequence[str], what: str = "model") -> list[nn.Module]:
    """The submodules ``names`` of ``model`` (``model.get_submodule`` names); ValueError naming a missing one."""
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"features must be a non-empty list of submodule names (e.g. ['features.5']), got {names!r}")
    taps = []
    for name in names:
        try:
            taps.append(model.get_submodule(name))
        except AttributeError:
            children = ", ".join(n for n, _ in model.named_children()) or "none"
            raise ValueError(
                f"features: the {what} ({type(model).__name__}) has no submodule {name!r} (its children: {children}); "
                "give names as model.named_modules() lists them"
            ) from None
    return taps


def tapped_output(call: Callable[[], object], taps: Sequence[nn.Module], names: Sequence[str]) -> torch.Tensor:
    """``call()``'s first output tensor, after the first outputs of the modules ``taps`` during that call: each
    flattened per sample, concatenated along dimension 1. The hooks are removed when it returns; a tap that is not
    called raises RuntimeError naming it (``names``)."""
    seen: dict[int, torch.Tensor] = {}
    hooks = [(m, lambda mod, out, i=i: seen.setdefault(i, first_tensor(out))) for i, m in enumerate(taps)]
    with forward_hooks(hooks, inputs=False):  # a tapped block may take its input by any keyword
        out = first_tensor(call())
    missing = [n for i, n in enumerate(names) if i not in seen]
    if missing:
        raise RuntimeError(f"features: {', '.join(missing)} not called in the forward pass")
    parts = [seen[i] for i in range(len(taps))] + [out]
    return torch.cat([p.flatten(1) for p in parts], dim=1)


def distilled_output(model: nn.Module, inputs: object, taps: Sequence[nn.Module], names: Sequence[str]) -> torch.Tensor:
    """What the fine-tuning loss compares: ``model``'s first output tensor on ``inputs``, or with ``taps``
    (``finetune(features=names)``) :func:`tapped_output`."""
    if not taps:
        return first_tensor(run_model(model, inputs))
    return tapped_output(lambda: run_model(model, inputs), taps, names)


class FeatureTaps(nn.Module):
    """``model`` (shared, not copied) returning :func:`tapped_output`: the outputs of its submodules ``names`` and
    its own output, each flattened per sample and concatenated, ``(B, sum of the sizes)``.

    ``finetune(student, teacher, data, features=names, loss="mse")`` does the same inside the loop (checkpoints
    and ``best.pt`` then hold the model itself); this wrapper is for other loops and losses. Measured on MNISTNet
    (benchmarks/recovery.py, ``--feature-epochs 8 --distill-epochs 0``): eight epochs on ``features.5`` and
    nothing else end the fully compressed net 0.33-0.40 points below the original over three seeds, where
    distillation on the logits ends 0.6-0.9 below. The model itself is left as it was (hooks only during a
    forward).
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names) if not isinstance(names, str) else names
        self._modules_tapped = resolve_taps(model, self.names)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return tapped_output(lambda: self.model(*args, **kwargs), self._modules_tapped, self.names)
