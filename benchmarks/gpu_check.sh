#!/usr/bin/env bash
# GPU checks, under 5 minutes on one H100/H200: the tests marked `gpu` (exact statistics with
# TF32 allowed, bf16 inputs, the solver on CUDA, the callback under bf16-mixed with
# layers="all" and exact NC4, a pair fit), then a CIFAR-shaped ResNet-18 trained with and
# without the NeuralCollapseCallback (default probe with its fitted pair; layers="all"),
# printing training samples/s, probe/bare-forward ratios and epoch-time ratios.
#   bash benchmarks/gpu_check.sh            (from a checkout with the package installed)
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -m pytest -q -m gpu tests
python benchmarks/gpu_epoch.py --samples 50000 --epochs 3
