# Two commands do all set-up on a fresh machine:
#   make train   # the embedded default job: 2 Gloo workers, FISH mask, digits (ARGS="key=value ..." to override)
#   make test    # the whole test suite (what CI runs), on JOBS parallel workers (docs/testing.md)
#   make check   # the inner loop: the suite without the tests marked slow or box (ARGS as for test)
VENV ?= .venv
PYTHON ?= python3
# The CPU wheel; on a GPU machine set TORCH_SPEC to the CUDA build you want.
TORCH_SPEC ?= torch==2.13.0
# pytest-xdist workers; tests that share a fixture or the network namespaces stay on one (tests/conftest.py).
# JOBS=N sets them for both; JOBS=0 runs in this process, one test after another. By default, on a 2-core
# machine: make test 3 (many of its tests wait part of the time, on Slurm, a timeout they check or a
# launch's start-up, and a third worker keeps both cores busy then), make check 2 (its tests only compute).
JOBS ?=
# The suite starts hundreds of interpreters that import the project: they share its byte code, written
# by the first (where the environment says PYTHONDONTWRITEBYTECODE=1, each would compile it again).
PYTEST = env -u PYTHONDONTWRITEBYTECODE $(VENV)/bin/pytest -q --dist loadgroup

# torch with pip (its CPU wheel lies in pip's find-links on machines that have one), the rest with uv
# (parallel downloads and installs: 14 s against pip's 41 s here), torch held at the version pip
# installed; where uv cannot install (a pip-only index or mirror), pip does.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q "$(TORCH_SPEC)" uv
	$(VENV)/bin/python -c "from importlib.metadata import version; print('torch==' + version('torch'))" > $(VENV)/torch-pin.txt
	$(VENV)/bin/uv pip install -q --python $(VENV)/bin/python --compile-bytecode --constraint $(VENV)/torch-pin.txt -e ".[dev]" \
		|| { echo "uv could not install .[dev]: pip installs it"; $(VENV)/bin/pip install -q -e ".[dev]"; }
	touch $@

.PHONY: setup train test check
setup: $(VENV)/.installed

train: $(VENV)/.installed
	$(VENV)/bin/sparsecomm-train $(ARGS)

test: $(VENV)/.installed
	$(PYTEST) -n $(or $(JOBS),3) --durations=30 $(ARGS)

check: $(VENV)/.installed
	$(PYTEST) -n $(or $(JOBS),2) -m "not slow and not box" $(ARGS)
