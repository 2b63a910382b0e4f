#!/usr/bin/env bash
# Every CUDA table in one run (target: under 8 minutes on one H100/H200): GMLinear (bf16, fp32 with TF32 off),
# GMChannelConv (bf16, fp32), batch 1 eager vs torch.compile with CUDA graphs, and the whole networks
# (MobileNetV2, ResNet-18, MNISTNet, wide MLP, MiniLM). Writes benchmarks/results/*_cuda.md and refreshes
# benchmarks/README.md. Run from the repository root after `bash scripts/setup.sh` (or with the repository on
# PYTHONPATH and ccexam + mlxtend importable; MiniLM is skipped, with a line saying so, without its weights package).
# GPU timings are steady: 0.1 s a timing (the CPU default is 0.3-0.5 s).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
start=$(date +%s)
${PYTHON:-python} benchmarks/layers.py --device cuda --min-run-time 0.1 --out benchmarks/results/layers_cuda.md
echo "== layers: $(( $(date +%s) - start )) s"
${PYTHON:-python} benchmarks/speed.py --device cuda --min-run-time 0.1 --out benchmarks/results/speed_cuda.md
echo "== total: $(( $(date +%s) - start )) s"
