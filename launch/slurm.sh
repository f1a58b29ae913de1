#!/bin/bash
# Multi-node DeepSpeed training under Slurm: one task per GPU, started by srun (no ssh, no pdsh).
#
#   sbatch --nodes 4 --gpus-per-node 8 launch/slurm.sh LAYOUT DEEPSPEED_CONFIG OUT_DIR [key=value ...]
#   sbatch ... launch/slurm.sh layouts/jamba.yaml launch/zero3.json /shared/runs/jamba train.steps=20000
#
# Resubmitting the same command resumes from OUT_DIR's latest checkpoint (--resume is passed when
# OUT_DIR already has one). OUT_DIR must be on a filesystem every node sees.
#SBATCH --job-name=hybridseq
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail

if [ $# -lt 3 ]; then
    echo "usage: sbatch [--nodes N --gpus-per-node G] launch/slurm.sh LAYOUT DEEPSPEED_CONFIG OUT_DIR [key=value ...]" >&2
    exit 2
fi
LAYOUT=$1; DS_CONFIG=$2; OUT=$3; shift 3

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}

RESUME=""
if [ -f "$OUT/checkpoints/latest" ]; then RESUME="--resume"; fi

# Each task maps Slurm's ids to the variables torch.distributed and launch/train.py read.
srun --kill-on-bad-exit=1 bash -c '
  export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
  exec python "$0"/launch/train.py "$@"
' "$REPO" "$LAYOUT" --deepspeed "$DS_CONFIG" --out "$OUT" --no-progress $RESUME "$@"
