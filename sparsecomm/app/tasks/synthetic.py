"""Random-data classification for benchmarks: fixed-seed inputs, labels from a fixed random teacher
(so the loss can fall), and a model of a chosen size.

    model=mlp       x (in_features,) float32 ~ N(0, 1);  y = argmax(x @ W)
    model=resnet18  x (3, 32, 32) float32 ~ N(0, 1);     y = argmax(avgpool4x4(x).flatten() @ W)
    model=gpt2      x (block_size,) int64 token ids;     y = argmax(sum_t E[x_t])  (bag of words)

Items: ``(x, y)``, y int64 in [0, num_classes). The same ``seed`` gives the same data on every rank.
Size kwargs left null take the benchmark sizes: the 25M MLP (``models.MLP_25M``) and GPT-2 small's
shape with 128-token sequences.
"""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from .. import models
from .common import Task, cross_entropy

SIZES = {  # size kwargs each model takes, with the benchmark defaults
    "mlp": {k: v for k, v in models.MLP_25M.items() if k != "num_classes"},
    "resnet18": {},
    "gpt2": dict(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=128),
}


def make_data(model: str, size: dict, n: int, num_classes: int, gen: torch.Generator,
              teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if model == "mlp":
        x = torch.randn(n, size["in_features"], generator=gen)
        return x, (x @ teacher).argmax(1)
    if model == "resnet18":
        x = torch.randn(n, 3, 32, 32, generator=gen)
        return x, (torch.nn.functional.avg_pool2d(x, 8).flatten(1) @ teacher).argmax(1)
    x = torch.randint(size["vocab_size"], (n, size["block_size"]), generator=gen)
    return x, teacher[x].sum(1).argmax(1)


def build(model: str = "mlp", num_classes: int = 10, num_train: int = 4096, num_test: int = 1024, seed: int = 0,
          **size) -> Task:
    """Synthetic task; ``size`` overrides the model's size kwargs (see ``SIZES``), null entries ignored."""
    if model not in SIZES:
        raise ValueError(f"task.model={model!r} is not a synthetic workload: use one of {sorted(SIZES)}, "
                         f"e.g. task.model=mlp")
    size = {k: v for k, v in size.items() if v is not None}
    unknown = sorted(set(size) - set(SIZES[model]))
    if unknown:
        raise ValueError(f"task.{unknown[0]} does not apply to task.model={model} (its size kwargs: "
                         f"{sorted(SIZES[model]) or 'none'}): set it to null or drop it")
    for k, v, least in (("num_classes", num_classes, 2), ("num_train", num_train, 1), ("num_test", num_test, 1)):
        if v < least:
            raise ValueError(f"task.{k}={v} is too small: use at least {least}")
    size = {**SIZES[model], **size}
    gen = torch.Generator().manual_seed(seed)
    feats = {"mlp": size.get("in_features"), "resnet18": 3 * 4 * 4, "gpt2": size.get("vocab_size")}[model]
    teacher = torch.randn(feats, num_classes, generator=gen)
    teacher = teacher - teacher.mean(0)
    teacher = teacher / teacher.norm(dim=0)  # centred, equal column norms: roughly balanced classes
    x_tr, y_tr = make_data(model, size, num_train, num_classes, gen, teacher)
    x_te, y_te = make_data(model, size, num_test, num_classes, gen, teacher)
    net = {"mlp": models.mlp, "resnet18": models.resnet18, "gpt2": models.gpt2}[model](num_classes=num_classes, **size)
    return Task(name=f"synthetic-{model}", model=net, train_set=TensorDataset(x_tr, y_tr),
                test_set=TensorDataset(x_te, y_te), loss_fn=cross_entropy, head=list(models.HEAD),
                num_classes=num_classes)
