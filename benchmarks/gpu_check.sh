#!/usr/bin/env bash
# GPU checks, under 5 minutes on one H100/H200: the tests marked `gpu` (exact statistics with
# TF32 allowed, bf16 inputs, the solver on CUDA, the callback under bf16-mixed with
# layers="all" and exact NC4, a pair fit), then a CIFAR-shaped ResNet-18 trained with and
# without the NeuralCollapseCallback (default probe with its fitted pair; layers="all"),
# printing training samples/s, probe/bare-forward ratios and epoch-time ratios.
# Last, the projected wall time of the 350-epoch ResNet-18/CIFAR-10 protocol with a probe
# every epoch (50,000-sample train probe with its pair fit; layers="all" every 10 epochs).
#   bash benchmarks/gpu_check.sh            (from a checkout with the package installed)
#   bash benchmarks/gpu_check.sh --cpu      (no GPU: the python parts, tiny sizes, on CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
if [[ "${1:-}" == "--cpu" ]]; then
  python benchmarks/gpu_epoch.py --accelerator cpu --samples 256 --epochs 2 --workers 0 \
    --batch-size 64 --probe-batch-size 128
  python benchmarks/scale.py --quick
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -m pytest -q -m gpu tests
python benchmarks/scale.py --quick
python benchmarks/gpu_epoch.py --samples 50000 --epochs 3
