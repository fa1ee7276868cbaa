"""What sparsecomm saves, measured against what users run today: one module per benchmark, run from
the repository root as ``python -m benchmarks.<name>`` (``benchmarks/README.md``); the per-rank
workers are launched by torchrun as modules of this package. Results go to ``benchmarks/results/``.
"""
