"""The graph pass: find the dense layers a model really calls, and swap in replacements.

``find_layers`` traces the model with ``torch.fx`` (every module that has a handler in
:mod:`gmcompress.handlers` is kept as a leaf, subclasses included) and lists the ``call_module`` nodes
of those layers in execution order. When the model does not trace (data-dependent control flow,
Hugging Face models under transformers 5, TorchScript modules, ...) it says why and falls back to the
module tree: every such module, by fully qualified name. ``swap`` replaces modules by name on a root
module (a GraphModule shares its submodules with the traced model, so the graph's ``call_module`` nodes
then run the replacement).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, jit, nn

from .handlers import handler_for

__all__ = ["TraceResult", "find_layers", "swap", "module_aliases"]


@dataclass
class TraceResult:
    """The layers found, the GraphModule (None when tracing failed) and why tracing failed."""

    layers: list[tuple[str, nn.Module]]
    graph_module: fx.GraphModule | None
    failure: str | None


class _LayerTracer(fx.Tracer):
    """torch.fx's tracer, with every dense layer gmcompress knows kept as one ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return handler_for(m) is not None or super().is_leaf_module(m, module_qualified_name)


def find_layers(model: nn.Module) -> TraceResult:
    """Dense layers of ``model`` in call order (traced) or module order (fallback), deduplicated by name."""
    if isinstance(model, (jit.ScriptModule, jit.RecursiveScriptModule)):
        raise TypeError(
            f"{type(model).__name__} is a TorchScript module (torch.jit.script/trace): its layers cannot be "
            "swapped; compress the original nn.Module, then script or export the result"
        )
    try:
        graph = _LayerTracer().trace(model)
        gm = fx.GraphModule(model, graph, type(model).__name__)
    except Exception as err:  # torch.fx raises many types for untraceable code
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        layers = [(name, m) for name, m in model.named_modules() if handler_for(m) is not None]
        return TraceResult(layers, None, reason)
    seen: set[str] = set()
    layers = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in seen:
            module = gm.get_submodule(node.target)
            if handler_for(module) is not None:
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
