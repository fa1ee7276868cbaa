"""One live run per folder: an exclusive ``flock`` on ``<folder>/.lock`` for as long as the run lives.

The process that owns the run folder takes it (:func:`acquire`) before it judges what the folder
holds, and keeps it until it exits: the bare app's launching process (its workers, its children or
its forkserver's, end with it: :func:`die_with`), or global rank 0 under torchrun or Slurm (the
other ranks never touch the lock, so none of them can wait on it). The kernel drops an ``flock``
when the last descriptor of its holder is closed, which a SIGKILL, an OOM kill or a lost node also
does: a dead run never blocks its resume.

The file holds one line about its holder (pid, host, start time) for the message of a refused
second command (:class:`FolderInUse`); the lock itself, not the line, decides. Nothing crosses the
network (on a shared file system the lock is that file system's).
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import select
import signal
import socket
import threading
import time

LOCK_NAME = ".lock"


class FolderInUse(ValueError):
    """Another live process holds the folder's lock; the message names the folder, the holder and the fix."""


class FolderLock:
    """A held lock on ``<folder>/.lock`` (its descriptor); :meth:`release` or the process's end frees it."""

    def __init__(self, folder: str, fd: int):
        self.folder, self.fd = folder, fd

    @property
    def path(self) -> str:
        return os.path.join(self.folder, LOCK_NAME)

    def record_holder(self) -> None:
        """Write ``pid=... host=... since=...`` into the lock file (best effort: the lock decides)."""
        line = f"pid={os.getpid()} host={socket.gethostname()} since={time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n"
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, line.encode(), 0)
        except OSError:
            pass

    def release(self) -> None:
        if self.fd >= 0:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = -1


def holder(folder: str) -> str:
    """What the lock file of ``folder`` says about its holder (``pid=... host=...``), or ``''``."""
    try:
        with open(os.path.join(folder, LOCK_NAME), errors="replace") as f:
            text = f.read(200)
    except OSError:
        return ""
    return "".join(c for c in text if c.isprintable()).strip()  # a damaged file prints nothing odd


def in_use_error(folder: str) -> FolderInUse:
    who = holder(folder)
    pid = who.split()[0].removeprefix("pid=") if who.startswith("pid=") else ""
    stop = f"stop it (kill -TERM {pid} on its host) and rerun to resume it" if pid else "stop it"
    return FolderInUse(f"run directory {folder} is in use by a live run ({who or 'holder unknown'}); wait for it to "
                       f"end or {stop}, or start another run with another run_id=...")


def acquire(folder: str) -> FolderLock:
    """Take ``folder``'s lock without waiting; :class:`FolderInUse` if a live process holds it."""
    path = os.path.join(folder, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise FolderInUse(f"cannot create the lock file {path} ({e.strerror}); the run folder must be writable: "
                          f"point out_dir at a writable folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise in_use_error(folder) from None
    return FolderLock(folder, fd)


def is_live(folder: str) -> bool:
    """Does a live process hold ``folder``'s lock now? (A probe: taken and given back at once.)"""
    try:
        fd = os.open(os.path.join(folder, LOCK_NAME), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def die_with(launcher: int) -> None:
    """In a worker of the bare app: be killed (SIGKILL) when the launching process ``launcher`` dies,
    as its lock does, so that no orphaned worker goes on writing into a folder nobody holds.

    A spawned worker is the launcher's child: the kernel's parent-death signal does it (Linux). A
    worker forked by the launcher's forkserver is the server's child, and the server lives as long
    as its children: a daemon thread waits on the launcher's pidfd (Linux), else checks every second.
    """
    if launcher == os.getppid():
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != launcher:  # the launcher died before the call above
            os._exit(1)
        return
    try:
        pidfd = os.pidfd_open(launcher)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd here: look once a second
        pidfd = None
    threading.Thread(target=_kill_self_when_gone, args=(launcher, pidfd), name="sparsecomm-launcher-watch",
                     daemon=True).start()


def _kill_self_when_gone(launcher: int, pidfd: int | None) -> None:
    if pidfd is not None:
        select.select([pidfd], [], [])  # readable once the launcher has exited
    else:
        while _alive(launcher):
            time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
