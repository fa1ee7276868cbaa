"""Tasks: a model plus its data. Each ``sparsecomm/app/tasks/<name>.py`` exposes ``build(**cfg) -> Task``,
configured by ``conf/task/<name>.yaml`` and built with ``hydra.utils.instantiate(cfg.task)``.

    digits     scikit-learn's 8x8 digits, small_cnn (the embedded default; CPU, ~1 minute)
    cifar10    CIFAR-10 python pickles, ResNet-18/34 (CIFAR variant)
    glue       GLUE TSVs, a local Hugging Face model (default: the packaged all-MiniLM-L6-v2)
    wordnet    WordNet 3.0 noun supersenses (26 classes), the packaged MiniLM with mean pooling
    synthetic  fixed-seed random data with learnable labels, mlp | gpt2 | resnet18 (benchmarks)
"""
from __future__ import annotations

from .common import Task, cross_entropy, logits_of, require_dir

__all__ = ["Task", "cross_entropy", "logits_of", "require_dir"]
