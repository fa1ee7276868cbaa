"""Fuzz of the app's configuration, through its real entry point (``sparsecomm.app.train.main``, one
process): every field of every option of every config group, and the top-level fields, each set
to a wrong type, out of range, empty, null, huge, a list; an unknown option of every group; an
unknown key in every group, with and without ``+``; and seeded combinations of several at once.

Every case must either run (the real app, to its summary; a case whose values ask for more than
a few steps is stopped after step 6, counted as running) or end with exit code 2 and ONE line
``error: ...`` that names the field it is about. A traceback is a failure.

In the suite each field meets one mutation (the kind rotating over the fields);
``SPARSECOMM_FUZZ=full`` runs every mutation of every field, ``SPARSECOMM_FUZZ_SEEDS=N`` widens
the seeded combinations (default 12).
"""
from __future__ import annotations

import functools
import os
import random
import re
from collections.abc import Iterator

import pytest
from omegaconf import DictConfig, OmegaConf

from apptest import TINY, clean_launcher_env, compose_app, error_lines, main_in_process
from sparsecomm.app import train

MUTATIONS = ("abc", "''", "null", "-1", "0", "0.5", "1000000000000", "1e308", "[1,2]", "{a:1}")
SKIP_FIELDS = {"_target_", "name"}  # what picks the code, not a value: covered by the unknown-option cases
SEEDS = int(os.environ.get("SPARSECOMM_FUZZ_SEEDS", "12"))
FULL = os.environ.get("SPARSECOMM_FUZZ") == "full"


# What makes a group option runnable on a CPU machine in a few steps: its fields are fuzzed from there.
RUNNABLE_WITH = {
    "cluster=single_node_gpu": ("cluster.backend=gloo", "cluster.device=cpu", "cluster.nproc_per_node=1"),
    "cluster=slurm": ("cluster.backend=gloo", "cluster.device=cpu", "cluster.nproc_per_node=1", "cluster.nnodes=1"),
    "mask=diff_pruning": ("mask.l0_steps=1",),
}


# Group choices that stop on their own in this environment, and what their one line names: a
# field case of such a choice may stop with that line instead of naming its own field.
STOPS_ON_ITS_OWN = {"task=cifar10": "task.data_dir", "task=glue": "task.data_dir", "mask=file": "mask.path",
                    "mask=token_rows": "mask.embedding",  # a text model's embedding; TINY's is none
                    "logging=wandb": "logging=wandb"}


def _wordnet_installed(filename: str) -> bool:
    from sparsecomm.app.tasks.wordnet import find_data_file

    try:
        find_data_file(None, filename)
    except FileNotFoundError:
        return False
    return True


# Without WordNet on the machine (Debian's wordnet-base or NLTK's copy), its tasks stop on their own too.
STOPS_ON_ITS_OWN |= {choice: "task.data_dir" for choice, filename in
                     (("task=wordnet", "data.noun"), ("task=verb_examples", "data.verb"))
                     if not _wordnet_installed(filename)}
# What each override value of the cases means, written out by hand (Hydra's override grammar).
VALUES = {"abc": "abc", "''": "", "null": None, "-1": -1, "0": 0, "0.5": 0.5, "1000000000000": 10**12,
          "1e308": 1e308, "[1,2]": [1, 2], "{a:1}": {"a": 1}, "1": 1, "2": 2, "6": 6, "1:1": "1:1",
          "bf16": "bf16", "gloo": "gloo", "cpu": "cpu"}


class _Enough(BaseException):
    """A case that asked for a long run was running fine: stop it."""


def groups_and_options() -> dict[str, list[str]]:
    from importlib.resources import files

    root = files(train.CONFIG_MODULE)
    out = {}
    for group in sorted(train.config_groups()):
        node = root.joinpath(*group.split("/"))
        out[group] = sorted(p.name[:-5] for p in node.iterdir() if p.name.endswith(".yaml"))
    return out


def leaves(node, prefix: str) -> Iterator[str]:
    for key in node.keys():
        value = node._get_node(key)
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, DictConfig) and not value._is_none():
            yield from leaves(node[key], path)
        elif key not in SKIP_FIELDS:
            yield path


Option = tuple[str, tuple[str, ...], tuple[str, ...] | None]  # (choice, overrides it needs to run, fields)


@functools.cache
def fields() -> tuple[tuple[str, ...], tuple[tuple[str, tuple[Option, ...]], ...]]:
    """What the cases fuzz, composed once per process: the top-level fields, and per group its
    options as (choice, the overrides it needs to run, its fields); a preset's fields are None (a
    global-package option that sets other groups' fields, fuzzed there)."""
    options = groups_and_options()
    base = compose_app(*TINY)
    top = tuple(k for k in leaves(base, "") if k.split(".")[0] not in {g.split("/")[0] for g in options})
    groups = []
    for group, names in options.items():
        package = group.replace("/", ".")
        per_option = []
        for name in names:
            choice = f"{group}={name}"
            node = OmegaConf.select(compose_app(*TINY, choice), package)
            keys = None if node is None else tuple(leaves(node, package))
            per_option.append((choice, RUNNABLE_WITH.get(choice, ()), keys))
        groups.append((group, tuple(per_option)))
    return top, tuple(groups)


def field_cases(full: bool = FULL) -> list[tuple[str, ...]]:
    """(group choice, override) for every field of every option, and every top-level field.

    ``full``: every mutation of every field; else one per field, the kind rotating from field to
    field (so that every kind meets many fields), plus every unknown option and unknown key.
    """
    top, groups = fields()
    cases: list[tuple[str, ...]] = []
    turn = iter(range(10**9))

    def mutate(key: str) -> list[str]:
        return [f"{key}={m}" for m in MUTATIONS] if full else [f"{key}={MUTATIONS[next(turn) % len(MUTATIONS)]}"]

    for key in top:
        cases += [(o,) for o in mutate(key)]
    for group, per_option in groups:
        package = group.replace("/", ".")
        cases.append((f"{group}=nope",))
        for choice, fixes, keys in per_option:
            if keys is None:
                continue
            cases += [(choice, f"{package}.nosuchkey=1"), (choice, f"+{package}.nosuchkey=1")]
            for key in keys:
                cases += [(choice, *fixes, o) for o in mutate(key)]
    return cases


def combined_cases(seeds: int) -> list[tuple[str, ...]]:
    pool = field_cases(full=True)
    good = ["mask=random", "mask=dense", "optim=sgd", "schedule=fish_fixed", "comm.wire_dtype=bf16",
            "checkpoint.every=2", "steps=6", "schedule.core_full=1:1"]
    out = []
    for seed in range(seeds):
        rng = random.Random(seed)
        out.append(tuple(rng.choice(good if rng.random() < 0.4 else [o for c in pool for o in c])
                         for _ in range(rng.randint(2, 3))))
    return out


def key_of(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


@pytest.fixture
def capped_app(monkeypatch):
    """The app, with a run stopped after step 6 (the cases are about values, not long runs)."""
    from sparsecomm.app import trainer

    clean_launcher_env(monkeypatch)
    real = trainer.Trainer.train_step

    def train_step(self, step):
        if step >= 6:
            raise _Enough
        return real(self, step)

    monkeypatch.setattr(trainer.Trainer, "train_step", train_step)


def run_case(case, tmp_path, capsys, combined: bool = False) -> str:
    """'ran' or 'error'; asserts the contract (no traceback; one line naming a field of the case).

    A field case (group choice, fixes, the override) must name the overridden field, unless its
    choice stops on its own with that very line (e.g. logging=wandb without wandb installed); a
    combined case must name one of its fields.
    """
    try:
        code, out, err = main_in_process([*TINY, *case, f"out_dir={tmp_path}"], capsys)
    except _Enough:
        return "ran"
    assert "Traceback" not in out + err, f"{case}: {err[-3000:]}"
    if code == 0:
        assert "== sparsecomm summary" in out, (case, out[-2000:], err[-2000:])
        return "ran"
    assert code == 2, (case, code, err[-3000:])
    lines = error_lines(err)
    assert len(lines) == 1, (case, err)
    keys = [key_of(o) for o in case] if combined else [key_of(case[-1])]
    named = [k for k in keys if k in lines[0] or k.replace("/", ".") in lines[0]]
    own = STOPS_ON_ITS_OWN.get(case[0]) if not combined and len(case) > 1 else None
    assert named or (own is not None and own in lines[0]), f"{case}: names none of {keys}: {lines[0]}"
    return "error"


CASES = field_cases()


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: " ".join(c))
def test_every_field_runs_or_fails_in_one_line(case, tmp_path, capsys, capped_app):
    run_case(case, tmp_path, capsys)


def assert_ran_with(case, out_dir) -> None:
    """What a case that ran did: it started a run (one run folder, its ``config.yaml`` written)
    and that run holds every value the case asked for (the last one per field), as
    :data:`VALUES` spells it out (a str field holds its text), each group choice as the option's
    ``name``."""
    runs = [p for p in out_dir.iterdir() if (p / "config.yaml").exists()]
    assert len(runs) == 1, (case, sorted(p.name for p in out_dir.iterdir()))
    saved = OmegaConf.to_container(OmegaConf.load(runs[0] / "config.yaml"))
    groups = groups_and_options()
    asked = {}
    for override in case:
        key, text = key_of(override), override.split("=", 1)[1]
        if key in groups:
            asked[f"{key.replace('/', '.')}.name"] = text
        else:
            asked[key] = VALUES[text]
    for key, want in asked.items():
        node = saved
        for part in key.split("."):
            node = node[part]
        assert node == want or (isinstance(node, str) and node == str(want)), f"{case}: the run holds {key}={node!r}"


@pytest.mark.slow
def test_seeded_combinations_run_or_fail_in_one_line(tmp_path, capsys, capped_app):
    """Each combination either ran with every value it asked for, or stopped with one line naming
    one of its fields (run_case); between them, the combinations did both."""
    outcomes = []
    for i, case in enumerate(combined_cases(SEEDS)):
        outcomes.append(run_case(case, tmp_path / str(i), capsys, combined=True))
        if outcomes[-1] == "ran":
            assert_ran_with(case, tmp_path / str(i))
    assert set(outcomes) == {"ran", "error"}, outcomes


def test_the_field_cases_cover_every_group_and_both_outcomes(tmp_path, capsys, capped_app):
    """Every group has cases; a sample of cases really runs and really fails (by what they did)."""
    groups = {key_of(o).split(".")[0].split("/")[0] for c in CASES for o in c}
    assert {"cluster", "task", "mask", "schedule", "optim", "logging", "comm", "checkpoint", "nonfinite",
            "steps"} <= groups
    sample = [("mask.density=0.5",), ("mask.density=-1",), ("optim.lr=0.5",), ("steps=abc",)]
    assert [run_case(c, tmp_path / str(i), capsys) for i, c in enumerate(sample)] == ["ran", "error", "ran", "error"]
    for i in (0, 2):
        assert_ran_with(sample[i], tmp_path / str(i))


def test_a_typo_with_plus_is_refused_naming_the_field(tmp_path, capsys, capped_app):
    code, _, err = main_in_process([*TINY, "+mask.densty=0.01", f"out_dir={tmp_path}"], capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert "mask.densty" in line and "did you mean mask.density" in line, line
    assert re.search(r"no config field", line)


@pytest.fixture(scope="module")
def synthetic_checkpoint(tmp_path_factory):
    """A real checkpoint of a small MLP run (not the digits CNN), written through the app."""
    from hydra.core.global_hydra import GlobalHydra

    d = tmp_path_factory.mktemp("ck")
    try:
        GlobalHydra.instance().clear()
        train.main([*TINY, "task=synthetic", "task.in_features=16", "task.hidden=16", "task.depth=1",
                    "task.num_train=64", "task.num_test=16", "mask=random", "mask.density=0.5", "checkpoint.every=2",
                    f"out_dir={d}", "run_id=syn"])
    finally:
        GlobalHydra.instance().clear()
    return d / "syn" / "checkpoints" / "step-00000004.ckpt"


@pytest.mark.parametrize("kind", ["mask_for_another_model", "corrupted_checkpoint", "checkpoint_of_another_model"])
def test_bad_files_end_in_one_line(kind, tmp_path, capsys, synthetic_checkpoint, monkeypatch):
    clean_launcher_env(monkeypatch)
    capsys.readouterr()
    if kind == "mask_for_another_model":
        from sparsecomm.app import models
        from sparsecomm import random_mask

        path = tmp_path / "mask.safetensors"
        random_mask(models.mlp(16, 16, 1, 10), density=0.5).save(path)
        extra, field, why = ["mask=file", f"mask.path={path}"], "mask.path", "another model"
    elif kind == "corrupted_checkpoint":
        path = tmp_path / "step-00000004.ckpt"
        data = bytearray(synthetic_checkpoint.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        extra, field, why = [f"checkpoint.resume={path}"], "checkpoint.resume", "truncated or corrupted"
    else:
        extra, field, why = [f"checkpoint.resume={synthetic_checkpoint}"], "checkpoint.resume", "another model"
    code, out, err = main_in_process([*TINY, *extra, f"out_dir={tmp_path}", "run_id=bad"], capsys)
    assert code == 2 and "Traceback" not in out + err, err
    (line,) = error_lines(err)
    assert field in line and why in line, line
    assert os.path.exists(synthetic_checkpoint)
