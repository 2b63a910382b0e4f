"""Whole-model latency and throughput, original vs compressed and vs frozen, with MACs next to the measured time.

    python benchmarks/speed.py [--quick] [--device cuda]

Models: MobileNetV2 and ResNet-18 at 224 x 224 (``benchmarks/cnns.py``, random weights) compressed with
``group="C8"`` and defaults (every dense layer), ccexam MNISTNet (``group="C8"`` defaults, and
``recipes/mnistnet.yaml``), all-MiniLM-L6-v2 (``recipes/minilm.yaml``; token batches of 32 tokens) and a wide MLP
(4096-wide, 4 Linear layers, C16 rank 1). For every batch size the compressed model is frozen on that batch
(``gm.freeze(compressed, inputs)``: each GM layer on its fastest path, or its plain torch layer, measured there,
as for serving), and the original, the compressed (each layer on its "auto" rule) and the frozen model are timed
in the same interleaved rounds (median latency, eval, inference mode, all the process's threads): throughput,
MACs of the original and the frozen model, the form gm.freeze chose for each layer, and every frozen layer that
did not get faster (timed alone, with the reason).
"""

from __future__ import annotations

import argparse
import platform
import time
from functools import partial
from pathlib import Path

import cnns
import torch
from common import ROUNDS, interleaved, measured_on, pyplot, save_figure, steady_allocator
from readme import refresh
from torch import nn
from torch.utils import benchmark

import gmcompress as gm
from gmcompress import zoo
from gmcompress.graph.batches import first_inputs, run_model
from gmcompress.measure.paths import AS_IS, TORCH_LAYER, TORCH_LAYERS, FreezeReport
from gmcompress.measure.timing import settle_allocator


def median_ms(model: nn.Module, inputs: object, device: str, min_run_time: float) -> float:
    sync = "torch.cuda.synchronize()" if device == "cuda" else "pass"
    settle_allocator()
    timer = benchmark.Timer(
        f"run(model, inputs); {sync}",
        globals=dict(run=run_model, model=model, inputs=inputs, torch=torch),
        num_threads=torch.get_num_threads(),
    )
    with torch.inference_mode():
        return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def wide_mlp() -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(4):
        layers += [nn.Linear(4096, 4096), nn.GELU()]
    return nn.Sequential(*layers).eval()


def layer_times(
    original: nn.Module, frozen: nn.Module, inputs: object, device: str, min_run_time: float
) -> list[tuple[str, float, float, str]]:
    """Every layer gm.freeze measured, timed alone on its real input against its original: ``(name, original ms,
    frozen ms, its form and why it is not faster)``."""
    report: FreezeReport = frozen.freeze_report
    dense = {c.name: original.get_submodule(c.name) for c in report.layers}
    captured = first_inputs(original, inputs, dense)
    out = []
    for choice in report.layers:
        if choice.name not in captured:
            continue
        x = captured[choice.name]
        best = interleaved(
            {
                "before": partial(median_ms, dense[choice.name], x, device, min_run_time),
                "after": partial(median_ms, frozen.get_submodule(choice.name), x, device, min_run_time),
            }
        )
        why = WHY.get(choice.chosen, f"path '{choice.chosen}': transform and launch overhead outweigh the saved MACs")
        out.append((choice.name, best["before"], best["after"], why))
    return out


WHY = {
    TORCH_LAYER: "the plain torch layer (the original's product on the compressed weight) was fastest",
    "dense": "path 'dense': the original's product on the materialised weight",
    AS_IS: "one path: GMConv2d runs the materialised (tied) weight through the same dense convolution",
}


CURVES: dict[str, list[tuple[int, float]]] = {}  # model -> (batch, frozen speed-up), filled by measure() for the plot


def plot(path: str, title: str) -> None:
    """Speed-up (original / frozen latency) against batch size, one line per model."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in CURVES.items():
        ax.plot([b for b, _ in pts], [r for _, r in pts], "o-", label=label.split(" (")[0])
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("speed-up (original / frozen latency)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def measure(
    label: str, original: nn.Module, compressed: nn.Module, batches: dict[int, object], device: str, min_run_time: float
) -> list[str]:
    """Whole-model latency, original against compressed and against ``gm.freeze(compressed, inputs)`` (frozen on
    each batch, as for serving), with the MAC ratio and the limit set by the layers that were not compressed: with
    the compressed layers' original times (each timed alone on its real input) summing to ``L`` of the original's
    ``T``, no speed-up of those layers gives more than ``T / (T - L)`` (the "free layers" limit)."""
    lines = [
        f"### {label}",
        "",
        "| batch | original ms | compressed ms | speed-up | frozen ms | frozen speed-up | frozen layers ms, "
        "before -> after | limit if they were free | original samples/s | frozen samples/s | "
        "original MACs | frozen MACs | MAC ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    slow: list[str] = []
    forms: list[str] = []
    curve = CURVES.setdefault(label, [])
    for batch, inputs in batches.items():
        frozen = gm.freeze(compressed, inputs, progress=False)
        best = interleaved(
            {
                "original": partial(median_ms, original, inputs, device, min_run_time),
                "compressed": partial(median_ms, compressed, inputs, device, min_run_time),
                "frozen": partial(median_ms, frozen, inputs, device, min_run_time),
            }
        )
        t0, t1, t2 = best["original"], best["compressed"], best["frozen"]
        curve.append((batch, t0 / t2))
        m0 = gm.report.count_macs(original, inputs)[0]
        m2 = gm.report.count_macs(frozen, inputs)[0]
        layers = layer_times(original, frozen, inputs, device, min_run_time)
        before, after = sum(r[1] for r in layers), sum(r[2] for r in layers)
        limit = f"{t0 / (t0 - before):.2f}x" if before < t0 else "-"
        served_torch = frozen.freeze_report.served == TORCH_LAYERS
        same = " (plain torch layers: the original's computation)" if served_torch else ""
        lines.append(
            f"| {batch} | {t0:.3f} | {t1:.3f} | {t0 / t1:.2f}x | {t2:.3f} | {t0 / t2:.2f}x{same} | {before:.3f} -> "
            f"{after:.3f} ({before / t0:.0%} of the original) | {limit} | {batch / t0 * 1e3:,.0f} | "
            f"{batch / t2 * 1e3:,.0f} | {m0:,} | {m2:,} | {m0 / m2:.2f}x |"
        )
        slow += [
            f"| {batch} | {name} | {b:.3f} | {a:.3f} | {b / a:.2f}x | {why} |"
            for name, b, a, why in layers
            if a >= 0.95 * b
        ]
        forms += form_rows(batch, frozen.freeze_report)
    if slow:
        lines += [
            "",
            "Frozen layers that did not get faster (timed alone on their real inputs):",
            "",
            "| batch | layer | original ms | frozen ms | speed-up | why |",
            "|---|---|---|---|---|---|",
        ] + slow
    return lines + ["", "Forms gm.freeze chose (each form timed on the layer's input at that batch):", "",
                    "| batch | layer | input | form | ms per form | vs torch layer |", "|---|---|---|---|---|---|",
                    *forms]  # fmt: skip


def form_rows(batch: int, report: FreezeReport) -> list[str]:
    """One markdown row per layer gm.freeze measured: its input, the form kept and every form's time."""
    return [
        f"| {batch} | {c.name} | {'x'.join(map(str, c.input_shape))} | {c.chosen} | "
        + ", ".join(f"{form} {ms:.3f}" for form, ms in c.times_ms.items())
        + f" | {'-' if c.speedup is None else f'{c.speedup:.2f}x'} |"
        for c in report.layers
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=None)
    parser.add_argument("--min-run-time", type=float, help="seconds per timing (default 0.3, 0.05 with --quick)")
    args = parser.parse_args()
    steady_allocator()
    ROUNDS["rounds"] = 1 if args.quick else 3
    dev, mrt = args.device, args.min_run_time or (0.05 if args.quick else 0.3)
    start = time.perf_counter()
    sections: list[str] = []

    def add(lines: list[str]) -> None:  # printed as each table is done, so a run cut short shows what it measured
        sections.extend(lines)
        print("\n".join(lines) + f"\n({time.perf_counter() - start:.0f} s)", flush=True)

    mlp = wide_mlp().to(dev)
    mlp_gm = gm.compress(mlp, group="C16", rank=1, progress=False).to(dev).eval()
    sizes = [1, 64] if args.quick else [1, 16, 64, 256]
    add(
        measure(
            "Wide MLP (4 x Linear 4096 -> 4096), C16 rank 1",
            mlp,
            mlp_gm,
            {b: torch.randn(b, 4096, device=dev) for b in sizes},
            dev,
            mrt,
        )
    )

    resolution = 112 if args.quick else 224
    for build in (cnns.mobilenet_v2, cnns.resnet18):
        cnn = build().to(dev)
        images = {b: torch.randn(b, 3, resolution, resolution, device=dev) for b in (1, 8)}
        cnn_gm = gm.compress(cnn, group="C8", progress=False).to(dev).eval()
        add([""] + measure(f"{build.__name__} {resolution}x{resolution}, C8", cnn, cnn_gm, images, dev, mrt))

    net = zoo.mnistnet().to(dev)
    digits = zoo.mnist_split()[2].to(dev)
    sizes = [1, 64] if args.quick else [1, 16, 64, 512]
    for label, kwargs in [
        ("C8 defaults", dict(group="C8")),
        ("recipes/mnistnet.yaml", dict(recipe="recipes/mnistnet.yaml")),
    ]:
        net_gm = gm.compress(net, progress=False, **kwargs).to(dev).eval()
        add([""] + measure(f"MNISTNet ({label})", net, net_gm, {b: digits[:b] for b in sizes}, dev, mrt))

    try:
        enc = None if args.quick else zoo.minilm()
    except ImportError as err:  # e.g. a GPU machine without the 84 MB weights package
        add(["", f"all-MiniLM-L6-v2: not measured ({err})."])
        enc = None
    if enc is not None:
        enc = enc.to(dev)
        enc_gm = gm.compress(enc, recipe="recipes/minilm.yaml", progress=False).to(dev).eval()
        sentences = zoo.split_sentences()[1]
        batches = {}
        for b in [1, 16, 64]:
            tok = zoo.minilm_tokenize(sentences[:b], max_length=32)
            batches[b] = {k: v.to(dev) for k, v in tok.items()}
        add([""] + measure("all-MiniLM-L6-v2 (recipes/minilm.yaml), up to 32 tokens", enc, enc_gm, batches, dev, mrt))

    name = (
        torch.cuda.get_device_name()
        if dev == "cuda"
        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    text = "\n".join(
        [
            f"{measured_on(name)}, fp32; {time.perf_counter() - start:.0f} s.",
            "",
        ]
        + sections
    )
    print(text.splitlines()[0])
    if args.out:
        png = str(Path(args.out).with_suffix(".png"))
        plot(png, f"whole-model speed-up, {name}")
        with open(args.out, "w") as fh:
            fh.write(text + f"\n\n![speed-up against batch size]({Path(png).name})\n")
        refresh()


if __name__ == "__main__":
    main()
