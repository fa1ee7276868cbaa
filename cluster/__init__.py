"""The cluster in a box and its emulated links (``python -m cluster.box``), run from the repository root.

:mod:`cluster.netem` shapes a link inside a network namespace; :mod:`cluster.nodes` enters a node of
the box and reads its counters; :mod:`cluster.slurm` runs Slurm over the nodes; :mod:`cluster.box`
builds and removes the box (its command line). Standard library only: the box runs as root with any
Python 3.10+. The shell scripts beside them launch the app (``torchrun_local.sh``,
``slurm_train.sbatch``).
"""
