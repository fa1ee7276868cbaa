"""A peer that stops answering ends the run in bounded time, with one line saying who (``cluster.timeout_s``).

Every process group the app creates waits at most ``cluster.timeout_s`` for a peer
(:func:`launch.init_process_group` passes it to torch): Gloo raises in the rank that waits (a
timeout, or at once when a peer's connection closes); NCCL's watchdog ends the process after
that time (``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``, torch's default, set unless the user chose
another; the launcher then reports the worker's failure). The rendezvous (the store's
connection, our launcher's ``join_timeout``) is bounded by the same setting.

:class:`Heartbeat` tells who stopped answering: a daemon thread per rank adds 1 to the counter
``hb/<rank>`` in the job's store (the ``MASTER_ADDR:MASTER_PORT`` TCPStore every rank already
reaches) every ``interval`` seconds: one small request, nothing on the training links. When a
collective fails (:func:`is_peer_failure`), a surviving rank marks itself ``lost/<rank>``, reads
every counter twice, three intervals apart, and names the ranks whose counter stood still and
that did not mark themselves (:meth:`Heartbeat.silent_ranks`), with their host and pid
(``host/<rank>``, written once at start). If the store itself does not answer, its host is the one cut off.
"""
from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Mapping
from datetime import timedelta

import torch.distributed as dist

# What Gloo, the TCPStore and NCCL say when a peer is gone or silent (their exceptions are plain
# RuntimeErrors in some versions, torch.distributed.DistError subclasses in others).
# Gloo's transport errors (gloo/transport/tcp/pair.cc): "Timed out waiting", "Application timeout caused
# pair closure" (a timeout on another operation of the same pair), "Connection closed by peer",
# "Socket closed", "Read error"; the TCPStore's: "Socket Timeout", "Read timeout", "Write timeout",
# "Socket unexpectedly closed".
_PEER_MARKERS = ("Timed out waiting", "pair closure", "Connection closed by peer", "Socket closed", "Read error",
                 "Socket unexpectedly closed", "Read timeout", "Write timeout", "Socket Timeout",
                 "Connection reset by peer", "Broken pipe", "connectFullMesh", "NCCL", "timed out",
                 "Connection refused")

PEER_LOST_RECORD = "peer-lost: "  # how a worker of our launcher marks this line for the launcher


class PeerLost(RuntimeError):
    """This rank stopped because a peer (or the job's store) stopped answering; ``str``: the line.

    ``run_dir`` and ``checkpoint`` (the ``checkpoint`` config) let the caller add the resume command.
    """

    def __init__(self, message: str, run_dir: str | None = None, checkpoint: Mapping | None = None):
        super().__init__(message)
        self.run_dir, self.checkpoint = run_dir, checkpoint


def timeout(cluster: Mapping) -> timedelta:
    """``cluster.timeout_s`` as the ``timedelta`` torch's process groups and stores take."""
    return timedelta(seconds=float(cluster.get("timeout_s", 300.0)))


def is_peer_failure(exc: BaseException) -> bool:
    """True if ``exc`` says a collective or the store lost a peer (not a bug of ours, not a user error)."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _PEER_MARKERS)


def reason(exc: BaseException) -> str:
    """The first line of torch's message without source locations (``[.../pair.cc:534] ``) and wrappers."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", text)
    return re.sub(r"^(?:Got the following error when running the callback: )?(?:\w+Error: )?", "", text).strip()


class Heartbeat:
    """This rank's counter in the job's store, bumped by a daemon thread; see the module doc."""

    def __init__(self, store, rank: int, world: int, interval: float):
        self.store, self.rank, self.world, self.interval = store, rank, world, interval
        self._stop = threading.Event()
        try:
            self.store.set(f"host/{rank}", f"{socket.gethostname()}, pid {os.getpid()}")
            self.store.add(f"hb/{rank}", 1)
        except Exception:  # noqa: BLE001 - a store that fails now fails the process group too
            pass
        self._thread = threading.Thread(target=self._beat, name="sparsecomm-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, cluster: Mapping, environ: Mapping[str, str] | None = None) -> Heartbeat | None:
        """A heartbeat for this rank of a multi-process world (None for one process)."""
        environ = os.environ if environ is None else environ
        if not dist.is_initialized() or dist.get_world_size() < 2 or "MASTER_ADDR" not in environ:
            return None
        limit = timeout(cluster).total_seconds()
        interval = min(max(limit / 10, 0.5), 5.0)
        try:
            store = dist.TCPStore(environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), is_master=False,
                                  timeout=timedelta(seconds=min(limit, 10.0)), wait_for_workers=False)
        except Exception:  # noqa: BLE001 - without a store the line cannot say who; training goes on
            return None
        attempt = environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        prefixed = dist.PrefixStore(f"sparsecomm/peers/attempt-{attempt}", store)
        return cls(prefixed, dist.get_rank(), dist.get_world_size(), interval)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.store.add(f"hb/{self.rank}", 1)
            except Exception:  # noqa: BLE001 - the store may be gone; the collective's timeout reports it
                pass

    def stop(self) -> None:
        self._stop.set()

    def silent_ranks(self) -> list[int] | None:
        """Ranks whose counter stood still for three intervals and that did not report the failure
        themselves; None if the store does not answer."""
        try:
            self.store.set(f"lost/{self.rank}", "1")
            before = [self.store.add(f"hb/{r}", 0) for r in range(self.world)]
            time.sleep(3 * self.interval)
            after = [self.store.add(f"hb/{r}", 0) for r in range(self.world)]
            return [r for r in range(self.world) if r != self.rank and before[r] == after[r]
                    and not self.store.check([f"lost/{r}"])]
        except Exception:  # noqa: BLE001 - the store's host is the silent one
            return None

    def where(self, rank: int) -> str | None:
        """``"node2, pid 1234"``: where ``rank`` runs, as it wrote at start (None if unknown)."""
        try:
            return self.store.get(f"host/{rank}").decode() if self.store.check([f"host/{rank}"]) else None
        except Exception:  # noqa: BLE001
            return None


def who(heartbeat: Heartbeat | None, environ: Mapping[str, str] | None = None) -> str:
    """``"rank 2 (node2, pid 1234), rank 3 (node2, pid 1235)"``, or what is known of the silent peer.

    Asked in a daemon thread with a deadline: a request to a store whose host is cut off can wait
    for TCP's own timeout (many minutes) whatever the store's timeout says."""
    environ = os.environ if environ is None else environ
    if heartbeat is None:
        return "a peer"
    found: list[str | None] = []
    asking = threading.Thread(target=lambda: found.append(_silent_peers(heartbeat)), daemon=True)
    asking.start()
    asking.join(3 * heartbeat.interval + 10.0)
    if found and found[0] is not None:
        return found[0]
    store = f"{environ.get('MASTER_ADDR', '?')}:{environ.get('MASTER_PORT', '?')}"
    return f"the job's store at {store} (rank 0's host) and the ranks there"


def _silent_peers(heartbeat: Heartbeat) -> str | None:
    silent = heartbeat.silent_ranks()
    if silent is None:
        return None
    if not silent:
        return "a peer (every rank's heartbeat still runs: a rank stuck in a collective?)"
    return ", ".join(f"rank {r}" + (f" ({place})" if (place := heartbeat.where(r)) else "") for r in silent)


def lost(exc: BaseException, heartbeat: Heartbeat | None, cluster: Mapping, *, done: int | None, total: int,
         run_dir: str | None, checkpoint: Mapping | None) -> PeerLost:
    """The :class:`PeerLost` to raise after ``exc``: the step, who stopped answering, torch's reason."""
    when = f"at step {done + 1} of {total} ({done} done)" if done is not None else "before the first step"
    limit = timeout(cluster).total_seconds()
    return PeerLost(f"stopped {when}: {who(heartbeat)} stopped answering (cluster.timeout_s={limit:g}; "
                    f"{reason(exc)})", run_dir, checkpoint)
