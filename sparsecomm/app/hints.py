"""Hints a user pastes: commands quoted for the shell and for Hydra's override parser.

A value Hydra would read as something else (``123``, ``true``, ``[1]``, ``a,b``) or cannot read at
all (a space at either end, non-ASCII letters, ``=``, quotes, ...) is put in Hydra's single quotes
(:func:`hydra_value`); every argument is then quoted for a POSIX shell (``shlex.quote``). The
result, pasted into bash, hands the app the same values it ran with.

* :func:`resume_command`: how to continue the run in a folder, by launcher (bare app, torchrun,
  Slurm);
* :func:`quoting_fix`: the line for an override Hydra's parser refuses, with the quoting to use.
"""
from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

APP = "sparsecomm-train"
SLURM_SCRIPT_SETS = ("cluster", "cluster.nproc_per_node")  # cluster/slurm_train.sbatch passes these itself


def _parses_as(text: str, value: str) -> bool:
    """Does Hydra read ``text`` as ``value`` into a string field (``4711`` is fine, ``007``, ``true`` are not)?"""
    try:
        parsed = OverridesParser.create().parse_override(f"k={text}").value()
    except HydraException:
        return False
    return type(parsed) in (str, int, float) and str(parsed) == value


def hydra_value(value: str) -> str:
    """``value`` written so that Hydra's override parser reads back exactly this string."""
    if value and value == value.strip() and _parses_as(value, value):
        return value
    # In Hydra's quoted strings a quote is escaped with a backslash, and backslashes only where
    # they precede a quote or end the string (then each one doubled).
    body = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value)
    return f"'{body}'"


def override(key: str, value: str) -> str:
    """``key=value`` as one shell word, the value quoted for Hydra where it needs it."""
    return shlex.quote(f"{key}={hydra_value(str(value))}")


def shell_words(args: Sequence[str]) -> str:
    """Arguments the shell hands back unchanged (each one as the app received it)."""
    return " ".join(shlex.quote(a) for a in args)


def _key(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~")


def resume_command(path: str, overrides: Sequence[str], options: Sequence[str] = (),
                   environ: Mapping[str, str] | None = None) -> str:
    """How to continue the run in ``path``: a command to paste, or under Slurm/torchrun the
    launcher's command with the run id to pass (the folder's name). ``overrides``/``options``:
    the command line's Hydra overrides and options (``--config-name ...``), as the app got them."""
    environ = os.environ if environ is None else environ
    rid = os.path.basename(os.path.normpath(path))
    if any(_key(o) == "hydra.run.dir" for o in overrides):
        return f"resume with: {APP} {shell_words([*options, *overrides])}".rstrip()
    keep = [o for o in overrides if _key(o) != "run_id"]
    args = shell_words([*options, *keep])
    again = f"{args} {override('run_id', rid)}".strip()
    if environ.get("SLURM_JOB_ID"):
        job = environ["SLURM_JOB_ID"]
        script_args = [o for o in keep if _key(o) not in SLURM_SCRIPT_SETS]
        return (f"resume: submit the job again with {override('run_id', rid)} added to its arguments "
                f"(e.g. sbatch <your options> cluster/slurm_train.sbatch "
                f"{shell_words(script_args)} {override('run_id', rid)}; this was Slurm job {job}), "
                f"or requeue it: scontrol requeue {job}")
    if environ.get("TORCHELASTIC_RUN_ID") or "RANK" in environ:
        rdzv = environ.get("TORCHELASTIC_RUN_ID", "")
        return (f"resume with the same torchrun options (rdzv id {rdzv or '?'}) and the run id: "
                f"torchrun <options> -m sparsecomm.app.train {again}")
    return f"resume with: {APP} {again}"


def quoting_fix(line: str) -> str | None:
    """For an override Hydra cannot parse: the same override quoted for Hydra and the shell, or
    None when quoting the value would not help (no ``=``, or a key Hydra cannot read)."""
    key, sep, value = line.partition("=")
    if not sep or not re.fullmatch(r"[+~]{0,2}[\w./@-]+", key):
        return None
    fixed = f"{key}={hydra_value(value)}"
    try:
        OverridesParser.create().parse_override(fixed)
    except HydraException:
        return None
    return shlex.quote(fixed)


def unparsable_override(line: str, error: BaseException) -> str:
    """The one line for an override Hydra's parser refuses: the override, the parser's reason, the fix."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    fix = quoting_fix(line)
    how = (f"quote the value for Hydra and the shell: {fix}" if fix else
           "write overrides as key=value (see https://hydra.cc/docs/advanced/override_grammar/basic)")
    return f"override {line!r} cannot be parsed ({reason}); {how}"
