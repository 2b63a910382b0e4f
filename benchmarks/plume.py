"""Smoke-plume forecasting where the rotation symmetry is really broken (the paper's dynamics task, after Wang et al.).

    python benchmarks/plume.py [--quick] [--cases 'beta 0.9' background] [--drift]   (also run by paper.py)
    python benchmarks/plume.py --history1 [--quick]   (one input frame)

Data, simulated here with phiflow (numpy backend, fixed parameters, no downloads): a closed square box,
smoke injected at the centre, a buoyancy force ``strength(theta) * (cos theta, sin theta)`` on the smoke, per
simulation. The box, the inflow and the solver are exactly symmetric under quarter turns (checked on every
run: the ``beta 0`` case must be symmetric to 1e-3). The *cases* break the symmetry by different amounts:

* ``beta b``: ``strength(theta) = s0 (1 + b cos theta)``, b in {0, 0.3, 0.6, 0.9}: turning a simulation by 90
  degrees gives another simulation of the family only at b = 0;
* ``background``: b = 0 plus a fixed force ``0.5 s0`` along +y on the smoke, the same for every direction:
  the domain itself (the "gravity" of the box) is no longer symmetric.

Each simulation keeps ``frames`` velocity fields ``(x, y, 2)``.

* train: directions ``90 k +- 15`` degrees (k = 0..3), the first ``train_frames`` frames of each;
* *future*: the same simulations, later frames (forecast beyond the training window);
* *domain*: unseen directions ``90 k`` degrees (held-out simulations).

Task: from ``history`` past velocity fields predict the next one; RMSE of an autoregressive rollout of
``horizon`` steps (the paper's 6), averaged over start frames.

Models (all residual: ``v_next = v_last + f(history)``, 3x3 convolutions, zero padding, ReLU):

* ``CNN w``: plain convolutions, ``w`` channels.
* ``p4 exact w``: C4 group convolutions (``GMConv2d``, exact weight tying) on the velocity history written as
  C4-regular fields: channel ``k`` of a frame is ``<v, R^k e_x>`` (R = quarter turn), so turning the input
  turns and cyclically shifts the fibres, and the decoded output ``((c0 - c2) / 2, (c1 - c3) / 2)`` turns
  with it: the whole model is exactly equivariant to quarter turns (asserted).
* ``p4 relaxed rR w``: rank-R relaxed group matrices (a learnt modulation per output channel and orientation).
* ``RPP w`` and ``RGroup L2 w``: the baselines of ``plume_baselines.py`` (residual pathway priors; relaxed
  group convolutions with 2 filter banks) on the same C4-regular fields.

``w`` counts orientation fibres for the p4 models (4 w channels). The widths give two matched parameter
budgets (about 2.5k and 5.5k parameters). Every (case, model, seed) result is kept in ``results/plume-runs`` (a
small JSON each, committed), so an interrupted sweep resumes and a study too long for one machine's sitting builds
up across machines; ``--cached`` reports what is kept. ``--drift`` writes ``results/plume_drift.md``: why a
relaxed seed "drifted".
``--study NAME --families ... --cases ... [--models ...] [--epochs N] [--cached]`` trains only those models and
writes every seed's RMSE to ``results/plume_NAME.md`` (the seed-spread and longer-training studies).
``--history1 [--quick] [--cases ...] [--families ...] [--cached]`` writes ``results/plume_history1.md``: the same
models on beta 0, the background force and beta 0.6/0.9 with *one* input frame (so a simulation's force cannot be
read from the smoke's motion), with each relaxed model's orientation weights per layer and every model's learnt
asymmetry (:func:`modulation_summary`, :func:`change_asymmetry`) beside the errors.

Training (:func:`train`): AdamW, peak learning rate :data:`LR`, linear warm-up over :data:`WARMUP` of the steps
(25%: with the old 5%, ReLU fibres of 3-fibre layers died in the first epoch in some seeds), cosine decay,
Adam betas :data:`ADAM_BETAS` (with PyTorch's beta2 = 0.999, in one seed of six the loss spiked near the peak
learning rate and 15 ReLU channels died for good; ``--spikes`` and :func:`dead_channels`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from common import measured_on, pyplot, save_figure
from plume_baselines import RGroupConv2d, RPPConv2d
from readme import refresh
from torch import nn

from gmcompress.nn import GMConv2d

RESULTS = Path(__file__).parent / "results"
CACHE = Path(__file__).resolve().parent.parent / "out" / "plume-cache"
RUNS = RESULTS / "plume-runs"  # one JSON per (case, model, seed, epochs), committed: studies build up across machines
RUN_VERSION = 3  # bump when a model, its initialisation or the training change
RPP_DECAY = 10.0  # AdamW weight decay of the RPP residual paths (the equivariant paths and all else: 0.01)
NORMALIZE = False  # divide the inputs by their training RMS (and scale the predicted change back), every model
LR = 2e-3  # AdamW peak learning rate, every model
ADAM_BETAS = (0.9, 0.99)  # beta2 0.999: loss spikes near the peak learning rate killed channels (--spikes)
WARMUP = 0.25  # fraction of the steps with a linear warm-up, then cosine decay
EVAL_CHUNK = 64  # training windows per forward pass when a whole split is evaluated (bounds the activations)
EPOCHS = 60  # the default of the sweep and studies (at 20 the large models were not converged: studies/plume.md)
RECIPE = (
    f"{'inputs divided by their training RMS, ' if NORMALIZE else ''}AdamW {LR:g} (betas {ADAM_BETAS[0]:g}, "
    f"{ADAM_BETAS[1]:g}) with {100 * WARMUP:g}% linear warm-up then cosine, weight decay 0.01, batch 16"
)
GENERATOR_VERSION = 2  # bump when simulate(), strength() or domains() change: the cache key includes it


@dataclass(frozen=True)
class PlumeConfig:
    res: int = 64
    frames: int = 50
    warmup: int = 8  # solver steps before the first kept frame (the plume has to start moving)
    train_frames: int = 34
    history: int = 4
    horizon: int = 6
    strength: float = 0.04
    jitter: float = 15.0
    beta: float = 0.3  # direction-dependent strength s0 (1 + beta cos theta): beta = 0 keeps the symmetry
    quarters: int = 4  # directions near 90 k degrees for k < quarters (--quick: 2)
    background: float = 0.0  # a fixed force on the smoke along +y, in units of s0: breaks the symmetry by the domain


QUICK = PlumeConfig(res=32, frames=22, warmup=6, train_frames=15, history=3, horizon=4, quarters=2)


def strength(theta_deg: float, s0: float, beta: float = 0.3) -> float:
    """Direction-dependent buoyancy ``s0 (1 + beta cos theta)``: the symmetry-breaking term (none at beta = 0)."""
    return s0 * (1 + beta * math.cos(math.radians(theta_deg)))


def case_configs(cfg: PlumeConfig, quick: bool = False) -> dict[str, PlumeConfig]:
    """The symmetry-breaking sweep: ``beta`` in {0, 0.3, 0.6, 0.9}, and a fixed background force (beta = 0).

    ``--quick`` keeps beta 0 and the background force (CI's smoke run).
    """
    betas = (0.0,) if quick else (0.0, 0.3, 0.6, 0.9)
    out = {f"beta {b:g}": replace(cfg, beta=b, background=0.0) for b in betas}
    out["background"] = replace(cfg, beta=0.0, background=0.5)
    return out


def simulate(theta_deg: float, s: float, cfg: PlumeConfig) -> np.ndarray:
    """Velocity fields ``(frames, res, res, 2)`` (indexed ``[x, y, vector]``) of one smoke plume."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from phi import flow as phi

        res = cfg.res
        box = phi.Box(x=res, y=res)
        fixed = cfg.background * cfg.strength  # the same for every direction: not turned with theta
        force = phi.math.tensor(
            [s * math.cos(math.radians(theta_deg)), s * math.sin(math.radians(theta_deg)) + fixed],
            phi.channel(vector="x,y"),
        )
        smoke = phi.CenteredGrid(0, phi.extrapolation.ZERO, x=res, y=res, bounds=box)
        velocity = phi.StaggeredGrid(0, phi.extrapolation.ZERO, x=res, y=res, bounds=box)
        source = phi.Sphere(center=phi.vec(x=res / 2, y=res / 2), radius=res / 16)
        inflow = phi.CenteredGrid(source, phi.extrapolation.ZERO, x=res, y=res, bounds=box)
        pressure = None
        out = []
        for step in range(cfg.warmup + cfg.frames):
            smoke = phi.advect.mac_cormack(smoke, velocity, dt=1) + 0.2 * inflow
            velocity = phi.advect.semi_lagrangian(velocity, velocity, dt=1) + phi.resample(smoke * force, to=velocity)
            # 'auto' with tolerances and a warm start: phiflow's plain 'CG' diverges here (data.md)
            velocity, pressure = phi.fluid.make_incompressible(velocity, (), phi.Solve("auto", 1e-3, 1e-3, x0=pressure))
            if step >= cfg.warmup:
                out.append(velocity.at_centers().values.numpy("x,y,vector"))
    return np.stack(out).astype(np.float32)


def rotate_velocity(v: np.ndarray | torch.Tensor, k: int = 1):
    """Turn a velocity field ``(..., x, y, 2)`` by ``k`` quarter turns: ``v'(p) = R v(R^-1 p)``."""
    lib = torch if isinstance(v, torch.Tensor) else np
    for _ in range(k % 4):
        v = lib.rot90(v, 1, (-3, -2))
        v = lib.stack([-v[..., 1], v[..., 0]], -1)
    return v


def check_solver_symmetry(cfg: PlumeConfig) -> float:
    """Relative difference between a turned simulation and the simulation of the turned force (no breaking)."""
    plain = replace(cfg, beta=0.0, background=0.0)
    return turn_difference(simulate(10.0, cfg.strength, plain), simulate(100.0, cfg.strength, plain))


def turn_difference(a: np.ndarray, b: np.ndarray) -> float:
    """``max |R a - b| / max |b|``: 0 when ``b`` is ``a`` turned by a quarter."""
    return float(np.abs(rotate_velocity(a) - b).max() / np.abs(b).max())


def symmetry_pair(cfg: PlumeConfig) -> np.ndarray:
    """The simulations at 10 and 100 degrees of this case (strength and background included), stacked."""
    return np.stack([simulate(t, strength(t, cfg.strength, cfg.beta), cfg) for t in (10.0, 100.0)])


def domains(cfg: PlumeConfig) -> dict[str, list[float]]:
    return {
        "train": [90.0 * k + d for k in range(cfg.quarters) for d in (-cfg.jitter, cfg.jitter)],
        "domain": [90.0 * k for k in range(cfg.quarters)],
    }


def cache_path(cfg: PlumeConfig) -> Path:
    """The simulations' file: the key is every field but ``history`` (how many frames the models read does not
    change the simulations; the sweep's 4-frame key is kept), and :data:`GENERATOR_VERSION`."""
    spec = {**asdict(replace(cfg, history=PlumeConfig.history)), "generator": GENERATOR_VERSION}
    return CACHE / f"plume-{hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]}.npz"


def dataset(cfg: PlumeConfig) -> dict[str, np.ndarray]:
    """All simulations ``{"train": (S, frames, x, y, 2), "domain": ..., "pair": (2, ...)}``, cached under
    ``out/plume-cache``. ``pair`` holds the 10 and 100 degree simulations (:func:`symmetry_pair`)."""
    path = cache_path(cfg)
    if path.exists():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    data = {
        name: np.stack([simulate(t, strength(t, cfg.strength, cfg.beta), cfg) for t in thetas])
        for name, thetas in domains(cfg).items()
    }
    data["pair"] = symmetry_pair(cfg)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **data)
    return data


# ------------------------------------------------------------------------------------------------- models
def to_channels(v: torch.Tensor) -> torch.Tensor:
    """``(B, T, x, y, 2)`` -> ``(B, 2T, x, y)`` plain channels."""
    return v.permute(0, 1, 4, 2, 3).flatten(1, 2)


def encode_regular(v: torch.Tensor) -> torch.Tensor:
    """``(B, T, x, y, 2)`` -> ``(B, 4T, x, y)``: per frame the fibre ``(<v, R^k e_x>)_k = (vx, vy, -vx, -vy)``."""
    vx, vy = v[..., 0], v[..., 1]
    return torch.stack([vx, vy, -vx, -vy], 2).flatten(1, 2)


def decode_regular(c: torch.Tensor) -> torch.Tensor:
    """``(B, 4, x, y)`` -> ``(B, x, y, 2)``: the equivariant inverse of :func:`encode_regular`."""
    return torch.stack([(c[:, 0] - c[:, 2]) / 2, (c[:, 1] - c[:, 3]) / 2], -1)


class Persistence(nn.Module):
    """The trivial forecast: the last frame again."""

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return v[:, -1]


def equivariance_error(model: nn.Module, history: int, res: int = 16) -> float:
    """``max |f(R v) - R f(v)| / max |f(v)|`` on a random velocity history: 0 for an equivariant model."""
    v = torch.randn(2, history, res, res, 2, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        out = model(v)
        return float((model(rotate_velocity(v)) - rotate_velocity(out)).abs().max() / out.abs().max())


class PlainCNN(nn.Module):
    """Plain 3x3 convolutions; ``scale``: the inputs are divided by it and the predicted change multiplied."""

    def __init__(self, history: int, width: int, depth: int = 4, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = float(scale)
        sizes = [2 * history] + [width] * (depth - 1) + [2]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        h = to_channels(v / self.scale)
        for i, conv in enumerate(self.convs):
            h = conv(h) if i == len(self.convs) - 1 else torch.relu(conv(h))
        return v[:, -1] + self.scale * h.permute(0, 2, 3, 1)


LAYERS = ("gm", "rpp", "rgroup")


def p4_layer(kind: str, c_in: int, c_out: int, rank: int) -> nn.Module:
    """One 3x3 layer on C4-regular fields: ``gm`` (GMConv2d, exact at rank 1, relaxed above), ``rpp``, ``rgroup``
    (``rank`` filter banks)."""
    if kind == "gm":
        return GMConv2d(c_in, c_out, 3, "C4", rank, rank > 1, padding=1, bias="shared")
    if kind == "rpp":
        return RPPConv2d(c_in, c_out)
    if kind == "rgroup":
        return RGroupConv2d(c_in, c_out, banks=rank)
    raise ValueError(f"layer kind must be one of {LAYERS}, got {kind!r}")


class P4CNN(nn.Module):
    """C4 group convolutions on C4-regular velocity features: exact or relaxed GM, RPP or RGroup layers.
    ``scale`` as :class:`PlainCNN` (a scalar: equivariance is kept)."""

    def __init__(
        self, history: int, width: int, rank: int = 1, depth: int = 4, kind: str = "gm", scale: float = 1.0
    ) -> None:
        super().__init__()
        self.scale = float(scale)
        sizes = [4 * history] + [4 * width] * (depth - 1) + [4]
        self.convs = nn.ModuleList(p4_layer(kind, a, b, rank) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        h = encode_regular(v / self.scale)
        for i, conv in enumerate(self.convs):
            h = conv(h) if i == len(self.convs) - 1 else torch.relu(conv(h))
        return v[:, -1] + self.scale * decode_regular(h)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups; an RPP model's residual paths get the stronger prior :data:`RPP_DECAY`."""
        groups = []
        for conv in self.convs:
            if isinstance(conv, RPPConv2d):
                groups += conv.param_groups(weight_decay, RPP_DECAY)
            else:
                groups.append({"params": list(conv.parameters()), "weight_decay": weight_decay})
        return groups


# ------------------------------------------------------------------------------------------ train / eval
def windows(sims: np.ndarray, history: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One-step pairs (history frames, next frame) with the target frame index in ``[start, stop)``."""
    xs, ys = [], []
    for t in range(max(start, history), stop):
        xs.append(sims[:, t - history : t])
        ys.append(sims[:, t])
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


@torch.no_grad()
def rollout_rmse(model: nn.Module, sims: np.ndarray, cfg: PlumeConfig, first: int) -> float:
    """RMSE of ``horizon``-step autoregressive forecasts started at every frame ``t >= first``."""
    model.eval()
    v = torch.from_numpy(sims)
    errs = []
    for t in range(max(first, cfg.history), sims.shape[1] - cfg.horizon + 1):
        window = v[:, t - cfg.history : t]
        for s in range(cfg.horizon):
            pred = model(window)
            errs.append(((pred - v[:, t + s]) ** 2).mean().item())
            window = torch.cat([window[:, 1:], pred.unsqueeze(1)], 1)
    return math.sqrt(float(np.mean(errs)))


@torch.no_grad()
def one_step_rmse(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    """RMSE of the one-step predictions on ``data`` (the training pairs: the fit, not the forecast)."""
    model.eval()
    x, y = data
    squares = sum(float(((model(xs) - ys) ** 2).sum()) for xs, ys in zip(x.split(EVAL_CHUNK), y.split(EVAL_CHUNK)))
    return math.sqrt(squares / y.numel())


def train(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    epochs: int,
    seed: int,
    lr: float = LR,
    warmup: float = WARMUP,
    betas: tuple[float, float] = ADAM_BETAS,
    epoch_rmse: list[float] | None = None,
) -> float:
    """AdamW (weight decay 0.01 unless the model's ``param_groups`` say otherwise), linear warm-up over the first
    ``warmup`` of the steps then cosine decay, gradient clipping at 1, batch 16 shuffled by ``seed``; mean squared
    error. ``epoch_rmse``: a list that gets each epoch's training RMSE (over its batches). Returns the seconds."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    groups = getattr(model, "param_groups", lambda wd: [{"params": list(model.parameters()), "weight_decay": wd}])
    optimizer = torch.optim.AdamW(groups(0.01), lr=lr, betas=betas)
    x, y = data
    per_epoch = math.ceil(len(x) / 16)
    total, warm = epochs * per_epoch, max(1, int(warmup * epochs * per_epoch))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
    )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    shuffle = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        squares = 0.0
        for batch in torch.randperm(len(x), generator=shuffle).split(16):
            loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            if epoch_rmse is not None:  # .item() waits for the step: only when asked for
                squares += loss.item() * len(batch)
        if epoch_rmse is not None:
            epoch_rmse.append(math.sqrt(squares / len(x)))
    return time.perf_counter() - start


FAMILIES: dict[str, tuple[str, int]] = {  # p4 family -> (layer kind, rank or filter banks)
    "p4 exact": ("gm", 1),
    "p4 relaxed r2": ("gm", 2),
    "p4 relaxed r4": ("gm", 4),
    "RPP": ("rpp", 1),
    "RGroup L2": ("rgroup", 2),
}
RELAXED = ("p4 relaxed r2", "p4 relaxed r4")


def widths(quick: bool) -> dict[str, tuple[int, ...]]:
    """Widths per family, picked for two matched parameter budgets (about 2.5k and 5.5k parameters)."""
    if quick:
        return {"CNN": (16,), **dict.fromkeys(FAMILIES, (3,))}
    return {
        "CNN": (8, 16),
        "p4 exact": (5, 8),
        "p4 relaxed r2": (3, 5),
        "p4 relaxed r4": (2, 3),
        "RPP": (2, 3),
        "RGroup L2": (3, 5),
    }


def build(family: str, width: int, history: int, scale: float = 1.0) -> nn.Module:
    if family == "CNN":
        return PlainCNN(history, width, scale=scale)
    kind, rank = FAMILIES[family]
    return P4CNN(history, width, rank, kind=kind, scale=scale)


def family_of(name: str) -> str:
    return name.rsplit(" ", 1)[0]


@dataclass
class Result:
    """One model on one case: means and spreads (max - min) over the seeds."""

    params: int
    future: float
    future_spread: float
    domain: float
    domain_spread: float
    equivariance: float
    seconds: float
    seeds: list[tuple[float, float]]  # (future, domain) per seed
    modulation_change: float = float("nan")  # mean over the seeds of the largest |a - 1| (relaxed GM), nan: not kept
    dead_channels: list[int] | None = None  # per seed, hidden channels off on every training input (None: not kept)
    train_rmse: list[float] | None = None  # per seed, the one-step RMSE on the training pairs (None: not kept)
    layers: list[list[float]] | None = None  # per relaxed layer, :func:`modulation_summary` averaged over the seeds
    learnt_asymmetry: float = float("nan")  # mean over the seeds of :func:`change_asymmetry` (nan: not kept)


def input_scale(data: tuple[torch.Tensor, torch.Tensor]) -> float:
    """RMS of the training inputs (velocity components): the models see the history divided by it."""
    return float(data[0].pow(2).mean().sqrt())


def hidden_peaks(model: nn.Module, v: torch.Tensor, chunk: int = EVAL_CHUNK) -> list[torch.Tensor]:
    """Per hidden layer (every conv but the last, each followed by a ReLU), each channel's largest pre-activation
    over the batch ``v`` (run ``chunk`` windows at a time) and all positions: the channel's ReLU is off everywhere
    where it is <= 0."""
    peaks: list[torch.Tensor | None] = [None] * (len(model.convs) - 1)

    def keep(i: int):
        def hook(_module, _inputs, out):
            peak = out.amax(dim=(0, 2, 3))
            peaks[i] = peak if peaks[i] is None else torch.maximum(peaks[i], peak)

        return hook

    hooks = [conv.register_forward_hook(keep(i)) for i, conv in enumerate(model.convs[:-1])]
    try:
        with torch.no_grad():
            for part in v.split(chunk):
                model(part)
    finally:
        for hook in hooks:
            hook.remove()
    return peaks


def dead_channels(model: nn.Module, v: torch.Tensor) -> int:
    """Hidden channels whose ReLU is off on every input of ``v`` (they get no gradient: dead for good)."""
    return int(sum(int((peak <= 0).sum()) for peak in hidden_peaks(model, v)))


def relaxation_weights(conv: nn.Module) -> torch.Tensor | None:
    """A layer's learnt weights of the output orientations ``(r, c, |G|)``, all 1 at initialisation: a relaxed
    GMConv2d's modulations, an RGroup layer's relaxed weights (one table for all channels, ``c`` = 1); None for a
    layer without them (exact GM, RPP, plain convolutions)."""
    if isinstance(conv, GMConv2d) and conv.modulations is not None:
        return conv.modulations.detach()
    if isinstance(conv, RGroupConv2d):
        return conv.relaxed_weights.detach()[:, None, :]
    return None


def modulation_summary(model: nn.Module) -> list[list[float]]:
    """Per layer of ``model.convs`` with relaxation weights ``a`` (:func:`relaxation_weights`):
    ``[mean |a - 1|, max |a - 1|, orientation spread]``, the spread being the mean over ranks and channels of
    ``max_g a - min_g a`` (0 while the layer is exactly equivariant, whatever the level of ``a``)."""
    out = []
    for conv in model.convs:
        a = relaxation_weights(conv)
        if a is not None:
            off = (a - 1).abs()
            out.append([float(off.mean()), float(off.max()), float((a.amax(-1) - a.amin(-1)).mean())])
    return out


@torch.no_grad()
def change_asymmetry(model: nn.Module, x: torch.Tensor, chunk: int = EVAL_CHUNK) -> float:
    """How far the learnt change ``f(v) - v_last`` is from turning with its input, on the windows ``x``:
    ``||f(R v) - R f(v)|| / ||f(v) - v_last||`` over all of them (one quarter turn; 0 for an equivariant model)."""
    model.eval()
    broken = change = 0.0
    for part in x.split(chunk):
        step = model(part) - part[:, -1]
        turned = model(rotate_velocity(part)) - rotate_velocity(part[:, -1])
        broken += float((turned - rotate_velocity(step)).pow(2).sum())
        change += float(step.pow(2).sum())
    return math.sqrt(broken / change)


def run_seed(
    name: str,
    cfg: PlumeConfig,
    sims: dict,
    data,
    epochs: int,
    seed: int,
    betas: tuple[float, float] = ADAM_BETAS,
    epoch_rmse: list[float] | None = None,
) -> dict:
    """Train one model with one seed; ``{"future", "domain", "equivariance", "seconds", "params", "train_rmse",
    "dead_channels", "modulation_change", "modulations", "learnt_asymmetry"}``. ``dead_channels``: hidden channels off
    on every training input; ``modulations``: :func:`modulation_summary`; ``learnt_asymmetry``: :func:`change_asymmetry`
    on the training inputs; ``betas``, ``epoch_rmse``: as :func:`train`."""
    torch.manual_seed(seed)
    family, width = family_of(name), int(name.rsplit(" ", 1)[1])
    model = build(family, width, cfg.history, input_scale(data) if NORMALIZE else 1.0)
    secs = train(model, data, epochs, seed=seed, betas=betas, epoch_rmse=epoch_rmse)
    equi = equivariance_error(model, cfg.history)
    if family == "p4 exact" and equi > 1e-4:
        raise AssertionError(f"{name} should be exactly equivariant to quarter turns, error {equi:.2e}")
    return {
        "future": rollout_rmse(model, sims["train"], cfg, cfg.train_frames),
        "domain": rollout_rmse(model, sims["domain"], cfg, 0),
        "equivariance": equi,
        "seconds": secs,
        "params": sum(p.numel() for p in model.parameters()),
        "train_rmse": one_step_rmse(model, data),
        "dead_channels": dead_channels(model, data[0]),
        "modulation_change": max(  # largest |a - 1| of a relaxed GM model's modulations (they start at 1)
            (
                float((m.modulations.detach() - 1).abs().max())
                for m in model.modules()
                if isinstance(m, GMConv2d) and m.modulations is not None
            ),
            default=float("nan"),
        ),
        "modulations": modulation_summary(model),
        "learnt_asymmetry": change_asymmetry(model, data[0]),
    }


def run_case(
    cfg: PlumeConfig,
    quick: bool,
    epochs: int,
    seeds: int,
    tag: str,
    families: list[str] | None = None,
    models: list[str] | None = None,
    cached: bool = False,
    min_seeds: int | None = None,
) -> tuple[dict[str, Result], dict]:
    """Every model of :func:`widths` (``families``, ``models``: a subset) on one case; per-seed results are kept
    in ``results/plume-runs`` (resumable). ``cached``: train nothing, leave out the models with a seed not kept, or
    with ``min_seeds``, those with fewer than its first ``min_seeds`` seeds kept (the others keep what is kept)."""
    sims = dataset(cfg)
    data = windows(sims["train"], cfg.history, 0, cfg.train_frames)
    results = {}
    for family, ws in widths(quick).items():
        if families and family not in families:
            continue
        for w in ws:
            name = f"{family} {w}"
            if models and name not in models:
                continue
            runs = []
            for seed in range(seeds):
                key = hashlib.sha1(json.dumps([asdict(cfg), name, seed, epochs, RUN_VERSION]).encode()).hexdigest()[:12]
                path = RUNS / f"{tag}-{name.replace(' ', '_')}-s{seed}-{key}.json"
                if path.exists() and not quick:
                    runs.append(json.loads(path.read_text()))
                    continue
                if cached:
                    break
                runs.append(run_seed(name, cfg, sims, data, epochs, seed))
                if not quick:  # the --quick smoke run always trains
                    RUNS.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(runs[-1]))
            if len(runs) < (min_seeds or seeds):
                continue  # cached: not all seeds kept
            fut = [r["future"] for r in runs]
            dom = [r["domain"] for r in runs]
            results[name] = Result(
                runs[0]["params"], float(np.mean(fut)), float(np.ptp(fut)), float(np.mean(dom)), float(np.ptp(dom)),
                float(np.mean([r["equivariance"] for r in runs])), float(np.mean([r["seconds"] for r in runs])),
                list(zip(fut, dom)), float(np.mean([r.get("modulation_change", np.nan) for r in runs])),
                [r["dead_channels"] for r in runs] if all("dead_channels" in r for r in runs) else None,
                [r["train_rmse"] for r in runs] if all("train_rmse" in r for r in runs) else None,
                mean_layers([r.get("modulations") for r in runs]),
                float(np.mean([r.get("learnt_asymmetry", np.nan) for r in runs])),
            )  # fmt: skip
            print(f"plume [{tag}]: {name}: {results[name].params:,} params, RMSE future {np.mean(fut):.4f} "
                  f"(spread {np.ptp(fut):.4f}) domain {np.mean(dom):.4f}", flush=True)  # fmt: skip
    info = {
        "pairs": len(data[0]),
        "persistence": rollout_rmse(Persistence(), sims["train"], cfg, cfg.train_frames),
        "persistence_domain": rollout_rmse(Persistence(), sims["domain"], cfg, 0),
        "asymmetry": turn_difference(sims["pair"][0], sims["pair"][1]),
        "scale": float(np.sqrt((sims["train"] ** 2).mean())),
    }
    return results, info


def mean_layers(per_seed: list[list[list[float]] | None]) -> list[list[float]] | None:
    """The seeds' :func:`modulation_summary` averaged entry by entry; None when a seed did not keep it, or kept none
    (a model without relaxation weights)."""
    if any(not layers for layers in per_seed):
        return None
    return np.mean(np.array(per_seed), axis=0).tolist()


def run(
    quick: bool = False, epochs: int | None = None, seeds: int | None = None, only: list[str] | None = None
) -> list[str]:
    """The sweep (``only``: a subset of the case tags, ``beta 0`` always kept for its symmetry check)."""
    base = QUICK if quick else PlumeConfig()
    epochs = epochs or (2 if quick else EPOCHS)
    seeds = seeds or (1 if quick else 3)
    t0 = time.perf_counter()
    cases = case_configs(base, quick)
    if only:
        cases = {tag: cfg for tag, cfg in cases.items() if tag in only or tag == "beta 0"}
    sweep = {}
    for tag, cfg in cases.items():
        sweep[tag] = run_case(cfg, quick, epochs, seeds, tag)
    check_symmetric(sweep)
    minutes = (time.perf_counter() - t0) / 60
    trained = sum(r.seconds * len(r.seeds) for results, _ in sweep.values() for r in results.values()) / 60
    lines = describe(base, cases, sweep, epochs, seeds, minutes, trained)
    lines += results_tables(sweep)
    lines += ["", *summary_lines(sweep)]
    if not quick:
        plot(sweep, RESULTS / "plume.png", f"smoke plume {base.res}x{base.res}, {base.horizon}-step rollouts")
        lines += ["", "![RMSE against beta at matched parameters](plume.png)"]
    return lines


def describe(
    base: PlumeConfig, cases: dict, sweep: dict, epochs: int, seeds: int, minutes: float, trained: float
) -> list[str]:
    info = sweep["beta 0"][1]
    asym = ", ".join(f"{tag} {sweep[tag][1]['asymmetry']:.1e}" for tag in cases)
    return [
        f"Smoke plume {base.res}x{base.res}, per case: {len(domains(base)['train'])} training simulations "
        f"(directions {domains(base)['train']}), {info['pairs']} one-step pairs from their first {base.train_frames} "
        f"frames; {base.history} input frames, {base.horizon}-step rollouts; {epochs} epochs ({RECIPE}, RPP residual "
        f"paths weight decay {RPP_DECAY:g}); RMSEs are the mean over {seeds} training seeds "
        f"(± the spread, max - min). Cases: buoyancy strength `s0 (1 + beta cos theta)` for beta in "
        f"{{{', '.join(t.split()[1] for t in cases if t.startswith('beta'))}}}, and `background`: beta = 0 plus a "
        f"fixed force `{cases['background'].background:g} s0` along +y on the smoke. Symmetry breaking of each case, "
        f"`max |R sim(10 deg) - sim(100 deg)| / max |sim(100 deg)|`: {asym} (beta 0: the solver's own error, "
        f"the case is exactly symmetric). Training time summed over all runs: {trained:.0f} min; this report "
        f"took {minutes:.0f} min (runs are kept in benchmarks/results/plume-runs and reused).",
    ]


def results_tables(sweep: dict) -> list[str]:
    """Two tables (future frames, held-out directions): one row per model, one column per case."""
    tags = list(sweep)
    names = list(sweep[tags[0]][0])
    out = []
    for split, title in (("future", "later frames of the training simulations"), ("domain", "held-out directions")):
        out += ["", f"Rollout RMSE, {title}:", "", "| model | parameters | " + " | ".join(tags) + " |",
                "|---|---|" + "---|" * len(tags)]  # fmt: skip
        out.append(
            "| persistence | 0 | "
            + " | ".join(
                f"{sweep[t][1]['persistence' if split == 'future' else 'persistence_domain']:.4f}" for t in tags
            )
            + " |"
        )
        for name in names:
            cells = [f"{getattr(sweep[t][0][name], split):.4f} ± {getattr(sweep[t][0][name], split + '_spread'):.4f}"
                     for t in tags]  # fmt: skip
            out.append(f"| {name} | {sweep[tags[0]][0][name].params:,} | " + " | ".join(cells) + " |")
    return out


def budgets(results: dict[str, Result]) -> list[dict[str, str]]:
    """Per budget (the i-th width of each p4 family), the model name of each p4 family."""
    p4 = {f: sorted((n for n in results if family_of(n) == f), key=lambda n: results[n].params) for f in FAMILIES}
    return [{f: names[i] for f, names in p4.items()} for i in range(min(len(v) for v in p4.values()))]


def budget_row(tag: str, label: str, results: dict[str, Result], b: dict[str, str]) -> str:
    """One summary row: each p4 family's RMSE (parameters) and the better relaxed GM model against the others."""
    relaxed = min(RELAXED, key=lambda f: results[b[f]].future)
    best, exact = results[b[relaxed]].future, results[b["p4 exact"]].future
    base = min(results[b["RPP"]].future, results[b["RGroup L2"]].future)
    params = results[b[relaxed]].params
    base_at = min(rmse_at(results, f, params) for f in ("RPP", "RGroup L2"))
    spread = max(results[b[f]].future_spread / results[b[f]].future for f in RELAXED)
    exact_spread = results[b["p4 exact"]].future_spread / exact
    cells = [f"{results[b[f]].future:.4f} ({results[b[f]].params:,})" for f in FAMILIES]
    return (
        f"| {tag} | {label} | {' | '.join(cells)} | {100 * (best / exact - 1):+.1f}% | "
        f"{100 * (best / base - 1):+.1f}% | {100 * (best / base_at - 1):+.1f}% | {100 * spread:.0f}% | "
        f"{100 * exact_spread:.0f}% |"
    )


def rmse_at(results: dict[str, Result], family: str, params: int) -> float:
    """The family's future RMSE at ``params`` parameters, on the power law ``RMSE = c params^alpha`` through its
    two widths nearest below and above (or the two nearest, outside them); one width: its RMSE."""
    sizes = sorted((r.params, r.future) for n, r in results.items() if family_of(n) == family)
    if len(sizes) < 2:
        return sizes[0][1]
    i = min(max(1, sum(p < params for p, _ in sizes)), len(sizes) - 1)
    (p0, r0), (p1, r1) = sizes[i - 1], sizes[i]
    return r0 * (params / p0) ** (math.log(r1 / r0) / math.log(p1 / p0))


def summary_lines(sweep: dict) -> list[str]:
    """Per case and budget: relaxed GM against exact, RPP and RGroup; the best CNN and the GM parameter ratio."""
    out = [
        "Future-frame rollout RMSE (parameters) at matched budgets; the last columns compare the better relaxed "
        "GM model with exact and with the better baseline (negative: relaxed GM lower); in \"both at relaxed's "
        "parameter count\" each baseline's RMSE is moved to the relaxed model's parameter count on the straight "
        "line through its two widths in log(RMSE) against log(parameters), that case (interpolated, or "
        "extrapolated outside its widths):",
        "",
        "| case | budget | " + " | ".join(FAMILIES) + " | better relaxed vs exact | vs better of RPP/RGroup | "
        "both at relaxed's parameter count | largest relaxed seed spread / mean | exact's seed spread / mean |",
        "|---|---|" + "---|" * (len(FAMILIES) + 5),
    ]
    for tag, (results, _) in sweep.items():
        for i, b in enumerate(budgets(results)):
            out.append(budget_row(tag, ("small", "large")[i] if i < 2 else str(i), results, b))
    out.append("")
    for tag, (results, _) in sweep.items():
        out += [f"- {tag}: " + "; ".join(claim_lines({n: (r.params, r.future, r.domain) for n, r in results.items()}))]
    out += ["", dead_line(sweep)]
    fit = fit_forecast_correlation(sweep)
    out += ["", "How much a seed's fit explains its forecast: per family, the correlation over every run between "
            "log training RMSE and log future RMSE, each less its cell's mean over the seeds (1: the seeds that fit "
            f"better forecast better; 0: unrelated): {fit or 'not kept'}."]  # fmt: skip
    variation = seed_variation(sweep)
    out += ["", "Seed-to-seed variation of the future RMSE, per family (the root mean square over its cells of the "
            f"coefficient of variation, sample std / mean, of each cell's seeds): {variation or '-'}; of the "
            f"one-step training RMSE: {seed_variation(sweep, 'train') or 'not kept'}."]  # fmt: skip
    return out


def dead_line(sweep: dict) -> str:
    """Per family, the runs that ended with a hidden channel off on every training input (the loss-spike symptom)."""
    runs: dict[str, list[int]] = {}
    for results, _ in sweep.values():
        for name, r in results.items():
            if r.dead_channels is not None:
                runs.setdefault(family_of(name), []).extend(r.dead_channels)
    if not runs:
        return "Dead channels: not kept by these runs."
    return (
        "Runs that ended with hidden channels off on every training input (runs with any / runs, most in one "
        "run): " + ", ".join(f"{f} {sum(d > 0 for d in v)} / {len(v)} ({max(v)})" for f, v in runs.items()) + "."
    )


def fit_forecast_correlation(sweep: dict) -> str:
    """Per family, the within-cell correlation of the seeds' log training RMSE and log future RMSE (cells that did
    not keep the training RMSE are left out)."""
    pairs: dict[str, list[tuple[float, float]]] = {}
    for results, _ in sweep.values():
        for name, r in results.items():
            if r.train_rmse is None or len(r.seeds) < 2:
                continue
            fit, forecast = np.log(r.train_rmse), np.log([fut for fut, _ in r.seeds])
            pairs.setdefault(family_of(name), []).extend(zip(fit - fit.mean(), forecast - forecast.mean()))
    return ", ".join(f"{fam} {np.corrcoef(np.array(v).T)[0, 1]:.2f}" for fam, v in pairs.items())


def seed_variation(sweep: dict, metric: str = "future") -> str:
    """Per family, the pooled coefficient of variation of the seeds' ``metric`` over every (case, width) cell:
    ``future`` (the rollout RMSE) or ``train`` (the one-step training RMSE; cells that did not keep it are left
    out)."""
    if metric not in ("future", "train"):
        raise ValueError(f"metric must be 'future' or 'train', got {metric!r}")
    cvs: dict[str, list[float]] = {}
    for results, _ in sweep.values():
        for name, r in results.items():
            values = [fut for fut, _ in r.seeds] if metric == "future" else r.train_rmse
            if values is not None and len(values) > 1:
                f = np.array(values)
                cvs.setdefault(family_of(name), []).append(float(f.std(ddof=1) / f.mean()))
    return ", ".join(f"{fam} {100 * np.sqrt(np.mean(np.square(v))):.1f}%" for fam, v in cvs.items())


def plot(sweep: dict, path: Path, title: str) -> None:
    """Future-frame RMSE against the case (beta, then the background force), one panel per parameter budget."""
    plt = pyplot()
    tags = list(sweep)
    n_budgets = len(budgets(sweep[tags[0]][0]))
    fig, axes = plt.subplots(1, n_budgets, figsize=(5 * n_budgets, 4), sharey=True, squeeze=False)
    for i, ax in enumerate(axes[0]):
        for family, style in zip(FAMILIES, ("s-", "^-", "v-", "o--", "d--")):
            names = [budgets(sweep[t][0])[i][family] for t in tags]
            ys = [sweep[t][0][n].future for t, n in zip(tags, names)]
            errs = [sweep[t][0][n].future_spread / 2 for t, n in zip(tags, names)]
            ax.errorbar(range(len(tags)), ys, yerr=errs, fmt=style, capsize=3,
                        label=f"{family} ({sweep[tags[0]][0][names[0]].params:,})")  # fmt: skip
        ax.set_xticks(range(len(tags)), tags)
        ax.set_title(f"{'small' if i == 0 else 'large'} budget")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("rollout RMSE, future frames")
    fig.suptitle(title)
    save_figure(fig, path)


def claim_lines(results: dict[str, tuple[int, float, float]]) -> list[str]:
    """Per test split: the best CNN, and the smallest GM model (exact or relaxed) at least as good; the ratio of
    their parameter counts (best CNN / GM model: below 1 when the GM model is the larger)."""
    out = []
    for split, col in (("future", 1), ("domain", 2)):
        cnns = {k: v for k, v in results.items() if k.startswith("CNN")}
        best_name, best = min(cnns.items(), key=lambda kv: kv[1][col])
        gms = [(v[0], k, v[col]) for k, v in results.items() if k.startswith("p4") and v[col] <= best[col]]
        if gms:
            params, name, err = min(gms)
            out.append(
                f"{split}: best CNN `{best_name}` {best[col]:.4f} ({best[0]:,} parameters), smallest GM model at "
                f"least as good `{name}` {err:.4f} ({params:,}; ratio **{best[0] / params:.1f}**)"
            )
        else:
            out.append(f"{split}: best CNN `{best_name}` {best[col]:.4f} ({best[0]:,}), **no GM model reached it**")
    return out


# ------------------------------------------------------------------------------- studies on a few families
def study(
    name: str,
    families: list[str],
    only: list[str],
    epochs: int,
    seeds: int,
    models: list[str] | None = None,
    cached: bool = False,
) -> list[str]:
    """Some families on some cases (``results/plume_<name>.md``): every seed's future RMSE, the spread / mean,
    and the better relaxed GM model against exact at each matched budget."""
    cases = {t: c for t, c in case_configs(PlumeConfig()).items() if t in only}
    missing = set(only) - set(cases) or set(families) - set(widths(False))
    if missing:
        raise ValueError(f"unknown case or family: {sorted(missing)}")
    t0 = time.perf_counter()
    sweep = {tag: run_case(cfg, False, epochs, seeds, tag, families, models, cached) for tag, cfg in cases.items()}
    minutes = (time.perf_counter() - t0) / 60
    lines = [
        f"{epochs} epochs, {seeds} seeds, {RECIPE}; models {', '.join(models or families)}; "
        f"this report took {minutes:.0f} min (runs are kept in benchmarks/results/plume-runs and reused).",
        "",
        "| case | model | parameters | future RMSE per seed | mean | spread / mean | held-out directions, mean | "
        "largest modulation change abs(a - 1) (-: exact, or not kept) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tag, (results, _) in sweep.items():
        for model, r in results.items():
            per_seed = ", ".join(f"{f:.4f}" for f, _ in r.seeds)
            lines.append(f"| {tag} | {model} | {r.params:,} | {per_seed} | {r.future:.4f} | "
                         f"{100 * r.future_spread / r.future:.0f}% | {r.domain:.4f} | "
                         f"{'-' if math.isnan(r.modulation_change) else f'{r.modulation_change:.2f}'} |")  # fmt: skip
    relaxed = [f for f in RELAXED if f in families]
    if "p4 exact" in families and relaxed:
        lines += ["", "| case | budget | p4 exact | better relaxed GM | relaxed vs exact |", "|---|---|---|---|---|"]
        for tag, (results, _) in sweep.items():
            by_family = {f: sorted((n for n in results if family_of(n) == f), key=lambda n: results[n].params)
                         for f in ["p4 exact", *relaxed]}  # fmt: skip
            sweep_widths = widths(False)["p4 exact"]  # the budget is the exact model's place in the sweep
            for i in range(min(len(v) for v in by_family.values())):
                exact = results[by_family["p4 exact"][i]]
                width = int(by_family["p4 exact"][i].rsplit(" ", 1)[1])
                budget = ("small", "large")[sweep_widths.index(width)] if width in sweep_widths else f"width {width}"
                best = min((by_family[f][i] for f in relaxed), key=lambda n: results[n].future)
                lines.append(
                    f"| {tag} | {budget} | {exact.future:.4f} ({exact.params:,}) | "
                    f"`{best}` {results[best].future:.4f} ({results[best].params:,}) | "
                    f"{100 * (results[best].future / exact.future - 1):+.1f}% |"
                )
    return lines


# ------------------------------------------------------------------------ one input frame (--history1)
ONE_FRAME_CASES = ("beta 0", "background", "beta 0.6", "beta 0.9")  # the control first, then the broken cases
RELAXATION_FAMILIES = (*RELAXED, "RGroup L2")  # the families with learnt orientation weights (relaxation_weights)
SPREAD_LIMIT = 0.2  # a cell's seed spread (max - min) / mean above it is flagged


def one_frame_cases(cfg: PlumeConfig, quick: bool = False) -> dict[str, PlumeConfig]:
    """The cases of the one-frame study: those of :func:`case_configs` in :data:`ONE_FRAME_CASES`, each with
    ``history`` 1, so that a simulation's force cannot be read from the smoke's motion (``quick``: beta 0 and the
    background force)."""
    cases = case_configs(cfg, quick)
    return {tag: replace(cases[tag], history=1) for tag in ONE_FRAME_CASES if tag in cases}


def check_symmetric(sweep: dict) -> None:
    """The beta 0 case (when run) must be symmetric under quarter turns up to the solver's error."""
    if "beta 0" in sweep and sweep["beta 0"][1]["asymmetry"] > 1e-3:
        raise AssertionError(
            f"beta = 0 should be exactly symmetric under quarter turns, got {sweep['beta 0'][1]['asymmetry']:.1e}"
        )


def history1_study(
    quick: bool = False,
    epochs: int | None = None,
    seeds: int | None = None,
    only: list[str] | None = None,
    families: list[str] | None = None,
    cached: bool = False,
) -> list[str]:
    """The one-frame study (``results/plume_history1.md``): every model of :func:`widths` trained on
    :func:`one_frame_cases` (``families``, ``only``: train only these; the report shows every run kept), and the
    four-frame sweep's runs of the same cases where they are kept (never trained here)."""
    base = QUICK if quick else PlumeConfig()
    epochs, seeds = epochs or (2 if quick else EPOCHS), seeds or (1 if quick else 3)
    cases = one_frame_cases(base, quick)
    unknown = set(only or ()) - set(cases) or set(families or ()) - set(widths(quick))
    if unknown:
        raise ValueError(f"--history1: unknown case or family {sorted(unknown)}; cases {list(cases)}")
    cases = {tag: cfg for tag, cfg in cases.items() if not only or tag in only}
    t0 = time.perf_counter()
    one = {tag: run_case(cfg, quick, epochs, seeds, tag, families, cached=cached) for tag, cfg in cases.items()}
    if not quick:  # report every model kept, with at least two seeds (the cells show how many ran)
        one = {tag: run_case(cfg, False, epochs, seeds, tag, cached=True, min_seeds=2) for tag, cfg in cases.items()}
    four = {} if quick else {
        tag: run_case(replace(cfg, history=base.history), False, epochs, seeds, tag, cached=True)[0]
        for tag, cfg in cases.items()
    }  # fmt: skip
    check_symmetric(one)
    minutes = (time.perf_counter() - t0) / 60
    return history1_lines(base, one, four, epochs, seeds, quick, minutes)


def cell(results: dict[str, Result], name: str, seeds: int) -> str:
    """``mean ± spread (spread / mean)`` of a model's future RMSE (and how many seeds, if fewer than ``seeds``), or
    ``not run``."""
    if name not in results:
        return "not run"
    r = results[name]
    fewer = f", {len(r.seeds)} seeds" if len(r.seeds) < seeds else ""
    return f"{r.future:.4f} ± {r.future_spread:.4f} ({100 * r.future_spread / r.future:.0f}%{fewer})"


def relaxed_vs_exact(results: dict[str, Result], exact: str, relaxed: list[str]) -> str:
    """The better of the ``relaxed`` models that ran against ``exact``, in percent of exact's RMSE, or ``-``."""
    ran = [n for n in relaxed if n in results]
    if exact not in results or not ran:
        return "-"
    best = min(ran, key=lambda n: results[n].future)
    return f"`{best}` {100 * (results[best].future / results[exact].future - 1):+.1f}%"


def per_layer(r: Result, column: int, with_max: bool = False) -> str:
    """One entry of :func:`modulation_summary` per layer, ``/``-separated (with the max in brackets); for a run
    kept before the summary, the largest change over all layers where ``with_max`` (else ``-``)."""
    if not r.layers:
        kept = with_max and not math.isnan(r.modulation_change)
        return f"max over all layers {r.modulation_change:.2f} (per layer not kept)" if kept else "-"
    return " / ".join(f"{v[column]:.3f}" + (f" ({v[1]:.2f})" if with_max else "") for v in r.layers)


def history1_lines(
    base: PlumeConfig, one: dict, four: dict, epochs: int, seeds: int, quick: bool, minutes: float
) -> list[str]:
    """The one-frame report: future RMSE per case and model, relaxed against exact per budget (one and four
    frames), the relaxed models' modulations per layer beside their errors, and the learnt asymmetry."""
    tags, ws = list(one), widths(quick)
    names = [f"{family} {w}" for family, fam_ws in ws.items() for w in fam_ws]
    trained = sum(r.seconds * len(r.seeds) for results, _ in one.values() for r in results.values()) / 60
    asym = ", ".join(f"{t} {one[t][1]['asymmetry']:.1e}" for t in tags)
    lines = [
        f"Smoke plume {base.res}x{base.res}, the sweep's simulations, models and widths, but **one input frame** "
        f"(history 1: the models see the last velocity field only, so a simulation's force cannot be read from "
        f"the smoke's motion); {one[tags[0]][1]['pairs']} one-step pairs per case, {base.horizon}-step rollouts; "
        f"{epochs} epochs ({RECIPE}, RPP residual paths weight decay {RPP_DECAY:g}), {seeds} seeds "
        "per model (fewer where a cell says so). "
        f"Symmetry breaking of each case (as the sweep): {asym}. Training time summed over the runs shown: "
        f"{trained:.0f} min; this report took {minutes:.0f} min (runs are kept in benchmarks/results/plume-runs and "
        "reused). "
        "`not run`: no kept run for that cell.",
        "",
        "Future-frame rollout RMSE, mean ± spread (max - min over the seeds) and spread / mean:",
        "",
        "| model | parameters | " + " | ".join(tags) + " |",
        "|---|---|" + "---|" * len(tags),
        "| persistence | 0 | " + " | ".join(f"{one[t][1]['persistence']:.4f}" for t in tags) + " |",
    ]
    for name in names:
        params = next((one[t][0][name].params for t in tags if name in one[t][0]), None)
        if params is not None:
            lines.append(f"| {name} | {params:,} | " + " | ".join(cell(one[t][0], name, seeds) for t in tags) + " |")
    kept_four = any(four.values())  # none when the four-frame sweep ran before its runs were kept
    lines += [
        "",
        "Relaxed GM against exact at each budget (the i-th width of each family), future-frame RMSE; negative: "
        "relaxed lower"
        + (
            ". Last column: the same comparison with four input frames, from the sweep's kept runs:"
            if kept_four
            else " (no run of the four-frame sweep is kept: its comparison, at its own widths, is in results/plume.md):"
        ),
        "",
        "| case | budget | "
        + " | ".join(FAMILIES)
        + " | better relaxed GM vs exact, 1 frame |"
        + (" 4 frames |" if kept_four else ""),
        "|---|---|" + "---|" * (len(FAMILIES) + 1 + kept_four),
    ]
    for tag in tags:
        results = one[tag][0]
        for i in range(len(ws["p4 exact"])):
            budget = {f: f"{f} {ws[f][i]}" for f in FAMILIES}
            cells = [f"{results[n].future:.4f} ({results[n].params:,})" if n in results else "not run"
                     for n in budget.values()]  # fmt: skip
            relaxed = [budget[f] for f in RELAXED]
            lines.append(
                f"| {tag} | {('small', 'large')[i] if len(ws['p4 exact']) == 2 else ws['p4 exact'][i]} | "
                f"{' | '.join(cells)} | {relaxed_vs_exact(results, budget['p4 exact'], relaxed)} |"
                + (f" {relaxed_vs_exact(four.get(tag, {}), budget['p4 exact'], relaxed)} |" if kept_four else "")
            )
    lines += [
        "",
        "The relaxed models' orientation weights `a` after training (1 at initialisation; relaxed GM: the "
        "modulations `a[k, o, g]`, RGroup: its `(2, 4)` table per layer), per layer from input to output, mean "
        "over the seeds: mean `abs(a - 1)` (max in brackets), and the orientation spread (mean over ranks and "
        "channels of `max_g a - min_g a`: 0 while a layer is exactly equivariant). Learnt asymmetry: "
        "`||f(R v) - R f(v)|| / ||f(v) - v_last||` over the training inputs (R a quarter turn; 0 for exact):",
        "",
        "| case | model | frames | future RMSE | vs exact, same budget | mean abs(a - 1) per layer (max) | "
        "orientation spread per layer | learnt asymmetry |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tag in tags:
        for name in (n for n in names if family_of(n) in RELAXATION_FAMILIES):
            exact = f"p4 exact {ws['p4 exact'][ws[family_of(name)].index(int(name.rsplit(' ', 1)[1]))]}"
            for frames, results in ((1, one[tag][0]), (base.history, four.get(tag, {}))):
                if name not in results:
                    continue
                r = results[name]
                vs = f"{100 * (r.future / results[exact].future - 1):+.1f}%" if exact in results else "-"
                asym = "-" if math.isnan(r.learnt_asymmetry) else f"{r.learnt_asymmetry:.3f}"
                lines.append(f"| {tag} | {name} | {frames} | {r.future:.4f} | {vs} | {per_layer(r, 0, True)} | "
                             f"{per_layer(r, 2)} | {asym} |")  # fmt: skip
    lines += ["", "Learnt asymmetry of every model, one input frame (exact p4 models: 0 up to rounding):", "",
              "| model | " + " | ".join(tags) + " |", "|---|" + "---|" * len(tags)]  # fmt: skip
    for name in names:
        if any(name in one[t][0] for t in tags):
            row = [f"{one[t][0][name].learnt_asymmetry:.3f}" if name in one[t][0] else "not run" for t in tags]
            lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines += ["", spread_line(one)]
    return lines


def spread_line(sweep: dict) -> str:
    """The largest seed spread / mean over every cell that ran, and the cells above :data:`SPREAD_LIMIT`."""
    spreads = {(tag, name): r.future_spread / r.future for tag, (results, _) in sweep.items()
               for name, r in results.items()}  # fmt: skip
    if not spreads:
        return "Seed spread: no cell ran."
    (tag, name), worst = max(spreads.items(), key=lambda kv: kv[1])
    over = [f"`{n}` on {t} ({100 * s:.0f}%)" for (t, n), s in spreads.items() if s > SPREAD_LIMIT]
    return (
        f"Seed spread / mean over the {len(spreads)} cells that ran: largest {100 * worst:.0f}% (`{name}` on {tag}); "
        f"above {100 * SPREAD_LIMIT:.0f}%: {', '.join(over) if over else 'none'}."
    )


# ------------------------------------------------------------------------------------ the "drifting" seeds
def live_fractions(model: P4CNN, x: torch.Tensor) -> list[float]:
    """Per hidden layer, the fraction of channels whose ReLU is on somewhere on the inputs ``x``."""
    return [float((peak > 0).float().mean()) for peak in hidden_peaks(model, x)]


def build_p4(history: int, width: int, rank: int, seed: int, uniform_bias: bool) -> P4CNN:
    """A fresh p4 model; ``uniform_bias`` redraws the shared biases as GMConv2d did before (``+-1/sqrt(fan_in)``)."""
    torch.manual_seed(seed)
    model = P4CNN(history, width, rank)
    if uniform_bias:
        with torch.no_grad():
            for conv in model.convs:
                bound = 1 / math.sqrt(conv.in_channels * 9)
                conv.bias.uniform_(-bound, bound)
    return model


def drift_check(models: tuple[tuple[int, int], ...] = ((2, 1), (4, 1), (2, 4), (4, 2)), seeds: int = 200,
                train_seeds: int = 6) -> list[str]:  # fmt: skip
    """Why a relaxed seed "drifted": dead hidden layers at initialisation, with the old and the new shared-bias init.

    Counts, over ``seeds`` initialisations, the models with a hidden layer that is off everywhere on the
    training inputs (beta = 0.3 case), then trains ``p4 relaxed r2 4`` with ``train_seeds`` seeds under both.
    """
    cfg = PlumeConfig()
    sims = dataset(cfg)
    data = windows(sims["train"], cfg.history, 0, cfg.train_frames)
    x = data[0][::8]
    lines = [
        f"Fresh p4 models ({seeds} seeds), inputs: every 8th training window of the beta = 0.3 case. Old init: "
        "shared bias uniform in +-1/sqrt(fan_in) (as nn.Conv2d); new: shared bias 0.",
        "",
        "| model | seeds with a dead hidden layer, old init | new init | live channels, old | new |",
        "|---|---|---|---|---|",
    ]
    for width, rank in models:
        row = []
        for uniform in (True, False):
            live = [live_fractions(build_p4(cfg.history, width, rank, s, uniform), x) for s in range(seeds)]
            row.append((sum(min(v) == 0 for v in live), float(np.mean(live))))
        name = f"p4 exact {width}" if rank == 1 else f"p4 relaxed r{rank} {width}"
        lines.append(f"| {name} | {row[0][0]} | {row[1][0]} | {row[0][1]:.2f} | {row[1][1]:.2f} |")
    if train_seeds:
        head = "| `p4 relaxed r2 4`, 30 epochs | future RMSE per seed | mean | spread / mean |"
        lines += ["", head, "|---|---|---|---|"]
        for uniform in (True, False):
            errs = []
            for seed in range(train_seeds):
                model = build_p4(cfg.history, 4, 2, seed, uniform)
                train(model, data, 30, seed)
                errs.append(rollout_rmse(model, sims["train"], cfg, cfg.train_frames))
            lines.append(
                f"| {'old' if uniform else 'new'} init | {', '.join(f'{e:.4f}' for e in errs)} | {np.mean(errs):.4f} | "
                f"{100 * np.ptp(errs) / np.mean(errs):.0f}% |"
            )
    return lines


def spike_check(
    tag: str = "beta 0.3", name: str = "p4 relaxed r4 3", seeds: int = 6, epochs: int = EPOCHS
) -> list[str]:
    """Why seeds still differed after the warm-up fix: each seed of ``name`` trained with Adam's beta2 = 0.999
    (PyTorch's default, which the sweep used until this check) and with :data:`ADAM_BETAS`; per seed the final
    one-step training RMSE, the largest ratio of an epoch's training RMSE to the best epoch before it (1.00: it
    never rose), the hidden channels off on every training input, and the rollout RMSEs."""
    cfg = case_configs(PlumeConfig())[tag]
    sims = dataset(cfg)
    data = windows(sims["train"], cfg.history, 0, cfg.train_frames)
    lines = [
        f"`{name}` on `{tag}`, {epochs} epochs, {seeds} seeds, {RECIPE}, except beta2 as in the first column.",
        "",
        "| beta2 | seed | training RMSE | largest epoch RMSE / best epoch before | dead channels | future RMSE | "
        "held-out directions |",
        "|---|---|---|---|---|---|---|",
    ]
    for beta2 in (0.999, ADAM_BETAS[1]):
        futures = []
        for seed in range(seeds):
            curve: list[float] = []
            run = run_seed(name, cfg, sims, data, epochs, seed, (ADAM_BETAS[0], beta2), curve)
            rise = max([1.0, *(curve[e] / min(curve[:e]) for e in range(1, len(curve)))])
            futures.append(run["future"])
            lines.append(f"| {beta2:g} | {seed} | {run['train_rmse']:.5f} | {rise:.2f} | {run['dead_channels']} | "
                         f"{run['future']:.4f} | {run['domain']:.4f} |")  # fmt: skip
            print(lines[-1], flush=True)
        lines.append(f"| {beta2:g} | all | | | | mean {np.mean(futures):.4f}, spread / mean "
                     f"{100 * np.ptp(futures) / np.mean(futures):.0f}% (first 3 seeds: "
                     f"{100 * np.ptp(futures[:3]) / np.mean(futures[:3]):.0f}%) | |")  # fmt: skip
    return lines


def write_study(filename: str, body: list[str]) -> None:
    """Print a study's report under the machine line and write it to ``results/<filename>``."""
    text = "\n".join([f"{measured_on()}.", "", *body])
    print(text)
    (RESULTS / filename).write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32x32, few frames, 2 cases, 2 epochs, 1 width")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seeds", type=int, help="training seeds per model (default 3, --quick 1)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (the sweep's times are for 1)")
    parser.add_argument("--cases", nargs="+", help="case tags to run, e.g. 'beta 0.9' background (beta 0 always)")
    parser.add_argument("--families", nargs="+", help="with --study: model families, e.g. 'p4 exact' 'p4 relaxed r2'")
    parser.add_argument("--models", nargs="+", help="with --study: only these models, e.g. 'p4 exact 5'")
    parser.add_argument("--cached", action="store_true", help="with --study: train nothing, report the kept runs")
    parser.add_argument("--study", help="write results/plume_<STUDY>.md for --families on --cases (not plume.md)")
    parser.add_argument("--history1", action="store_true", help="the one-frame study (results/plume_history1.md); "
                        "--cases, --families: train only those")  # fmt: skip
    parser.add_argument("--drift", action="store_true", help="only the dead-layer check (results/plume_drift.md)")
    parser.add_argument("--drift-train", type=int, default=0, help="with --drift: also train r2 4, old and new init")
    parser.add_argument("--spikes", action="store_true", help="only the loss-spike check (results/plume_spikes.md)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.history1:
        body = history1_study(args.quick, args.epochs, args.seeds, args.cases, args.families, args.cached)
        return print("\n".join(body)) if args.quick else write_study("plume_history1.md", body)
    if args.drift:
        return write_study("plume_drift.md", drift_check(train_seeds=args.drift_train))
    if args.spikes:
        return write_study("plume_spikes.md", spike_check())
    if args.study:
        if not (args.families and args.cases):
            parser.error("--study needs --families and --cases")
        body = study(
            args.study, args.families, args.cases, args.epochs or EPOCHS, args.seeds or 3, args.models, args.cached
        )
        return write_study(f"plume_{args.study}.md", body)
    main_with(args.quick, args.epochs, args.seeds, args.cases)


def main_with(quick: bool, epochs: int | None = None, seeds: int | None = None, only: list[str] | None = None) -> None:
    header = f"{measured_on()}."
    text = "\n".join([header, "", *run(quick, epochs, seeds, only)])
    print(text)
    if not quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "plume.md").write_text(text + "\n")
        refresh()


if __name__ == "__main__":
    main()
