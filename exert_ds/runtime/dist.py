"""Process-group start and stop for every launcher (deepspeed, torchrun, mpirun, SLURM), and their hygiene: what
each rank prints, and the shared memory DeepSpeed leaves behind."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

# Read by the libraries when they are imported: set before, on every rank but 0 (quiet_other_ranks).
QUIET_ENV = {
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # datasets' map/load bars
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # downloads, and transformers' own bars (loading weights)
    "TQDM_DISABLE": "1",  # any other tqdm bar whose code does not pass `disable` itself (tqdm ≥ 4.66)
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
}


def launched_world_size() -> int:
    """World size as the launcher (deepspeed, torchrun, SLURM, mpirun) announces it, before init."""
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 1


def launched_rank() -> int:
    """This process's global rank as the launcher announces it, before init (0 without a launcher)."""
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 0


def quiet_other_ranks(rank: int) -> None:
    """Only rank 0 speaks: on every other rank, no progress bars (datasets, huggingface_hub, transformers, tqdm)
    and no Python warnings or library INFO/WARNING lines, which are the same on every rank. Call it before the
    libraries are imported (the CLI does, from the launcher's environment); for those already imported it also
    switches their bars off directly."""
    if rank == 0:
        return
    os.environ.update(QUIET_ENV)
    warnings.simplefilter("ignore")
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()


def set_verbosity(verbose: bool, rank: int) -> None:
    """What the libraries print. DeepSpeed's logger: INFO with `--verbose`, else WARNING on rank 0 and ERROR on the
    others (a DeepSpeed config's own `log_level` key still applies once the engine is built). Without `--verbose`,
    the deprecation notices torch, transformers, deepspeed and peft raise about each other's calls (FutureWarning)
    are not shown: a user can do nothing about them."""
    from deepspeed.utils.logging import set_log_level_from_string

    set_log_level_from_string("info" if verbose else "warning" if rank == 0 else "error")
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch|transformers|deepspeed|peft)(\.|$)")


def init_distributed() -> None:
    """Start the process group: NCCL on GPUs, gloo on CPU; MPI discovery when started by bare mpirun."""
    import deepspeed
    import torch.distributed
    from deepspeed.accelerator import get_accelerator

    backend = "gloo" if get_accelerator().device_name() == "cpu" else None
    mpi = "OMPI_COMM_WORLD_SIZE" in os.environ and "MASTER_ADDR" not in os.environ
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=mpi)
    quiet_other_ranks(deepspeed.comm.get_rank())
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        torch.distributed.barrier()  # every rank has mapped every peer's shared-memory buffer
        remove_deepspeed_shm_buffer(torch.distributed.get_rank())


def shutdown_distributed() -> None:
    """Leave the process group together: a rank that exits while gloo/NCCL still serves a peer can abort it."""
    import torch.distributed

    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def exit_launched_rank(code: int) -> None:
    """Under a launcher (more than one rank), end this finished rank now with `code`: logs and stdio flushed, the
    interpreter's finalization skipped. A rank whose work and `shutdown_distributed` were complete still aborted, now
    and then, while Python tore down gloo's worker threads ("terminate called without an active exception", return
    code -6: pytorch/pytorch#190489; the atexit fix pytorch/pytorch#179291 was abandoned), and the launcher then
    reported the whole run as failed. Call it only after every file is written and closed. MPI, when mpirun's
    discovery started it, is finalised first (mpirun counts a rank that skips it as failed). One process (tests
    calling `cli.main`) returns normally."""
    if launched_world_size() <= 1:
        return
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")  # mpirun discovery (DeepSpeed's mpi4py path) initialised MPI: finalise it,
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():  # as mpi4py's own atexit hook would
        mpi.Finalize()
    os._exit(code)


def finish_launched_rank() -> None:
    """The normal end of a script run under a launcher (the tests' workers, the eval benches): leave the process group
    together (`shutdown_distributed`), then end the rank without the interpreter teardown (`exit_launched_rank(0)`).
    Call it as the script's last statement, once every file is written and closed; one process returns normally."""
    shutdown_distributed()
    exit_launched_rank(0)


def remove_deepspeed_shm_buffer(rank: int) -> None:
    """DeepSpeed's CPU shared-memory all-reduce (op deepspeed_shm_comm, deepspeed 0.19.8) creates
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> (69 MB) and never unlinks it; a
    machine that runs many CPU jobs fills its memory with them. `init_distributed` unlinks this rank's as soon as
    every rank has mapped it (POSIX shared memory lives on, unnamed, until its last mapping goes), so no exit path
    leaves it behind: a one-line error, an exception, SIGTERM from the launcher, or SIGKILL."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}").unlink(missing_ok=True)
