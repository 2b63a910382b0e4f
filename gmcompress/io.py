"""Save and load compressed models: a JSON-able structure manifest next to the state_dict.

The file is ``torch.save({"manifest": ..., "state_dict": ...})`` with plain containers only, so
``torch.load(path, weights_only=True)`` reads it (no pickled code). ``load`` re-applies the manifest to
a fresh instance of the original architecture (re-tracing it when the saved model was a
GraphModule) and loads the weights bit for bit. Every GM layer kind is found by name in
:data:`gmcompress.nn.GM_LAYERS`.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
import warnings
from pathlib import Path

import torch
from torch import fx, nn

from .graph.fx import find_layers, module_aliases, swap
from .nn import GM_LAYERS, GMLayer, GMModule

__all__ = ["save", "load", "manifest", "atomic_torch_save", "read_checkpoint", "FORMAT"]

FORMAT = "gmcompress/3"
_OLD_FORMATS = ("gmcompress/1", "gmcompress/2")
# 1: 1x1 convs were GMPointwiseConv, a GMLinear wrapped at ".linear"; 1 and 2: every GM layer stored "kernels", where a
# layer on a block path now stores "spectrum" (converted on load, GMModule.convert_state)


def manifest(model: nn.Module) -> dict:
    """Per GM layer (by fully qualified name): its kind, constructor config and aliases."""
    from ._version import __version__

    layers: dict[str, dict] = {}
    aliases = module_aliases(model)
    for name, module in model.named_modules():
        if isinstance(module, GMLayer) and not any(name.startswith(f"{other}.") for other in layers):
            layers[name] = {"kind": type(module).__name__, "config": module.config(), "aliases": aliases[id(module)]}
    return {
        "format": FORMAT,
        "gmcompress_version": __version__,
        "graph_module": isinstance(model, fx.GraphModule),
        "layers": layers,
    }


def _check_model(model: object, what: str) -> None:
    """TypeError unless ``model`` (the argument of ``what``: "save" or "load") is an nn.Module."""
    if isinstance(model, nn.Module):
        return
    hint = ""
    if isinstance(model, (str, os.PathLike)):
        hint = " (the arguments are model, path: the other way round?)"
    elif isinstance(model, dict):
        hint = " (a state_dict? pass the model itself: the file holds the structure of its GM layers too)"
    raise TypeError(f"{what}: model must be a torch.nn.Module, got {type(model).__name__}{hint}")


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s manifest and state_dict to ``path`` atomically (temp file + rename)."""
    _check_model(model, "save")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"cannot save to {path}: it is a directory; give a file name, e.g. {path / 'model.pt'}")
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"cannot save to {path}: {path.parent} is a file, not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"manifest": manifest(model), "state_dict": model.state_dict()}, path)


def atomic_torch_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file beside ``path``, then rename: an interruption never leaves half a file.

    The file gets the permissions a plain ``open(path, "w")`` would give (the umask, or those of the file it
    replaces), and a symlink at ``path`` keeps pointing where it did: its target is replaced. A failed write (a
    full disk: OSError with errno ENOSPC) raises OSError naming ``path``, with the temp file removed and the file
    that was there kept as it was. The writes go through a Python file, so the OS error reaches us as it is
    (``torch.save`` to a name reports a short write only as "unexpected pos").
    """
    target = Path(os.path.realpath(path))
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    os.close(fd)
    try:
        try:
            with open(tmp, "wb") as file:
                torch.save(obj, file)
        except OSError as err:
            raise _write_error(err, Path(path)) from None
        os.chmod(tmp, _file_mode(target))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp) or os.path.islink(tmp):
            os.remove(tmp)


def _write_error(err: OSError, path: Path) -> OSError:
    """``err`` (from writing ``path``'s temp file) as an OSError of the same errno that names ``path``."""
    kept = "; the file there before is kept unchanged" if path.exists() else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = f"the disk is full ({err.strerror}); free space on {path.parent} or write elsewhere"
    else:
        reason = err.strerror or str(err)
    return OSError(err.errno, f"could not write {path}: {reason}{kept}", str(path))


def _file_mode(path: Path) -> int:
    if path.exists():
        return stat.S_IMODE(path.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """``torch.load(path, weights_only=True)`` with one clear error for a missing, empty or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # EOFError, UnpicklingError, RuntimeError (zip), UnicodeDecodeError ...
        if _readable_on_meta(path):  # the file is fine: map_location is what failed
            raise ValueError(
                f"map_location={map_location!r} cannot place the weights of {path}: {str(err).splitlines()[0]}"
            ) from None
        raise ValueError(
            f"{path}: not a readable gmcompress/torch file ({type(err).__name__}); it may be empty, truncated or "
            "of another format"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a gmcompress file (holds a {type(data).__name__}, expected a dict)")
    return data


def _readable_on_meta(path: Path) -> bool:
    """Whether ``path`` loads with ``map_location="meta"`` (structure only, no data read)."""
    try:
        torch.load(path, map_location="meta", weights_only=True)
    except Exception:
        return False
    return True


def load(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild a saved compressed model on ``model`` (a fresh instance of the original architecture).

    The GM layers named in the manifest replace the modules at those names, then the weights load
    with ``strict=True``. A model saved as a GraphModule is re-traced first (same graph pass as
    ``compress``). ``model`` is required: the manifest holds the structure of the GM layers, not code.
    If anything fails, ``model`` is left as it was.
    """
    if model is not None:
        _check_model(model, "load")
    data = read_checkpoint(path, map_location)
    meta = _manifest_of(data, path)
    if model is None:
        raise ValueError(
            f"{path}: pass model=<a fresh instance of the original architecture>; the file holds the "
            f"structure of the GM layers and the weights, not the model's code"
        )
    _check_finite_weights(data["state_dict"], path)
    root = _load_root(model, meta, path)
    swapped: list[tuple[str, nn.Module]] = []
    try:
        for name, entry in meta["layers"].items():
            new = _rebuild_layer(root, name, entry, path)
            for alias in entry.get("aliases", [name]):
                swapped.append((alias, root.get_submodule(alias)))
                swap(root, alias, new)
        _convert_states(root, data["state_dict"])
        _check_fits(root, data["state_dict"], path)  # before any weight is copied
        root.load_state_dict(data["state_dict"], strict=True)
    except Exception:
        for alias, old in reversed(swapped):
            swap(root, alias, old)
        raise
    return root


def _convert_states(root: nn.Module, state: dict) -> None:
    """Every GM layer's kernels in ``state`` in the form the rebuilt layer stores (a file from before the spectrum
    form, or saved while a layer took another path; see :meth:`gmcompress.nn.GMModule.convert_state`)."""
    for name, module in root.named_modules(remove_duplicate=False):
        if isinstance(module, GMModule):
            module.convert_state(state, f"{name}." if name else "")


def _check_fits(root: nn.Module, state: dict, path: str | os.PathLike) -> None:
    """The saved state_dict has exactly the model's keys and shapes (strict loading would copy, then fail)."""
    expected = root.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = {"missing": missing, "unexpected": unexpected, "shape": shapes}
    if any(problems.values()):
        parts = [
            f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}" for what, keys in problems.items() if keys
        ]
        raise ValueError(f"{path}: the weights do not fit this model ({'; '.join(parts)})")


def _check_finite_weights(state: dict, path: str | os.PathLike) -> None:
    """ValueError naming the tensors of ``state`` that hold NaN or inf (a model saved after training diverged)."""
    bad = [
        k
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not v.is_meta and not bool(torch.isfinite(v).all())
    ]
    if bad:
        names = ", ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
        raise ValueError(
            f"{path}: {len(bad)} weight tensor(s) hold NaN or inf ({names}): the model was saved after its training "
            "diverged and would give NaN outputs; load an earlier checkpoint, or fine-tune again"
        )


def _format_version(fmt: object) -> int | None:
    """The number N of a ``"gmcompress/N"`` format string, else None."""
    if isinstance(fmt, str) and fmt.startswith("gmcompress/") and fmt.removeprefix("gmcompress/").isdigit():
        return int(fmt.removeprefix("gmcompress/"))
    return None


def _manifest_of(data: dict, path: str | os.PathLike) -> dict:
    meta = data.get("manifest")
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt == "gmcompress/1":
        return _upgrade_v1(data)
    if fmt in _OLD_FORMATS:
        return meta  # the kernels are converted once the layers are built (_convert_states)
    newer = _format_version(fmt)
    if newer is not None and newer > _format_version(FORMAT):
        written_by = meta.get("gmcompress_version")
        by = f" (written by gmcompress {written_by})" if isinstance(written_by, str) else ""
        raise ValueError(
            f"{path}: a newer gmcompress format, {fmt!r}{by}; this gmcompress reads {FORMAT!r} and older. Upgrade "
            "gmcompress to load it"
        )
    if fmt != FORMAT or "state_dict" not in data:
        raise ValueError(f"{path}: not a gmcompress file (expected a manifest with format {FORMAT!r})")
    return meta


def _upgrade_v1(data: dict) -> dict:
    """Format 1 stored a 1x1 conv as ``GMPointwiseConv(linear=GMLinear)``: now a :class:`GMChannelConv`.

    The parameters are the same tensors (a 1x1 kernel adds no offset); their keys lose ``.linear``. Whether
    the conv was 1-D or 2-D was not recorded: ``load`` takes it from the model (``"dims": None``).
    """
    meta = data["manifest"]
    for name, entry in meta["layers"].items():
        if entry["kind"] != "GMPointwiseConv":
            continue
        old = entry["config"]["linear"]
        impl = old["impl"] if old["impl"] in ("auto", "dense") else "grouped"
        entry["kind"] = "GMChannelConv"
        entry["config"] = {
            "in_channels": old["in_features"], "out_channels": old["out_features"], "kernel_size": None,
            "group": old["group"], "rank": old["rank"], "modulate": old["modulate"], "bias": old["bias"],
            "impl": impl, "support": old["support"], "pad": old["pad"], "dims": None,
        }  # fmt: skip
        for alias in entry.get("aliases", [name]):
            prefix = f"{alias}.linear." if alias else "linear."
            for key in [k for k in data["state_dict"] if k.startswith(prefix)]:
                data["state_dict"][key.replace(prefix, prefix[: -len("linear.")], 1)] = data["state_dict"].pop(key)
    return meta


def _load_root(model: nn.Module, meta: dict, path: str | os.PathLike) -> nn.Module:
    if not meta["graph_module"]:
        return model
    traced = find_layers(model)
    if traced.graph_module is not None:
        return traced.graph_module
    warnings.warn(
        f"{path}: saved as a GraphModule, but {type(model).__name__} does not trace now ({traced.failure}); "
        "loading into the module tree",
        stacklevel=3,
    )
    return model


def _rebuild_layer(root: nn.Module, name: str, entry: dict, path: str | os.PathLike) -> nn.Module:
    kind = GM_LAYERS.get(entry["kind"])
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
    config = entry["config"]
    if config.get("dims", 0) is None:  # a format-1 1x1 conv: the model says Conv1d or Conv2d
        dims = len(old.kernel_size)
        config = dict(config, dims=dims, kernel_size=[1] * dims, stride=list(old.stride), dilation=[1] * dims)
        config.update(padding=old.padding if isinstance(old.padding, str) else list(old.padding))
        config.update(padding_mode=old.padding_mode)
    try:
        new = kind.from_config(config, **factory)
    except TypeError as err:  # a key this version's layer does not take (a newer file), or one missing
        raise ValueError(
            f"{path}: layer {name!r} ({entry['kind']}) has a config this gmcompress cannot build ({err}); the file may "
            "come from a newer gmcompress: upgrade it, or save the model again with this version"
        ) from None
    for attr in ("in_features", "out_features", "in_channels", "out_channels"):
        if hasattr(old, attr) and hasattr(new, attr) and getattr(old, attr) != getattr(new, attr):
            raise ValueError(
                f"{path}: layer {name!r} has {attr}={getattr(old, attr)} in this model but {getattr(new, attr)} "
                "in the file; is it the architecture that was compressed?"
            )
    return new
