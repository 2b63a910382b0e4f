"""Forward latency of GMLinear against a dense nn.Linear, measured in the same run.

    python benchmarks/layers.py [--quick] [--device cuda]

CPU (default, fp32): n in {1024, 4096} (square layers), groups C16, C64, D8, rank 1 and 2, batch 1
and 64; eval mode under ``torch.inference_mode`` (the layer caches its block weights, as in
deployment). ``--device cuda`` runs the GPU setting instead: n = 8192, C16, batch 16384, bf16 and fp32
(TF32 off), against ``x @ W.T``. Prints a markdown table of ratios (dense time / GM time) and
parameter ratios; ``--out`` also writes it to a file.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import measured_on
from readme import refresh
from torch.utils import benchmark

from gmcompress.nn import GMLinear


def timed(stmt: str, min_run_time: float, **env) -> float:
    return benchmark.Timer(stmt, globals=env).blocked_autorange(min_run_time=min_run_time).median


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
                        layer(x)  # build the eval cache
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n=4096, C16, rank 1 only (under a minute)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    min_run_time = 0.2 if args.quick else 0.5
    start = time.perf_counter()
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
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        refresh()


if __name__ == "__main__":
    main()
