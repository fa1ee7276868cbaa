"""sparsecomm: train while sending only the gradient entries of a shared sparse mask.

Public API::

    Mask, fisher_mask, random_mask                      # which entries train and travel
    register_masked_allreduce, MaskedAllReduceState     # the DDP communication hook
    MaskedAdamW, MaskedSGD                              # optimizers over the k selected entries
    DiffPruning                                         # learn a sparse task diff (hard-concrete L0)
    diff                                                # a task as base + sparse diff: save / apply

The Hydra app (``sparsecomm-train``) lives in :mod:`sparsecomm.app`; nothing here imports it.
"""
from . import diff
from .diff_pruning import DiffPruning
from .fisher import fisher_mask
from .hook import MaskedAllReduceState, masked_allreduce_hook, register_masked_allreduce
from .mask import Mask, MaskMismatch, random_mask
from .optim import MaskedAdamW, MaskedSGD

__all__ = [
    "Mask", "MaskMismatch", "fisher_mask", "random_mask",
    "register_masked_allreduce", "MaskedAllReduceState", "masked_allreduce_hook",
    "MaskedAdamW", "MaskedSGD", "DiffPruning", "diff",
]
__version__ = "0.1.0"
