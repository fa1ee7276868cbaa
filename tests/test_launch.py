"""sparsecomm.app.launch and the app's error path: who starts workers, Slurm ranks, one-line errors."""
from __future__ import annotations

import os

import pytest
from omegaconf import OmegaConf

from sparsecomm.app import launch
from sparsecomm.app.launch import ClusterError, Plan, WorkerUserError

CPU2 = OmegaConf.create({"nnodes": 1, "nproc_per_node": 2, "backend": "gloo", "device": "cpu",
                         "rdzv_backend": "c10d", "rdzv_endpoint": "localhost:0", "rdzv_id": None,
                         "max_restarts": 0, "start_method": "fork", "num_threads": 1})


def test_plan_bare_launches_or_runs_in_place():
    assert launch.plan(CPU2, {}) == Plan("launch", "bare", 1, 2)
    assert launch.plan({**CPU2, "nproc_per_node": 1}, {}).mode == "single"


def test_plan_joins_torchrun_and_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}
    assert launch.plan(CPU2, env) == Plan("join", "torchrun", 2, 4)
    assert launch.env_rank(env) == 3
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_NNODES": "2"}
    assert launch.plan(CPU2, slurm) == Plan("join", "slurm", 2, 4)
    assert launch.env_rank(slurm) == 5
    # One Slurm task (e.g. a batch script running the app bare) is not a world to join.
    assert launch.plan(CPU2, {"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).mode == "launch"
    assert launch.env_rank({}) is None


def test_auto_nproc_without_gpus_names_the_field():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs")
    with pytest.raises(ClusterError, match=r"cluster\.nproc_per_node=auto"):
        launch.plan({**CPU2, "nproc_per_node": "auto"}, {})


def test_export_slurm_env_finds_the_head_node(tmp_path, monkeypatch):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text('#!/usr/bin/env bash\nprintf "gpu17\\ngpu18\\n"\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_NNODES": "2", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[17-18]", "SLURM_JOB_ID": "123456"}
    launch.export_slurm_env({"master_port": None}, env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("5", "8", "1", "4")
    assert env["MASTER_ADDR"] == "gpu17" and env["MASTER_PORT"] == str(20000 + 123456 % 20000)


def test_slurm_head_node_never_falls_back_to_localhost(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol
    with pytest.raises(ClusterError, match="scontrol is not on PATH"):
        launch.slurm_head_node({"SLURM_JOB_NODELIST": "gpu[17-18]"})


def test_multi_node_launch_needs_a_shared_rendezvous():
    two = {**CPU2, "nnodes": 2}
    with pytest.raises(ClusterError, match=r"cluster\.rdzv_endpoint"):
        launch.launch_config(two, Plan("launch", "bare", 2, 2))
    with pytest.raises(ClusterError, match=r"cluster\.rdzv_id"):
        launch.launch_config({**two, "rdzv_endpoint": "node1:29500"}, Plan("launch", "bare", 2, 2))
    cfg = launch.launch_config({**two, "rdzv_endpoint": "node1:29500", "rdzv_id": "job7"}, Plan("launch", "bare", 2, 2))
    assert (cfg.min_nodes, cfg.max_nodes, cfg.nproc_per_node, cfg.run_id) == (2, 2, 2, "job7")


def _rank_entry(tag):
    return f"{tag}{os.environ['RANK']}"


def _failing_entry(bad_rank):
    from sparsecomm.app.train import exit_on_user_error

    with exit_on_user_error():
        if os.environ["RANK"] == str(bad_rank):
            raise FileNotFoundError(f"task.data_dir='/nope' does not exist (rank {bad_rank})")
        import time

        time.sleep(30)  # the launcher stops the others when one fails


def test_launch_workers_returns_every_ranks_result():
    assert launch.launch_workers(CPU2, launch.plan(CPU2, {}), _rank_entry, "r") == {0: "r0", 1: "r1"}


def _uses_agent_store():
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE")


def test_one_node_workers_share_the_agents_store(monkeypatch):
    """No second store on a port chosen by binding port 0 and closing it (another job on the host can
    take it in between: that job's store, or a rank of this one talking to the wrong job)."""
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    assert launch.launch_workers(CPU2, launch.plan(CPU2, {}), _uses_agent_store) == {0: "True", 1: "True"}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in os.environ


def test_a_multi_node_launch_asks_for_fresh_stores_for_its_own_length(monkeypatch):
    """Across nodes each restart attempt gets a fresh store; the launching process's later one-node
    launches (a sweep's next job, its subprocesses) must not inherit the variable that asks for it."""
    seen = {}

    def elastic_launch(config, entrypoint):
        def run(*args):
            seen["during"] = os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE")
            return {0: "done"}
        return run

    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    monkeypatch.setattr(launch, "elastic_launch", elastic_launch)
    two = {**CPU2, "nnodes": 2, "rdzv_endpoint": "node1:29500", "rdzv_id": "job7"}
    assert launch.launch_workers(two, Plan("launch", "bare", 2, 2), _rank_entry, "r") == {0: "done"}
    assert seen["during"] == "1"
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in os.environ


def test_a_workers_user_error_reaches_the_launcher_as_one_line():
    with pytest.raises(WorkerUserError) as info:
        launch.launch_workers(CPU2, launch.plan(CPU2, {}), _failing_entry, 1)
    assert str(info.value) == "task.data_dir='/nope' does not exist (rank 1)"


def test_only_a_processes_first_launch_uses_the_forkserver(monkeypatch):
    preloads = []
    monkeypatch.setattr(launch, "_launched", False)
    monkeypatch.setattr(launch.multiprocessing, "set_forkserver_preload", preloads.append)
    assert launch._start_method("forkserver", ["sparsecomm.app.tasks.digits"]) == "forkserver"
    assert preloads == [[*launch.WORKER_IMPORTS, "sparsecomm.app.tasks.digits"]]
    assert launch._start_method("forkserver", []) == "spawn"  # the server keeps its first environment
    assert launch._start_method("fork", []) == "fork" and len(preloads) == 1


FORKSERVER_TWICE = """
import json, os
from omegaconf import OmegaConf
from sparsecomm.app import launch
cluster = OmegaConf.create(json.loads(os.environ["CLUSTER"]))
first = launch.launch_workers(cluster, launch.plan(cluster, {}), os.getppid)
os.environ["SPARSECOMM_TEST_VALUE"] = "changed"
second = launch.launch_workers(cluster, launch.plan(cluster, {}), os.getenv, "SPARSECOMM_TEST_VALUE")
print(json.dumps({"launcher": os.getpid(), "first": list(first.values()), "second": list(second.values())}))
"""


@pytest.mark.slow  # a fresh interpreter launching twice: ~7 s
def test_forkserver_workers_fork_from_one_server_and_a_second_launch_sees_the_new_environment():
    """In a fresh process: the first launch's workers are children of one forkserver (not of the
    launcher); the second launch spawns, and its workers see the environment as changed since."""
    import json
    import subprocess
    import sys

    cluster = {**OmegaConf.to_container(CPU2), "start_method": "forkserver"}
    env = {**os.environ, "CLUSTER": json.dumps(cluster), "SPARSECOMM_TEST_VALUE": "first"}
    proc = subprocess.run([sys.executable, "-c", FORKSERVER_TWICE], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(set(out["first"])) == 1 and out["first"][0] != out["launcher"], out  # one server, their parent
    assert out["second"] == ["changed", "changed"], out


def test_one_line_condenses_hydra_errors():
    from hydra.errors import ConfigCompositionException, MissingConfigException

    from sparsecomm.app.train import one_line

    e = MissingConfigException("In 'train': Could not find 'mask/nope'\n\nAvailable options in 'mask':\n\tdense",
                               missing_cfg_file="mask/nope", options=["dense", "fisher"])
    assert one_line(e) == "mask=nope: no such option in config group 'mask'; choose one of: dense, fisher"
    try:
        try:
            raise KeyError("Key 'densty' is not in struct\n    full_key: mask.densty\n    object_type=dict")
        except KeyError as cause:
            raise ConfigCompositionException("Could not override 'mask.densty'.\nTo append to your config "
                                             "use +mask.densty=0.1") from cause
    except ConfigCompositionException as e:
        line = one_line(e)
    assert "\n" not in line and line.startswith("Could not override 'mask.densty'. To append")
