"""Checkpoints: ``last.pt`` + ``trainer.pt`` written, read back and checked, restored, and saved on Ctrl-C."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..io import atomic_torch_save, save
from .fingerprint import _digest, _fingerprint_diffs
from .state import _Trainer

_FORMAT = "gmcompress.finetune/2"
_TRAINER_KEYS = frozenset(
    {"format", "fingerprint", "weights", "optimizer", "scheduler", "scaler", "rng", "step", "history"}
    | {"best_metric", "best_path", "skipped_batches", "epoch_generators", "loss_sum", "loss_count"}
)
_FRESH = "Pass resume='never' to start afresh (it overwrites that checkpoint), or use another checkpoint_dir."


def _rng_state(t: _Trainer) -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state(t.device) if t.device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def _read(path: Path, keys: frozenset[str]) -> dict[str, Any]:
    """Load a checkpoint file (weights only); one ValueError naming it when it is unreadable or not ours."""
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
        problem = "" if isinstance(obj, dict) and keys <= obj.keys() else " (it lacks the expected entries)"
    except Exception as e:  # unpickling, zip and EOF errors all mean the same here
        problem = f" ({type(e).__name__} while reading it)"
    if problem:
        raise ValueError(
            f"{path} is corrupt, or not a gmcompress fine-tuning checkpoint of this version{problem}. Delete it, "
            f"or {_FRESH[0].lower()}{_FRESH[1:]}"
        )
    if obj.get("format", _FORMAT) != _FORMAT:
        raise ValueError(f"{path} has format {obj.get('format')!r}, expected {_FORMAT!r}. {_FRESH}")
    return obj


def _restore(t: _Trainer, resume: str) -> None:
    """Resume from ``last.pt`` + ``trainer.pt`` in the checkpoint directory as ``resume`` says (see finetune)."""
    ckpt = t.checkpoint_dir
    if ckpt is None:
        return
    files = {name: (ckpt / name).exists() for name in ("trainer.pt", "last.pt")}
    if resume == "never":
        if t.rank == 0:
            for name in ("trainer.pt", "last.pt", "best.pt"):
                (ckpt / name).unlink(missing_ok=True)
        return
    if not any(files.values()):
        if resume == "must":
            raise ValueError(f"{ckpt}: resume='must', but there is no checkpoint there (trainer.pt and last.pt)")
        return
    if not all(files.values()):
        have, lack = sorted(files, key=lambda name: not files[name])
        raise ValueError(f"{ckpt}: {have} without {lack}, an incomplete checkpoint. {_FRESH}")
    state = _read(ckpt / "trainer.pt", _TRAINER_KEYS)
    diffs = _fingerprint_diffs(state["fingerprint"], t.fingerprint)
    if diffs:
        raise ValueError(f"{ckpt}: the checkpoint there is from a different run: {'; '.join(diffs)}. {_FRESH}")
    model_state = _read(ckpt / "last.pt", frozenset({"state_dict"}))["state_dict"]
    if _digest(model_state) != state["weights"]:
        raise ValueError(
            f"{ckpt}: last.pt does not hold the weights trainer.pt was written with (written at different "
            f"steps). {_FRESH}"
        )
    _apply_checkpoint(t, state, model_state)


def _apply_checkpoint(t: _Trainer, state: dict[str, Any], model_state: dict[str, torch.Tensor]) -> None:
    t.student.load_state_dict(model_state)
    t.optimizer.load_state_dict(state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    t.scaler.load_state_dict(state["scaler"])
    rngs = state["rng"]
    mine = rngs[t.rank] if t.rank < len(rngs) else rngs[0]
    torch.set_rng_state(mine["cpu"])
    if mine["cuda"] is not None and t.device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], t.device)
    t.epoch_generators = list(state["epoch_generators"])
    for g, g_state in zip(t.data.generators, t.epoch_generators):
        g.set_state(g_state)
    t.step = t.checkpoint_step = int(state["step"])
    t.loss_sum, t.loss_count = float(state["loss_sum"]), int(state["loss_count"])
    t.result.history = list(state["history"])
    t.result.best_metric = state["best_metric"]
    t.result.best_path = state["best_path"]
    t.result.skipped_batches = list(state["skipped_batches"])
    t.result.skipped = len(t.result.skipped_batches)
    t.result.resumed_from_step = t.step


def _weights_finite(t: _Trainer) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in t.student.parameters() if p.is_floating_point())


def _write_checkpoint(t: _Trainer, rng: dict[str, Any] | None = None) -> None:
    """Write ``last.pt`` and ``trainer.pt`` on rank 0 (every rank's RNG state gathered to it).

    Both files are written beside their targets first, then renamed one after the other, so a crash leaves
    at worst a pair from different steps, which resuming detects (``trainer.pt`` holds the hash of the
    weights). ``rng``: the RNG states to save (default: the current ones). Non-finite weights are never
    written: FloatingPointError instead.
    """
    if t.checkpoint_dir is None:
        return
    if not _weights_finite(t):
        raise FloatingPointError(f"the weights are not finite at step {t.step}: not saved to {t.checkpoint_dir}")
    rngs = [rng or _rng_state(t)]
    if t.world > 1:
        gathered: list[Any] = [None] * t.world
        dist.all_gather_object(gathered, rngs[0])
        rngs = gathered
    if t.rank == 0:
        state = {
            "format": _FORMAT,
            "fingerprint": t.fingerprint,
            "weights": _digest(t.student.state_dict()),
            "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(),
            "scaler": t.scaler.state_dict(),
            "rng": rngs,
            "step": t.step,
            "history": t.result.history,
            "best_metric": t.result.best_metric,
            "best_path": t.result.best_path,
            "skipped_batches": t.result.skipped_batches,
            "epoch_generators": t.epoch_generators,  # at the start of this epoch, or of the next at an epoch end
            "loss_sum": t.loss_sum,
            "loss_count": t.loss_count,
        }
        last, trainer = (Path(os.path.realpath(t.checkpoint_dir / n)) for n in ("last.pt", "trainer.pt"))
        last_next, trainer_next = (p.with_name(p.name + ".next") for p in (last, trainer))
        try:
            save(t.student, last_next)
            atomic_torch_save(state, trainer_next)
        except BaseException as err:  # a full disk, Ctrl-C: no half-written pair is left beside the checkpoint
            for path in (last_next, trainer_next):
                path.unlink(missing_ok=True)
            if isinstance(err, OSError):
                raise OSError(err.errno, f"{err.strerror}. {_not_written(t)}", err.filename) from None
            raise
        os.replace(last_next, last)
        os.replace(trainer_next, trainer)
    t.checkpoint_step = t.step


def _not_written(t: _Trainer) -> str:
    kept = "none was written before" if t.checkpoint_step is None else f"the one of step {t.checkpoint_step} is kept"
    return f"The checkpoint of step {t.step} was not written to {t.checkpoint_dir}; {kept}"


def _checkpoint_on_interrupt(t: _Trainer) -> None:
    """Ctrl-C: save the state of the last step boundary, unless the weights are half updated (or not finite)."""
    if t.checkpoint_dir is None:
        return
    kept = f"the checkpoint of step {t.checkpoint_step} is kept" if t.checkpoint_step is not None else "none written"
    problem = f"while {t.busy}" if t.busy is not None else None
    if problem is None and not _weights_finite(t):
        problem = "with non-finite weights"
    if problem is not None:
        warnings.warn(f"gmcompress: fine-tuning interrupted {problem}: no checkpoint written, {kept}", stacklevel=3)
        return
    _write_checkpoint(t, t.rng_boundary)
