"""sparsecomm inside the training stacks people already use; one optional module per stack.

* :mod:`sparsecomm.integrations.hf`: Hugging Face Transformers, ``SparseCommTrainer`` (a ``Trainer``);
  ``pip install 'sparsecomm[hf]'``.
* :mod:`sparsecomm.integrations.accelerate`: Accelerate, ``prepare_masked`` after ``accelerator.prepare``;
  ``pip install 'sparsecomm[accelerate]'``.
* :mod:`sparsecomm.integrations.lightning`: PyTorch Lightning, ``SparseCommStrategy`` (a ``DDPStrategy``)
  and ``masked_optimizer`` for ``configure_optimizers``; ``pip install 'sparsecomm[lightning]'``.

Each does what a hand-written DDP script does with the library: every rank holds the same
:class:`~sparsecomm.Mask`, DDP runs :func:`~sparsecomm.masked_allreduce_hook` (k values per
synchronised step, one all-reduce, no index), and a masked optimizer keeps state for the k
entries only and never writes the others. Nothing is imported here, so importing this package
needs none of the three stacks.
"""
