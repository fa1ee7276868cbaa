"""Small helpers over ``torch.distributed`` shared by the library and the app.

Everything here works without an initialised process group (single process):
then the world has one rank and every check passes trivially.
"""
from __future__ import annotations

import atexit
import gc
import time
from typing import Any

import torch.distributed as dist

# How long the interpreter, at exit, leaves the GIL to the communication threads (see below).
COMM_THREADS_GRACE_S = 0.2


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(process_group=None) -> int:
    return dist.get_world_size(process_group) if is_initialized() else 1


def rank(process_group=None) -> int:
    return dist.get_rank(process_group) if is_initialized() else 0


def is_main_process() -> bool:
    """True on global rank 0: the one process that prints, logs and writes files."""
    return rank() == 0


class RankDisagreement(RuntimeError):
    """Ranks hold different values of something that must be identical (a mask, a config).

    Raised on every rank with the same message (``collective``): rank 0's line is enough.
    """

    collective = True


def gather_strings(value: str, process_group=None) -> list[str]:
    """All-gather one short string from every rank (over the wire: a pickled string per rank)."""
    if not is_initialized():
        return [value]
    out: list = [None] * world_size(process_group)
    dist.all_gather_object(out, value, group=process_group)
    return out


def assert_same_on_all_ranks(value: str, what: str, process_group=None, fix: str = "") -> None:
    """Raise :class:`RankDisagreement` on every rank, listing each rank's value, if any differ.

    ``value`` is a digest or hash; ``what`` names it in the error ("mask digest", "config hash").
    Collective: every rank of ``process_group`` must call it.
    """
    values = gather_strings(value, process_group)
    if len(set(values)) > 1:
        listing = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        msg = f"ranks disagree on the {what}: {listing}"
        raise RankDisagreement(msg + (f". {fix}" if fix else ""))


def rank0_decides(check, error: type[Exception] = ValueError) -> None:
    """Collective: run ``check()`` on rank 0 only; if it raises ``error``, raise it on every rank.

    For checks of things only rank 0 touches (the files it writes), so that the other ranks stop
    with the same message instead of waiting in their next collective. Over the network: one
    broadcast of a short pickled string.
    """
    message = None
    if is_main_process():
        try:
            check()
        except error as e:
            message = str(e)
    message = broadcast_from_rank0(message)
    if message is not None:
        raise error(message)


def broadcast_from_rank0(obj: Any) -> Any:
    """Collective: rank 0's ``obj`` on every rank (one pickled broadcast; no-op in a 1-rank world)."""
    if is_initialized() and world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        obj = box[0]
    return obj


_groups_left: list[Any] = []  # process groups destroyed, held until the exit pause (leave_process_group)


def _pause_for_comm_threads() -> None:
    time.sleep(COMM_THREADS_GRACE_S)  # sleeping releases the GIL
    _groups_left.clear()  # their last reference, dropped on the main thread once the workers are idle


_exit_pause_registered = False


def leave_process_group() -> None:
    """Free what reference cycles hold, then destroy the default process group, its last reference
    kept until the exit pause.

    DDP wrappers and their comm hooks' states sit in reference cycles: collected first, they are
    freed while their group is still alive, not by a later collection. A Gloo worker thread can hold
    the last reference to its own process group: a comm hook's ``.then`` callback that captured the
    group (PowerSGD's does) lives in the work item the worker drops after the future completed,
    possibly after ``destroy_process_group`` has returned. The group's destructor then joins its
    worker threads from one of them and the process aborts ("terminate called ... std::system_error:
    Resource deadlock avoided", exit code -6; about 1 in 75 PowerSGD runs of 2 ranks here). Held
    here, it is freed on the main thread by the exit pause
    (:func:`let_comm_threads_finish_at_exit`), after the workers had time to finish.
    """
    gc.collect()
    if not dist.is_initialized():
        return
    _groups_left.append(dist.group.WORLD)
    let_comm_threads_finish_at_exit()
    dist.destroy_process_group()


def let_comm_threads_finish_at_exit() -> None:
    """Before the interpreter finalises, give Gloo's worker threads a moment with the GIL (once per process).

    Once DDP has been built over a Gloo group, that group's worker threads outlive the training
    loop: they are still running after ``del`` of the DDP wrapper, ``destroy_process_group`` and
    ``gc.collect()`` (torch 2.13, seen by listing the process's threads). After a collective's future completes, the
    worker drops the work it ran, and with it Python objects: the context that torch's backward
    stashes in the thread-local state every collective launched during backward captures, and a
    comm hook's ``.then`` callback. Dropping them takes the GIL. When the main thread has already
    begun finalising the interpreter, that worker thread exits inside a C++ destructor and the
    process aborts ("terminate called without an active exception", exit code -6) after a run
    that finished: torchrun then reports a failed job. The last step's collectives are the ones
    at risk; an ``atexit`` pause, run while the interpreter is still whole, lets them go.
    """
    global _exit_pause_registered
    if not _exit_pause_registered:
        atexit.register(_pause_for_comm_threads)
        _exit_pause_registered = True
