"""Suite-wide set-up, and the groups that keep tests sharing one thing on one xdist worker.

``make test`` runs the suite on parallel workers (pytest-xdist, ``--dist loadgroup``). Tests stay
together (same worker, one after another) when they

* share a module-scoped fixture (a built wheel, a cluster in a box, a reference run): grouped by
  their module, so the fixture is built once;
* use the host's network namespaces (marker ``box``): one group, ``netns``, since two boxes at
  once would compete for the same Slurm and namespace names and halve each other's CPU;
* carry their own ``@pytest.mark.xdist_group(name)``.

Workers take the groups first (xdist hands out the largest first; a group's tests in their order),
then the other tests longest first, as ``tests/durations.json`` records them (``make test
ARGS=--store-durations`` rewrites it): the short tests fill the workers at the end instead of a
long one running on alone.
"""
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402  (after the offline switches above)

import freshenv  # noqa: E402  (tests/freshenv.py)

SHARED_SCOPES = ("module", "package", "class")


def xdist_group_of(item: pytest.Item) -> str | None:
    """The group ``item`` must run in (see the module docstring), or None: any worker will do."""
    named = item.get_closest_marker("xdist_group")
    if named is not None:
        return str(named.args[0] if named.args else named.kwargs.get("name", "default"))
    if item.get_closest_marker("box") is not None:
        return "netns"
    for defs in item._fixtureinfo.name2fixturedefs.values():
        if defs and defs[-1].scope in SHARED_SCOPES:
            return item.module.__name__
    return None


def in_group(item: pytest.Item, group: str) -> None:
    """Give ``item`` the id suffix ``@group`` that xdist's loadgroup scheduler reads. xdist's own
    hook writes ``item._nodeid``, which pytest 9.2 no longer reads (the id is a ``NodeId``)."""
    nodeid = f"{item.nodeid}@{group}"
    if hasattr(item, "_id"):
        from _pytest.nodeid import NodeId  # pytest >= 9.2

        item._id = NodeId.parse(nodeid)
    else:
        item._nodeid = nodeid


@pytest.hookimpl(trylast=True)  # after xdist's own hook: an id it did rename is left alone
def pytest_collection_modifyitems(config, items):
    if not getattr(config.option, "loadgroup", False):  # set on xdist's workers under --dist loadgroup
        return
    for item in items:
        group = xdist_group_of(item)
        if group is not None and not item.nodeid.endswith(f"@{group}"):
            in_group(item, group)
    # The tests outside groups longest first. xdist hands out the groups before them, largest first;
    # a group's tests keep their order (by module: a module-scoped fixture is torn down when the
    # worker moves to another module, and would be set up again if the module came back).
    seconds = recorded_durations()

    def longest_first(item: pytest.Item) -> float:
        name = without_group(item.nodeid)
        if name != item.nodeid:  # in a group
            return 0.0
        return -seconds.get(name, UNRECORDED_SLOW_S if item.get_closest_marker("slow") else 0.0)

    items.sort(key=longest_first)


DURATIONS = Path(__file__).with_name("durations.json")
RECORD_FROM_S = 2.0  # tests shorter than this are left out of the file: their order does not matter
UNRECORDED_SLOW_S = 10.0  # a test marked slow that the file does not hold yet


def without_group(nodeid: str) -> str:
    """``nodeid`` without the ``@group`` suffix that grouping adds."""
    return nodeid.rsplit("@", 1)[0] if nodeid.rfind("@") > nodeid.rfind("]") else nodeid


def recorded_durations() -> dict[str, float]:
    try:
        return json.loads(DURATIONS.read_text())
    except (OSError, ValueError):
        return {}


def pytest_addoption(parser):
    parser.addoption("--store-durations", action="store_true",
                     help=f"record each test's seconds (setup, call, teardown) in {DURATIONS.name}, "
                          "the order in which the workers take the tests")


def pytest_configure(config):
    if config.getoption("store_durations") and not hasattr(config, "workerinput"):  # not on an xdist worker
        config.pluginmanager.register(DurationRecorder(), "durations-recorder")


class DurationRecorder:
    """Each test's seconds, from the reports (on the controller, the workers' reports): written to
    ``DURATIONS`` at the end, keeping the entries of the tests that did not run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def pytest_runtest_logreport(self, report) -> None:
        key = without_group(report.nodeid)
        self.seconds[key] = self.seconds.get(key, 0.0) + report.duration

    def pytest_sessionfinish(self) -> None:
        kept = {k: v for k, v in recorded_durations().items() if k not in self.seconds}
        kept.update({k: round(v, 1) for k, v in self.seconds.items() if v >= RECORD_FROM_S})
        DURATIONS.write_text(json.dumps(dict(sorted(kept.items(), key=lambda kv: -kv[1])), indent=0) + "\n")


@pytest.fixture(scope="session", autouse=True)
def _warm_lazy_imports():
    """Import what DDP and the optimizers import lazily (torch._dynamo) once, before any fork."""
    import torch
    import torch._dynamo  # noqa: F401

    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:  # parallel workers share the cores: each its share of torch's threads
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))


@pytest.fixture(scope="session")
def torch_env(tmp_path_factory) -> Path:
    """One fresh virtual environment holding this environment's torch (and what it requires, and
    pip) by hard links, the source that ``freshenv.make_venv`` seeds fresh environments from
    (tests/freshenv.py)."""
    return freshenv.torch_env(tmp_path_factory.mktemp("torch-env") / "env")


REPO = Path(__file__).resolve().parents[1]
# What a build must not see: local environments, caches and outputs.
NOT_SOURCE = (".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", "outputs", "multirun", "runs",
              "wandb", ".pytest_cache", "benchmarks", "tests")


@pytest.fixture(scope="session")
def dists(tmp_path_factory) -> dict[str, Path]:
    """The wheel and the sdist, built from a copy of the tree (``python -m build``)."""
    src = tmp_path_factory.mktemp("src") / "sparsecomm"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    return freshenv.build(src, tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="session")
def wheel_env(dists, torch_env, tmp_path_factory) -> Path:
    """A fresh virtual environment holding the wheel and every dependency it declares, as pip
    resolved them (torch seeded from ``torch_env``)."""
    return freshenv.install(dists["wheel"], tmp_path_factory.mktemp("wheel-env") / "env", torch_env)
