"""Save and load compressed models: a JSON-able structure manifest next to the state_dict.

The file is ``torch.save({"manifest": ..., "state_dict": ...})`` with plain containers only, so
``torch.load(path, weights_only=True)`` reads it (no pickled code). ``load`` re-applies the manifest to
a fresh instance of the original architecture (re-tracing it when the saved model was a
GraphModule) and loads the weights bit for bit.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import fx, nn

from .fx import find_layers, module_aliases, swap
from .nn import GMConv2d, GMLinear, GMPointwiseConv

__all__ = ["save", "load", "manifest", "FORMAT"]

FORMAT = "gmcompress/1"
KINDS: dict[str, type[nn.Module]] = {"GMLinear": GMLinear, "GMConv2d": GMConv2d, "GMPointwiseConv": GMPointwiseConv}


def manifest(model: nn.Module) -> dict:
    """Per GM layer (by fully qualified name): its kind, constructor config and aliases."""
    from . import __version__

    layers: dict[str, dict] = {}
    aliases = module_aliases(model)
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind in KINDS and not any(name.startswith(f"{other}.") for other in layers):
            layers[name] = {"kind": kind, "config": module.config(), "aliases": aliases[id(module)]}
    return {
        "format": FORMAT,
        "gmcompress_version": __version__,
        "graph_module": isinstance(model, fx.GraphModule),
        "layers": layers,
    }


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s manifest and state_dict to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"manifest": manifest(model), "state_dict": model.state_dict()}, path)


def atomic_torch_save(obj: object, path: Path) -> None:
    """``torch.save`` to a temp file beside ``path``, then rename: an interruption never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild a saved compressed model on ``model`` (a fresh instance of the original architecture).

    The GM layers named in the manifest replace the modules at those names, then the weights load
    with ``strict=True``. A model saved as a GraphModule is re-traced first (same graph pass as
    ``compress``). ``model`` is required: the manifest holds the structure of the GM layers, not code.
    """
    data = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(data, dict) or data.get("manifest", {}).get("format") != FORMAT:
        raise ValueError(f"{path}: not a gmcompress file (expected a manifest with format {FORMAT!r})")
    meta = data["manifest"]
    if model is None:
        raise ValueError(
            f"{path}: pass model=<a fresh instance of the original architecture>; the file holds the "
            f"structure of the GM layers and the weights, not the model's code"
        )
    root: nn.Module = model
    if meta["graph_module"]:
        traced = find_layers(model)
        if traced.graph_module is not None:
            root = traced.graph_module
        else:
            warnings.warn(
                f"{path}: saved as a GraphModule, but {type(model).__name__} does not trace now "
                f"({traced.failure}); loading into the module tree",
                stacklevel=2,
            )
    for name, entry in meta["layers"].items():
        kind = KINDS.get(entry["kind"])
        if kind is None:
            raise ValueError(f"{path}: layer {name!r} has unknown kind {entry['kind']!r}")
        try:
            old = root.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"{path}: the model has no layer {name!r}; is it the architecture that was compressed?"
            ) from None
        factory = {}
        weight = getattr(old, "weight", None)
        if isinstance(weight, torch.Tensor):
            factory = {"device": weight.device, "dtype": weight.dtype}
        new = kind.from_config(entry["config"], **factory)
        for alias in entry.get("aliases", [name]):
            swap(root, alias, new)
    root.load_state_dict(data["state_dict"], strict=True)
    return root
