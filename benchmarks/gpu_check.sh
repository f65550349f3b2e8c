#!/usr/bin/env bash
# GPU checks, under 5 minutes on one H100: the tests marked `gpu`, then one
# CIFAR-shaped ResNet-18 epoch (bf16 autocast, channels_last) with and without the
# NeuralCollapseCallback, printing samples/s and the callback's overhead ratio.
#   bash benchmarks/gpu_check.sh            (from a checkout with the package installed)
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -m pytest -q -m gpu tests
python benchmarks/gpu_epoch.py --samples 50000 --epochs 2
