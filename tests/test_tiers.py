"""The test tiers (docs/testing.md): ``make test`` runs every test on parallel workers, ``make check``
leaves out the slow and box tests, and tests that share a fixture or the network namespaces run on
one worker (tests/conftest.py)."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def make_command(target: str) -> list[str]:
    """The pytest command line ``make <target>`` runs (``make -n``: printed, not run)."""
    out = subprocess.run(["make", "-n", "-C", str(REPO), target, "VENV=.venv"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    lines = [shlex.split(line) for line in out.stdout.splitlines() if "pytest" in line]
    assert len(lines) == 1, out.stdout
    return lines[0]


def test_make_test_runs_everything_and_make_check_leaves_out_slow_and_box():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    full, check = make_command("test"), make_command("check")
    assert "-m" not in full and "-k" not in full, full  # no test left out
    assert check[check.index("-m") + 1] == "not slow and not box", check
    for cmd in (full, check):
        assert cmd[cmd.index("--dist") + 1] == "loadgroup", cmd  # the groups of conftest.py are honoured
    assert (REPO / ".ci" / "run").read_text().rstrip().endswith("make test")  # CI runs the whole suite


GROUPED = '''
import json, os, time

import pytest

def record(name):
    with open(os.path.join(os.environ["RECORD_DIR"], name), "w") as f:
        json.dump({"worker": os.environ.get("PYTEST_XDIST_WORKER"), "pid": os.getpid(),
                   "at": time.monotonic_ns()}, f)

@pytest.fixture(scope="module")
def shared():
    record("fixture-" + str(os.getpid()))

@pytest.mark.parametrize("i", range(6))
def test_uses_module_fixture(shared, i):
    record(f"fixture-user-{i}")

@pytest.fixture(scope="module")
def box_state():
    record(f"box-fixture-{time.monotonic_ns()}")

@pytest.mark.box
@pytest.mark.parametrize("i", range(4))
def test_box(i, box_state):
    record(f"box-{i}")

@pytest.mark.parametrize("i", range(8))
def test_free(i):
    record(f"free-{i}")

def test_sleeps():
    time.sleep(2.2)
'''
# A box test in another module: the group holds two modules.
OTHER_MODULE = '''
import pytest

from test_grouped import record

@pytest.mark.box
def test_box_elsewhere():
    record("box-elsewhere")
'''
# What the inner suite's durations file says before the run: two free tests long (they take the
# order 7, 6, then the rest); a group's tests long enough to interleave its two modules if groups
# were sorted too (the box module's fixture would then be set up twice); a test that no longer
# runs (its entry is kept).
RECORDED = {"tests/test_grouped.py::test_free[6]": 50.0, "tests/test_grouped.py::test_free[7]": 60.0,
            "tests/test_grouped.py::test_box[3]": 40.0, "tests/test_other.py::test_box_elsewhere": 30.0,
            "tests/test_gone.py::test_elsewhere": 5.0}


@pytest.mark.slow
def test_tests_sharing_a_module_fixture_or_the_box_stay_on_one_worker(tmp_path):
    """A real xdist run of a module with a module fixture, box tests and free tests on 2 workers."""
    root = tmp_path / "suite"
    (root / "tests").mkdir(parents=True)
    for name in ("conftest.py", "freshenv.py"):
        shutil.copy(REPO / "tests" / name, root / "tests" / name)
    (root / "tests" / "test_grouped.py").write_text(GROUPED)
    (root / "tests" / "test_other.py").write_text(OTHER_MODULE)
    (root / "tests" / "durations.json").write_text(json.dumps(RECORDED))
    (root / "pytest.ini").write_text("[pytest]\nmarkers =\n    box: cluster in a box\n    slow: slow\n")
    records = tmp_path / "records"
    records.mkdir()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
                           "--dist", "loadgroup", "--store-durations", "tests"], cwd=root, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "RECORD_DIR": str(records)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = {p.name: json.loads(p.read_text()) for p in records.iterdir()}
    assert len([n for n in seen if n.startswith("fixture-") and not n.startswith("fixture-user")]) == 1, sorted(seen)
    users = {seen[f"fixture-user-{i}"]["worker"] for i in range(6)}
    boxes = {seen[f"box-{i}"]["worker"] for i in [*range(4), "elsewhere"]}
    assert len([n for n in seen if n.startswith("box-fixture-")]) == 1, sorted(seen)  # its module's tests together
    assert len(users) == 1 and len(boxes) == 1, (users, boxes)
    assert {r["worker"] for r in seen.values()} <= {"gw0", "gw1"}, seen  # every test ran on a worker
    # Each worker took the free tests longest first, by the file: 7, 6, then 0-5 in order.
    for worker in ("gw0", "gw1"):
        mine = sorted((r["at"], int(n.split("-")[1])) for n, r in seen.items()
                      if n.startswith("free-") and r["worker"] == worker)
        ran = [i for _, i in mine]
        assert ran == [i for i in (7, 6, 0, 1, 2, 3, 4, 5) if i in ran], (worker, ran)
    # --store-durations: the tests of 2 s or more measured now (a worker's first test also holds the
    # session's set-up), the entries of the tests that did not run kept.
    stored = json.loads((root / "tests" / "durations.json").read_text())
    assert 2.2 <= stored["tests/test_grouped.py::test_sleeps"] < 60, stored
    assert stored["tests/test_gone.py::test_elsewhere"] == 5, stored
    assert not any("test_free" in k for k in stored), stored  # measured now, under 2 s: out of the file
