"""The launch/ scripts: each starts 2 CPU ranks on a tiny run and must give the deepspeed launcher's losses;
the SLURM template (not runnable here) is checked for its #SBATCH lines and, with stub srun/scontrol, its per-task env."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

import pytest

from tests.fixtures import run_yaml
from tests.launch import REPO, cpu_env, deepspeed_cpu, free_port
from tests.test_train import loss_lines

LAUNCH = REPO / "launch"
LAUNCHERS = ["deepspeed.sh", "torchrun.sh", "mpirun.sh", "slurm.sbatch"]
RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny run YAML (two prune events in 4 steps) and the deepspeed launcher's loss lines on it, 2 CPU ranks."""
    tmp = tmp_path_factory.mktemp("launchers")
    config = run_yaml(tmp, prune={"sparsity": 0.5, "every_steps": 2}, train={"max_steps": 4})
    losses = loss_lines(deepspeed_cpu(["--module", "exert_ds", "train", "--config", str(config)], ranks=2).stdout)
    assert len(losses) == 4
    return config, losses


def run_script(script: str, args: list[str], **env: str) -> str:
    """`bash launch/SCRIPT ARGS...` from outside the repo with the CPU env (no inherited rendezvous) plus `env`."""
    full = {k: v for k, v in cpu_env().items() if k not in RENDEZVOUS} | env
    proc = subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        cwd=tempfile.gettempdir(),
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def test_every_script_parses():
    for script in [*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")]:
        subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("script", LAUNCHERS)
def test_launcher_says_how_to_use_it(script):
    text = (LAUNCH / script).read_text()
    assert text.startswith("#!/usr/bin/env bash\n# ") and "set -euo pipefail" in text
    assert f"launch/{script} CONFIG" in text and "EXERT_COMMAND" in text  # the usage lines
    assert "NCCL_NVLS_ENABLE=0" in text


def test_sbatch_template_asks_one_task_per_gpu():
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", (LAUNCH / "slurm.sbatch").read_text(), re.M))
    assert {"nodes", "ntasks-per-node", "gpus-per-node", "time"} <= sbatch.keys()
    assert sbatch["ntasks-per-node"] == sbatch["gpus-per-node"]


def test_sbatch_gives_each_srun_task_its_own_rank(tmp_path):
    """Stub scontrol, srun (runs SLURM_NTASKS tasks here) and python3 (prints its env): real SLURM is not here."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "scontrol": "echo nodeA; echo nodeB",
        "srun": "while [[ $1 == --* ]]; do shift; done\n"
        'for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$((i % 2)) "$@"; done',
        "python3": 'echo "RANK=$RANK WORLD_SIZE=$WORLD_SIZE LOCAL_RANK=$LOCAL_RANK $MASTER_ADDR:$MASTER_PORT $*"',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\nset -euo pipefail\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "nodeA,nodeB", "SLURM_NTASKS": "4"}
    out = run_script("slurm.sbatch", ["run.yaml", "--set", "prune.sparsity=0.4"], EXERT_COMMAND="prune", **env)
    assert out.splitlines() == [
        f"RANK={r} WORLD_SIZE=4 LOCAL_RANK={r % 2} nodeA:29500 -m exert_ds prune --config run.yaml --set prune.sparsity=0.4"
        for r in range(4)
    ]


@pytest.mark.distributed
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not on PATH (Debian: apt-get install openmpi-bin)")
def test_mpirun_with_mpi_discovery_gives_the_deepspeed_launcher_losses(tiny_run):
    """No RANK/MASTER_ADDR in the env: exit 0 means mpi4py discovery set up the process group (port 29500)."""
    config, losses = tiny_run
    assert loss_lines(run_script("mpirun.sh", [str(config)], NPROC="2")) == losses


@pytest.mark.distributed
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not on PATH (Debian: apt-get install openmpi-bin)")
def test_mpirun_with_hostfile_and_explicit_env_gives_the_deepspeed_launcher_losses(tiny_run, tmp_path):
    config, losses = tiny_run
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out = run_script("mpirun.sh", [str(config), str(hostfile)], MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    assert loss_lines(out) == losses


@pytest.mark.distributed
@pytest.mark.parametrize("script", ["deepspeed.sh", "torchrun.sh"])
def test_script_gives_the_deepspeed_launcher_losses(tiny_run, script):
    config, losses = tiny_run
    out = run_script(script, [str(config)], NPROC="2", MASTER_PORT=str(free_port()), EXERT_COMMAND="train")
    assert loss_lines(out) == losses
