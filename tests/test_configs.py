"""Every config group option composes (Hydra's compose API) and the run directory is shared."""
from __future__ import annotations

import importlib.resources

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import sparsecomm.app.train  # noqa: F401  registers the sc_run_id resolver
from sparsecomm.app.config import check_config

CONF = importlib.resources.files("sparsecomm.conf")
GROUPS = ["cluster", "task", "mask", "schedule", "optim", "logging", "schedule/lr", "comm"]


def options(group: str) -> list[str]:
    return sorted(p.name[:-5] for p in CONF.joinpath(group).iterdir() if p.name.endswith(".yaml"))


@pytest.fixture(autouse=True)
def clean_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def compose_train(*overrides: str, hydra_config: bool = False):
    with initialize_config_module(config_module="sparsecomm.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra_config)


def test_every_group_has_its_options():
    assert set(options("cluster")) >= {"local_cpu", "single_node_gpu", "slurm"}
    assert set(options("schedule")) >= {"dense_warmup", "fish_fixed", "refresh", "core_full"}
    assert set(options("mask")) >= {"dense", "fisher", "random", "diff_pruning", "width_core", "file"}
    assert set(options("optim")) >= {"adamw", "sgd"}
    assert set(options("logging")) >= {"default", "wandb"}
    assert set(options("schedule/lr")) >= {"constant", "cosine", "linear"}
    assert set(options("task")) >= {"digits", "cifar10", "glue", "synthetic"}


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_option_composes(group, option):
    cfg = compose_train(f"{group}={option}")
    node = OmegaConf.select(cfg, group.replace("/", "."))
    if "name" in node:
        assert node.name == option
    else:  # tasks: the target names the module
        assert node._target_ == f"sparsecomm.app.tasks.{option}.build"
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_default_config_passes_the_checks():
    cfg = compose_train()
    check_config(cfg)
    assert (cfg.cluster.name, cfg.task._target_, cfg.mask.name, cfg.schedule.name) == (
        "local_cpu", "sparsecomm.app.tasks.digits.build", "fisher", "dense_warmup")
    assert cfg.cluster.nnodes * cfg.cluster.nproc_per_node == 2 and cfg.cluster.backend == "gloo"


@pytest.mark.parametrize("overrides", [
    ["mask=random", "schedule=refresh", "optim=sgd", "schedule/lr=cosine"],
    ["mask=dense", "schedule=fish_fixed", "schedule/lr=linear", "schedule.lr.warmup_steps=10"],
    ["schedule.core_full=3:1"],
])
def test_combinations_pass_the_checks(overrides):
    check_config(compose_train(*overrides))


@pytest.mark.parametrize("override,field", [
    ("mask.density=0", "mask.density"),
    ("mask.density=1.5", "mask.density"),
    ("mask.method=fancy", "mask.method"),
    ("steps=0", "steps"),
    ("schedule.dense_steps=400", "schedule.dense_steps"),
    ("schedule.core_full=3-1", "schedule.core_full"),
    ("optim.lr=-1", "optim.lr"),
    ("comm.wire_dtype=fp8", "wire_dtype"),
    ("cluster.backend=mpi2", "cluster.backend"),
    ("task=cifar10", "task.data_dir"),
])
def test_bad_values_name_their_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        check_config(compose_train(override))


def test_nccl_without_gpus_names_the_backend():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match=r"cluster\.backend=nccl .*cluster=local_cpu"):
        check_config(compose_train("cluster=single_node_gpu", "cluster.nproc_per_node=2"))


def test_run_dir_comes_from_the_launchers_run_id(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc123")
    cfg = compose_train("out_dir=/tmp/x", hydra_config=True)
    assert cfg.hydra.run.dir == "/tmp/x/abc123"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun without --rdzv_id
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    assert compose_train(hydra_config=True).hydra.run.dir == "outputs/777"
    assert compose_train("run_id=mine", hydra_config=True).hydra.run.dir == "outputs/mine"


def test_slurm_cluster_reads_the_slurm_environment(monkeypatch):
    monkeypatch.setenv("SLURM_NNODES", "4")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SPARSECOMM_RDZV_ENDPOINT", "node001:29500")
    c = compose_train("cluster=slurm").cluster
    assert (c.nnodes, c.nproc_per_node, c.rdzv_id, c.rdzv_endpoint, c.backend) == (4, 8, "4242", "node001:29500", "nccl")


def test_submitit_launcher_config():
    """The Slurm sweep launcher config: plain YAML here; composed when the plugin is installed."""
    text = CONF.joinpath("hydra/launcher/submitit_slurm.yaml").read_text()
    assert text.startswith("# @package hydra.launcher")
    body = yaml.safe_load(text)
    assert body["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert body["tasks_per_node"] and body["gpus_per_node"]
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_train("hydra/launcher=submitit_slurm", "cluster=slurm", hydra_config=True)
    assert cfg.hydra.launcher.gpus_per_node == cfg.hydra.launcher.tasks_per_node


def test_every_option_extends_its_schema():
    """schema.OPTIONS and conf/ list the same options; each YAML extends schema/<group>/<option> first."""
    from sparsecomm.app.schema import OPTIONS

    assert set(OPTIONS) == set(GROUPS)
    for group in GROUPS:
        assert set(OPTIONS[group]) == set(options(group)), group
        for option in options(group):
            body = yaml.safe_load(CONF.joinpath(group, f"{option}.yaml").read_text())
            assert body["defaults"][0] == f"/schema/{group}/{option}@_here_", (group, option)
    assert yaml.safe_load(CONF.joinpath("train.yaml").read_text())["defaults"][0] == "/schema/train@_here_"


def schema_classes() -> set[type]:
    """Every dataclass of the schema: the options of every group, the top level and what they nest."""
    import dataclasses

    from sparsecomm.app.schema import OPTIONS, TrainConfig

    todo, seen = [TrainConfig, *(c for options in OPTIONS.values() for c in options.values())], set()
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        todo += [f.default_factory for f in dataclasses.fields(cls) if dataclasses.is_dataclass(f.default_factory)]
    return seen


def test_every_option_checks_only_fields_it_has():
    """Each dataclass's ranges and union types name fields of that dataclass (a typo would check nothing)."""
    import dataclasses

    from sparsecomm.app.fields import Option

    classes = schema_classes()
    assert len(classes) > 20
    for cls in classes:
        assert issubclass(cls, Option), cls
        names = {f.name for f in dataclasses.fields(cls)}
        for table in ("bounds", "union_types"):
            assert set(cls.table(table)) <= names, (cls.__name__, table, set(cls.table(table)) - names)


def test_a_range_is_the_options_own():
    """The same field name bounded differently in two options: each option applies its own range."""
    with pytest.raises(ValueError, match=r"task\.seed=4294967296 is out of range"):
        check_config(compose_train("task=digits", "task.seed=4294967296"))  # a task's split seed: 32 bits
    check_config(compose_train("mask=random", "mask.seed=4294967296"))  # a mask's seed: 63 bits


def test_the_checks_never_branch_on_an_options_name():
    """config.py, compose.py and train.py ask each option; no comparison with a mask kind's name."""
    import re

    from sparsecomm.app.schema import OPTIONS

    src = importlib.resources.files("sparsecomm.app")
    names = "|".join(OPTIONS["mask"])
    for module in ("config.py", "compose.py", "train.py"):
        text = src.joinpath(module).read_text()
        assert not re.search(rf"""(==|!=|\bin)\s*\(?\s*["']({names})["']""", text), module
        assert not re.search(rf"""["']({names})["']\s*(==|!=)""", text), module


@pytest.mark.slow
def test_the_app_composes_its_config_once_and_leaves_argv_alone(tmp_path, capsys, monkeypatch):
    """A run through the real entry point composes the config exactly once (Hydra's config loader
    counted), runs in the claimed folder, and leaves sys.argv as it found it."""
    import sys

    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    from apptest import TINY, clean_launcher_env, main_in_process

    clean_launcher_env(monkeypatch)
    calls = []
    real = ConfigLoaderImpl.load_configuration

    def counted(self, *args, **kwargs):
        calls.append(kwargs.get("overrides"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ConfigLoaderImpl, "load_configuration", counted)
    argv = list(sys.argv)
    code, out, err = main_in_process([*TINY, f"out_dir={tmp_path}", "run_id=once"], capsys)
    assert code == 0, err
    assert len(calls) == 1, calls
    assert sys.argv == argv
    assert (tmp_path / "once" / "summary.json").exists() and (tmp_path / "once" / ".hydra").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["once"]
