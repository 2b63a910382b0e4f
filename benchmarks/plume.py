"""Smoke-plume forecasting with approximate rotation symmetry (the paper's dynamics task, after Wang et al. 2022).

    python benchmarks/plume.py [--quick]        (also run by benchmarks/paper.py)

Data, simulated here with phiflow (numpy backend, fixed parameters, no downloads): a closed square box,
smoke injected at the centre, a buoyancy force ``strength(theta) * (cos theta, sin theta)`` per
simulation. The box, the inflow and the solver are exactly symmetric under quarter turns (checked by
:func:`check_solver_symmetry`); the *symmetry is broken* because the buoyancy strength depends on the
direction, ``strength(theta) = s0 * (1 + 0.3 * cos theta)``, so turning a simulation by 90 degrees does not
give another simulation of the family. Each simulation keeps ``frames`` velocity fields ``(x, y, 2)``.

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
  with it: the whole model is exactly equivariant to quarter turns (tested).
* ``p4 relaxed w``: the same with rank-2 relaxed group convolutions (learnt modulation over orientations):
  approximately equivariant, able to learn the direction-dependent strength.

``w`` counts orientation fibres for the p4 models (4 w channels), so ``p4 w`` has the feature size of
``CNN 4w``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from common import measured_on, pyplot, save_figure
from readme import refresh
from torch import nn

import gmcompress as gm
from gmcompress.nn import GMConv2d

RESULTS = Path(__file__).parent / "results"
CACHE = Path(__file__).resolve().parent.parent / "out" / "plume-cache"
GENERATOR_VERSION = 1  # bump when simulate(), strength() or domains() change: the cache key includes it


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


QUICK = PlumeConfig(res=32, frames=26, warmup=6, train_frames=18, history=3, horizon=4)


def strength(theta_deg: float, s0: float) -> float:
    """Direction-dependent buoyancy: the symmetry-breaking term."""
    return s0 * (1 + 0.3 * math.cos(math.radians(theta_deg)))


def simulate(theta_deg: float, s: float, cfg: PlumeConfig) -> np.ndarray:
    """Velocity fields ``(frames, res, res, 2)`` (indexed ``[x, y, vector]``) of one smoke plume."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from phi import flow as phi

        res = cfg.res
        box = phi.Box(x=res, y=res)
        force = phi.math.tensor(
            [s * math.cos(math.radians(theta_deg)), s * math.sin(math.radians(theta_deg))],
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
    """Relative difference between a turned simulation and the simulation of the turned force."""
    a = simulate(10.0, cfg.strength, cfg)
    b = simulate(100.0, cfg.strength, cfg)
    return float(np.abs(rotate_velocity(a) - b).max() / np.abs(b).max())


def domains(cfg: PlumeConfig) -> dict[str, list[float]]:
    return {
        "train": [90.0 * k + d for k in range(4) for d in (-cfg.jitter, cfg.jitter)],
        "domain": [90.0 * k for k in range(4)],
    }


def cache_path(cfg: PlumeConfig) -> Path:
    spec = {**asdict(cfg), "generator": GENERATOR_VERSION}
    return CACHE / f"plume-{hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]}.npz"


def dataset(cfg: PlumeConfig) -> dict[str, np.ndarray]:
    """All simulations ``{"train": (S, frames, x, y, 2), "domain": ...}``, cached under ``out/plume-cache``."""
    path = cache_path(cfg)
    if path.exists():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    data = {
        name: np.stack([simulate(t, strength(t, cfg.strength), cfg) for t in thetas])
        for name, thetas in domains(cfg).items()
    }
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
    def __init__(self, history: int, width: int, depth: int = 4) -> None:
        super().__init__()
        sizes = [2 * history] + [width] * (depth - 1) + [2]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        h = to_channels(v)
        for i, conv in enumerate(self.convs):
            h = conv(h) if i == len(self.convs) - 1 else torch.relu(conv(h))
        return v[:, -1] + h.permute(0, 2, 3, 1)


class P4CNN(nn.Module):
    """C4 group convolutions on C4-regular velocity features; exact (rank 1) or relaxed (rank r, modulated)."""

    def __init__(self, history: int, width: int, rank: int = 1, depth: int = 4) -> None:
        super().__init__()
        relaxed = rank > 1
        sizes = [4 * history] + [4 * width] * (depth - 1) + [4]
        self.convs = nn.ModuleList(
            GMConv2d(a, b, 3, "C4", rank, relaxed, padding=1, bias="shared") for a, b in zip(sizes[:-1], sizes[1:])
        )

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        h = encode_regular(v)
        for i, conv in enumerate(self.convs):
            h = conv(h) if i == len(self.convs) - 1 else torch.relu(conv(h))
        return v[:, -1] + decode_regular(h)


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


def train(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], epochs: int, seed: int) -> float:
    start = time.perf_counter()
    torch.manual_seed(seed)
    gm.finetune(model, None, data, epochs=epochs, lr=2e-3, batch_size=16, loss="task", progress=False, seed=seed)
    return time.perf_counter() - start


def builders(quick: bool, history: int) -> dict[str, Callable[[], nn.Module]]:
    cnn_widths = (16, 32) if quick else (8, 16, 32, 64)
    p4_widths = (4, 8) if quick else (2, 4, 8, 16)
    out = {f"CNN {w}": (lambda w=w: PlainCNN(history, w)) for w in cnn_widths}
    out |= {f"p4 exact {w}": (lambda w=w: P4CNN(history, w, 1)) for w in p4_widths}
    out |= {f"p4 relaxed r2 {w}": (lambda w=w: P4CNN(history, w, 2)) for w in p4_widths}
    return out


def run(quick: bool = False, epochs: int | None = None, seeds: int | None = None) -> list[str]:
    cfg = QUICK if quick else PlumeConfig()
    epochs = epochs or (2 if quick else 30)
    seeds = seeds or (1 if quick else 2)
    t0 = time.perf_counter()
    cached = cache_path(cfg).exists()
    sims = dataset(cfg)
    simulation = (
        "simulations read from out/plume-cache"
        if cached
        else f"simulated in {time.perf_counter() - t0:.0f} s (cached in out/plume-cache)"
    )
    solver_error = check_solver_symmetry(cfg)
    data = windows(sims["train"], cfg.history, 0, cfg.train_frames)
    scale = float(np.sqrt((sims["train"] ** 2).mean()))
    lines = [
        f"Smoke plume {cfg.res}x{cfg.res}: {len(sims['train'])} training simulations (directions "
        f"{domains(cfg)['train']}), {len(data[0])} one-step pairs from their first {cfg.train_frames} frames; "
        f"{cfg.history} input frames, {cfg.horizon}-step rollouts; {epochs} epochs (AdamW 2e-3, batch 16); "
        f"RMSEs are the mean over {seeds} training seeds (the spread is max - min). "
        f"RMS velocity {scale:.3f}; {simulation}. The solver itself is "
        f"symmetric: a turned simulation differs from the simulation of the turned force by {solver_error:.1e} "
        f"(relative); the data break the symmetry only through the direction-dependent strength.",
        "",
        "| model | parameters | RMSE future | RMSE domain | quarter-turn equivariance error | seconds per seed |",
        "|---|---|---|---|---|---|",
    ]
    results = {}
    persistence = rollout_rmse(Persistence(), sims["train"], cfg, cfg.train_frames)
    lines.append(
        f"| persistence (v_next = v_last, no model) | 0 | {persistence:.4f} | "
        f"{rollout_rmse(Persistence(), sims['domain'], cfg, 0):.4f} | 0 | 0 |"
    )
    for name, build in builders(quick, cfg.history).items():
        runs = []  # (future, domain, equivariance error, seconds) per seed
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = build()
            secs = train(model, data, epochs, seed=seed)
            equi = equivariance_error(model, cfg.history)
            if name.startswith("p4 exact") and equi > 1e-4:
                raise AssertionError(f"{name} should be exactly equivariant to quarter turns, error {equi:.2e}")
            future = rollout_rmse(model, sims["train"], cfg, cfg.train_frames)
            runs.append((future, rollout_rmse(model, sims["domain"], cfg, 0), equi, secs))
        params = sum(p.numel() for p in model.parameters())
        future, domain, equi, secs = np.mean(runs, axis=0)
        spread = np.ptp(runs, axis=0)
        results[name] = (params, future, domain)
        lines.append(
            f"| {name} | {params:,} | {future:.4f} ± {spread[0]:.4f} | {domain:.4f} ± {spread[1]:.4f} | "
            f"{equi:.1e} | {secs:.0f} |"
        )
        print(f"plume: {name}: {params:,} params, RMSE future {future:.4f} domain {domain:.4f}", flush=True)
    lines += ["", *claim_lines(results)]
    if not quick:
        plot(results, RESULTS / "plume.png", f"smoke plume {cfg.res}x{cfg.res}, {cfg.horizon}-step rollouts")
        lines += ["", "![RMSE against parameters](plume.png)"]
    return lines


def plot(results: dict[str, tuple[int, float, float]], path: Path, title: str) -> None:
    """RMSE against parameter count (log scale), one line per model family, one panel per test split."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (split, col) in zip(axes, (("future frames", 1), ("held-out domains", 2))):
        for family, style in (("CNN", "o-"), ("p4 exact", "s-"), ("p4 relaxed r2", "^-")):
            pts = sorted(v for k, v in results.items() if k.rsplit(" ", 1)[0] == family)
            ax.plot([p[0] for p in pts], [p[col] for p in pts], style, label=family)
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_title(split)
    axes[0].set_ylabel("rollout RMSE")
    axes[0].legend()
    fig.suptitle(title)
    save_figure(fig, path)


def claim_lines(results: dict[str, tuple[int, float, float]]) -> list[str]:
    """The paper's claim, tested: the smallest GM model at least as good as the best CNN, per test split."""
    out = []
    for split, col in (("future", 1), ("domain", 2)):
        cnns = {k: v for k, v in results.items() if k.startswith("CNN")}
        best_name, best = min(cnns.items(), key=lambda kv: kv[1][col])
        gms = [(v[0], k, v[col]) for k, v in results.items() if not k.startswith("CNN") and v[col] <= best[col]]
        if gms:
            params, name, err = min(gms)
            out.append(
                f"- {split}: best CNN `{best_name}` RMSE {best[col]:.4f} with {best[0]:,} parameters; smallest "
                f"GM model at least as good: `{name}` RMSE {err:.4f} with {params:,} parameters "
                f"(**{best[0] / params:.1f}x fewer**)."
            )
        else:
            out.append(
                f"- {split}: best CNN `{best_name}` RMSE {best[col]:.4f} ({best[0]:,} parameters); "
                f"**no GM model reached it**."
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32x32, few frames, 2 epochs, 2 widths")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seeds", type=int, help="training seeds per model (default 2, --quick 1)")
    args = parser.parse_args()
    main_with(args.quick, args.epochs, args.seeds)


def main_with(quick: bool, epochs: int | None = None, seeds: int | None = None) -> None:
    header = f"{measured_on()}."
    text = "\n".join([header, "", *run(quick, epochs, seeds)])
    print(text)
    if not quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "plume.md").write_text(text + "\n")
        refresh()


if __name__ == "__main__":
    main()
