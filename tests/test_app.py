"""End to end: the real console entry `sparsecomm-train` in a subprocess, 2 Gloo workers on digits."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from apptest import REPO, app_env, compose_app, read_events, run_app

pytestmark = pytest.mark.slow  # every test runs the app (torchrun, a subprocess or a transfer job): 10-60 s each

SMALL = ["steps=10", "batch_size=16", "eval_every=5", "logging.log_every=2", "mask.num_samples=64"]


def test_default_job_two_workers(tmp_path):
    """Bare launch: 2 workers, 3 dense steps then the FISH mask; files, mask digest and bytes."""
    import torch
    from safetensors.torch import load_model

    from sparsecomm import Mask

    from sparsecomm.app import models
    from sparsecomm.app.data import build_task

    proc = run_app([*SMALL, "schedule.dense_steps=3", f"out_dir={tmp_path}", "run_id=e2e"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "e2e"
    for name in ("config.yaml", "metrics.jsonl", "mask.safetensors", "model.safetensors", "summary.json", ".hydra"):
        assert (run_dir / name).exists(), name
    assert proc.stdout.count("== sparsecomm summary") == 1  # rank 0 alone reports
    assert "step/s" in proc.stderr  # rank 0's progress bar

    records = read_events(run_dir)
    by_event = {e: [r for r in records if r["event"] == e] for e in ("train", "eval", "mask", "summary")}
    assert [r["step"] for r in by_event["train"]] == [2, 4, 6, 8, 10]
    assert [r["step"] for r in by_event["eval"]] == [5, 10]
    assert [r["step"] for r in by_event["mask"]] == [3]
    (summary,) = by_event["summary"]
    assert summary == {**json.loads((run_dir / "summary.json").read_text()), "event": "summary", "step": 10,
                       "time": summary["time"]}
    assert summary["world_size"] == 2

    model = models.small_cnn(10)
    mask = Mask.load(run_dir / "mask.safetensors", model)  # verifies the stored digest, fits the model
    assert mask.digest() == summary["mask_digest"] == by_event["mask"][0]["digest"]
    n = summary["numel"]
    assert n == sum(p.numel() for p in model.parameters())
    k = round(0.005 * n)  # density 0.005 of every entry (the head's count against it)
    assert mask.num_selected == summary["k"] == k
    assert all(mask[name].all() for name in mask if name.startswith("head."))  # the head is kept whole

    # 3 dense steps send all n fp32 entries, 7 masked steps send the k selected ones.
    assert summary["bytes_sent"] == 3 * n * 4 + 7 * k * 4
    assert summary["dense_bytes"] == 10 * n * 4
    assert summary["bytes_sent"] < summary["dense_bytes"]
    assert summary["ratio"] == pytest.approx(summary["bytes_sent"] / summary["dense_bytes"])
    assert [r["bytes_per_step"] for r in by_event["train"]][-1] == k * 4

    load_model(model, str(run_dir / "model.safetensors"))
    assert torch.isfinite(torch.cat([p.reshape(-1) for p in model.parameters()])).all()
    # The reported accuracy is the saved model's, on the whole test set, counted here by hand.
    test_set = build_task(compose_app().task).test_set
    x = torch.stack([test_set[i][0] for i in range(len(test_set))])
    y = torch.tensor([int(test_set[i][1]) for i in range(len(test_set))])
    with torch.no_grad():
        correct = int((model.eval()(x).argmax(-1) == y).sum())
    assert summary["test_acc"] == pytest.approx(correct / len(y), abs=1e-12), (summary["test_acc"], correct, len(y))


def test_glue_minilm_transfer_job(tmp_path):
    """The paper's transfer setting end to end: the packaged pretrained MiniLM fine-tuned on GLUE
    TSVs under task.data_dir, FISH mask after 2 dense steps, 2 workers; the task diff rebuilds it."""
    import torch
    from safetensors.torch import load_file, load_model

    pytest.importorskip("transformers")
    from sparsecomm import diff
    from sparsecomm.app.data import build_task

    data = tmp_path / "SST-2"
    data.mkdir()
    rows = ["sentence\tlabel"] + [f"{w} film {i}\t{int(w == 'great')}" for i in range(24) for w in ("great", "dull")]
    for name in ("train.tsv", "dev.tsv"):
        (data / name).write_text("\n".join(rows) + "\n")
    args = ["task=glue", f"task.data_dir={data}", "task.max_length=12", "steps=4", "batch_size=4", "eval_every=0",
            "mask.num_samples=8", "mask.batch_size=4", "mask.chunk_size=4", "schedule.dense_steps=2",
            "logging.progress=false", f"out_dir={tmp_path}", "run_id=glue"]
    proc = run_app(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "glue"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["task"] == "glue-sst2" and summary["k"] == round(0.005 * summary["numel"])
    assert summary["bytes_sent"] == 2 * summary["numel"] * 4 + 2 * summary["k"] * 4

    base = build_task(compose_app(*args).task).model
    load_model(base, str(run_dir / "base.safetensors"))
    rebuilt = diff.apply(base, run_dir / "task_diff.safetensors").state_dict()
    final = load_file(str(run_dir / "model.safetensors"))
    assert final.keys() <= rebuilt.keys() and all(torch.equal(t, rebuilt[n]) for n, t in final.items())


def test_torchrun_ranks_join_and_share_one_run_dir(tmp_path):
    """cluster/torchrun_local.sh: torchrun starts the ranks, the app starts none; one run dir."""
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(REPO / "cluster" / "torchrun_local.sh"), "steps=4", "batch_size=16", "schedule=fish_fixed", "mask=random", "eval_every=0", "logging.progress=false", f"out_dir={out}"],
        cwd=tmp_path, env={**app_env(), "PYTHON": sys.executable, "NPROC": "2"},
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir,) = list(out.iterdir())  # both ranks agreed on TORCHELASTIC_RUN_ID
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["bytes_sent"] == 4 * summary["k"] * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # rank 1 wrote nothing elsewhere
    assert proc.stdout.count("== sparsecomm summary") == 1


@pytest.mark.parametrize("args,field", [
    (["mask=nope"], "mask=nope"),
    (["mask.density=0"], "mask.density"),
    (["task=cifar10"], "task.data_dir"),
    (["cluster.backend=nccl"], "cluster.backend"),
    # Found by the workers (building the task), reported once by the launching process:
    (["task=cifar10", "task.data_dir=/nonexistent/cifar", "cluster.start_method=fork"], "task.data_dir"),
])
def test_bad_input_is_one_line(tmp_path, args, field):
    import torch

    if "cluster.backend=nccl" in args and torch.cuda.is_available():
        pytest.skip("this machine has GPUs")
    proc = run_app([*args, f"out_dir={tmp_path}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-4000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and field in lines[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
