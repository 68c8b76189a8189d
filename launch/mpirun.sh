#!/usr/bin/env bash
# Start `exert_ds train` (or prune) under Open MPI's mpirun: NPROC ranks on this node, or one rank per slot of an
# Open MPI hostfile (same `HOST slots=N` format as launch/hostfile.example; ssh between nodes).
# Each rank finds rank 0 through mpi4py (deepspeed.init_distributed(auto_mpi_discovery=True)): master address =
# rank 0's first `hostname -I` address, port 29500. If that address is wrong or the port is taken, set MASTER_ADDR
# (and MASTER_PORT): each rank then gets RANK/WORLD_SIZE/LOCAL_RANK from Open MPI's OMPI_COMM_WORLD_* instead.
#
#   launch/mpirun.sh CONFIG [HOSTFILE] [ARGS...]
#     single node:  launch/mpirun.sh run.yaml
#     multi-node:   launch/mpirun.sh run.yaml launch/hostfile.example      (run it on the first host)
#     CPU ranks:    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 NPROC=2 launch/mpirun.sh run.yaml
#   ARGS go to `exert_ds COMMAND` (e.g. --set prune.sparsity=0.4); a HOSTFILE is the 2nd argument unless it starts with -.
#   Env: EXERT_COMMAND  train (default) or prune
#        NPROC          number of ranks (default: GPUs listed by nvidia-smi, else 1; with a HOSTFILE: its slots)
#        MASTER_ADDR, MASTER_PORT   optional: explicit rendezvous instead of MPI discovery (port default 29500)
#   Exported to every rank (-x) when set: PATH LD_LIBRARY_PATH PYTHONPATH DS_ACCELERATOR OMP_NUM_THREADS
#   CUDA_VISIBLE_DEVICES TOKENIZERS_PARALLELISM HF_* NCCL_* TORCH_* NVSHMEM_*.
set -euo pipefail
config=${1:?usage: launch/mpirun.sh CONFIG [HOSTFILE] [ARGS...]}
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast off
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
mpi=(mpirun --bind-to none)  # Open MPI binds each rank to one core by default; torch threads need more
if [[ $(id -u) == 0 ]]; then
  mpi+=(--allow-run-as-root)
fi
if [[ $# -gt 0 && $1 != -* ]]; then
  mpi+=(--hostfile "$1")
  shift
  if [[ -n ${NPROC:-} ]]; then mpi+=(-np "$NPROC"); fi
else
  nproc=${NPROC:-$gpus}
  mpi+=(-np "$(( nproc > 0 ? nproc : 1 ))" --oversubscribe)  # more ranks than cores is allowed on one node
fi
for var in $(compgen -e); do
  case $var in
    PATH | LD_LIBRARY_PATH | PYTHONPATH | DS_ACCELERATOR | OMP_NUM_THREADS | CUDA_VISIBLE_DEVICES | \
      TOKENIZERS_PARALLELISM | HF_* | NCCL_* | TORCH_* | NVSHMEM_*) mpi+=(-x "$var") ;;
  esac
done
run=(python3 -m exert_ds "${EXERT_COMMAND:-train}" --config "$config" "$@")
if [[ -z ${MASTER_ADDR:-} ]]; then
  exec "${mpi[@]}" "${run[@]}"  # MPI discovery in exert_ds.train.trainer.init_distributed
fi
export MASTER_PORT=${MASTER_PORT:-29500}
exec "${mpi[@]}" -x MASTER_ADDR -x MASTER_PORT bash -c \
  'export RANK=$OMPI_COMM_WORLD_RANK WORLD_SIZE=$OMPI_COMM_WORLD_SIZE LOCAL_RANK=$OMPI_COMM_WORLD_LOCAL_RANK; exec "$@"' \
  bash "${run[@]}"
