# CUDA-capable image: PyPI's Linux torch wheels bundle CUDA, so `pip install .` gives a GPU
# build on x86-64 hosts. The install step is the one .ci/run exercises (pip install from the
# source tree). Run with GPUs:  docker run --gpus all -v $PWD/runs:/work/runs nclightning \
#   nclightning fit --config resnet18_cifar10.yaml --data.init_args.root /data
# A CPU-only image (torch without the CUDA libraries):
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t nclightning .
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

ARG TORCH_INDEX=

WORKDIR /opt/nclightning
COPY pyproject.toml README.md ./
COPY nclightning ./nclightning
RUN python -m pip install --upgrade pip \
    && if [ -n "$TORCH_INDEX" ]; then \
        python -m pip install torch torchvision --index-url "$TORCH_INDEX"; fi \
    && python -m pip install .

# Runs (CSV logs, checkpoints, W&B offline runs) are written under /work/runs.
WORKDIR /work
CMD ["nclightning", "fit", "--config", "digits_mlp.yaml"]
