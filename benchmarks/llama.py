"""Compress a LLaMA-style decoder (random weights, plain torch) with calibration: time and peak memory.

    python benchmarks/llama.py [--quick] [--preset 1b|600m|bert-base|tiny] [--mode sequential|original]

The model is written here in plain torch so that torch.fx traces it (RMSNorm, rotary embeddings,
grouped-query attention through ``F.scaled_dot_product_attention``, SwiGLU feed-forward); ``--preset 1b``
has TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 key/value heads, feed-forward 5632,
vocabulary 32,000); ``350m`` is a smaller one (hidden 1024, 24 layers, feed-forward 2816). ``bert-base`` is an
encoder of BERT-base's size (12 layers, hidden 768, GELU feed-forward 3072, 109 M parameters) whose 24
feed-forward Linears are compressed. Every run is a fresh process: the model is
built, then compressed **in place** (``inplace=True``: no copy of the weights) with C16 rank 1 (on every
projection of every block of the decoders), calibrated on random token batches. Reported:
wall time of ``compress``, the resident memory after building the model and its peak during ``compress``
(``resource.getrusage`` ru_maxrss), parameters before and after.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from common import measured_on, publish, rss_mb, table_head
from torch import nn

import gmcompress as gm

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Config:
    vocab: int = 32000
    hidden: int = 2048
    layers: int = 22
    heads: int = 32
    kv_heads: int = 4
    ffn: int = 5632
    causal: bool = True  # False: a BERT-style encoder (bidirectional, GELU feed-forward, no LM head)
    compress: str = r"layers\.\d+\..*_proj"  # the Linears compressed (a regex over module names)


PRESETS = {
    "1b": Config(),
    "350m": Config(hidden=1024, layers=24, heads=16, kv_heads=4, ffn=2816),
    "bert-base": Config(
        vocab=30522,
        hidden=768,
        layers=12,
        heads=12,
        kv_heads=12,
        ffn=3072,
        causal=False,
        compress=r"layers\.\d+\.(up|down)_proj",
    ),  # fmt: skip
    "tiny": Config(vocab=1000, hidden=256, layers=2, heads=4, kv_heads=2, ffn=512),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x`` ``(B, heads, T, d)``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Block(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        head = c.hidden // c.heads
        self.c, self.head = c, head
        self.attn_norm, self.ffn_norm = RMSNorm(c.hidden), RMSNorm(c.hidden)
        self.q_proj = nn.Linear(c.hidden, c.heads * head, bias=False)
        self.k_proj = nn.Linear(c.hidden, c.kv_heads * head, bias=False)
        self.v_proj = nn.Linear(c.hidden, c.kv_heads * head, bias=False)
        self.o_proj = nn.Linear(c.heads * head, c.hidden, bias=False)
        if c.causal:
            self.gate_proj = nn.Linear(c.hidden, c.ffn, bias=False)
        self.up_proj = nn.Linear(c.hidden, c.ffn, bias=False)
        self.down_proj = nn.Linear(c.ffn, c.hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, t, self.c.heads, self.head).transpose(1, 2)
        k = self.k_proj(h).view(b, t, self.c.kv_heads, self.head).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.c.kv_heads, self.head).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        repeat = self.c.heads // self.c.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.c.causal)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, -1))
        h = self.ffn_norm(x)
        inner = F.silu(self.gate_proj(h)) * self.up_proj(h) if self.c.causal else F.gelu(self.up_proj(h))
        return x + self.down_proj(inner)


class Llama(nn.Module):
    """Token ids ``(B, T)`` -> logits ``(B, T, vocab)``."""

    def __init__(self, c: Config, max_len: int = 2048) -> None:
        super().__init__()
        self.embed = nn.Embedding(c.vocab, c.hidden)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.hidden)
        self.lm_head = nn.Linear(c.hidden, c.vocab, bias=False) if c.causal else nn.Identity()
        head = c.hidden // c.heads
        freq = 10000.0 ** (-torch.arange(0, head, 2).float() / head)
        angles = torch.outer(torch.arange(max_len).float(), freq).repeat(1, 2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        positions = torch.arange(ids.shape[1], device=ids.device)
        cos, sin = F.embedding(positions, self.cos), F.embedding(positions, self.sin)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def build(c: Config, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(c).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    return model


def run_one(preset: str, mode: str, batches: int, batch: int, seq: int) -> dict:
    """Build and compress one model in this process; the measurements as a dict."""
    c = PRESETS[preset]
    model = build(c)
    params_before = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    calibration = [torch.randint(0, c.vocab, (batch, seq), generator=gen) for _ in range(batches)]
    rss_model = rss_mb()
    kwargs = dict(group="C16", rank=1, include=c.compress, inplace=True, progress=False)
    if "calibration_mode" in inspect.signature(gm.compress).parameters:
        kwargs["calibration_mode"] = mode
    start = time.perf_counter()
    out = gm.compress(model, calibration=calibration, **kwargs)
    seconds = time.perf_counter() - start
    rep = out.gm_report
    fitted = sum(r.params_before for r in rep.compressed)
    return dict(
        preset=preset, mode=mode if "calibration_mode" in kwargs else "original (all rows kept)",
        params=params_before, layers=len(rep.compressed), weights=fitted, params_after=rep.params_after,
        tokens=batches * batch * seq, seconds=seconds, rss_model_mb=rss_model,
        peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, config=asdict(c),
        output_error=_mean([r.output_error for r in rep.compressed]), traced=rep.traced,
    )  # fmt: skip


def _load() -> str:
    """The 1-minute load average at the end (other jobs on the machine slow a run down)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "unknown"


def _mean(values: list[float | None]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def child(args: list[str]) -> dict:
    """Run one configuration in a fresh process (its ru_maxrss is its own)."""
    cmd = [sys.executable, __file__, "--child", *args]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> list[str]:
    header = (
        "| model | parameters | calibration | mode | compressed Linears (weights) | compress s | weights/s | "
        "RSS after build GB | peak RSS GB | mean calib output err |"
    )
    lines = table_head(header)
    for r in rows:
        rate = r["weights"] / r["seconds"] / 1e6
        lines.append(
            f"| {r['preset']} | {r['params'] / 1e6:,.0f} M | {r['tokens']:,} tokens | {r['mode']} | "
            f"{r['layers']} ({r['weights'] / 1e6:,.0f} M) | {r['seconds']:.1f} | {rate:.2f} M | "
            f"{r['rss_model_mb'] / 1024:.2f} | {r['peak_mb'] / 1024:.2f} | {r['output_error']:.3f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny preset only (CI smoke run)")
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS), help="default: 1b")
    parser.add_argument("--mode", action="append", choices=["sequential", "original"], help="default: sequential")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "llama.md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    presets = ["tiny"] if args.quick else args.preset or ["1b"]
    modes = args.mode or ["sequential"]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_one(presets[0], modes[0], args.batches, args.batch, args.seq)))
        return
    common = ["--batches", str(args.batches), "--batch", str(args.batch), "--seq", str(args.seq)]
    common += ["--threads", str(args.threads)] if args.threads else []
    rows = [child(["--preset", p, "--mode", m, *common]) for p in presets for m in modes]
    text = "\n".join(
        [
            f"{measured_on()}; C16 rank 1, random weights, compress(inplace=True); load average {_load()}.",
            "",
            *table(rows),
        ]
    )
    publish(text, args.out, args.quick)


if __name__ == "__main__":
    main()
