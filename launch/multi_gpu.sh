#!/usr/bin/env bash
# Cert-SSB on one machine with several GPUs: ONE process that drives every visible GPU (the ensemble axis of
# each chunk is sharded over them; no jax.distributed needed).
#
#   bash launch/multi_gpu.sh configs/cifar10.py /data/runs/cifar10 0,1,2,3
#
# which runs:
#
#   CUDA_VISIBLE_DEVICES=0,1,2,3 python -m certssb_jax.launch --config=configs/cifar10.py --workdir=/data/runs/cifar10
#
# Leave out the GPU list to use every GPU. Chunks of models are rounded up to a multiple of the GPU count;
# train.models_per_chunk (default: all models, at most 256) bounds the memory per GPU. Rerunning resumes.
set -euo pipefail

CONFIG=${1:?usage: multi_gpu.sh CONFIG WORKDIR [GPU_IDS]}
WORKDIR=${2:?usage: multi_gpu.sh CONFIG WORKDIR [GPU_IDS]}
if [[ -n "${3:-}" ]]; then
  export CUDA_VISIBLE_DEVICES="$3"
fi

exec python -m certssb_jax.launch --config="$CONFIG" --workdir="$WORKDIR"
