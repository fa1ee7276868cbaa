"""The trainer: one config builds every component; the trainer wires them and runs the steps.

Components, each small and usable alone::

    check_config(cfg)            every field checked up front; errors name the field and the fix
    ShardedData                  this rank's shard of the training set (DistributedSampler), its
                                 Fisher batches, its slice of the test set
    MaskSource                   mask/: fisher (on the rank's own shard) | random | dense (None)
    GradientSync                 the masked all-reduce hook (or plain DDP for mask=dense); bytes
    build_optimizer              optim/: masked AdamW/SGD over the mask, or torch's dense one
    evaluate                     test accuracy: each rank its slice, counts all-reduced
    Trainer                      schedule/ decides, per step, dense or sparse and when to mask

What crosses the network per step is the hook's business (see :mod:`sparsecomm.hook`); the
trainer adds one all-reduce of a few float64 numbers per log line and per evaluation, and a
Fisher mask costs one all-reduce of n float64 scores (counted as ``mask_score_bytes``).

Rank 0 alone writes, into the run directory: ``config.yaml`` (resolved), ``metrics.jsonl``,
``mask.safetensors`` (with its digest), ``model.safetensors`` and ``summary.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torch.utils._pytree import tree_map

from . import distributed as sdist
from . import launch
from .metrics import check_wandb, human_bytes, make_logger
from .schedule import LRSchedule, Schedule, set_lr

MASK_KINDS = ("fisher", "random", "dense")
OPTIMIZERS = ("adamw", "sgd")


class ConfigError(ValueError):
    """A config value the app cannot run with; the message names the field and the fix."""


# --- configuration --------------------------------------------------------------------------

def _positive(cfg: Mapping, key: str, prefix: str = "", minimum: float = 1, kind=int) -> Any:
    value = cfg.get(key)
    field = f"{prefix}{key}"
    try:
        v = kind(value)
        if kind is int and v != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{field}={value!r} is not a {'whole number' if kind is int else 'number'}") from None
    if v < minimum:
        raise ConfigError(f"{field}={value!r} must be >= {minimum}")
    return v


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` (or the library's ValueError) naming the first bad field."""
    from .hook import resolve_wire_dtype
    from .mask import check_density

    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} is required but not set; add {e.full_key}=... to the command line") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{getattr(e, 'full_key', '') or 'config'}: {str(e).splitlines()[0]}") from None
    for key in ("steps", "batch_size", "eval_batch_size"):
        _positive(cfg, key)
    _positive(cfg, "eval_every", minimum=0)
    _positive(cfg, "num_workers", minimum=0)
    launch.check_cluster(cfg.cluster)
    if not cfg.get("task") or "_target_" not in cfg.task:
        raise ConfigError("task has no _target_; pick a task config, e.g. task=digits")

    mask = cfg.mask
    if mask.get("name") not in MASK_KINDS:
        raise ConfigError(f"mask.name={mask.get('name')!r} is unknown; use mask=fisher, mask=random or mask=dense")
    if mask.name != "dense":
        check_density(mask.get("density"), field="mask.density")
    if mask.name == "fisher":
        from .fisher import METHODS

        if mask.get("method") not in METHODS:
            raise ConfigError(f"mask.method={mask.get('method')!r} is unknown; use one of {', '.join(METHODS)}")
        for key in ("num_samples", "batch_size", "chunk_size"):
            _positive(mask, key, "mask.")

    schedule = Schedule.from_config(cfg.schedule, cfg.steps, cfg.get("seed", 0), masked=mask.name != "dense")
    LRSchedule.from_config(cfg.schedule.get("lr", {}), schedule.steps)

    optim = cfg.optim
    if optim.get("name") not in OPTIMIZERS:
        raise ConfigError(f"optim.name={optim.get('name')!r} is unknown; use optim=adamw or optim=sgd")
    for key in ("lr", "dense_lr"):
        value = optim.get(key)
        if not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"optim.{key}={value!r} must be a positive number, e.g. optim.{key}=0.01")
    try:
        resolve_wire_dtype(cfg.comm.get("wire_dtype"))
    except ValueError as e:
        raise ConfigError(f"comm.{e}") from None
    check_wandb(cfg.get("logging"))


def config_hash(cfg: DictConfig) -> str:
    return hashlib.sha256(OmegaConf.to_yaml(cfg, resolve=True, sort_keys=True).encode()).hexdigest()


# --- data -------------------------------------------------------------------------------------

def to_device(batch: Any, device: torch.device) -> Any:
    return tree_map(lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t, batch)


def forward(model: torch.nn.Module, inputs: Any):
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


class ShardedData:
    """This rank's data: a different shard of the training set per rank, and of the test set.

    Training batches come from a ``DistributedSampler`` (reshuffled every epoch, seed shared by
    the ranks, so shards never overlap within an epoch); the stream is endless and knows its
    position (``epoch``, ``batch``) for checkpoints.
    """

    def __init__(self, task, rank: int, world: int, *, batch_size: int, eval_batch_size: int, seed: int,
                 device: torch.device, num_workers: int = 0):
        self.task, self.rank, self.world, self.seed, self.device = task, rank, world, seed, device
        self.sampler = DistributedSampler(task.train_set, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        shard = len(self.sampler)
        if shard < batch_size:
            raise ConfigError(
                f"batch_size={batch_size} is larger than this rank's shard of {shard} training examples "
                f"({len(task.train_set)} over {world} ranks); lower batch_size")
        pin = device.type == "cuda"
        self.train_loader = DataLoader(task.train_set, batch_size=batch_size, sampler=self.sampler, drop_last=True,
                                       collate_fn=task.collate_fn, num_workers=num_workers, pin_memory=pin)
        test_slice = Subset(task.test_set, range(rank, len(task.test_set), world))  # no padding: exact counts
        self.test_loader = DataLoader(test_slice, batch_size=eval_batch_size, shuffle=False,
                                      collate_fn=task.collate_fn, num_workers=num_workers, pin_memory=pin)
        self.epoch, self.batch = 0, 0
        self._it: Iterator | None = None

    def next_batch(self) -> tuple[Any, Any]:
        while True:
            if self._it is None:
                self.sampler.set_epoch(self.epoch)
                self._it = iter(self.train_loader)
            try:
                inputs, targets = next(self._it)
                self.batch += 1
                return to_device(inputs, self.device), to_device(targets, self.device)
            except StopIteration:
                self._it, self.epoch, self.batch = None, self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume the stream: same epoch, skipping the batches already trained on."""
        self.epoch, self._it, self.batch = int(state["epoch"]), None, 0
        for _ in range(int(state["batch"])):
            self.next_batch()

    def fisher_batches(self, round_: int, batch_size: int) -> Iterator[tuple[Any, Any]]:
        """This rank's own shard, in an order that changes with ``round_`` (one per mask)."""
        sampler = DistributedSampler(self.task.train_set, num_replicas=self.world, rank=self.rank, shuffle=True,
                                     seed=self.seed + 7919 * (round_ + 1))
        loader = DataLoader(self.task.train_set, batch_size=batch_size, sampler=sampler,
                            collate_fn=self.task.collate_fn)
        for inputs, targets in loader:
            yield to_device(inputs, self.device), to_device(targets, self.device)


# --- masks ------------------------------------------------------------------------------------

class MaskSource:
    """Builds the shared mask per ``mask/`` (None for ``dense``), identical on every rank.

    ``always`` defaults to the task's classifier head. ``score_bytes`` counts what computing
    masks put on the network: one all-reduce of n float64 Fisher scores per fisher mask.
    """

    def __init__(self, cfg: Mapping, task, data: ShardedData, model: torch.nn.Module, seed: int):
        from .mask import count_for_density, matches_any

        self.cfg, self.task, self.data, self.seed = cfg, task, data, seed
        self.kind = cfg.get("name")
        self.score_bytes = 0
        self.rounds = 0
        always = cfg.get("always")
        self.always = tuple(task.head if always is None else ([always] if isinstance(always, str) else always))
        if self.kind == "dense":
            return
        params = dict(model.named_parameters())
        numel = sum(p.numel() for p in params.values())
        self.k = count_for_density(cfg.density, numel, field="mask.density")
        whole = sum(p.numel() for n, p in params.items() if matches_any(n, self.always))
        if whole > self.k:
            raise ConfigError(
                f"mask.density={cfg.density} keeps k={self.k} of {numel} entries, fewer than the {whole} entries "
                f"of the parameters always kept ({list(self.always)}); raise mask.density to at least "
                f"{whole / numel:.3g} or set mask.always=[]")

    @property
    def dense(self) -> bool:
        return self.kind == "dense"

    def build(self, model: torch.nn.Module):
        """A new mask (collective for fisher: every rank must call it at the same step)."""
        from . import fisher_mask, random_mask

        round_, self.rounds = self.rounds, self.rounds + 1
        if self.kind == "random":
            return random_mask(model, density=self.cfg.density, seed=int(self.cfg.get("seed", self.seed)) + round_,
                               always=self.always)
        data = self.data.fisher_batches(round_, int(self.cfg.batch_size))
        mask = fisher_mask(model, data, self.task.loss_fn, density=self.cfg.density,
                           num_samples=int(self.cfg.num_samples), method=self.cfg.method, always=self.always,
                           chunk_size=int(self.cfg.chunk_size))
        if sdist.world_size() > 1:
            self.score_bytes += 8 * mask.numel
        return mask


# --- communication ----------------------------------------------------------------------------

class GradientSync:
    """How gradients cross the network, and how many bytes that took.

    ``masked``: the masked all-reduce hook, registered once with a full mask in dense mode
    (dense steps send all n entries), switched to the real mask by :meth:`set_mask` and between
    masked and dense per step by :meth:`set_dense`, never re-registered. Otherwise plain DDP
    (mask=dense): every step sends all n entries, counted here.
    """

    def __init__(self, ddp: DistributedDataParallel, *, masked: bool, comm: Mapping):
        from . import Mask, register_masked_allreduce

        self.state = None
        self._plain_steps = 0
        self._plain_bytes = sum(p.numel() * p.element_size() for p in ddp.module.parameters() if p.requires_grad)
        if masked:
            self.state = register_masked_allreduce(ddp, Mask.full(ddp.module), wire_dtype=comm.get("wire_dtype"),
                                                   fused=bool(comm.get("fused", True)))
            self.state.dense = True

    def set_mask(self, mask) -> None:
        self.state.set_mask(mask)

    def set_dense(self, dense: bool) -> None:
        if self.state is not None:
            self.state.dense = dense

    def after_backward(self) -> None:
        if self.state is None:
            self._plain_steps += 1

    @property
    def bytes_sent(self) -> int:
        return self.state.bytes_sent if self.state is not None else self._plain_steps * self._plain_bytes

    @property
    def dense_bytes(self) -> int:
        return self.state.dense_bytes if self.state is not None else self._plain_steps * self._plain_bytes


# --- optimizers, evaluation -------------------------------------------------------------------

def build_optimizer(cfg: Mapping, model: torch.nn.Module, mask=None) -> tuple[torch.optim.Optimizer, float]:
    """``(optimizer, base lr)``: masked over ``mask`` at ``optim.lr``, else dense at ``optim.dense_lr``."""
    from . import MaskedAdamW, MaskedSGD

    if cfg.name == "adamw":
        kw = dict(betas=tuple(cfg.get("betas", (0.9, 0.999))), eps=float(cfg.get("eps", 1e-8)),
                  weight_decay=float(cfg.get("weight_decay", 0.0)))
        masked, dense = MaskedAdamW, torch.optim.AdamW
    else:
        kw = dict(momentum=float(cfg.get("momentum", 0.0)), nesterov=bool(cfg.get("nesterov", False)),
                  weight_decay=float(cfg.get("weight_decay", 0.0)))
        masked, dense = MaskedSGD, torch.optim.SGD
    if mask is None:
        lr = float(cfg.dense_lr)
        return dense([p for p in model.parameters() if p.requires_grad], lr=lr, **kw), lr
    lr = float(cfg.lr)
    return masked(model, mask, lr=lr, **kw), lr


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, loss_fn, device: torch.device) -> dict[str, float]:
    """Accuracy and mean loss over the test set: each rank its slice, one all-reduce of 3 float64."""
    from .tasks import logits_of

    was_training = model.training
    model.eval()
    stats = torch.zeros(3, dtype=torch.float64, device=device)  # correct, examples, summed loss
    for inputs, targets in loader:
        inputs, targets = to_device(inputs, device), to_device(targets, device)
        outputs = forward(model, inputs)
        n = targets.shape[0]
        stats[0] += (logits_of(outputs).argmax(-1) == targets).sum()
        stats[1] += n
        stats[2] += loss_fn(outputs, targets).double() * n
    model.train(was_training)
    if sdist.is_initialized():
        dist.all_reduce(stats)
    correct, count, loss = stats.tolist()
    return {"test_acc": correct / max(count, 1), "test_loss": loss / max(count, 1), "test_examples": int(count)}


# --- the trainer ------------------------------------------------------------------------------

class Trainer:
    """Builds a run from ``cfg`` on an initialised process group and trains it (:meth:`fit`)."""

    def __init__(self, cfg: DictConfig, run_dir: str, device: torch.device, t0: float | None = None):
        self.t0 = time.time() if t0 is None else t0
        self.cfg, self.device = cfg, device
        self.rank, self.world = sdist.rank(), sdist.world_size()
        self.run_dir = sdist.gather_strings(os.path.abspath(run_dir))[0]  # rank 0's is the run's
        sdist.assert_same_on_all_ranks(config_hash(cfg), "config hash",
                                       fix="Start every rank with the same config and overrides.")
        self.schedule = Schedule.from_config(cfg.schedule, cfg.steps, cfg.seed, masked=cfg.mask.name != "dense")
        self.lr_schedule = LRSchedule.from_config(cfg.schedule.get("lr", {}), cfg.steps)

        torch.manual_seed(cfg.seed)  # same initial model on every rank (DDP broadcasts rank 0's anyway)
        self.task = build_task(cfg.task)
        self.model = self.task.model.to(device)
        self.data = ShardedData(self.task, self.rank, self.world, batch_size=cfg.batch_size,
                                eval_batch_size=cfg.eval_batch_size, seed=cfg.seed, device=device,
                                num_workers=cfg.num_workers)
        self.masks = MaskSource(cfg.mask, self.task, self.data, self.model, cfg.seed)
        self.ddp = DistributedDataParallel(
            self.model, device_ids=[device.index] if device.type == "cuda" else None,
            bucket_cap_mb=cfg.comm.bucket_cap_mb, **_buffer_sync_kwargs(bool(cfg.comm.sync_buffers)))
        # DDP broadcasts rank 0's buffers (BatchNorm statistics) before every training forward.
        self.buffer_bytes_per_step = sum(b.numel() * b.element_size() for b in self.model.buffers()) \
            if cfg.comm.sync_buffers and self.world > 1 else 0
        self.sync = GradientSync(self.ddp, masked=not self.masks.dense, comm=cfg.comm)
        self.mask = None
        self.dense_opt, self.dense_lr = build_optimizer(cfg.optim, self.model)
        self.sparse_opt, self.sparse_lr = None, None
        torch.manual_seed(cfg.seed + 1 + self.rank)  # dropout etc. differ per rank from here on

        self.step = 0
        self.log = make_logger(cfg.logging, self.run_dir, cfg.steps,
                               config=OmegaConf.to_container(cfg, resolve=True))
        if sdist.is_main_process():
            os.makedirs(self.run_dir, exist_ok=True)
            OmegaConf.save(cfg, os.path.join(self.run_dir, "config.yaml"), resolve=True)
        numel = sum(p.numel() for p in self.model.parameters())
        self.log.info(
            f"sparsecomm: task={self.task.name} ({numel:,} parameters), mask={self.masks.kind}, "
            f"schedule={self.schedule.name}, {self.world} ranks ({cfg.cluster.backend}, {device.type}), "
            f"run dir {self.run_dir}")

    # -- per step ------------------------------------------------------------------------------
    def _prepare(self, step: int) -> tuple[torch.optim.Optimizer, float]:
        """Apply the schedule before ``step``: mask (re)computation, dense or masked sync."""
        if self.masks.dense:
            return self.dense_opt, self.dense_lr
        if self.schedule.mask_due(step):
            self._new_mask(step)
        dense = self.schedule.sends_dense(step)
        self.sync.set_dense(dense)
        return (self.dense_opt, self.dense_lr) if dense else (self.sparse_opt, self.sparse_lr)

    def _new_mask(self, step: int) -> None:
        t = time.perf_counter()
        mask = self.masks.build(self.model)
        self.sync.set_mask(mask)  # checks every rank holds this mask
        if self.sparse_opt is None:
            self.sparse_opt, self.sparse_lr = build_optimizer(self.cfg.optim, self.model, mask)
        else:
            self.sparse_opt.reset_mask(mask)  # refresh: state of entries that stay selected carries over
        self.mask = mask
        digest = mask.save(os.path.join(self.run_dir, "mask.safetensors")) if sdist.is_main_process() else mask.digest()
        self.log.log("mask", step, kind=self.masks.kind, k=mask.num_selected, numel=mask.numel,
                     density=mask.density, digest=digest, seconds=round(time.perf_counter() - t, 3))
        self.log.info(f"step {step}: {self.masks.kind} mask, k={mask.num_selected:,} of {mask.numel:,} "
                      f"(density {mask.density:.4g}), digest {digest[:12]}, {time.perf_counter() - t:.1f} s")

    def train_step(self, step: int) -> torch.Tensor:
        """One step: forward, backward (the hook syncs), optimizer update. Returns the local loss."""
        optimizer, base_lr = self._prepare(step)
        set_lr(optimizer, base_lr * self.lr_schedule.factor(step))
        inputs, targets = self.data.next_batch()
        loss = self.task.loss_fn(forward(self.ddp, inputs), targets)
        loss.backward()
        self.sync.after_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.step = step + 1
        return loss.detach()

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        log_every = max(int(cfg.logging.get("log_every", 10)), 1)
        window = torch.zeros(2, dtype=torch.float64, device=self.device)  # summed loss, steps
        mark = (time.perf_counter(), self.step, self.sync.bytes_sent)  # time, step, bytes at the last log
        start = time.perf_counter()
        for step in range(self.step, self.schedule.steps):
            window += torch.stack([self.train_step(step).double(), window.new_ones(())])
            done = step + 1
            self.log.progress(done)
            if done % log_every == 0 or done == self.schedule.steps:
                mark = self._log_train(done, window, mark)
                window.zero_()
            if cfg.eval_every and done % cfg.eval_every == 0 and done != self.schedule.steps:
                self._log_eval(done)
        train_s = time.perf_counter() - start
        final = self._log_eval(self.schedule.steps)
        return self._finish(final, train_s)

    def _log_train(self, done: int, window: torch.Tensor, mark: tuple) -> tuple:
        if sdist.is_initialized():
            dist.all_reduce(window)
        loss = (window[0] / window[1].clamp(min=1)).item()
        now, sent = time.perf_counter(), self.sync.bytes_sent
        steps = max(done - mark[1], 1)
        per_step = (sent - mark[2]) / steps
        lr = self.lr_schedule.factor(done - 1)
        self.log.log("train", done, loss=loss, steps_per_s=steps / max(now - mark[0], 1e-9),
                     bytes_per_step=per_step, bytes_sent=sent, dense_bytes=self.sync.dense_bytes,
                     lr_factor=lr, dense=self.masks.dense or self.schedule.sends_dense(done - 1))
        self.log.progress(done, loss=f"{loss:.4f}", sent=f"{human_bytes(per_step)}/step")
        return now, done, sent

    def _log_eval(self, done: int) -> dict[str, float]:
        result = evaluate(self.model, self.data.test_loader, self.task.loss_fn, self.device)
        self.log.log("eval", done, **result)
        self.log.info(f"step {done}: test accuracy {result['test_acc']:.4f}, loss {result['test_loss']:.4f}")
        return result

    def _finish(self, final: dict[str, float], train_s: float) -> dict[str, Any]:
        cfg, sync = self.cfg, self.sync
        summary = {
            "task": self.task.name, "mask": self.masks.kind, "schedule": self.schedule.name,
            "world_size": self.world, "backend": cfg.cluster.backend, "steps": self.schedule.steps,
            "dense_steps": 0 if self.masks.dense else self.schedule.dense_steps,
            "numel": sum(p.numel() for p in self.model.parameters()),
            "k": self.mask.num_selected if self.mask is not None else None,
            "density": self.mask.density if self.mask is not None else 1.0,
            "mask_digest": self.mask.digest() if self.mask is not None else None,
            "test_acc": final["test_acc"], "test_loss": final["test_loss"],
            "wall_s": time.time() - self.t0, "train_s": train_s,
            "bytes_sent": sync.bytes_sent, "dense_bytes": sync.dense_bytes,
            "ratio": sync.bytes_sent / sync.dense_bytes if sync.dense_bytes else float("nan"),
            "mask_score_bytes": self.masks.score_bytes,
            "buffer_bytes": self.buffer_bytes_per_step * self.schedule.steps,
            "wire_dtype": cfg.comm.wire_dtype, "run_dir": self.run_dir,
        }
        self.log.log("summary", self.schedule.steps, **summary)
        self.log.close()
        if sdist.is_main_process():
            if cfg.get("save_model", True):
                from safetensors.torch import save_model

                save_model(self.model, os.path.join(self.run_dir, "model.safetensors"))
            with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
            print(format_summary(summary, cfg.cluster), flush=True)
        return summary

    def close(self) -> None:
        self.log.close()


def _buffer_sync_kwargs(sync: bool) -> dict[str, bool]:
    """DDP's per-forward buffer broadcast switch, by its name in this torch version."""
    import inspect

    if sync:
        return {}  # DDP's default
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def build_task(task_cfg: DictConfig):
    """``hydra.utils.instantiate(cfg.task)``, unwrapping Hydra's error to the task's own."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(task_cfg, _convert_="all")
    except InstantiationException as e:
        if e.__cause__ is not None:
            raise e.__cause__ from None
        raise


def format_summary(s: Mapping[str, Any], cluster: Mapping | None = None) -> str:
    """The end-of-run report a user reads."""
    mask = "dense (plain DDP)" if s["mask"] == "dense" else (
        f"{s['mask']} mask, k={s['k']:,} of {s['numel']:,} (density {s['density']:.4g})")
    lines = [
        f"== sparsecomm summary: {s['task']} | {mask} | {s['world_size']} ranks ({s['backend']}) | "
        f"{s['steps']} steps ({s['dense_steps']} dense) ==",
        f"  test accuracy    {s['test_acc']:.4f}",
        f"  wall time        {s['wall_s']:.1f} s (training loop {s['train_s']:.1f} s)",
        f"  sent by the hook {human_bytes(s['bytes_sent'])}  (gradient all-reduce payload per rank)",
        f"  dense DDP        {human_bytes(s['dense_bytes'])}  for the same steps",
    ]
    if s["dense_bytes"]:
        ratio = s["ratio"]
        fewer = f"  ({1 / ratio:.1f}x fewer bytes)" if 0 < ratio < 1 else ""
        lines.append(f"  ratio            {ratio:.4f}{fewer}")
    if s["mask_score_bytes"]:
        lines.append(f"  Fisher scores    {human_bytes(s['mask_score_bytes'])}  (all-reduce of n float64 per mask)")
    if s.get("buffer_bytes"):
        lines.append(f"  buffers          {human_bytes(s['buffer_bytes'])}  (BatchNorm statistics DDP broadcasts "
                     f"from rank 0, dense or not)")
    link = _link_gbit(cluster, s["world_size"]) if cluster is not None else None
    if link and s["world_size"] > 1:
        ring = 2 * (s["world_size"] - 1) / s["world_size"] / (link * 1e9 / 8)
        lines.append(f"  at {link:g} Gbit/s    ~{s['bytes_sent'] * ring:.3g} s on the wire "
                     f"(dense DDP ~{s['dense_bytes'] * ring:.3g} s), ring all-reduce estimate")
    lines.append(f"  outputs          {s['run_dir']}")
    return "\n".join(lines)


def _link_gbit(cluster: Mapping, world: int) -> float | None:
    link = cluster.get("link") or {}
    nnodes = int(cluster.get("nnodes", 1)) if str(cluster.get("nnodes", 1)).isdigit() else 1
    value = link.get("inter_node_gbit") if nnodes > 1 else link.get("intra_node_gbit")
    return float(value) if value else None


def run(cfg: DictConfig, run_dir: str, t0: float | None = None) -> dict[str, Any]:
    """Every rank's whole life: join the process group, train, leave. Returns the summary."""
    device = launch.init_process_group(cfg.cluster)
    try:
        trainer = Trainer(cfg, run_dir, device, t0)
        try:
            return trainer.fit()
        finally:
            trainer.close()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
