"""The graph pass: find the dense layers a model really calls, and swap in replacements.

``find_layers`` traces the model with ``torch.fx.symbolic_trace`` and lists the ``call_module`` nodes
of ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` in execution order. When the model does not trace (data-
dependent control flow, Hugging Face models under transformers 5, ...) it says why and falls back to the
module tree: every such leaf module, found by fully qualified name. ``swap`` replaces modules by
name on a root module (a GraphModule shares its submodules with the traced model, so the graph's
``call_module`` nodes then run the replacement).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

DENSE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class TraceResult:
    """The layers found, the GraphModule (None when tracing failed) and why tracing failed."""

    layers: list[tuple[str, nn.Module]]
    graph_module: fx.GraphModule | None
    failure: str | None


def find_layers(model: nn.Module, types: tuple[type[nn.Module], ...] = DENSE_TYPES) -> TraceResult:
    """Dense layers of ``model`` in call order (traced) or module order (fallback), deduplicated by name."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as err:  # torch.fx raises many types for untraceable code
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        layers = [(name, m) for name, m in model.named_modules() if type(m) in types]
        return TraceResult(layers, None, reason)
    seen: set[str] = set()
    layers = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in seen:
            module = gm.get_submodule(node.target)
            if type(module) in types:
                seen.add(node.target)
                layers.append((str(node.target), module))
    return TraceResult(layers, gm, None)


def swap(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at the fully qualified ``name`` of ``root``."""
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if not hasattr(parent, attr):
        raise KeyError(f"{type(root).__name__} has no submodule {name!r}")
    setattr(parent, attr, new)


def module_aliases(model: nn.Module) -> dict[int, list[str]]:
    """All fully qualified names of each module object (a module shared by two parents has two)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names
