"""The Hydra app (``sparsecomm-train``): config, launch, trainer, mask kinds and tasks.

It builds on the library (:mod:`sparsecomm`), which never imports it.
"""
