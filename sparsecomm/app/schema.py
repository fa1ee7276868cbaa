"""The config schema: one dataclass per config group option, and one for the top level.

Hydra's structured config schema pattern: :func:`register` stores the dataclass of option ``O``
of group ``G`` in the ConfigStore as ``schema/G/O``, and ``conf/G/O.yaml`` extends it first in
its defaults list::

    # conf/mask/fisher.yaml
    defaults:
      - /schema/mask/fisher@_here_
      - _self_
    name: fisher

The dataclass gives every field its type and its default (written here once); the YAML names the
option, says what it is, and sets only the values in which it differs from its schema (e.g.
``cluster/single_node_gpu.yaml`` sets the backend and the device). ``conf/train.yaml`` extends
``schema/train`` (:class:`TrainConfig`). OmegaConf checks every value against its field's type at
composition; each dataclass checks the rest of its own fields (:class:`~sparsecomm.app.fields.Option`:
``bounds``, ``union_types`` for the fields typed ``Any``, ``check``), asked by
:func:`sparsecomm.app.config.check_config`. A field without a default (``MISSING``, ``???``) must
be set on the command line.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from .cluster_checks import check_cluster
from .fields import GB, NATURAL, SEED, ConfigError, Option, check_choice, show
from .mask_schema import (  # noqa: F401  (the mask group's dataclasses, listed in OPTIONS)
    MASK_OPTIONS, DenseMask, DiffPruningMask, FileMask, FisherMask, MaskConfig, RandomMask, SparseMask, WidthCoreMask)

from .comm_schema import CastComm, CommConfig, DenseComm, MaskedComm, PostLocalComm, PowerSGDComm

# --- cluster/: sparsecomm/app/launch.py --------------------------------------------------------


@dataclass
class LinkConfig(Option):
    """Link speeds, Gbit/s: only used to estimate time on the wire in the summary."""

    bounds = {"inter_node_gbit": GB, "intra_node_gbit": GB}

    inter_node_gbit: Optional[float] = None  # between nodes
    intra_node_gbit: Optional[float] = 100  # within a node (loopback / shared memory)


@dataclass
class ClusterConfig(Option):
    """Topology, backend and rendezvous (defaults: one machine, CPU processes talking Gloo)."""

    union_types = {"nproc_per_node": (int, str)}
    bounds = {"max_restarts": (0, 1000, False), "nproc_per_node": (1, 4096, False), "nnodes": (1, 100_000, False),
              "num_threads": (1, 4096, False), "timeout_s": (1, 7 * 24 * 3600, False)}

    name: str = MISSING
    nnodes: int = 1
    nproc_per_node: Any = 2  # worker processes per node, or "auto": one per visible GPU
    backend: str = "gloo"  # gloo (CPU) | nccl (GPUs)
    device: str = "cpu"  # cpu | cuda (cuda:LOCAL_RANK)
    rdzv_backend: str = "c10d"
    rdzv_endpoint: Optional[str] = "localhost:0"  # host:port of the rendezvous store; port 0: a free one (one node)
    rdzv_id: Optional[str] = None  # run id shared by all nodes; null: a fresh one per run (one node only)
    socket_ifname: Optional[str] = None  # interface between nodes (GLOO_/NCCL_SOCKET_IFNAME); null: netif.py picks
    max_restarts: int = 0  # elastic restarts of failed workers
    start_method: str = "spawn"  # how the bare app starts its workers: spawn | fork | forkserver (docs/clusters.md)
    num_threads: Optional[int] = None  # torch threads per process; null: this node's cores / nproc_per_node
    timeout_s: float = 300.0  # a collective (or the rendezvous) waiting longer on a peer stops every rank, one line
    link: LinkConfig = field(default_factory=LinkConfig)

    def check(self, cfg: Any) -> None:
        check_cluster(vars(self))  # choices, counts, the GPUs this machine (or Slurm job) has


@dataclass
class SlurmClusterConfig(ClusterConfig):
    bounds = {"master_port": (1, 65535, False)}
    master_port: Optional[int] = 29500  # port on the head node when ranks come straight from SLURM_* variables


# --- task/: sparsecomm/app/tasks/ ----------------------------------------------------------------

TASK_SEED = (0, 2**32 - 1, False)
TOKENS = (1, 10**5, False)


@dataclass
class TaskConfig(Option):
    """``_target_`` (set by the option's YAML) builds the model and the data."""

    _target_: str = MISSING

    def check(self, cfg: Any) -> None:
        if not self._target_:
            raise ConfigError("task has no _target_; pick a task config, e.g. task=digits")


@dataclass
class DigitsTask(TaskConfig):
    bounds = {"test_fraction": (0, 1, True), "seed": TASK_SEED}
    test_fraction: float = 0.2  # stratified held-out share (360 of 1,797 images)
    seed: int = 0  # split seed; the same on every rank


@dataclass
class Cifar10Task(TaskConfig):
    data_dir: str = MISSING  # folder with data_batch_1..5 and test_batch (or its cifar-10-batches-py/)
    arch: str = "resnet18"  # resnet18 (11.2M params) | resnet34 (21.3M)
    augment: bool = True  # random crop (4-px padding) + horizontal flip on the train set


@dataclass
class GlueTask(TaskConfig):
    bounds = {"max_length": TOKENS}
    data_dir: str = MISSING  # folder with the task's train.tsv and dev.tsv (e.g. glue_data/SST-2, or glue_data/)
    task_name: str = "sst2"  # sst2 | cola | mrpc | qnli | rte | qqp | mnli
    model_dir: Optional[str] = None  # null: the packaged all-MiniLM-L6-v2; else a save_pretrained() folder
    max_length: int = 128  # tokens per example (padded/truncated)


@dataclass
class SyntheticTask(TaskConfig):
    # sizes that allocate: bounded so that a typo's 10**12 is an error, not an out-of-memory crash
    bounds = {"seed": TASK_SEED, "num_classes": (2, 100_000, False), "num_train": (1, 10**8, False),
              "num_test": (1, 10**8, False), "in_features": (1, 10**6, False), "hidden": (1, 10**6, False),
              "depth": (1, 10**4, False),
              "vocab_size": (1, 10**7, False), "n_layer": (1, 10**4, False), "n_head": (1, 10**4, False),
              "n_embd": (1, 10**6, False), "block_size": (1, 10**6, False)}
    model: str = "mlp"  # mlp | resnet18 | gpt2
    num_classes: int = 10
    num_train: int = 4096
    num_test: int = 1024
    seed: int = 0  # data seed; the same on every rank
    # size kwargs; null = the benchmark size (mlp: 1024 -> 5 x 2368 -> C, 24.9M; gpt2: GPT-2 small, 128 tokens)
    in_features: Optional[int] = None  # mlp
    hidden: Optional[int] = None  # mlp
    depth: Optional[int] = None  # mlp: hidden layers
    vocab_size: Optional[int] = None  # gpt2
    n_layer: Optional[int] = None  # gpt2
    n_head: Optional[int] = None  # gpt2
    n_embd: Optional[int] = None  # gpt2
    block_size: Optional[int] = None  # gpt2: tokens per example


@dataclass
class WordnetTask(TaskConfig):
    bounds = {"train_size": (1, 10**8, False), "test_size": (1, 10**8, False), "seed": TASK_SEED, "max_length": TOKENS}
    data_dir: Optional[str] = None  # folder with data.noun; null: /usr/share/wordnet, then NLTK's corpora/wordnet
    model_dir: Optional[str] = None  # null: the packaged all-MiniLM-L6-v2; else a save_pretrained() folder
    train_size: Optional[int] = 20000  # training synsets (null: all but the test set)
    test_size: int = 2000  # test synsets (the first test_size of a permutation by seed)
    seed: int = 0  # the split's permutation (fixed: independent of the run's seed)
    max_length: int = 64  # tokens per example at most; batches are padded to their longest example only


@dataclass
class VerbExamplesTask(TaskConfig):
    bounds = {"train_size": (1, 10**8, False), "test_size": (1, 10**8, False), "seed": TASK_SEED, "max_length": TOKENS}
    data_dir: Optional[str] = None  # folder with data.verb; null: /usr/share/wordnet, then NLTK's corpora/wordnet
    model_dir: Optional[str] = None  # null: the packaged all-MiniLM-L6-v2; else a save_pretrained() folder
    train_size: Optional[int] = None  # training sentences (null: all but the test set; 11,510 in WordNet 3.0)
    test_size: int = 1000  # test sentences (the first test_size of a permutation by seed)
    seed: int = 0  # the split's permutation (fixed: independent of the run's seed)
    max_length: int = 48  # tokens per example at most; batches are padded to their longest example only


# --- schedule/ and schedule/lr/: sparsecomm/app/schedule.py --------------------------------------


@dataclass
class LRConfig(Option):
    """Linear warm-up, then the factor over the run (constant / cosine / linear to min_ratio)."""

    bounds = {"warmup_steps": (0, None, False), "min_ratio": (0, 1, False)}

    name: str = MISSING
    warmup_steps: int = 0
    min_ratio: float = 0.0


@dataclass
class ScheduleConfig(Option):
    union_types = {"core_full": (str, int, float, None)}
    bounds = {"dense_steps": (0, None, False), "refresh_every": (0, None, False)}
    name: str = MISSING
    dense_steps: int = 0  # dense steps (dense optimizer, full all-reduce) before the first mask
    refresh_every: int = 0  # recompute the mask every M steps after the first (0: never)
    core_full: Any = None  # core/full alternation of the sparse steps: 'C:F' (e.g. "3:1") or a probability
    lr: LRConfig = MISSING


# --- optim/: sparsecomm/optim.py -----------------------------------------------------------------


@dataclass
class OptimConfig(Option):
    bounds = {"lr": GB, "dense_lr": GB, "weight_decay": (0, 10, False)}  # decay x lr beyond 1 flips weights
    name: str = MISSING
    lr: float = MISSING  # sparse (masked) steps
    dense_lr: float = MISSING  # dense steps (warm-up, mask=dense, full steps)
    weight_decay: float = 0.0  # decoupled; only selected entries decay (unselected stay bit-identical)

    def check(self, cfg: Any) -> None:
        choices = tuple(OPTIONS["optim"])
        check_choice(self.name, "optim.name", choices, " or ".join(f"use optim={k}" for k in choices))


@dataclass
class AdamWConfig(OptimConfig):
    bounds = {"eps": GB}
    lr: float = 3.0e-2  # few entries train: they want a large step
    dense_lr: float = 3.0e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8

    def check(self, cfg: Any) -> None:
        super().check(cfg)
        if not (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)):
            raise ConfigError(f"optim.betas={show(self.betas)} must be two numbers in [0, 1), "
                              f"e.g. optim.betas='[0.9,0.999]'")


@dataclass
class SGDConfig(OptimConfig):
    bounds = {"momentum": (0, 1, False)}
    lr: float = 0.3
    dense_lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False


# --- logging/: sparsecomm/app/metrics.py ---------------------------------------------------------


@dataclass
class WandbConfig(Option):
    project: str = "sparsecomm"
    entity: Optional[str] = None
    name: Optional[str] = None  # null: the run directory's name
    mode: str = "offline"  # offline | online | disabled
    tags: List[str] = field(default_factory=list)

    def check(self, cfg: Any) -> None:
        check_choice(self.mode, "logging.wandb.mode", ("offline", "online", "disabled"))
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("logging.wandb is set (logging=wandb), which needs the wandb package, and it is not "
                              "installed: pip install 'sparsecomm[wandb]', or use logging=default") from None


@dataclass
class LoggingConfig(Option):
    bounds = {"log_every": NATURAL}
    name: str = MISSING
    progress: bool = True  # tqdm bar on rank 0: loss, steps/s, bytes sent per step
    jsonl: bool = True  # <run dir>/metrics.jsonl, one JSON object per line
    log_every: int = 10  # steps between train records
    wandb: Optional[WandbConfig] = None  # Weights & Biases from rank 0 (logging=wandb)


# --- the top level: conf/train.yaml ----------------------------------------------------------------


@dataclass
class CheckpointConfig(Option):
    """Checkpoints and resuming (sparsecomm/app/checkpointing.py)."""

    bounds = {"every": (0, None, False), "keep": NATURAL}

    every: int = 0  # rank 0 writes one after every N-th step and after the last (0: no checkpoints)
    keep: int = 3  # the last K are kept
    dir: Optional[str] = None  # null: <run dir>/checkpoints
    resume: str = "auto"  # auto: newest valid checkpoint in dir | never | <file or folder>

    def check(self, cfg: Any) -> None:
        if self.resume is None or str(self.resume).strip() == "":
            raise ConfigError("checkpoint.resume is empty; use auto, never or the path of a checkpoint file or folder")
        if str(self.resume) not in ("auto", "never") and not os.path.exists(str(self.resume)):
            raise ConfigError(f"checkpoint.resume={self.resume!r} is neither auto, never nor an existing checkpoint "
                              f"file or folder; fix the path or use checkpoint.resume=auto")
        if self.dir is not None and os.path.exists(str(self.dir)) and not os.path.isdir(str(self.dir)):
            raise ConfigError(f"checkpoint.dir={self.dir!r} is a file, not a folder; point it at a folder")


@dataclass
class NonFiniteConfig(Option):
    bounds = {"max_in_a_row": NATURAL}
    max_in_a_row: int = 5  # stop the run after this many skipped (NaN/Inf gradient) steps in a row


@dataclass
class TrainConfig(Option):
    bounds = {"steps": (1, 10**12, False), "batch_size": NATURAL, "eval_batch_size": NATURAL,
              "eval_every": (0, None, False), "num_workers": (0, 256, False), "seed": SEED}
    cluster: ClusterConfig = MISSING
    task: TaskConfig = MISSING
    mask: MaskConfig = MISSING
    schedule: ScheduleConfig = MISSING
    optim: OptimConfig = MISSING
    logging: LoggingConfig = MISSING
    steps: int = 400  # optimizer steps in total (dense warm-up included)
    batch_size: int = 32  # examples per rank per step (global batch = batch_size x world size)
    eval_every: int = 100  # test accuracy every N steps (0: only at the end)
    eval_batch_size: int = 256
    num_workers: int = 0  # DataLoader worker processes per rank
    seed: int = 0
    save_model: bool = True  # rank 0 writes model.safetensors at the end
    save_diff: bool = True  # masked runs: rank 0 writes task_diff.safetensors
    comm: CommConfig = MISSING
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    nonfinite: NonFiniteConfig = field(default_factory=NonFiniteConfig)
    out_dir: str = "outputs"  # run directories go under here
    run_id: Optional[str] = None  # null: TORCHELASTIC_RUN_ID / SLURM_JOB_ID, else a timestamp (+ _1, _2 if taken)
    stop_sweep_on_failure: bool = False  # -m sweeps: false runs every job; true starts none after a failed one


# group -> option -> its schema: one entry per conf/<group>/<option>.yaml (tests check both ways)
OPTIONS: dict[str, dict[str, type]] = {
    "cluster": {"local_cpu": ClusterConfig, "single_node_gpu": ClusterConfig, "slurm": SlurmClusterConfig},
    "task": {"digits": DigitsTask, "cifar10": Cifar10Task, "glue": GlueTask, "synthetic": SyntheticTask,
             "wordnet": WordnetTask, "verb_examples": VerbExamplesTask},
    "mask": MASK_OPTIONS,
    "schedule": {name: ScheduleConfig for name in ("core_full", "dense_warmup", "fish_fixed", "refresh")},
    "schedule/lr": {name: LRConfig for name in ("constant", "cosine", "linear")},
    "optim": {"adamw": AdamWConfig, "sgd": SGDConfig},
    "logging": {"default": LoggingConfig, "wandb": LoggingConfig},
    "comm": {"dense": DenseComm, "fp16": CastComm, "bf16": CastComm, "powersgd": PowerSGDComm,
             "post_local": PostLocalComm, "masked": MaskedComm},
}


def register() -> None:
    """Store every schema in Hydra's ConfigStore (``schema/train``, ``schema/<group>/<option>``)."""
    cs = ConfigStore.instance()
    cs.store(group="schema", name="train", node=TrainConfig)
    for group, options in OPTIONS.items():
        for name, node in options.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


register()
