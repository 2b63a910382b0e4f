"""Compression under a budget: per-layer groups and ranks chosen by ``gm.Budget``, against uniform choices.

    python benchmarks/budget.py [--quick] [--only mlp|mnist|minilm] [--threads N]

* ``mlp``: a 3-layer, 2048-wide MLP (random weights, Gaussian calibration rows), ``Budget(speedup=3.0)``
  with example batches of 32 rows; the speed-up is measured (``torch.utils.benchmark``, before and after in
  one run). Beside it the equal-latency comparison: truncated SVD at the rank whose measured latency
  matches the budgeted GM model, compared on the model's output error.
* ``mnist``: ccexam's MNISTNet, ``Budget(speedup=2.0)`` on its example batch of 64 digits, then the
  fine-tuning of ``recipes/mnistnet.yaml`` (2 epochs); accuracy on the held-out digits. A budget that no
  choice meets is reported with the closest achievable speed-up it names.
* ``minilm``: all-MiniLM-L6-v2's 12 feed-forward Linears at ``Budget(params=4.0)`` against the uniform
  choices of the same size (C4 r1, C8 r2, C16 r4, all with calibration) and truncated SVD / magnitude
  pruning at 4x fewer weights per layer; mean sentence-embedding cosine on held-out Lee sentences before
  and after the distillation of ``benchmarks/compression.py`` (1 epoch over 512 sentences, lr 5e-4).
Writes ``benchmarks/results/budget.md`` and ``budget_minilm.png`` (the error-against-size frontier).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

import gmcompress as gm
from gmcompress import zoo
from gmcompress.measure.timing import measure_latency

sys.path.insert(0, str(Path(__file__).parent))
from baselines import replace_layers  # noqa: E402
from common import measured_on, publish, table_head  # noqa: E402

RESULTS = Path(__file__).parent / "results"
FFN = r"bert\.encoder\.layer\.\d+\.(intermediate|output)\.dense"
FFN_QUICK = r"bert\.encoder\.layer\.0\.(intermediate|output)\.dense"  # --quick: block 0 only, C4 and C8


def layer_weights(model: nn.Module, names: list[str]) -> int:
    """Parameters of the named layers (weights, modulations and biases)."""
    return sum(p.numel() for n in names for p in model.get_submodule(n).parameters())


def output_error(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = reference(x)
        return float((model(x) - ref).norm() / ref.norm())


# ---------------------------------------------------------------------------------------------------- mlp
def mlp_section(quick: bool) -> list[str]:
    width, batch = (512, 32) if quick else (2048, 32)
    torch.manual_seed(0)
    net = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(width, width), nn.ReLU())][:-1]).eval()
    gen = torch.Generator().manual_seed(1)
    calibration = [torch.randn(256, width, generator=gen) for _ in range(4)]
    x = torch.randn(batch, width, generator=gen)
    target = 1.2 if quick else 3.0
    start = time.perf_counter()
    title = f"### 3-layer {width}-wide MLP, `Budget(speedup={target:g})`, batch {batch}"
    try:
        model = gm.compress(net, budget=gm.Budget(speedup=target), calibration=calibration, example_inputs=x)
    except gm.BudgetError as err:  # timings decide what is reachable; a noisy machine may not reach it
        return [title, "", f"Not met: `{err}`", ""]
    seconds = time.perf_counter() - start
    rep = model.gm_report
    before, after = measure_latency(net, x), measure_latency(model, x)
    gm_err = output_error(model, net, calibration[0])
    names = ["0", "2", "4"]
    lines = [
        title,
        "",
        f"Plan and fits {seconds:.0f} s. {rep.budget}.",
        "",
        *table_head("| layer | choice | path | params | calib out err |"),
    ]
    for r in rep.layers:
        choice = f"{r.group} r{r.rank}" if r.form else "dense"
        lines.append(f"| {r.name} | {choice} | {r.path or 'dense'} | {r.params_after:,} | {_f(r.output_error)} |")
    lines += [
        "",
        f"Measured: {before:.3f} ms -> {after:.3f} ms, **{before / after:.2f}x** (asked {target:g}x, "
        f"{'met' if before / after >= target else 'NOT met'}); model output error {gm_err:.3f}; layer parameters "
        f"{layer_weights(net, names):,} -> {layer_weights(model, names):,}.",
        "",
        *equal_latency(net, model, names, x, calibration[0], after, gm_err),
    ]
    return lines


def equal_latency(net, gm_model, names, x, probe, gm_ms, gm_err) -> list[str]:
    """Truncated SVD at the largest uniform rank whose measured latency is at most the GM model's."""
    width = net[0].in_features
    best = None
    for k in sorted({max(width >> s, 1) for s in range(1, 12)}, reverse=True):
        svd = replace_layers(net, names, {n: k * 2 * width for n in names}, "svd")
        ms = measure_latency(svd, x)
        if ms <= gm_ms:
            best = (k, ms, output_error(svd, net, probe), layer_weights(svd, names))
            break
    lines = [*table_head("| model | latency ms | layer params | model output error |")]
    lines.append(f"| GM budget | {gm_ms:.3f} | {layer_weights(gm_model, names):,} | {gm_err:.3f} |")
    if best is None:
        lines.append("| truncated SVD | - | - | no rank is as fast as the GM model |")
    else:
        k, ms, err, params = best
        lines.append(f"| truncated SVD rank {k} (equal latency) | {ms:.3f} | {params:,} | {err:.3f} |")
    return ["Equal latency: GM budget against truncated SVD at the largest rank at most as slow.", "", *lines]


# -------------------------------------------------------------------------------------------------- mnist
def mnist_section(quick: bool) -> list[str]:
    net = zoo.mnistnet()
    x = zoo.mnist_example_inputs()
    target = 2.0
    lines = [f"### MNISTNet, `Budget(speedup={target:g})` on its example batch ({x.shape[0]} digits)", ""]
    try:
        model = gm.compress(
            net, budget=gm.Budget(speedup=target), calibration=zoo.mnist_calibration(), example_inputs=x
        )
    except gm.BudgetError as err:
        lines += [f"Not met: `{err}`", "", *amdahl(net, x), ""]
        target = math.floor(err.closest * 100) / 100
        if quick or target < 1.01:
            return lines + ["No compressed choice is faster than the dense model here: nothing to fine-tune.", ""]
        lines += [f"Rerun at the closest achievable: `Budget(speedup={target:g})`.", ""]
        model = gm.compress(
            net, budget=gm.Budget(speedup=target), calibration=zoo.mnist_calibration(), example_inputs=x
        )
    rep = model.gm_report
    before = zoo.mnist_accuracy(model)["accuracy"]
    data = zoo.mnist_augmented(copies=1)
    if quick:
        data = torch.utils.data.TensorDataset(*data[:512])
    gm.finetune(model, net, data, epochs=2, lr=5e-3, batch_size=128, loss="mix", progress=False, device="cpu")
    after = zoo.mnist_accuracy(model)["accuracy"]
    speed = rep.latency_before_ms / rep.latency_after_ms
    return lines + [
        f"{rep.budget}. Measured {rep.latency_before_ms:.3f} -> {rep.latency_after_ms:.3f} ms (**{speed:.2f}x**); "
        f"accuracy 1.0000 -> {before:.4f} before fine-tuning -> {after:.4f} after 2 epochs.",
        "",
    ]


def amdahl(net: nn.Module, x: torch.Tensor) -> list[str]:
    """The model's latency with every compressible layer made free (replaced by a stub returning zeros)."""
    import copy

    from gmcompress.graph.fx import swap

    names = [r.name for r in gm.plan(net, "C2").layers if r.form]
    shapes = {}
    with torch.no_grad():
        hooks = [
            net.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: shapes.__setitem__(n, o.shape))
            for n in names
        ]
        net(x)
        for h in hooks:
            h.remove()
    free = copy.deepcopy(net)
    for n in names:
        swap(free, n, _Zeros(shapes[n]))
    full, rest = measure_latency(net, x), measure_latency(free, x)
    return [
        f"Bound: {full:.3f} ms as is, {rest:.3f} ms with the {len(names)} compressible layers ({', '.join(names)}) "
        f"replaced by stubs that cost nothing: no choice of these layers can make the model more than "
        f"**{full / rest:.2f}x** faster (the first conv has one input channel, so no channel group applies; it, "
        "the ReLUs and the max-pools stay)."
    ]


class _Zeros(nn.Module):
    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(self.shape)


# ------------------------------------------------------------------------------------------------- minilm
def minilm_section(quick: bool) -> list[str]:
    teacher = zoo.minilm()
    blocks = 1 if quick else 6
    names = [f"bert.encoder.layer.{i}.{part}.dense" for i in range(blocks) for part in ("intermediate", "output")]
    include = FFN_QUICK if quick else FFN
    budget_4x = gm.Budget(params=4.0, groups=("C4", "C8"), max_rank=2) if quick else gm.Budget(params=4.0, groups="C")
    calibration = zoo.minilm_calibration(batches=1 if quick else 4)
    train, _ = zoo.split_sentences()
    data = zoo.SentenceDataset(train[:32] if quick else train[:512])
    dense = layer_weights(teacher, names)

    def cosine(model):
        return zoo.minilm_cosine(model, teacher)["cosine"]

    def tune(model):
        gm.finetune(model, teacher, data, epochs=1, lr=5e-4, batch_size=32, loss="cosine", progress=False, device="cpu")

    models = {}
    uniform = [("C4", 1)] if quick else [("C4", 1), ("C8", 2), ("C16", 4)]
    for g, r in uniform:
        models[f"GM uniform {g} r{r}"] = gm.compress(teacher, g, r, include=include, calibration=calibration)
    start = time.perf_counter()
    the_plan = gm.plan(teacher, budget=budget_4x, include=include, calibration=calibration)
    plan_seconds = time.perf_counter() - start
    recipe = the_plan.budget.to_recipe()  # the allocation, without measuring the options a second time
    models["GM budget params=4"] = gm.compress(teacher, recipe=recipe, calibration=calibration)
    budget = {n: teacher.get_submodule(n).weight.numel() // 4 for n in names}
    if not quick:
        models["truncated SVD 4x"] = replace_layers(teacher, names, budget, "svd")
        models["magnitude pruning 4x"] = replace_layers(teacher, names, budget, "prune")
    rows = []
    for label, model in models.items():
        params = layer_weights(model, names)
        before = cosine(model)
        tune(model)
        after = cosine(model)
        rows.append(f"| {label} | {params:,} | {dense / params:.2f}x | {before:.4f} | {after:.4f} |")
        print(rows[-1], flush=True)
    out = the_plan.budget
    if not quick:
        uniform_points = {}  # the uniform choices, predicted from the same measured options
        for g, r in uniform:
            chosen = [next(o for o in lo.options if o.label == f"{g} r{r}") for lo in out.layers]
            err = sum(o.model_error**2 for o in chosen) ** 0.5
            uniform_points[f"GM uniform {g} r{r}"] = (dense / sum(o.params for o in chosen), err)
        out.plot(RESULTS / "budget_minilm.png", uniform=uniform_points)
    return [
        f"### all-MiniLM-L6-v2, {len(names)} feed-forward Linears, `Budget(params=4.0)`",
        "",
        f"Budget plan {plan_seconds:.0f} s ({sum(len(lo.options) - 1 for lo in out.layers)} options fitted). "
        f"{out.summary()}.",
        "",
        "```",
        out.table(),
        "```",
        "",
        *table_head("| model | FFN parameters | ratio | cosine before FT | cosine after FT |"),
        *rows,
        "",
        f"Fine-tuning: 1 epoch over {len(data):,} Lee sentences, AdamW lr 5e-4, cosine loss (as compression.py). "
        f"Calibration: {len(calibration)} batches of 32 sentences.",
        "",
        "![error against size](budget_minilm.png)",
        "",
    ]


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


SECTIONS = {"mlp": mlp_section, "mnist": mnist_section, "minilm": minilm_section}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (CI smoke run)")
    parser.add_argument("--only", choices=sorted(SECTIONS))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    lines = []
    for name, section in SECTIONS.items():
        if args.only in (None, name):
            lines += section(args.quick)
    head = [f"{measured_on()}; {(time.perf_counter() - start) / 60:.1f} min.", ""]
    name = f"budget_{args.only}.md" if args.only else "budget.md"
    publish("\n".join(head + lines), RESULTS / name, args.quick)


if __name__ == "__main__":
    main()
