"""Process-group start and stop for every launcher (deepspeed, torchrun, mpirun, SLURM), and their hygiene."""

from __future__ import annotations

import os
from pathlib import Path


def launched_world_size() -> int:
    """World size as the launcher (deepspeed, torchrun, SLURM, mpirun) announces it, before init."""
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 1


def init_distributed() -> None:
    """Start the process group: NCCL on GPUs, gloo on CPU; MPI discovery when started by bare mpirun."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    backend = "gloo" if get_accelerator().device_name() == "cpu" else None
    mpi = "OMPI_COMM_WORLD_SIZE" in os.environ and "MASTER_ADDR" not in os.environ
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=mpi)
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))


def shutdown_distributed() -> None:
    """Leave the process group together: a rank that exits while gloo/NCCL still serves a peer can abort it."""
    import torch.distributed

    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        rank = torch.distributed.get_rank()
        torch.distributed.destroy_process_group()
        remove_deepspeed_shm_buffer(rank)


def remove_deepspeed_shm_buffer(rank: int) -> None:
    """DeepSpeed's CPU shared-memory all-reduce (op deepspeed_shm_comm, deepspeed 0.19.8) creates
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> (69 MB) and never unlinks it; a
    machine that runs many CPU jobs fills its memory with them. Remove this rank's once every rank has left."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}").unlink(missing_ok=True)
