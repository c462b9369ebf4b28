#!/usr/bin/env bash
# Multi-node training under Slurm: one `torchrun` per node (started by srun), which starts one
# process per GPU; the nodes meet through torchrun's c10d rendezvous on the first node.
#
#   sbatch --nodes=4 scripts/slurm_train.sh g3m                      # 4 x 8 GPUs, the G3M recipe
#   sbatch --nodes=2 scripts/slurm_train.sh my-exp.toml --set optim.lr=2e-5
#
# Everything after the config goes to `nxtrec train`. A job that is requeued or submitted
# again with the same run directory continues from its newest checkpoint (same learning-rate
# schedule and data position), so `--requeue` and chained jobs need no extra flag.
#
# Environment (all optional):
#   PYTHON                 python with nxtrec installed (default: python)
#   NPROC_PER_NODE         processes per node (default: the GPUs Slurm gave, else nvidia-smi's count)
#   RDZV_PORT              rendezvous port on the first node (default: 29500)
#   OMP_NUM_THREADS        CPU threads per process (default: 8)
#
#SBATCH --job-name=nxtrec-train
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out

set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: sbatch [--nodes=N] $0 CONFIG [nxtrec train options]" >&2
    exit 2
fi
: "${SLURM_JOB_ID:?run this script with sbatch (or inside an salloc allocation)}"

PYTHON=${PYTHON:-python}
NODES=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD_NODE=$(echo "$NODES" | head -n 1)
NNODES=${SLURM_JOB_NUM_NODES:-$(echo "$NODES" | wc -l)}
RDZV_PORT=${RDZV_PORT:-29500}
if [ -z "${NPROC_PER_NODE:-}" ]; then
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
        NPROC_PER_NODE=$SLURM_GPUS_ON_NODE
    else
        NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | wc -l)
    fi
fi
if [ "$NPROC_PER_NODE" -lt 1 ]; then
    echo "no GPU found on $(hostname); set NPROC_PER_NODE to run CPU processes" >&2
    exit 1
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

echo "nxtrec: $NNODES node(s) x $NPROC_PER_NODE process(es), rendezvous $HEAD_NODE:$RDZV_PORT, config $1" >&2

# One task per node; each runs torchrun, which starts NPROC_PER_NODE training processes.
srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --nproc-per-node="$NPROC_PER_NODE" \
    --rdzv-id="$SLURM_JOB_ID" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$HEAD_NODE:$RDZV_PORT" \
    -m nxtrec train "$@"
