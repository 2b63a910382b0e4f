"""Calling a model on a batch: the batch forms gmcompress accepts and the output forms it reads.

A batch of model inputs is a tensor (one positional input), a tuple or list (positional inputs) or a dict
(keyword inputs, as Hugging Face models take). A model output is a tensor, a tuple, a dict or a
``ModelOutput``; :func:`first_tensor` picks the tensor that distillation and reports compare.

Calibration data (:func:`calibration_batches`) is one batch (a tensor or a dict) or an iterable of batches; a
batch of two elements that the model cannot take as two positional inputs is ``(inputs, labels)``, as
:func:`split_batch` reads a training batch, so one DataLoader serves ``compress`` and ``finetune`` alike.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from ..core.checks import short_repr

__all__ = [
    "run_model", "call_arguments", "layer_input", "forward_hooks", "first_inputs", "first_tensor", "output_tensors",
    "to_device", "split_batch", "calibration_batches", "positional_inputs", "CALIBRATION_FORMS", "eval_mode",
]  # fmt: skip


def call_arguments(inputs: object) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a batch: a dict (any mapping) is keyword inputs, a tuple/list positional ones, else
    one input."""
    if isinstance(inputs, Mapping):
        return (), inputs
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def run_model(model: nn.Module, inputs: object) -> object:
    """Call ``model`` on a tensor, a tuple/list of positional inputs or a dict of keyword inputs."""
    args, kwargs = call_arguments(inputs)
    return model(*args, **kwargs)


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The input a layer was called with: its first positional argument, or ``input=`` (the keyword of
    ``nn.Linear`` and ``nn.Conv*d``, and of the GM layers)."""
    if args:
        return args[0]
    if "input" in kwargs:
        return kwargs["input"]
    raise TypeError(f"a layer called without an input: positional {len(args)}, keywords {sorted(kwargs)}")


@contextlib.contextmanager
def forward_hooks(
    hooks: Iterable[tuple[nn.Module, Callable]], pre: bool = False, inputs: bool = True
) -> Iterator[None]:
    """``(module, hook)`` pairs registered for the block and removed when it ends, also on an error. Each hook is
    called as ``hook(module, x)`` before the module runs (``pre``) or ``hook(module, x, output)`` after it, with
    ``x`` the module's input (:func:`layer_input`); with ``inputs=False``, after it as ``hook(module, output)``
    (any module, called any way). What a hook returns is ignored, so it never replaces the module's arguments or
    output."""

    def before(module: nn.Module, args: tuple, kwargs: dict, hook: Callable) -> None:
        hook(module, layer_input(args, kwargs))

    def after(module: nn.Module, args: tuple, kwargs: dict, output: object, hook: Callable) -> None:
        if inputs:
            hook(module, layer_input(args, kwargs), output)
        else:
            hook(module, output)

    handles = []
    try:
        for module, hook in hooks:
            if pre:
                handles.append(module.register_forward_pre_hook(partial(before, hook=hook), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(partial(after, hook=hook), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def first_inputs(model: nn.Module, inputs: object, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The input of the first call of each of ``modules`` (by name) when ``model`` runs on ``inputs`` in inference
    mode; a module that is not called is left out."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [(m, lambda mod, x, name=name: seen.setdefault(name, x.detach())) for name, m in modules.items()]
    with forward_hooks(hooks, pre=True), torch.inference_mode():
        run_model(model, inputs)
    return seen


def first_tensor(out: object) -> torch.Tensor:
    """The first tensor of a model output (tensor, tuple, dict or ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out
    for v in values:  # type: ignore[union-attr]
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"model output of type {type(out).__name__} holds no tensor")


def output_tensors(out: object) -> list[torch.Tensor]:
    """Every floating-point tensor of a model output (tensor, tuple/list, dict or ModelOutput, nested), in order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() or out.is_complex() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in output_tensors(v)]
    return []


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) tuple, list or dict to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """A training batch is ``inputs`` or ``(inputs, labels)``; a one-tensor TensorDataset batch is ``[inputs]``."""
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return batch[0], None
        if len(batch) == 2:
            return batch[0], batch[1]
    return batch, None


CALIBRATION_FORMS = (
    "a tensor or a dict of keyword inputs (one batch), or an iterable of batches (a list or DataLoader of tensors, "
    "tuples/lists of positional inputs, (inputs, labels) pairs or dicts of keyword inputs)"
)


def calibration_batches(model: nn.Module, calibration: object) -> list[object]:
    """The model inputs of each calibration batch, as a list (a generator or DataLoader is read once, here).

    A tensor or a mapping is one batch; any other iterable but a string holds batches, each a tensor, a tuple/list
    of positional inputs or a mapping of keyword inputs. A two-element tuple/list that ``model.forward`` cannot
    take as two positional inputs is ``(inputs, labels)`` (:func:`split_batch`, finetune's rule): its labels are
    dropped. Anything else is a ``TypeError`` naming ``calibration`` and the accepted forms."""
    if isinstance(calibration, (torch.Tensor, Mapping)):
        batches = [calibration]
    elif isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        raise TypeError(f"calibration: expected {CALIBRATION_FORMS}; got {_described(calibration)}")
    else:
        batches = list(calibration)
    takes = positional_inputs(model)
    return [_batch_inputs(batch, i, takes, type(model).__name__) for i, batch in enumerate(batches)]


def _batch_inputs(batch: object, index: int, takes: float, model_name: str) -> object:
    """The model inputs of calibration batch ``index`` (its labels dropped), checked."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and takes < 2:
        batch = split_batch(batch)[0]
    if not isinstance(batch, (torch.Tensor, tuple, list, Mapping)):
        raise TypeError(
            f"calibration batch {index}: expected a tensor, a tuple/list of positional inputs, an (inputs, labels) "
            f"pair or a dict of keyword inputs; got {_described(batch)}"
        )
    if isinstance(batch, (tuple, list)) and len(batch) > takes:
        raise TypeError(
            f"calibration batch {index} holds {len(batch)} positional inputs, but {model_name}.forward takes "
            f"{takes}; give each batch as the model's inputs (a tensor, a tuple of them or a dict), or as an "
            "(inputs, labels) pair"
        )
    return batch


def positional_inputs(model: nn.Module) -> float:
    """How many positional inputs ``model.forward`` takes (``inf`` with ``*args`` or an unreadable signature)."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return math.inf
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return math.inf
    return sum(
        p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in parameters
    )


def _described(value: object) -> str:
    """A wrong value as its type and a short repr."""
    return f"{type(value).__name__} {short_repr(value)}"


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode inside; each module's own ``training`` flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def cuda_devices(model: nn.Module) -> list[int]:
    """The CUDA devices ``model``'s parameters are on (for ``torch.random.fork_rng(devices=...)``)."""
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
