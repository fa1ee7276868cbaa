"""``mask=token_rows``: the word embedding's entries on the rows of the tokens training reads.

The embedding (``mask.embedding``, a glob naming one parameter) gets ``density x occurring rows x
dim`` entries, only on rows of tokens the task's training set holds, shared among them in
proportion to ``count^mask.power`` (D'Hondt), each row's in a random order from ``mask.seed``
(:mod:`sparsecomm.token_rows`). Every rank
counts the whole training set, so this part sends nothing. The rest of the budget goes to the
other parameters by activation-scaled Fisher (``mask=fisher_scaled``, whose fields apply; the
embedding's own Fisher scores are set to 0 so it takes none of that part).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from sparsecomm.mask import Mask, matches_any
from sparsecomm.topk import positions_to_bits
from sparsecomm.token_rows import count_tokens, embedding_budget, token_row_positions

from ..config import ConfigError
from .base import Setting
from .fisher_scaled import FisherScaledKind


class TokenRowsKind(FisherScaledKind):
    name = "token_rows"

    def __init__(self, cfg: Mapping, setting: Setting):
        super().__init__(cfg, setting)
        pattern = str(cfg.embedding)
        params = dict(setting.model.named_parameters())
        names = [n for n, p in params.items() if p.dim() == 2 and matches_any(n, [pattern])]
        if len(names) != 1:
            embeddings = [n for n in params if "embed" in n or n.endswith("wte.weight")]
            hint = (f"this model's embeddings: {', '.join(embeddings)}" if embeddings else
                    "this model has no parameter named like an embedding: mask=token_rows is for text models")
            raise ConfigError(f"mask.embedding={pattern!r} matches {len(names)} 2-D parameters "
                              f"({', '.join(names) or 'none'}); it must name the word embedding exactly once ({hint})")
        if float(cfg.power) < 0:
            raise ConfigError(f"mask.power={cfg.power} must be >= 0 (0: every token the data holds alike)")
        self.embedding = names[0]
        vocab, self.dim = params[self.embedding].shape
        self.counts = count_tokens(_token_ids(setting.task.train_set), vocab)
        self.budget = embedding_budget(self.counts, self.dim, float(cfg.density))
        if self.budget >= self.k:
            raise ConfigError(f"mask.density={cfg.density}: the embedding rows alone take {self.budget} of k={self.k}; "
                              f"raise mask.density")

    def scored_density(self, model: torch.nn.Module) -> float:
        return (self.k - self.budget) / sum(p.numel() for p in model.parameters())

    def transform(self, model: torch.nn.Module):
        rescale = super().transform(model)

        def without_embedding(scores: dict[str, torch.Tensor]) -> None:
            if rescale is not None:
                rescale(scores)
            scores[self.embedding].zero_()
        return without_embedding

    def build(self, model: torch.nn.Module) -> Mask:
        rest = super().build(model)
        positions = token_row_positions(self.counts, self.dim, self.budget, seed=int(self.cfg.seed) + self.rounds,
                                        power=float(self.cfg.power))
        (rows,) = positions_to_bits(positions, [rest[self.embedding].shape])
        return Mask({n: (b | rows if n == self.embedding else b) for n, b in rest.items()})


def _token_ids(dataset):
    """The token ids of every example of ``dataset``: items ``({"input_ids": ids, ...}, label)``
    (the text tasks) or ``(ids, label)`` with an integer tensor of ids (synthetic GPT-2)."""
    for i in range(len(dataset)):
        x, _ = dataset[i]
        if isinstance(x, torch.Tensor) and not x.is_floating_point():
            yield x
            continue
        if not isinstance(x, Mapping) or "input_ids" not in x:
            raise ConfigError("mask=token_rows counts token ids, and this task's examples have no 'input_ids': "
                              "use it with a text task (task=wordnet, task=verb_examples, task=glue)")
        yield x["input_ids"]
