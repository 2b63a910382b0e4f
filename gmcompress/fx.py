"""The graph pass: find the dense layers a model really calls, and swap in replacements.

``find_layers`` traces the model with ``torch.fx`` (every module that has a handler in
:mod:`gmcompress.handlers` is kept as a leaf, subclasses included) and lists the ``call_module`` nodes
of those layers in execution order. Functional calls ``F.linear`` / ``F.conv1d`` / ``F.conv2d`` on a
module's own parameters become layers too: each is lifted into an ``nn.Linear`` / ``nn.Conv*d`` holding
the same parameters (named ``<weight path with _>_<op>``, e.g. ``proj_w_linear``), when the weight is
used by that call only. When the model does not trace (data-dependent control flow,
Hugging Face models under transformers 5, TorchScript modules, ...) it says why and falls back to the
module tree: every such module, by fully qualified name. ``swap`` replaces modules by name on a root
module (a GraphModule shares its submodules with the traced model, so the graph's ``call_module`` nodes
then run the replacement).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
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
        optional = _arguments_with_defaults(graph)
        if not optional:  # (no GraphModule for a trace that will not be used)
            gm = fx.GraphModule(model, graph, type(model).__name__)
            _lift_functional_layers(gm)
    except Exception as err:  # torch.fx raises many types for untraceable code
        return _module_tree(model, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    if optional:
        return _module_tree(
            model,
            f"forward argument(s) {', '.join(optional)} have defaults, so the trace would keep only the branches "
            "taken when they are given",
        )
    seen: set[str] = set()
    layers = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in seen:
            module = gm.get_submodule(node.target)
            if handler_for(module) is not None:
                seen.add(node.target)
                layers.append((str(node.target), module))
    return TraceResult(layers, gm, None)


def _module_tree(model: nn.Module, reason: str) -> TraceResult:
    """The fallback: every module with a handler, in module order, and why the graph is not used."""
    layers = [(name, m) for name, m in model.named_modules() if handler_for(m) is not None]
    return TraceResult(layers, None, reason)


def _arguments_with_defaults(graph: fx.Graph) -> list[str]:
    """Forward arguments that have a default value (``mask=None``, ``scale=1.0``).

    torch.fx traces every argument as a Proxy. Tests that do not go through the graph still run on it: ``mask is
    not None`` is true and ``isinstance(mask, torch.Tensor)`` false, whatever is passed later. Code like ``if
    mask is not None: y = y * mask`` is then recorded with its branch taken, and the GraphModule fails or
    computes something else when the argument is left out (or, for ``isinstance``, when it is given). Such a
    test leaves no trace in the graph, so any argument with a default is suspect. The module tree keeps the
    model's own ``forward``, so it stays right."""
    return [str(n.target) for n in graph.nodes if n.op == "placeholder" and n.args]


_FUNCTIONAL = {torch._C._nn.linear: "linear", torch.conv1d: "conv1d", torch.conv2d: "conv2d"}
_CONV_ARGS = ("stride", "padding", "dilation", "groups")


def _lift_functional_layers(gm: fx.GraphModule) -> None:
    """Replace ``F.linear``/``F.conv1d``/``F.conv2d`` on parameters used nowhere else by equivalent modules."""
    for node in list(gm.graph.nodes):
        op = _FUNCTIONAL.get(node.target) if node.op == "call_function" else None
        args = dict(zip(("input", "weight", "bias", *_CONV_ARGS), node.args), **node.kwargs) if op else {}
        weight, bias = args.get("weight"), args.get("bias")
        if not op or not _own_parameter(gm, weight) or (bias is not None and not _own_parameter(gm, bias)):
            continue
        w = gm.get_parameter(weight.target)
        if op == "linear":
            module = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
        else:
            conv = nn.Conv1d if op == "conv1d" else nn.Conv2d
            groups = int(args.get("groups", 1))
            extra = {k: args[k] for k in _CONV_ARGS[:3] if k in args}
            module = conv(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), groups=groups, bias=bias is not None,
                          device="meta", **extra)  # fmt: skip
        module.weight = w
        if bias is not None:
            module.bias = gm.get_parameter(bias.target)
        name = f"{weight.target.replace('.', '_')}_{op}"
        gm.add_submodule(name, module)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (args["input"],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        for attr in [weight] + ([bias] if bias is not None else []):
            _delete_parameter(gm, attr)
    gm.graph.lint()
    gm.recompile()


def _own_parameter(gm: fx.GraphModule, node: object) -> bool:
    """A ``get_attr`` of a parameter with exactly one user (the call being lifted), whose owner module is not
    itself called (``self.proj(x)`` beside ``F.linear(x, self.proj.weight)``: lifting would take the weight
    away from the call)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr" or len(node.users) != 1:
        return False
    try:
        gm.get_parameter(node.target)
    except AttributeError:
        return False
    owner = node.target.rpartition(".")[0]
    if any(n.op == "call_module" and n.target == owner for n in gm.graph.nodes):
        return False
    return sum(1 for n in gm.graph.nodes if n.op == "get_attr" and n.target == node.target) == 1


def _delete_parameter(gm: fx.GraphModule, node: fx.Node) -> None:
    owner, _, attr = node.target.rpartition(".")
    delattr(gm.get_submodule(owner), attr)
    gm.graph.erase_node(node)


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
