"""Feature distillation targets: a model's inner outputs made part of what it returns.

:func:`tapped_parts` runs a model with forward hooks on some of its submodules and returns their outputs and the
model's own, each flattened per sample. ``finetune(..., features=names)`` distils on those, part by part (the
student's taps against the teacher's, each part's loss normalised: ``losses._feature_loss``);
:class:`FeatureTaps` returns them concatenated (:func:`tapped_output`), ``(B, sum of the sizes)``, as a module
for any other loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import fx, nn

from ..graph.batches import first_tensor, forward_hooks, run_model
from .settings import check_feature_names


def resolve_taps(
    model: nn.Module, names: Sequence[str], what: str = "model", reference: nn.Module | None = None
) -> list[nn.Module]:
    """The modules whose outputs are the outputs of ``model``'s submodules ``names`` (``get_submodule`` names).

    Usually the submodules themselves. A ``torch.fx.GraphModule`` (what ``gmcompress.compress`` returns) does not
    call its containers: the trace calls their submodules directly, so a hook on ``features`` never fires. There a
    name that the graph does not call is followed, while ``reference`` (the original model: the teacher) holds an
    ``nn.Sequential`` under it, to that Sequential's last child, whose output the Sequential returns. Otherwise
    ValueError names the side (``what``), the name and the modules the graph calls under it; also for a name that
    is not there."""
    check_feature_names(names)
    called = None
    if isinstance(model, fx.GraphModule):
        called = {n.target for n in model.graph.nodes if n.op == "call_module"}
    taps = []
    for name in names:
        _submodule(model, name, what)
        target, original = name, _submodule(reference, name, "teacher") if reference is not None else None
        while called is not None and target not in called:
            if not (isinstance(original, nn.Sequential) and len(original)):
                inside = sorted(t for t in called if t.startswith(target + "."))
                raise ValueError(
                    f"features: the {what} ({type(model).__name__}, a torch.fx graph) never calls {name!r} itself: "
                    "the trace calls what is inside it directly, so its output cannot be tapped; tap one of the "
                    f"modules it calls ({', '.join(inside[:6]) or 'none under that name'})"
                )
            last = list(original._modules)[-1]
            target, original = f"{target}.{last}", original[-1]
        taps.append(model.get_submodule(target))
    return taps


def _submodule(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        children = ", ".join(n for n, _ in model.named_children()) or "none"
        raise ValueError(
            f"features: the {what} ({type(model).__name__}) has no submodule {name!r} (its children: {children}); "
            "give names as model.named_modules() lists them"
        ) from None


def tapped_parts(
    call: Callable[[], object], taps: Sequence[nn.Module], names: Sequence[str], what: str = "model"
) -> list[torch.Tensor]:
    """The first outputs of the modules ``taps`` during ``call()`` (copies: a later in-place op,
    ``ReLU(inplace=True)``, must not change them), then ``call()``'s first output tensor: each flattened per
    sample, ``(B, size)`` (``(B,)`` counts as ``(B, 1)``). The hooks are removed when it returns; a tap that is
    not called raises RuntimeError naming it (``names``) and the side (``what``)."""
    seen: dict[int, torch.Tensor] = {}

    def keep(i: int, out: object) -> None:
        if i not in seen:
            seen[i] = first_tensor(out).clone()

    hooks = [(m, lambda mod, out, i=i: keep(i, out)) for i, m in enumerate(taps)]
    with forward_hooks(hooks, inputs=False):  # a tapped block may take its input by any keyword
        out = first_tensor(call())
    missing = [n for i, n in enumerate(names) if i not in seen]
    if missing:
        raise RuntimeError(f"features: {', '.join(missing)} not called in the forward pass of the {what}")
    parts = [seen[i] for i in range(len(taps))] + [out]
    return [p.reshape(p.shape[0], -1) for p in parts]


def tapped_output(
    call: Callable[[], object], taps: Sequence[nn.Module], names: Sequence[str], what: str = "model"
) -> torch.Tensor:
    """:func:`tapped_parts` concatenated along dimension 1: ``(B, sum of the sizes)``."""
    return torch.cat(tapped_parts(call, taps, names, what), dim=1)


def distilled_parts(
    model: nn.Module, inputs: object, taps: Sequence[nn.Module], names: Sequence[str], what: str = "model"
) -> list[torch.Tensor]:
    """What the fine-tuning loss compares: ``[model's first output tensor on inputs]``, or with ``taps``
    (``finetune(features=names)``) :func:`tapped_parts`, one entry per tap and the output last."""
    if not taps:
        return [first_tensor(run_model(model, inputs))]
    return tapped_parts(lambda: run_model(model, inputs), taps, names, what)


class FeatureTaps(nn.Module):
    """``model`` (shared, not copied) returning :func:`tapped_output`: the outputs of its submodules ``names`` and
    its own output, each flattened per sample and concatenated, ``(B, sum of the sizes)``.

    ``finetune(student, teacher, data, features=names, loss="mse")`` taps the same outputs inside the loop
    (checkpoints and ``best.pt`` then hold the model itself) and averages each part's own relative error, so no
    part drowns the others; this wrapper is for other loops and losses (an MSE on its concatenation weighs each
    part by its size and scale). Measured on MNISTNet (benchmarks/recovery.py, ``--feature-epochs 8
    --distill-epochs 0``, with the MSE of the concatenation that finetune used then): eight epochs on
    ``features.5`` and nothing else end the fully compressed net 0.33-0.40 points below the original over three
    seeds, where distillation on the logits ends 0.6-0.9 below. The model itself is left as it was (hooks only
    during a forward). ``reference``: the original model, for names of containers a compressed graph calls
    through (:func:`resolve_taps`).
    """

    def __init__(self, model: nn.Module, names: Sequence[str], reference: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.names = list(names) if not isinstance(names, str) else names
        self._modules_tapped = resolve_taps(model, self.names, reference=reference)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return tapped_output(lambda: self.model(*args, **kwargs), self._modules_tapped, self.names)
