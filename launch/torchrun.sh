#!/usr/bin/env bash
# Start `exert_ds train` (or prune) under torchrun: NPROC ranks on this node; for multi-node, run the same
# command on every node with NNODES and that node's NODE_RANK (static rendezvous at MASTER_ADDR:MASTER_PORT).
#
#   launch/torchrun.sh CONFIG [ARGS...]
#     single node:  launch/torchrun.sh run.yaml
#     multi-node:   NNODES=2 NODE_RANK=0 MASTER_ADDR=node1 MASTER_PORT=29500 launch/torchrun.sh run.yaml   # on node1
#                   NNODES=2 NODE_RANK=1 MASTER_ADDR=node1 MASTER_PORT=29500 launch/torchrun.sh run.yaml   # on node2
#     CPU ranks:    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 NPROC=2 launch/torchrun.sh run.yaml
#   ARGS go to `exert_ds COMMAND` (e.g. --set prune.sparsity=0.4).
#   Env: EXERT_COMMAND  train (default) or prune
#        NPROC          ranks per node (default: GPUs listed by nvidia-smi, else 1)
#        NNODES, NODE_RANK   number of nodes (default 1) and this node's index (default 0; 0 = MASTER_ADDR's node)
#        MASTER_ADDR, MASTER_PORT   rendezvous on node 0 (default 127.0.0.1:29500)
set -euo pipefail
config=${1:?usage: launch/torchrun.sh CONFIG [ARGS...]}
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast off
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
nproc=${NPROC:-$gpus}
exec torchrun --nproc_per_node "$(( nproc > 0 ? nproc : 1 ))" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --rdzv_backend static --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m exert_ds "${EXERT_COMMAND:-train}" --config "$config" "$@"
