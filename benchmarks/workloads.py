"""Models the communication benchmark trains, with a synthetic batch for each.

Every workload is ``(build(), batch(batch_size, generator))``: the same seed gives the same
initial weights on every rank and in every variant; each rank draws its own batch. The data are
random: the communication benchmark measures time and bytes per step, not learning. ``task``: the
same model as an app task (``task=synthetic`` settings), what the drivers of the app run.

    tiny       2-layer MLP, 2.8k parameters (tests)
    mlp        sparsecomm.app.models.mlp(**MLP_25M): 1024 -> 5 x 2368 -> 10, 24.9M parameters
    small_cnn  sparsecomm.app.models.small_cnn, the digits CNN (1x8x8 inputs), ~151k
    resnet18   sparsecomm.app.models.resnet18, CIFAR-shaped (3x32x32 inputs, 10 classes), ~11M
    gpt2       sparsecomm.app.models.gpt2 in GPT-2 small's shape (12 layers, 12 heads, 768 wide),
               sequence classification over 128 tokens, ~124M with GPT-2's 50257-token vocabulary
    minilm     the packaged pretrained all-MiniLM-L6-v2, mean-pooled, 26 classes (task=wordnet's
               model), 22.7M; dict inputs of 8..32 tokens padded per batch (needs sparsecomm[glue])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from sparsecomm.modelio import logits_of  # noqa: F401  (the micro-benchmarks take it from here: workloads.logits_of)


@dataclass
class Workload:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    default_batch: int
    note: str = ""
    kwargs: dict = field(default_factory=dict)
    task: tuple[str, ...] = ()  # the same model as the app's task: overrides (drivers of the app use these)


def _classify(shape: tuple[int, ...], classes: int = 10):
    def batch(b: int, gen: torch.Generator):
        return torch.randn(b, *shape, generator=gen), torch.randint(classes, (b,), generator=gen)
    return batch


def _tokens(vocab: int, block: int, classes: int = 2):
    def batch(b: int, gen: torch.Generator):
        return torch.randint(vocab, (b, block), generator=gen), torch.randint(classes, (b,), generator=gen)
    return batch


def _minilm() -> nn.Module:
    from sparsecomm.app.tasks import wordnet
    return wordnet.MeanPoolClassifier(wordnet.load_encoder(None)[1], len(wordnet.SUPERSENSES))


def _minilm_batch(b: int, gen: torch.Generator):
    """Token ids of 8..32 tokens (WordNet's "lemma: gloss" texts run ~20), padded to the longest."""
    from sparsecomm.app.tasks import wordnet
    lengths = torch.randint(8, 33, (b,), generator=gen).tolist()
    ds = wordnet.Tokenized([[101] + torch.randint(1000, 30000, (n - 2,), generator=gen).tolist() + [102]
                            for n in lengths], torch.randint(26, (b,), generator=gen).tolist())
    return wordnet.make_collate(0)([ds[i] for i in range(b)])


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def _models():
    try:
        from sparsecomm.app import models
    except ImportError as e:  # the models module is another engineer's; say what is missing
        raise RuntimeError(f"sparsecomm.app.models is not importable ({e}); only the 'tiny' workload runs "
                           f"without it") from e
    return models


MLP = dict(in_features=1024, hidden=2368, depth=5, num_classes=10)  # = sparsecomm.app.models.MLP_25M
GPT2 = dict(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=128, num_classes=2)

WORKLOADS: dict[str, Workload] = {
    "tiny": Workload("tiny", _tiny, _classify((32,)), 8, "2-layer MLP for tests",
                     task=("task=synthetic", "task.model=mlp", "task.in_features=32", "task.hidden=64",
                           "task.depth=1")),
    "mlp": Workload("mlp", lambda: _models().mlp(**MLP), _classify((MLP["in_features"],)), 16,
                    "MLP 1024-5x2368-10", MLP, task=("task=synthetic", "task.model=mlp")),
    "resnet18": Workload("resnet18", lambda: _models().resnet18(num_classes=10), _classify((3, 32, 32)), 16,
                         "ResNet-18, CIFAR variant, 3x32x32", task=("task=synthetic", "task.model=resnet18")),
    "small_cnn": Workload("small_cnn", lambda: _models().small_cnn(num_classes=10), _classify((1, 8, 8)), 32,
                          "digits CNN, 1x8x8"),
    "gpt2": Workload("gpt2", lambda: _models().gpt2(**GPT2), _tokens(GPT2["vocab_size"], GPT2["block_size"]), 4,
                     "GPT-2 small shape, 128 tokens", GPT2,
                     task=("task=synthetic", "task.model=gpt2", f"task.num_classes={GPT2['num_classes']}")),
    "minilm": Workload("minilm", _minilm, _minilm_batch, 32, "pretrained MiniLM-L6, mean-pooled, 8..32 tokens"),
}


def get(name: str) -> Workload:
    try:
        return WORKLOADS[name]
    except KeyError:
        raise ValueError(f"model {name!r} is not a benchmark workload; use one of {sorted(WORKLOADS)}") from None

