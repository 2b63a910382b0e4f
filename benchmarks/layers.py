"""Forward latency of GMLinear and GMChannelConv against the dense layers, measured in the same run.

    python benchmarks/layers.py [--quick] [--device cuda]

CPU (default, fp32, all the process's threads): GMLinear for n in {1024, 4096} (square layers), groups
C16, C64, D8, rank 1 and 2, batch 1 and 64, and the batch-1 read time of its parameters (the memory
limit); GMChannelConv for a 3x3 Conv2d 256 -> 256 on (8, 256, 28, 28) (C8, C16), a 1x1 Conv2d
384 -> 1536 on (8, 384, 14, 14) (C8), MNISTNet's 32 -> 64 3x3 conv at batch 64 and ResNet-18's 64 -> 64 3x3
conv on (8, 64, 56, 56) (C8), each path (dense, grouped: Gauss's products, packed),
with the MAC-limited speed-up (dense MACs / GM MACs) beside the measured one. Eval mode under
``torch.inference_mode``; a GM layer derives the weights its path multiplies from its parameters on every call
(nothing is cached). ``--device cuda`` runs the
GPU setting instead: n = 8192, C16, batch 16384, bf16 and fp32 (TF32 off), against ``x @ W.T``.
Prints markdown tables; ``--out`` also writes them to a file.

``--shapes``: the feed-forward table instead: GMLinear (rank 1, blocks path) on the MiniLM / BERT / LLaMA feed-forward
shapes at 1, 32 and 512 rows with C8, C16 and D8, against ``nn.Linear`` and against a truncated-SVD pair of Linears
with the same number of parameters, with the MAC-limited speed-up (dense MACs / GM MACs) beside the measured one,
and the path's function called directly on the layer's tensors (the layer's forward should be within about 1 us
of it).
``--threads N`` sets torch's threads; ``--compile`` adds the block path's function under ``torch.compile``.

``--direct-rows`` (``results/layers_direct_rows_cpu.md``): GMLinear's block path at 1 to 64 rows, rank 1, in its two
forms, Gauss's derived weights against the stored spectrum read directly (``gmcompress.nn.linear.DIRECT_ROWS``
picks the second up to that many rows), and ``nn.Linear``, in the same interleaved rounds.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
from common import ROUNDS, interleaved, measured_on, steady_allocator
from readme import refresh
from torch.utils import benchmark

from gmcompress.measure.timing import settle_allocator
from gmcompress.nn import GMLinear


def time_path(layer: torch.nn.Module, impl: str, x: torch.Tensor, min_run_time: float, sync: str = "") -> float:
    """``layer(x)`` on path ``impl`` (setting it converts the stored kernels to that path's form)."""
    layer.impl = impl
    layer(x)
    return timed("f(x)" + sync, min_run_time, f=layer, x=x, torch=torch)


def blocks_function(layer: GMLinear, x: torch.Tensor) -> partial:
    """GMLinear's block path as its functions called directly on the layer's tensors (up to ``DIRECT_ROWS`` rows
    the products on the stored spectrum itself, else Gauss's products on the spectrum and its pair sums; the bias):
    what ``forward`` adds to it is the module's own overhead."""
    from gmcompress.nn.functional import blocks_forward, direct_forward, spectrum_forward

    impl = layer.resolved_impl()
    q_in, q_out = (layer._q_packed, layer._q_packed) if impl == "packed" else (layer._q_in, layer._q_out)
    if impl == "blocks" and layer.reads_spectrum(x.shape[0]):
        q_in, q_out, spectrum = layer._q_direct_in, layer._q_direct_out, layer.spectrum
        return lambda: direct_forward(x, q_in, q_out, spectrum, layer.modulations, layer.c_out, layer.bias)
    if impl == "blocks" and layer.stored_form == "spectrum":
        spectrum, pairs = layer.spectrum, layer._n_pairs
        return lambda: spectrum_forward(x, q_in, q_out, spectrum, pairs, layer.modulations, layer.c_out, layer.bias)

    def run() -> torch.Tensor:
        return blocks_forward(x, q_in, q_out, layer._block_weights(impl), layer.modulations, layer.c_out, layer.bias)

    return run


def timed(stmt: str, min_run_time: float, **env) -> float:
    settle_allocator()
    timer = benchmark.Timer(stmt, globals=env, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


CONV_CASES = [  # (label, conv, input shape, group)
    ("3x3 Conv2d 256 -> 256", lambda: torch.nn.Conv2d(256, 256, 3, padding=1), (8, 256, 28, 28), "C8"),
    ("3x3 Conv2d 256 -> 256", lambda: torch.nn.Conv2d(256, 256, 3, padding=1), (8, 256, 28, 28), "C16"),
    ("1x1 Conv2d 384 -> 1536", lambda: torch.nn.Conv2d(384, 1536, 1), (8, 384, 14, 14), "C8"),
    ("MNISTNet 3x3 Conv2d 32 -> 64", lambda: torch.nn.Conv2d(32, 64, 3, padding=1), (64, 32, 14, 14), "C8"),
    ("ResNet-18 3x3 Conv2d 64 -> 64", lambda: torch.nn.Conv2d(64, 64, 3, padding=1), (8, 64, 56, 56), "C8"),
]


def conv_lines(quick: bool, min_run_time: float, device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[str]:
    """GMChannelConv (rank 1) against nn.Conv2d in both memory formats: each path, and the MAC-limited speed-up."""
    from gmcompress.nn import GMChannelConv

    sync = "; torch.cuda.synchronize()" if device == "cuda" else ""
    lines = [
        "| layer | input | layout | group | dtype | dense us | GM dense-path us | GM grouped us | GM packed us "
        "| speed-up | MAC limit | param ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, build, shape, spec in CONV_CASES[:1] if quick else CONV_CASES:
        torch.manual_seed(0)
        conv, x0 = build().eval(), torch.randn(shape)
        layer = GMChannelConv.from_dense(conv, spec).eval().to(device, dtype)
        conv, x0 = conv.to(device, dtype), x0.to(device, dtype)
        for layout, fmt in [("NCHW", torch.contiguous_format), ("channels-last", torch.channels_last)]:
            x = x0.contiguous(memory_format=fmt)
            conv = conv.to(memory_format=fmt)

            with torch.inference_mode():
                timers = {"original": partial(timed, "f(x)" + sync, min_run_time, f=conv, x=x, torch=torch)}
                for impl in layer.impls():
                    timers[impl] = partial(time_path, layer, impl, x, min_run_time, sync)
                times = interleaved(timers)
                t_dense = times.pop("original")
                out = conv(x)
            layer.impl = "grouped"  # the MAC limit of the grouped path
            limit = conv.weight.numel() / (layer.macs(x, out) / (out.numel() // out.shape[1]))
            params = conv.weight.numel() / layer.num_structured_parameters
            best = min(times.values())
            packed = f"{times['packed'] * 1e6:.0f}" if "packed" in times else "-"  # groups with a Gauss form
            lines.append(
                f"| {label} | {tuple(shape)} | {layout} | {spec} | {str(dtype).removeprefix('torch.')} | "
                f"{t_dense * 1e6:.0f} | {times['dense'] * 1e6:.0f} | {times['grouped'] * 1e6:.0f} | {packed} | "
                f"{t_dense / best:.2f}x | {limit:.1f}x | {params:.1f}x |"
            )
    return lines


def conv_lines_fresh(quick: bool, threads: int | None) -> list[str]:
    """:func:`conv_lines` on the CPU in a fresh process. A process's allocation history moves these timings:
    measured, after the GMLinear rows in the same process the grouped convolutions ran 15-30% slower
    (3x3 C8 3.13x, 1x1 1.21x) than in a process of their own (3.62x, 1.59x), the dense ones barely."""
    command = [sys.executable, __file__, "--convs"] + (["--quick"] if quick else [])
    command += ["--threads", str(threads)] if threads else []
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()


def compiled_batch1_line(min_run_time: float) -> str:
    """CUDA, batch 1: GMLinear 8192 (C16) eager, and under torch.compile(mode="reduce-overhead") (CUDA graphs)."""
    layer = GMLinear(8192, 8192, "C16", device="cuda", dtype=torch.bfloat16).eval()
    dense = torch.nn.Linear(8192, 8192, device="cuda", dtype=torch.bfloat16).eval()
    x = torch.randn(1, 8192, device="cuda", dtype=torch.bfloat16)
    sync = "f(x); torch.cuda.synchronize()"
    with torch.inference_mode():
        layer(x)
        t_eager = timed(sync, min_run_time, f=layer, x=x, torch=torch)
        t_dense = timed(sync, min_run_time, f=dense, x=x, torch=torch)
    line = f"Batch 1, bf16, GMLinear 8192 C16: dense {t_dense * 1e6:.0f} us, GM eager {t_eager * 1e6:.0f} us, "
    try:  # compiled under no_grad: torch 2.11's dynamo failed its own guard under inference_mode
        with torch.no_grad():
            compiled = torch.compile(layer, mode="reduce-overhead")
            for _ in range(3):
                compiled(x)
            t_graph = timed(sync, min_run_time, f=compiled, x=x, torch=torch)
    except Exception as err:  # a compiler bug must not cost the tables above
        return line + f"GM torch.compile failed on torch {torch.__version__}: {type(err).__name__}."
    return line + f"GM torch.compile(reduce-overhead, CUDA graphs) {t_graph * 1e6:.0f} us."


def read_time_line(min_run_time: float) -> str:
    """GMLinear n = 4096, C16, rank 1 at batch 1 against the time to read its parameters once."""
    layer = GMLinear(4096, 4096, "C16").eval()
    x = torch.randn(1, 4096)
    with torch.inference_mode():
        layer(x)
        t_gm = timed("f(x)", min_run_time, f=layer, x=x)
        params = torch.cat([p.reshape(-1) for p in layer.parameters()])
        t_read = timed("p.sum()", min_run_time, p=params)
        # the floor of any path made of the library's products: one matrix-vector product over the same bytes
        matrix, vector = params.view(-1, 1024), torch.randn(1024)  # 1,056,768 = 1032 x 1024
        t_mv = timed("torch.mv(a, v)", min_run_time, torch=torch, a=matrix, v=vector)
    return (
        f"GMLinear 4096 -> 4096, C16 rank 1, batch 1: {t_gm * 1e6:.0f} us; reading its {params.numel():,} parameters "
        f"once ({params.numel() * 4 / 2**20:.1f} MiB, `sum`): {t_read * 1e6:.0f} us; ratio {t_gm / t_read:.1f}x "
        f"(target: within 2x). At one row the block products multiply by the stored spectrum itself (each weight "
        f"read once, nothing derived). A dense matrix-vector product (`torch.mv`) over the same {params.numel():,} "
        f"floats takes {t_mv * 1e6:.0f} us, {t_mv / t_read:.1f}x the read: the floor of a path built on the "
        f"library's products."
    )


def _row(
    device: str,
    dtype: str,
    n: int,
    spec: str,
    rank: int,
    batch: int,
    layer: GMLinear,
    t_dense: float,
    t_gm: float,
    weight: torch.Tensor,
) -> dict:
    return dict(
        device=device,
        dtype=dtype,
        n=n,
        group=spec,
        rank=rank,
        batch=batch,
        impl=layer.resolved_impl(),
        dense_us=t_dense * 1e6,
        gm_us=t_gm * 1e6,
        params=weight.numel() / layer.num_structured_parameters,
    )


def cpu_rows(quick: bool, min_run_time: float) -> list[dict]:
    sizes = [4096] if quick else [1024, 4096]
    specs = ["C16"] if quick else ["C16", "C64", "D8"]
    ranks = [1] if quick else [1, 2]
    rows = []
    for n in sizes:
        dense = torch.nn.Linear(n, n).eval()
        for batch in [1, 64]:
            x = torch.randn(batch, n)
            with torch.inference_mode():
                t_dense = timed("f(x)", min_run_time, f=dense, x=x)
                for spec in specs:
                    for rank in ranks:
                        layer = GMLinear(n, n, spec, rank=rank).eval()
                        layer(x)
                        t_gm = timed("f(x)", min_run_time, f=layer, x=x)
                        rows.append(_row("cpu", "fp32", n, spec, rank, batch, layer, t_dense, t_gm, dense.weight))
    return rows


def cuda_rows(quick: bool, min_run_time: float) -> list[dict]:
    n, batch, spec = 8192, 16384, "C16"
    rows = []
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for dtype, label in [(torch.bfloat16, "bf16"), (torch.float32, "fp32 (TF32 off)")]:
        w = torch.randn(n, n, device="cuda", dtype=dtype) / n**0.5
        x = torch.randn(batch, n, device="cuda", dtype=dtype)
        with torch.inference_mode():
            t_dense = timed("x @ w.T; torch.cuda.synchronize()", min_run_time, x=x, w=w, torch=torch)
            for rank in [1] if quick else [1, 2]:
                layer = GMLinear(n, n, spec, rank=rank, bias=False, device="cuda", dtype=dtype).eval()
                layer(x)
                t_gm = timed("f(x); torch.cuda.synchronize()", min_run_time, f=layer, x=x, torch=torch)
                rows.append(_row(torch.cuda.get_device_name(), label, n, spec, rank, batch, layer, t_dense, t_gm, w))
    return rows


SHAPES = [(384, 1536), (1536, 384), (768, 3072), (3072, 768), (4096, 4096), (4096, 11008)]


def shape_lines(quick: bool, min_run_time: float, compiled: bool = False) -> list[str]:
    """GMLinear (blocks) vs dense vs equal-parameter low rank, per shape, rows and group; with
    ``compiled``, also the block path's function (``blocks_forward`` plus the bias) under ``torch.compile``."""
    import torch.nn.functional as F

    shapes = SHAPES[:2] if quick else SHAPES
    head = (
        "| layer | rows | group | dense us | GM us | path function us | forward - function us | "
        "low rank us (equal params) | speed-up | MAC limit | share of limit | GM / low rank |"
        + (" compiled GM us | compiled speed-up | compiled share |" if compiled else "")
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for fin, fout in shapes:
        for group in ("C8", "C16", "D8"):
            torch.manual_seed(0)
            dense = torch.nn.Linear(fin, fout).eval()
            layer = GMLinear(fin, fout, group, 1, impl="blocks").eval()
            k = max(1, sum(p.numel() for p in layer.parameters()) // (fin + fout))
            a, b = torch.randn(k, fin) / fin**0.5, torch.randn(fout, k) / k**0.5
            for rows in (1, 32, 512):
                x = torch.randn(rows, fin)
                limit = fin * fout * rows / layer.macs(x, None)  # the products as they run at this many rows
                with torch.inference_mode():
                    layer(x)
                    best = interleaved(
                        {
                            "dense": partial(timed, "f(x)", min_run_time, f=dense, x=x),
                            "gm": partial(timed, "f(x)", min_run_time, f=layer, x=x),
                            "function": partial(timed, "f()", min_run_time, f=blocks_function(layer, x)),
                            "low": partial(timed, "F.linear(F.linear(x, a), b)", min_run_time, F=F, x=x, a=a, b=b),
                        }
                    )
                    t_dense, t_gm, t_function, t_low = best["dense"], best["gm"], best["function"], best["low"]
                speed = t_dense / t_gm
                lines.append(
                    f"| {fin} -> {fout} | {rows} | {group} | {t_dense * 1e6:.0f} | {t_gm * 1e6:.0f} | "
                    f"{t_function * 1e6:.0f} | {(t_gm - t_function) * 1e6:.1f} | {t_low * 1e6:.0f} | {speed:.2f}x | "
                    f"{limit:.1f}x | {speed / limit:.0%} | {t_gm / t_low:.1f}x |"
                )
                if compiled:  # the block path's function under torch.compile (inductor), on the layer's tensors
                    from gmcompress.nn.functional import blocks_forward

                    torch._dynamo.reset()  # one shape at a time: no recompile limit, no stale guards
                    fast = torch.compile(blocks_forward, dynamic=False)
                    with torch.inference_mode():
                        args = (
                            x,
                            layer._q_in,
                            layer._q_out,
                            layer._block_weights(),
                            layer.modulations,
                        )
                        fast(*args, layer.c_out)
                        t_comp = timed("f(*a, c) + bias", min_run_time, f=fast, a=args, c=layer.c_out, bias=layer.bias)
                    c_speed = t_dense / t_comp
                    lines[-1] += f" {t_comp * 1e6:.0f} | {c_speed:.2f}x | {c_speed / limit:.0%} |"
                print(lines[-1], flush=True)
    return lines


def forward_overhead_line(rounds: int = 15) -> str:
    """What GMLinear's forward adds to its path's function, measured with the path's functions replaced by a stub
    that returns at once (the end-to-end difference in the table is within the timing noise of the products):
    the forward's own Python, at 1 row (the spectrum read directly) and 32 (Gauss's products), and what
    ``nn.Module.__call__`` adds on top of it, beside the same for ``nn.Linear``. Sub-microsecond differences: the
    best of ``rounds`` interleaved rounds of 20,000 calls each (a median carries the machine's noise)."""
    import timeit
    from unittest import mock

    import gmcompress.nn.linear as linear_module

    layer, dense = GMLinear(384, 1536, "C8", 1, impl="blocks").eval(), torch.nn.Linear(384, 1536).eval()
    out = torch.empty(0)

    def stub(*args: object) -> torch.Tensor:
        return out

    args = (layer._q_in, layer._q_out, layer.spectrum, layer._n_pairs, layer.modulations, layer.c_out, layer.bias)
    x1, x32 = torch.randn(1, 384), torch.randn(32, 384)
    calls = {
        "function 1": lambda: stub(x1, *args),
        "forward 1": lambda: layer.forward(x1),
        "call 1": lambda: layer(x1),
        "function 32": lambda: stub(x32, *args),
        "forward 32": lambda: layer.forward(x32),
        "call 32": lambda: layer(x32),
        "linear function": lambda: stub(x1),
        "linear call": lambda: dense(x1),
    }
    best = dict.fromkeys(calls, float("inf"))
    with torch.inference_mode(), mock.patch.object(linear_module, "direct_forward", stub), \
            mock.patch.object(linear_module, "spectrum_forward", stub), \
            mock.patch.object(dense, "forward", stub):  # fmt: skip
        for _ in range(rounds):
            for name, call in calls.items():
                best[name] = min(best[name], timeit.timeit(call, number=20000) / 20000 * 1e6)
    own = [best[f"forward {r}"] - best[f"function {r}"] for r in (1, 32)]
    call = [best[f"call {r}"] - best[f"forward {r}"] for r in (1, 32)]
    return (
        f"GMLinear 384 -> 1536 (C8) forward over its path's function, the functions stubbed: {own[0]:.2f} us at 1 row, "
        f"{own[1]:.2f} us at 32 rows (the forward's own Python); `nn.Module.__call__` adds {call[0]:.2f} / "
        f"{call[1]:.2f} us to it, as it adds {best['linear call'] - best['linear function']:.2f} us to `nn.Linear`."
    )


DIRECT_SHAPES = [(384, 1536, "C8"), (1536, 384, "C8"), (384, 1536, "C16"), (1536, 384, "C16"), (768, 3072, "C8"),
                 (3072, 768, "C16"), (4096, 4096, "C16")]  # fmt: skip
DIRECT_ROW_COUNTS = (1, 2, 4, 8, 16, 32, 64)


def direct_rows_lines(quick: bool, min_run_time: float) -> list[str]:
    """Gauss / direct time ratio of GMLinear's block path per shape and row count (above 1: the direct form is
    faster), with both times and the dense layer's, all in the same interleaved rounds."""
    import gmcompress.nn.linear as linear_module

    head = "| layer | group | " + " | ".join(f"{r} rows: Gauss / direct / dense us" for r in DIRECT_ROW_COUNTS) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    kept = linear_module.DIRECT_ROWS
    for fin, fout, group in DIRECT_SHAPES[:2] if quick else DIRECT_SHAPES:
        torch.manual_seed(0)
        layer, dense = GMLinear(fin, fout, group, 1, impl="blocks").eval(), torch.nn.Linear(fin, fout).eval()
        cells = []
        for rows in DIRECT_ROW_COUNTS:
            x = torch.randn(rows, fin)

            def form(direct: bool, x: torch.Tensor = x, layer: GMLinear = layer) -> float:
                linear_module.DIRECT_ROWS = 10**9 if direct else 0
                try:
                    return timed("f(x)", min_run_time, f=layer, x=x)
                finally:
                    linear_module.DIRECT_ROWS = kept

            with torch.inference_mode():
                best = interleaved(
                    {
                        "gauss": partial(form, False),
                        "direct": partial(form, True),
                        "dense": partial(timed, "f(x)", min_run_time, f=dense, x=x),
                    }
                )
            g, d, n = (best[k] * 1e6 for k in ("gauss", "direct", "dense"))
            cells.append(f"{g:.0f} / {d:.0f} / {n:.0f} ({g / d:.2f}x)")
        lines.append(f"| {fin} -> {fout} | {group} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return lines + ["", f"The block path reads the spectrum directly up to DIRECT_ROWS = {kept} rows."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n=4096, C16, rank 1 only (under a minute)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--shapes", action="store_true", help="the feed-forward shapes against dense and low rank")
    parser.add_argument("--compile", action="store_true", help="with --shapes: also the block path under torch.compile")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--convs", action="store_true", help="only the CPU convolution table (no header)")
    parser.add_argument("--min-run-time", type=float, help="seconds per timing (default 0.5, 0.2 with --quick)")
    parser.add_argument("--direct-rows", action="store_true", help="the block path's two forms by rows (results/)")
    args = parser.parse_args()
    steady_allocator()
    ROUNDS["rounds"] = 1 if args.quick else 3
    if args.threads:
        torch.set_num_threads(args.threads)
    min_run_time = args.min_run_time or (0.2 if args.quick else 0.5)
    start = time.perf_counter()
    if args.convs:
        print("\n".join(conv_lines(args.quick, min_run_time)))
        return
    if args.direct_rows:
        lines = direct_rows_lines(args.quick, min(min_run_time, 0.2))
        text = "\n".join([f"{measured_on()}; {time.perf_counter() - start:.0f} s.", "", *lines])
        out = Path(__file__).parent / "results" / "layers_direct_rows_cpu.md"
        print(text)
        if not args.quick:
            out.write_text(text + "\n")
            refresh()
        return
    if args.shapes:
        lines = shape_lines(args.quick, min_run_time, args.compile)
        lines += ["", forward_overhead_line(3 if args.quick else 15)]
        text = "\n".join([f"{measured_on()}; {time.perf_counter() - start:.0f} s.", "", *lines])
        print(text)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + "\n")
            refresh()
        return
    rows = cuda_rows(args.quick, min_run_time) if args.device == "cuda" else cpu_rows(args.quick, min_run_time)
    header = "| device | dtype | n | group | rank | batch | impl | dense us | GM us | speed-up | param ratio |"
    lines = [
        f"{measured_on()}; {time.perf_counter() - start:.0f} s.",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
    ]
    for r in rows:
        lines.append(
            f"| {r['device']} | {r['dtype']} | {r['n']} | {r['group']} | {r['rank']} | {r['batch']} | "
            f"{r['impl']} | {r['dense_us']:.0f} | {r['gm_us']:.0f} | {r['dense_us'] / r['gm_us']:.1f}x | "
            f"{r['params']:.1f}x |"
        )
    if args.device == "cpu":
        lines += ["", read_time_line(min_run_time), "", "### Convolutions (GMChannelConv, rank 1)", ""]
        lines += conv_lines_fresh(args.quick, args.threads)
    else:  # each table printed as it is done, so a run cut short still shows what it measured
        print("\n".join(lines), flush=True)
        lines += ["", "### Convolutions (GMChannelConv, rank 1)", ""]
        for dtype in (torch.bfloat16, torch.float32):
            lines += conv_lines(args.quick, min_run_time, "cuda", dtype)[0 if dtype == torch.bfloat16 else 2 :]
            print("\n".join(lines[-8:]), flush=True)
        lines += ["", compiled_batch1_line(min_run_time)]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        refresh()


if __name__ == "__main__":
    main()
