#!/usr/bin/env bash
# Start `exert_ds train` (or prune) under the DeepSpeed launcher: one rank per GPU, on this node or on every node
# of a DeepSpeed hostfile (reached over passwordless ssh with pdsh; see launch/README.md).
#
#   launch/deepspeed.sh CONFIG [HOSTFILE] [ARGS...]
#     single node:  launch/deepspeed.sh run.yaml
#     multi-node:   launch/deepspeed.sh run.yaml launch/hostfile.example      (run it on the first host)
#     CPU ranks:    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 NPROC=2 launch/deepspeed.sh run.yaml
#   ARGS go to `exert_ds COMMAND` (e.g. --set prune.sparsity=0.4); a HOSTFILE is the 2nd argument unless it starts with -.
#   Env: EXERT_COMMAND  train (default) or prune
#        NPROC          ranks per node (default: GPUs listed by nvidia-smi, else 1; with a HOSTFILE: its slots)
#        MASTER_ADDR    rank 0's address (default: 127.0.0.1, or the hostfile's first host)
#        MASTER_PORT    rendezvous port (default 29500)
#        DS_LOG_LEVEL   the launcher's own log level (default warning; info shows its start-up lines)
set -euo pipefail
config=${1:?usage: launch/deepspeed.sh CONFIG [HOSTFILE] [ARGS...]}
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast off
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
launcher=(deepspeed --log_level "${DS_LOG_LEVEL:-warning}" --master_port "${MASTER_PORT:-29500}")
[[ -n ${MASTER_ADDR:-} ]] && launcher+=(--master_addr "$MASTER_ADDR")
if [[ $# -gt 0 && $1 != -* ]]; then
  launcher+=(--hostfile "$1")
  shift
  [[ -n ${NPROC:-} ]] && launcher+=(--num_gpus "$NPROC")
else
  nproc=${NPROC:-$gpus}
  launcher+=(--num_gpus "$(( nproc > 0 ? nproc : 1 ))")
fi
exec "${launcher[@]}" --module exert_ds "${EXERT_COMMAND:-train}" --config "$config" "$@"
