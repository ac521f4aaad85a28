#!/bin/bash
# Launch `deepen train` on several machines under SLURM: one `accelerate launch` per machine (srun, one task per
# node), each starting one process per GPU. Machine 0 (the first host of the allocation) is the rendezvous.
#
#   sbatch scripts/slurm/launch.sh                                   # configs/llama2-7b-pro.yaml on 2 x 8 GPUs
#   CONFIG=configs/mistral-solar-10.7b.yaml sbatch scripts/slurm/launch.sh train.lr=2e-5   # any key=value overrides
#   sbatch --nodes 4 scripts/slurm/launch.sh                         # more machines: nothing else changes
#
# Environment (defaults in brackets): CONFIG [configs/llama2-7b-pro.yaml], ACCELERATE_CONFIG
# [configs/accelerate/two-node.yaml], GPUS_PER_NODE [8], MASTER_PORT [29500], VENV [.venv].
# Submit from the repository root (SLURM starts the job there). The global batch stays the config's whatever
# the machine count: gradient accumulation makes up the difference.
#SBATCH --job-name=deepen
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=7-00:00:00

set -euo pipefail

CONFIG=${CONFIG:-configs/llama2-7b-pro.yaml}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/two-node.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
VENV=${VENV:-.venv}
NODES=${SLURM_NNODES:?run this under SLURM (sbatch), which sets SLURM_NNODES and SLURM_JOB_NODELIST}

# The rendezvous: the first host of the allocation, as every machine names it.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
export MASTER_ADDR MASTER_PORT CONFIG ACCELERATE_CONFIG GPUS_PER_NODE NODES
export NCCL_ASYNC_ERROR_HANDLING=1  # a rank that dies ends the job instead of hanging the others
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

if [ -x "$VENV/bin/accelerate" ]; then
    export PATH="$VENV/bin:$PATH"
fi

echo "deepen: $NODES machines x $GPUS_PER_NODE GPUs, rendezvous $MASTER_ADDR:$MASTER_PORT, config $CONFIG"

# Single quotes: SLURM_PROCID (this machine's rank) must be read on each machine, not here.
srun --kill-on-bad-exit=1 bash -c '
accelerate launch \
    --config_file "$ACCELERATE_CONFIG" \
    --num_machines "$NODES" \
    --num_processes $((NODES * GPUS_PER_NODE)) \
    --machine_rank "$SLURM_PROCID" \
    --main_process_ip "$MASTER_ADDR" \
    --main_process_port "$MASTER_PORT" \
    -m deepen train --config "$CONFIG" "$@"
' deepen-launch "$@"
