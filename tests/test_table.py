"""``sparsecomm-table``: one Markdown table from run folders' summaries.

Fast tests build run folders by hand (the numbers are chosen, the expected cells worked out
here); the slow one runs the documented sweep ``-m comm=dense,fp16,powersgd,masked`` end to end
and checks each summary's bytes against what each option must send, counted from the model's
entries and the mask's k (n x 4 per dense step, n x 2 for fp16, k x 4 per masked step), then
the table of that sweep.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from apptest import APP, app_env, clean_launcher_env
from sparsecomm.app import table


def write_run(folder, *, comm="masked", mask="fisher", density=0.005, lr=0.03, seed=0, acc=0.9, sent=4e6,
              dense=16e6, train_s=2.0, **config):
    folder.mkdir(parents=True)
    summary = {"comm": comm, "mask": mask, "density": density, "test_acc": acc, "bytes_sent": sent,
               "dense_bytes": dense, "ratio": sent / dense, "train_s": train_s}
    (folder / "summary.json").write_text(json.dumps(summary))
    cfg = {"seed": seed, "steps": 400, "run_id": folder.name, "comm": {"name": comm, "bucket_cap_mb": 25},
           "mask": {"name": mask, "density": density}, "optim": {"name": "adamw", "lr": lr, "dense_lr": 0.003}}
    for key, value in config.items():
        cfg[key] = value
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))


def rows(text: str) -> list[list[str]]:
    lines = text.splitlines()
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]], lines[0]


def test_seeds_share_a_row_as_mean_and_spread(tmp_path):
    sweep = tmp_path / "sweep"
    write_run(sweep / "0", seed=0, acc=0.90, train_s=2.0)
    write_run(sweep / "1", seed=1, acc=0.94, train_s=4.0)
    write_run(sweep / "2", comm="fp16", mask="unused", density=1.0, acc=0.97, sent=8e6)
    (body, head) = rows(table.table([str(sweep)]))
    assert head == "| comm | mask | density | lr | seeds | test acc | MB sent / rank | ratio to dense | train s |"
    # 0.90, 0.94: mean 0.92, sample sd 0.04 / sqrt(2) = 0.0283; train s 3 +- 1.41
    assert body[0] == ["masked", "fisher", "0.005", "0.03", "2", "0.9200 ± 0.0283", "4.000", "0.2500", "3.0 ± 1.4"]
    assert body[1] == ["fp16", "unused", "1", "0.003", "1", "0.9700", "8.000", "0.5000", "2.0"]


def test_a_field_that_differs_within_an_option_becomes_a_column(tmp_path):
    write_run(tmp_path / "0", steps=100)
    write_run(tmp_path / "1", steps=200)
    write_run(tmp_path / "2", comm="powersgd", mask="unused", density=1.0)  # its own comm fields: no column
    (body, head) = rows(table.table([str(tmp_path)]))
    assert "| steps |" in head and "bucket_cap_mb" not in head
    assert [r[4] for r in body] == ["100", "200", "400"]


def with_mask_seed(folder, value) -> None:
    path = folder / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["mask"]["seed"] = value
    path.write_text(yaml.safe_dump(cfg))


def test_a_mask_seed_that_follows_the_seed_shares_the_row(tmp_path):
    """mask=random's ``mask.seed`` is ``${seed}``: resolved in each run's config, it differs with the
    seed and must not split the seeds of one config into rows. A mask seed of its own still does."""
    for seed, acc in ((0, 0.90), (1, 0.94)):
        write_run(tmp_path / "follows" / str(seed), mask="random", seed=seed, acc=acc)
        with_mask_seed(tmp_path / "follows" / str(seed), seed)
    (body, head) = rows(table.table([str(tmp_path / "follows")]))
    assert "mask.seed" not in head and len(body) == 1 and body[0][4:6] == ["2", "0.9200 ± 0.0283"]
    for mask_seed in (5, 6):
        write_run(tmp_path / "own" / str(mask_seed), mask="random", seed=0)
        with_mask_seed(tmp_path / "own" / str(mask_seed), mask_seed)
    (body, head) = rows(table.table([str(tmp_path / "own")]))
    assert "| mask.seed |" in head and len(body) == 2


def test_a_folder_without_a_summary_is_named_in_a_warning(tmp_path, capsys):
    write_run(tmp_path / "0")
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "log.txt").write_text("a failed job\n")
    table.main([str(tmp_path)])
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"warning: {tmp_path / '1'} has no summary.json (the run failed or has not "
                                f"finished): left out"]
    assert len(out.strip().splitlines()) == 3


def test_no_summary_at_all_is_one_error_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        table.main([str(tmp_path / "empty")])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no summary.json" in errors[0] and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.timeout(1200)  # four 2-rank app runs, each starting its workers
def test_the_comm_sweep_end_to_end_and_its_table(tmp_path, monkeypatch):
    clean_launcher_env(monkeypatch)
    steps, dense_steps = 20, 5
    proc = subprocess.run([str(APP), "-m", "comm=dense,fp16,powersgd,masked", "task=digits", f"steps={steps}",
                           f"schedule.dense_steps={dense_steps}", "eval_every=0", "logging.progress=false",
                           "batch_size=8", "eval_batch_size=128", "++mask.num_samples=16", "save_model=false",
                           f"out_dir={tmp_path}", "run_id=cmp"], cwd=tmp_path, env=app_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep = tmp_path / "multirun" / "cmp"
    s = {json.loads((sweep / str(i) / "summary.json").read_text())["comm"]:
         json.loads((sweep / str(i) / "summary.json").read_text()) for i in range(4)}
    assert set(s) == {"dense", "fp16", "powersgd", "masked"}
    n, k = s["masked"]["numel"], s["masked"]["k"]
    for name in s:
        assert s[name]["dense_bytes"] == steps * n * 4
        assert "test_acc" in s[name] and "train_s" in s[name] and "ratio" in s[name]
    assert s["dense"]["bytes_sent"] == steps * n * 4 and s["dense"]["mask"] == "unused"
    assert s["fp16"]["bytes_sent"] == steps * n * 2 and s["fp16"]["wire_dtype"] == "fp16"
    assert s["masked"]["bytes_sent"] == dense_steps * n * 4 + (steps - dense_steps) * k * 4
    assert 0 < s["powersgd"]["bytes_sent"] < s["fp16"]["bytes_sent"] and s["powersgd"]["compress_rate"] > 1
    assert s["powersgd"]["state_bytes"] >= n * 4, "its error feedback keeps n entries"

    out = subprocess.run([sys.executable, "-m", "sparsecomm.app.table", str(sweep)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    body, _ = rows(out.stdout)
    by_comm = {r[0]: r for r in body}
    assert list(by_comm) == ["dense", "fp16", "powersgd", "masked"]
    assert by_comm["fp16"][6] == f"{steps * n * 2 / 1e6:.3f}" and by_comm["fp16"][7] == "0.5000"
    assert by_comm["dense"][7] == "1.0000" and by_comm["masked"][1] == "fisher"
    assert by_comm["masked"][5] == f"{s['masked']['test_acc']:.4f}"
