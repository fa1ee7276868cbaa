"""Hints are commands (sparsecomm/app/hints.py): the printed ``resume with:`` line, pasted into
bash, resumes the same run, whatever characters ``out_dir`` and ``run_id`` hold; an override
Hydra's lexer refuses is one line showing the quoting that works.

The references are Hydra's own override parser (what the app reads back) and bash (what a user
pastes), never the quoting code itself.
"""
from __future__ import annotations

import os
import shlex
import subprocess

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from apptest import (APP, TINY, app_env, clean_launcher_env, compose_app, crash_runs_before, error_lines,
                     main_in_process, read_events)
from sparsecomm.app import hints

AWKWARD = ["plain", "4711", "007", "1e3", "with space", "ünïcödé", "a=b", "it's", 'say "hi"', "[1,2]", "x,y",
           "123", "true", "null", "back\\slash", "end\\", "q\\'s", " lead", "tab\there",
           "${oc.env:HOME}x", "{a: 1}", "semi;colon$HOME"]


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    clean_launcher_env(monkeypatch)


def as_the_app_reads(arg: str) -> str:
    """The value of ``arg`` (``key=value``) in the config the app composes (interpolations unresolved)."""
    key = OverridesParser.create().parse_override(arg).key_or_group
    return OmegaConf.to_container(compose_app(arg), resolve=False)[key]


@pytest.mark.parametrize("value", AWKWARD)
def test_an_override_the_app_reads_back_as_the_same_string_after_the_shell(value):
    word = hints.override("out_dir", value)
    (arg,) = shlex.split(word)  # what bash hands the app: one argument
    assert as_the_app_reads(arg) == value, word


@pytest.mark.slow  # a bash and an app process per word: 4 s
def test_bash_hands_the_app_the_same_argument():
    words = " ".join(hints.override("run_id", v) for v in AWKWARD)
    out = subprocess.run(["bash", "-c", f"printf '%s\\0' {words}"], capture_output=True, check=True).stdout
    assert [as_the_app_reads(a) for a in out.decode().split("\0")[:-1]] == AWKWARD
    assert hints.override("run_id", "4711") == "run_id=4711"  # quoted only where needed


@pytest.mark.parametrize("out_name,run_id", [("out dir ü", "run one"), ("o'q", "r=1,2 ä")])
@pytest.mark.slow
def test_the_printed_resume_line_pasted_into_bash_resumes_the_run(tmp_path, capsys, monkeypatch, out_name, run_id):
    out_dir = tmp_path / out_name
    crash_runs_before(monkeypatch, 3)
    # run_id typed with the quoting the lexer error would suggest; out_dir as the shell passes it
    args = [*TINY, "steps=6", "checkpoint.every=2", f"out_dir={hints.hydra_value(str(out_dir))}",
            f"run_id={hints.hydra_value(run_id)}"]
    code, _, err = main_in_process(args, capsys)
    assert code == 1, err
    (hint,) = [line for line in err.splitlines() if "resume with: " in line]
    command = hint.split("resume with: ", 1)[1]
    assert command.startswith("sparsecomm-train ")
    env = app_env(PATH=f"{APP.parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    run_dir = out_dir / run_id
    assert "resumed from" in done.stderr and str(run_dir / "checkpoints" / "step-00000002.ckpt") in done.stderr
    steps = [r["step"] for r in read_events(run_dir) if r["event"] == "train"]
    assert sorted(steps) == sorted(set(steps)) and max(steps) == 6
    assert sorted(p.name for p in out_dir.iterdir()) == [run_id]  # no second folder


@pytest.mark.parametrize("value", ["/tmp/ä", "/tmp/a b=c", "x'y"])
def test_an_override_the_lexer_refuses_is_one_line_with_the_quoting_to_use(tmp_path, capsys, value):
    code, _, err = main_in_process([*TINY, f"out_dir={value}"], capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = error_lines(err)
    assert "quote the value" in line, line
    fix = line.rsplit("shell: ", 1)[1]
    env = app_env(PATH=f"{APP.parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", "-c", f"sparsecomm-train --check {fix} run_id=r"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(os.path.join(tmp_path, value, "r")), done.stdout  # the value as typed


def test_under_slurm_the_hint_names_the_job_and_the_run_id_to_pass(tmp_path):
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    hint = hints.resume_command(str(tmp_path / "4711"), ["steps=8", "cluster=slurm"], environ={"SLURM_JOB_ID": "4711"})
    assert "4711" in hint and "run_id=4711" in hint and "scontrol requeue 4711" in hint, hint
    hint = hints.resume_command(str(tmp_path / "ab cd"), ["steps=8"], environ={"TORCHELASTIC_RUN_ID": "ab cd",
                                                                              "RANK": "0"})
    assert "torchrun" in hint and "rdzv id ab cd" in hint, hint
    steps, rid = shlex.split(hint.split("sparsecomm.app.train ")[1])
    assert steps == "steps=8" and as_the_app_reads(rid) == "ab cd", hint


@pytest.mark.slow
def test_without_checkpoints_the_hint_is_the_command_that_works(tmp_path, capsys, monkeypatch):
    """A crashed run without checkpoints: the hint says start a new run_id, and the same command is refused."""
    finish = crash_runs_before(monkeypatch, 3)
    args = [*TINY, f"out_dir={tmp_path}", "run_id=n", "logging.log_every=1"]
    code, _, err = main_in_process(args, capsys)
    assert code == 1 and "nothing to resume" in err and "another run_id" in err and "starts from step 0" not in err
    finish()
    code, _, err = main_in_process(args, capsys)
    assert code == 2 and "run_id=" in error_lines(err)[0]
    code, _, err = main_in_process([*args[:-2], "run_id=n2", "logging.log_every=1"], capsys)
    assert code == 0, err
