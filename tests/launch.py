"""Start a worker under a launcher (deepspeed, torchrun) on CPU ranks (gloo), as users launch the trainer."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env() -> dict[str, str]:
    return {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def _run(cmd: list[str], timeout: int, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=timeout)
    assert not check or proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return proc


def deepspeed_cpu(
    args: list[str], ranks: int, timeout: int = 600, port: int | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """`DS_ACCELERATOR=cpu deepspeed --num_gpus RANKS --master_port PORT ARGS...` (PORT: a free one); returns the
    finished process, which must have succeeded when `check`."""
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    port = port or free_port()
    return _run([launcher, "--num_gpus", str(ranks), "--master_port", str(port), *args], timeout, check)


def torchrun_cpu(args: list[str], ranks: int, timeout: int = 600) -> subprocess.CompletedProcess:
    """`DS_ACCELERATOR=cpu torchrun --nproc_per_node RANKS ARGS...` (ARGS: `-m exert_ds ...`)."""
    port = str(free_port())
    return _run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", port, *args],
        timeout,
    )
