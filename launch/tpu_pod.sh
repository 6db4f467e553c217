#!/usr/bin/env bash
# Cert-SSB on every host of a Cloud TPU VM pod slice: one process per host, all hosts' TPU chips in one mesh.
#
#   bash launch/tpu_pod.sh my-tpu-v4-32 us-central2-b configs/cifar10.py /mnt/shared/runs/cifar10
#
# which runs, on every worker at once:
#
#   gcloud compute tpus tpu-vm ssh my-tpu-v4-32 --zone=us-central2-b --worker=all --command="cd ~/certssb-jax && \
#     python -m certssb_jax.launch --config=configs/cifar10.py --workdir=/mnt/shared/runs/cifar10 --distributed --noprogress"
#
# --distributed makes every process call jax.distributed.initialize(), which reads the coordinator, the number
# of processes and this host's id from the TPU metadata. Process 0 writes the workdir and the other hosts read
# the checkpoints it writes, so WORKDIR must be a POSIX path every worker sees (a Filestore/NFS mount, or a
# gcsfuse mount of a bucket). Rerunning the same command resumes. The repository must be checked out at
# REPO_DIR on every worker (default ~/certssb-jax); SETUP=1 installs it (and jax[tpu]) there first.
set -euo pipefail

TPU_NAME=${1:?usage: tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR}
ZONE=${2:?usage: tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR}
CONFIG=${3:?usage: tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR}
WORKDIR=${4:?usage: tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR}
REPO_DIR=${REPO_DIR:-'~/certssb-jax'}
SETUP=${SETUP:-0}

setup=""
if [[ "$SETUP" == "1" ]]; then
  setup="python3 -m pip install -q -U 'jax[tpu]' && python3 -m pip install -q -e . && "
fi

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="cd $REPO_DIR && ${setup}\
python3 -m certssb_jax.launch --config=$CONFIG --workdir=$WORKDIR --distributed --noprogress"
