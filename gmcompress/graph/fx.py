"""The graph pass: find the dense layers a model really calls, and swap in replacements.

``find_layers`` traces the model with ``torch.fx`` (every module that has a handler in
:mod:`gmcompress.planning.handlers` is kept as a leaf, subclasses included, unless its own ``forward`` reduces to one
functional call on its weight) and lists the ``call_module`` nodes of those layers in execution order, with the
dense layers inside the torch.nn containers the tracer keeps whole (``nn.TransformerEncoder``, ...). Functional
calls ``F.linear`` / ``F.conv1d`` / ``F.conv2d`` on a module's own parameters become layers too: each is lifted
into an ``nn.Linear`` / ``nn.Conv*d`` holding the same parameters (named ``<weight path with _>_<op>``, e.g.
``proj_w_linear``), when the weight is used by that call only. When the model does not trace (data-dependent
control flow, Hugging Face models under transformers 5, TorchScript modules, ...) it says why and falls back to
the module tree: every such module, by fully qualified name. Layers a parent reads by weight instead of calling
(:data:`WEIGHT_READERS`) are listed with the reason they stay dense. ``swap`` replaces modules by name on a root
module (a GraphModule shares its submodules with the traced model, so the graph's ``call_module`` nodes then run
the replacement), and turns off torch's fused transformer paths above a GM layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import fx, jit, nn

from ..nn import GMLayer
from ..planning.handlers import handler_for, own_forward_base

__all__ = [
    "TraceResult", "find_layers", "swap", "module_aliases", "source_name", "is_lifted", "unfused_paths",
    "WEIGHT_READERS",
]  # fmt: skip


@dataclass
class TraceResult:
    """The layers found, the GraphModule (None when tracing failed), why tracing failed, and why some layers must stay
    dense whatever the settings (by name: a layer its parent reads by weight)."""

    layers: list[tuple[str, nn.Module]]
    graph_module: fx.GraphModule | None
    failure: str | None
    kept_dense: dict[str, str] = field(default_factory=dict)


class _LayerTracer(fx.Tracer):
    """torch.fx's tracer, with every dense layer gmcompress knows kept as one ``call_module`` node, except the
    modules in ``trace_into`` (by id): subclasses with their own ``forward`` whose weight goes to one functional call
    (:func:`_lifts_own_weight`). Their forward is traced, and the call lifted like any other."""

    def __init__(self, trace_into: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.trace_into = trace_into

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if handler_for(m) is None:
            return super().is_leaf_module(m, module_qualified_name)
        return id(m) not in self.trace_into


def _traced_into(model: nn.Module) -> frozenset[int]:
    """The layers of ``model`` whose own forward the trace follows (checked one by one, before the trace)."""
    return frozenset(
        id(m) for m in model.modules() if m is not model and own_forward_base(m) is not None and _lifts_own_weight(m)
    )


def _lifts_own_weight(layer: nn.Module) -> bool:
    """Whether ``layer``'s own forward traces and passes its weight to exactly one ``F.linear``/``F.conv*d``,
    which the graph pass lifts into a module (a "same padding" Conv2d: ``F.pad`` then ``F.conv2d(x, self.weight,
    ...)``)."""
    try:
        graph = _LayerTracer().trace(layer)
        if _arguments_with_defaults(graph):
            return False
        gm = fx.GraphModule(layer, graph, type(layer).__name__)
        _lift_functional_layers(gm)
    except Exception:  # torch.fx raises many types for untraceable code
        return False
    return any(m.weight is layer.weight for name, m in gm.named_children() if name in gm.meta.get(_LIFTED, {}))


def find_layers(model: nn.Module) -> TraceResult:
    """Dense layers of ``model`` in call order (traced) or module order (fallback), deduplicated by name."""
    if isinstance(model, (jit.ScriptModule, jit.RecursiveScriptModule)):
        raise TypeError(
            f"{type(model).__name__} is a TorchScript module (torch.jit.script/trace): its layers cannot be "
            "swapped; compress the original nn.Module, then script or export the result"
        )
    try:
        graph = _LayerTracer(_traced_into(model)).trace(model)
        _drop_string_annotations(graph)
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
    layers: dict[str, nn.Module] = {}
    kept: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if handler_for(module) is not None:
                layers.setdefault(str(node.target), module)
            else:  # a torch.nn container the tracer keeps whole (nn.TransformerEncoder, nn.MultiheadAttention, ...)
                inner, reasons = _dense_layers_inside(module, str(node.target))
                for name, layer in inner:
                    layers.setdefault(name, layer)
                kept.update(reasons)
    return TraceResult(list(layers.items()), gm, None, kept)


def _drop_string_annotations(graph: fx.Graph) -> None:
    """Forget the type annotations that are strings (a forward written under ``from __future__ import annotations``
    annotates ``x: "torch.Tensor"``): torch.fx keeps them as generated globals that ``torch.save`` of the
    GraphModule cannot write in torch up to 2.13 (pytorch/pytorch#167117). They play no part in the computation."""
    for node in graph.nodes:
        if isinstance(node.type, str):
            node.type = None


def _module_tree(model: nn.Module, reason: str) -> TraceResult:
    """The fallback: every dense layer in module order (:func:`_dense_layers_inside`), and why the graph is not
    used."""
    layers, kept = _dense_layers_inside(model)
    return TraceResult(layers, None, reason, kept)


def _dense_layers_inside(module: nn.Module, prefix: str = "") -> tuple[list[tuple[str, nn.Module]], dict[str, str]]:
    """Every dense layer inside ``module`` (named under ``prefix``), in module order, and why those that are read by
    weight instead of called (:data:`WEIGHT_READERS`) stay dense. A ``MultiheadAttention``'s input projection
    (``in_proj_weight``, or ``q/k/v_proj_weight``) is listed as a stand-in ``nn.Linear`` on ``meta`` holding those
    parameters (``<attention>.in_proj``, ``.q_proj``, ...): it is never swapped."""
    layers: list[tuple[str, nn.Module]] = []
    kept: dict[str, str] = {}
    for relative, m in module.named_modules():
        name = ".".join(n for n in (prefix, relative) if n)
        if handler_for(m) is not None:
            layers.append((name, m))
            parent_name, _, attr = relative.rpartition(".")
            parent = module.get_submodule(parent_name)
            if any(isinstance(parent, t) and attr in attrs for t, attrs in WEIGHT_READERS.items()):
                kept[name] = _read_by_weight(parent, f"{attr}.weight and {attr}.bias")
        if isinstance(m, nn.MultiheadAttention):
            for proj, stand_in in _attention_projections(m):
                biases = " and in_proj_bias" if stand_in.bias is not None else ""
                layers.append((f"{name}.{proj}" if name else proj, stand_in))
                kept[layers[-1][0]] = _read_by_weight(m, f"{proj}_weight{biases}")
    return layers, kept


WEIGHT_READERS: dict[type[nn.Module], tuple[str, ...]] = {nn.MultiheadAttention: ("out_proj",)}
"""torch modules whose forward reads a child Linear's ``weight``/``bias`` (``F.multi_head_attention_forward``)
instead of calling it, by the child's attribute name: a GM layer there would never run, so it stays dense. (The
fused inference paths of ``nn.TransformerEncoderLayer``/``nn.TransformerEncoder`` read ``linear1``/``linear2`` too,
but only when allowed: :func:`swap` turns them off above a GM layer, and the slow path calls the modules.)"""


def _read_by_weight(reader: nn.Module, what: str) -> str:
    return (
        f"{type(reader).__name__} reads {what} directly instead of calling a layer, so a GM layer there would never "
        "run; it stays dense"
    )


def _attention_projections(attention: nn.MultiheadAttention) -> list[tuple[str, nn.Linear]]:
    """Stand-ins for the input projection(s) of ``attention``, which are parameters, not modules."""
    if attention._qkv_same_embed_dim:
        return [("in_proj", _linear_over(attention.in_proj_weight, attention.in_proj_bias))]
    weights = (attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight)
    return [(f"{k}_proj", _linear_over(w, None)) for k, w in zip("qkv", weights)]


def _linear_over(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` and ``bias`` (shared, not copied)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = weight
    if bias is not None:
        linear.bias = bias
    return linear


def _arguments_with_defaults(graph: fx.Graph) -> list[str]:
    """Forward arguments that have a default value (``mask=None``, ``scale=1.0``).

    torch.fx traces every argument as a Proxy. Tests that do not go through the graph still run on it: ``mask is
    not None`` is true and ``isinstance(mask, torch.Tensor)`` false, whatever is passed later. Code like ``if
    mask is not None: y = y * mask`` is then recorded with its branch taken, and the GraphModule fails or
    computes something else when the argument is left out (or, for ``isinstance``, when it is given). Such a
    test leaves no trace in the graph, so any argument with a default is suspect. The module tree keeps the
    model's own ``forward``, so it stays right."""
    return [str(n.target) for n in graph.nodes if n.op == "placeholder" and n.args]


_LIFTED = "gmcompress.lifted"  # GraphModule.meta key: lifted layer name -> the module whose parameters it holds
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
        gm.meta.setdefault(_LIFTED, {})[name] = weight.target.rpartition(".")[0]
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
    if isinstance(new, GMLayer):
        _use_unfused_paths(root, name)


_FUSED_PATH_SWITCHES: dict[type[nn.Module], tuple[str, object]] = {
    nn.TransformerEncoderLayer: ("activation_relu_or_gelu", 0),
    nn.TransformerEncoder: ("use_nested_tensor", False),
}
"""torch modules with a fused inference path that reads their Linears' ``weight`` and ``bias`` instead of calling them,
and the attribute (and value) that turns it off. In eval mode without grad ``nn.TransformerEncoderLayer`` runs
``torch._transformer_encoder_layer_fwd`` unless ``activation_relu_or_gelu`` is 0, and ``nn.TransformerEncoder`` packs
a padded batch into a nested tensor unless ``use_nested_tensor`` is False. With the path off, the same computation
runs through the modules (in the unfused order of operations)."""


def _use_unfused_paths(root: nn.Module, name: str) -> None:
    """Turn off the fused paths (:data:`_FUSED_PATH_SWITCHES`) of every ancestor of layer ``name``: a GM layer there
    would be bypassed (a dense product of its materialised weight; an error for a shared bias) or fed a nested
    tensor."""
    parts = name.split(".")
    for depth in range(len(parts)):
        _switch_off(root.get_submodule(".".join(parts[:depth])))


def _switch_off(module: nn.Module) -> tuple[str, object] | None:
    """Turn ``module``'s fused path off; its switch and former value (None: it has no fused path)."""
    switch = next((v for t, v in _FUSED_PATH_SWITCHES.items() if isinstance(module, t)), None)
    if switch is None or not hasattr(module, switch[0]):
        return None
    former = getattr(module, switch[0])
    setattr(module, switch[0], switch[1])
    return switch[0], former


@contextlib.contextmanager
def unfused_paths(model: nn.Module) -> Iterator[None]:
    """Every fused transformer path of ``model`` off inside, so that hooks on the Linears see their calls and plain
    tensors (calibration statistics, captured inputs, budget measurements); back on after, except above a GM layer."""
    turned_off = [(m, _switch_off(m)) for m in model.modules()]
    try:
        yield
    finally:
        for module, switch in turned_off:
            if switch is not None and not any(isinstance(m, GMLayer) for m in module.modules()):
                setattr(module, *switch)


def is_lifted(root: nn.Module, name: str) -> bool:
    """Whether layer ``name`` of ``root`` was lifted from a functional call (it exists in the GraphModule only)."""
    return isinstance(root, fx.GraphModule) and name in root.meta.get(_LIFTED, {})


def source_name(root: nn.Module, name: str) -> str:
    """The name, in the traced model, of the module that module ``name`` of ``root`` stands for: itself, or for a
    layer lifted from a functional call, the module whose parameters it holds."""
    lifted = root.meta.get(_LIFTED, {}) if isinstance(root, fx.GraphModule) else {}
    return lifted.get(name, name)


def module_aliases(model: nn.Module) -> dict[int, list[str]]:
    """All fully qualified names of each module object (a module shared by two parents has two)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names
