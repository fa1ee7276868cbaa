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
composition; the ranges, choices and cross-field rules are checked by
:func:`sparsecomm.app.config.check_config`. A field without a default (``MISSING``, ``???``)
must be set on the command line. Fields typed ``Any`` take more than one type; their types are
in :data:`sparsecomm.app.config.UNION_TYPES`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING

from .comm_schema import CastComm, CommConfig, DenseComm, MaskedComm, PostLocalComm, PowerSGDComm

# --- cluster/: sparsecomm/app/launch.py --------------------------------------------------------


@dataclass
class LinkConfig:
    """Link speeds, Gbit/s: only used to estimate time on the wire in the summary."""

    inter_node_gbit: Optional[float] = None  # between nodes
    intra_node_gbit: Optional[float] = 100  # within a node (loopback / shared memory)


@dataclass
class ClusterConfig:
    """Topology, backend and rendezvous (defaults: one machine, CPU processes talking Gloo)."""

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
    start_method: str = "spawn"  # how the bare app starts its workers: spawn | fork | forkserver
    num_threads: Optional[int] = None  # torch threads per process; null: this node's cores / nproc_per_node
    timeout_s: float = 300.0  # a collective (or the rendezvous) waiting longer on a peer stops every rank, one line
    link: LinkConfig = field(default_factory=LinkConfig)


@dataclass
class SlurmClusterConfig(ClusterConfig):
    master_port: Optional[int] = 29500  # port on the head node when ranks come straight from SLURM_* variables


# --- task/: sparsecomm/app/tasks/ ----------------------------------------------------------------


@dataclass
class TaskConfig:
    """``_target_`` (set by the option's YAML) builds the model and the data."""

    _target_: str = MISSING


@dataclass
class DigitsTask(TaskConfig):
    test_fraction: float = 0.2  # stratified held-out share (360 of 1,797 images)
    seed: int = 0  # split seed; the same on every rank


@dataclass
class Cifar10Task(TaskConfig):
    data_dir: str = MISSING  # folder with data_batch_1..5 and test_batch (or its cifar-10-batches-py/)
    arch: str = "resnet18"  # resnet18 (11.2M params) | resnet34 (21.3M)
    augment: bool = True  # random crop (4-px padding) + horizontal flip on the train set


@dataclass
class GlueTask(TaskConfig):
    data_dir: str = MISSING  # folder with the task's train.tsv and dev.tsv (e.g. glue_data/SST-2, or glue_data/)
    task_name: str = "sst2"  # sst2 | cola | mrpc | qnli | rte | qqp | mnli
    model_dir: Optional[str] = None  # null: the packaged all-MiniLM-L6-v2; else a save_pretrained() folder
    max_length: int = 128  # tokens per example (padded/truncated)


@dataclass
class SyntheticTask(TaskConfig):
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
    data_dir: Optional[str] = None  # folder with data.noun; null: /usr/share/wordnet, then NLTK's corpora/wordnet
    model_dir: Optional[str] = None  # null: the packaged all-MiniLM-L6-v2; else a save_pretrained() folder
    train_size: Optional[int] = 20000  # training synsets (null: all but the test set)
    test_size: int = 2000  # test synsets (the first test_size of a permutation by seed)
    seed: int = 0  # the split's permutation (fixed: independent of the run's seed)
    max_length: int = 64  # tokens per example at most; batches are padded to their longest example only



@dataclass
class VerbExamplesTask(TaskConfig):
    data_dir: Optional[str] = None  # folder with data.verb; null: /usr/share/wordnet, then NLTK's corpora/wordnet
    model_dir: Optional[str] = None  # null: the packaged all-MiniLM-L6-v2; else a save_pretrained() folder
    train_size: Optional[int] = None  # training sentences (null: all but the test set; 11,510 in WordNet 3.0)
    test_size: int = 1000  # test sentences (the first test_size of a permutation by seed)
    seed: int = 0  # the split's permutation (fixed: independent of the run's seed)
    max_length: int = 48  # tokens per example at most; batches are padded to their longest example only

# --- mask/: which entries train and travel (sparsecomm/app/masks/) ------------------------------


@dataclass
class MaskConfig:
    name: str = MISSING


@dataclass
class DenseMask(MaskConfig):
    """No mask: plain DDP."""


@dataclass
class SparseMask(MaskConfig):
    density: float = 0.005  # fraction of all entries kept (the classifier head counts toward it)
    always: Any = None  # glob pattern(s) kept whole; null: the task's classifier head


@dataclass
class FisherMask(SparseMask):
    num_samples: int = 256  # examples scored in total, split over the ranks
    method: str = "empirical"  # empirical (true labels) | expected (every class, weighted by p(c|x))
    batch_size: int = 64  # scoring batch per rank
    chunk_size: int = 32  # examples per vectorised gradient chunk (memory knob)


@dataclass
class RandomMask(SparseMask):
    seed: int = II("seed")


@dataclass
class FisherScaledMask(FisherMask):
    normalise: str = "activation"  # activation | rows_and_columns | columns | none (sparsecomm.score_scaling)


@dataclass
class TokenRowsMask(FisherScaledMask):
    embedding: str = "*word_embeddings.weight"  # glob naming the word embedding whose rows come from token counts
    power: float = 0.5  # row t's share grows with count_t^power over the training set (0: every token alike)
    seed: int = II("seed")


@dataclass
class LearnedMask(SparseMask):
    refresh_every: int = 25  # masked steps between refreshes (sets schedule.refresh_every)
    max_change: float = 0.1  # at most this fraction of the k entries swapped per refresh, in [0, 1]
    normalise: str = "none"  # none | columns | rows_and_columns: flatten the sums' channel totals before ranking
    seed: int = II("seed")  # the first mask is random (mask=random's draw)


@dataclass
class LotteryMask(SparseMask):
    dense_steps: int = 25  # dense fine-tuning steps whose change picks the mask (after schedule.dense_steps)
    rewind: bool = True  # after the dense phase, reset the weights to their start (LT-SFT); false keeps them

@dataclass
class FileMask(MaskConfig):
    path: str = MISSING  # the .safetensors mask file, e.g. mask.path=outputs/<run>/mask.safetensors


@dataclass
class DiffPruningMask(SparseMask):
    l0_steps: int = 100  # steps of the L0 phase, after schedule.dense_steps (their sum must be < steps)
    l0_penalty: float = 1.25e-7  # lambda on the expected L0 norm; it sums over n entries: scale it with the model
    alpha_lr: float = 0.1  # learning rate of log_alpha (the reference implementation's); w uses optim.dense_lr
    structured: bool = False  # one extra gate per parameter tensor (structured diff pruning)
    ungated_head: bool = True  # the head gets a plain dense diff (no gate, no penalty), as the reference code
    stretch: List[float] = field(default_factory=lambda: [-1.5, 1.5])  # hard-concrete stretch interval (l, r)
    log_alpha_init: float = 5.0  # the paper's: P(gate open) = sigmoid(5) = 0.993 at the start
    temperature: float = 1.0  # the paper's gate has no temperature (= 1); Louizos et al. used 2/3


@dataclass
class WidthCoreMask(MaskConfig):
    fraction: float = 0.5  # of each hidden layer's units (ceil), in (0, 1]
    nested: bool = True  # keep the core a standalone subnetwork (sparsecomm.width_core.NestedCore)
    compare_alone: bool = False  # also train the same core architecture alone (plain DDP)
    alone_lr: Optional[float] = None  # lr of that run; null: optim.dense_lr


# --- schedule/ and schedule/lr/: sparsecomm/app/schedule.py --------------------------------------


@dataclass
class LRConfig:
    """Linear warm-up, then the factor over the run (constant / cosine / linear to min_ratio)."""

    name: str = MISSING
    warmup_steps: int = 0
    min_ratio: float = 0.0


@dataclass
class ScheduleConfig:
    name: str = MISSING
    dense_steps: int = 0  # dense steps (dense optimizer, full all-reduce) before the first mask
    refresh_every: int = 0  # recompute the mask every M steps after the first (0: never)
    core_full: Any = None  # core/full alternation of the sparse steps: 'C:F' (e.g. "3:1") or a probability
    lr: LRConfig = MISSING


# --- optim/: sparsecomm/optim.py -----------------------------------------------------------------


@dataclass
class OptimConfig:
    name: str = MISSING
    lr: float = MISSING  # sparse (masked) steps
    dense_lr: float = MISSING  # dense steps (warm-up, mask=dense, full steps)
    weight_decay: float = 0.0  # decoupled; only selected entries decay (unselected stay bit-identical)


@dataclass
class AdamWConfig(OptimConfig):
    lr: float = 3.0e-2  # few entries train: they want a large step
    dense_lr: float = 3.0e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8


@dataclass
class SGDConfig(OptimConfig):
    lr: float = 0.3
    dense_lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False


# --- logging/: sparsecomm/app/metrics.py ---------------------------------------------------------


@dataclass
class WandbConfig:
    project: str = "sparsecomm"
    entity: Optional[str] = None
    name: Optional[str] = None  # null: the run directory's name
    mode: str = "offline"  # offline | online | disabled
    tags: List[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    name: str = MISSING
    progress: bool = True  # tqdm bar on rank 0: loss, steps/s, bytes sent per step
    jsonl: bool = True  # <run dir>/metrics.jsonl, one JSON object per line
    log_every: int = 10  # steps between train records
    wandb: Optional[WandbConfig] = None  # Weights & Biases from rank 0 (logging=wandb)


# --- the top level: conf/train.yaml ----------------------------------------------------------------




@dataclass
class CheckpointConfig:
    """Checkpoints and resuming (sparsecomm/app/checkpointing.py)."""

    every: int = 0  # rank 0 writes one after every N-th step and after the last (0: no checkpoints)
    keep: int = 3  # the last K are kept
    dir: Optional[str] = None  # null: <run dir>/checkpoints
    resume: str = "auto"  # auto: newest valid checkpoint in dir | never | <file or folder>


@dataclass
class NonFiniteConfig:
    max_in_a_row: int = 5  # stop the run after this many skipped (NaN/Inf gradient) steps in a row


@dataclass
class TrainConfig:
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
    "mask": {"dense": DenseMask, "fisher": FisherMask, "random": RandomMask, "file": FileMask,
             "diff_pruning": DiffPruningMask, "width_core": WidthCoreMask, "fisher_scaled": FisherScaledMask,
             "token_rows": TokenRowsMask, "learned": LearnedMask, "lottery": LotteryMask},
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
