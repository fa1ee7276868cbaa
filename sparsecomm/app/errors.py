"""Errors a user can fix: one line ``error: ...`` on stderr and exit code 2, never a traceback.

:class:`ErrorReport` turns them into that line (``SPARSECOMM_TRACEBACK=1`` shows the traceback
instead) and remembers the last line it reported (:attr:`ErrorReport.last_line`): what a failed
sweep job records and what tells a failed write (resumable) from a bad value. A worker of the
app's own launcher hands the line to the parent, which prints it once; under torchrun or Slurm
rank 0 prints the errors every rank raises alike. A run stopped by SIGINT/SIGTERM exits 128 + the
signal's number; a lost peer exits 3 with the command that resumes the run.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

from hydra.errors import HydraException, MissingConfigException
from omegaconf.errors import OmegaConfBaseException

from sparsecomm.distributed import RankDisagreement

from . import rundir
from .signals import Interrupted
from .launch import WorkerFailed, WorkerUserError, env_rank, record_worker_error
from .peers import PEER_LOST_RECORD, PeerLost
from .runfolder import resume_hint

USER_ERROR_EXIT = 2
PEER_LOST_EXIT = 3  # a peer (rank, node, the job's store) stopped answering for cluster.timeout_s
QUIET_RANK_GRACE_S = 15.0  # how long a quiet rank leaves rank 0 to print the error they share


def user_error_types() -> tuple[type[BaseException], ...]:
    # OSError last: a file or folder the run cannot read or write (named in the line), not a bug.
    return (ValueError, FileNotFoundError, NotADirectoryError, ImportError, RankDisagreement,
            WorkerUserError, HydraException, OmegaConfBaseException, OSError)


def one_line(exc: BaseException) -> str:
    """The user-facing message of ``exc`` on one line (Hydra's multi-line errors condensed)."""
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, option = str(exc.missing_cfg_file).rpartition("/")
        options = ", ".join(exc.options or [])
        if group:
            return (f"{group}={option}: no such option in config group '{group}'"
                    + (f"; choose one of: {options}" if options else ""))
        return f"config '{option}' not found" + (f"; choose one of: {options}" if options else "")
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}; check the path in the config (out_dir, task.data_dir, mask.path, ...)"
    text = str(exc).strip() or type(exc).__name__
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("full_key:", "object_type=", "reference_type=", "Config search path",
                                        "Set the environment variable HYDRA_FULL_ERROR")):
            continue
        lines.append(line)
    message = " ".join(lines)
    cause = exc.__cause__ or exc.__context__
    if cause is not None and type(exc).__module__.startswith("hydra") and str(cause).strip():
        message += ": " + str(cause).strip().splitlines()[0]
    return message


def quiet_rank() -> bool:
    """True on a rank other than 0 under torchrun/Slurm: errors every rank shares are rank 0's to print."""
    return env_rank() not in (None, 0)


class ErrorReport:
    """Reports the user errors of one command (:meth:`guard`) and remembers the last line it reported.

    ``overrides``: the command line's overrides, for the resume command a lost peer prints.
    """

    def __init__(self, overrides: list[str] | tuple = ()) -> None:
        self.overrides = list(overrides)
        self.last_line: str | None = None
        self.kept_quiet = False  # the last line reported was rank 0's to print, not this rank's

    def _report(self, message: str, collective: bool) -> None:
        self.last_line = message
        self.kept_quiet = False
        if record_worker_error(message):
            return
        if collective and quiet_rank():
            self.kept_quiet = True
        else:
            print(message if message.startswith("sparsecomm:") else f"error: {message}", file=sys.stderr, flush=True)

    def leave_the_line_to_rank_zero(self, exit_code) -> None:
        """Before a rank that kept quiet about an error ends the process with it, give rank 0 time to print it.

        Under torchrun the first worker to fail ends the others (SIGTERM): a quiet rank that exited
        first could stop rank 0 before its line, and the job would end with no word of why (seen
        under load). Waiting at most ``QUIET_RANK_GRACE_S``; rank 0's exit ends the wait sooner
        (torchrun, or ``srun --kill-on-bad-exit``, stops the job's other ranks).
        """
        if self.kept_quiet and exit_code == USER_ERROR_EXIT:
            time.sleep(QUIET_RANK_GRACE_S)

    @contextlib.contextmanager
    def guard(self, quiet: bool = False):
        """Turn a user error raised inside into its one line and ``SystemExit``; let bugs raise.

        ``quiet``: the error is every rank's alike (rank 0 prints it), as are exceptions marked
        ``collective``; a rank's own error is printed by that rank.
        """
        try:
            yield
        except WorkerFailed as e:
            print(f"error: a worker failed:\n{e}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        except Interrupted as e:
            self._report(f"sparsecomm: {e}", True)
            raise SystemExit(e.exit_code) from None
        except PeerLost as e:
            if not record_worker_error(f"{PEER_LOST_RECORD}{e}"):  # the launcher adds its resume command
                hint = f"; {resume_hint(e.run_dir, self.overrides, e.checkpoint)}" if e.run_dir else ""
                print(f"sparsecomm: {e}{hint}", file=sys.stderr, flush=True)
            raise SystemExit(PEER_LOST_EXIT) from None
        except rundir.AlreadyFinished as e:
            self._report(str(e), True)
            raise SystemExit(0) from None
        except user_error_types() as e:
            if os.environ.get("SPARSECOMM_TRACEBACK"):
                raise
            self._report(one_line(e), quiet or bool(getattr(e, "collective", False)))
            raise SystemExit(USER_ERROR_EXIT) from None


def exit_on_user_error(quiet: bool = False):
    """:meth:`ErrorReport.guard` of a report of its own (a worker's entry point, a test)."""
    return ErrorReport().guard(quiet)
