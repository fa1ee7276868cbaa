"""An emulated cluster link: a private network namespace whose loopback is shaped with ``tc tbf``.

    with Link("1gbit") as link:                 # or Link(None) for an unshaped namespace
        subprocess.run(link.wrap(["python", "worker.py"]), env=link.env(os.environ), check=True)
        print(link.tx_bytes())                  # bytes sent on the namespace's loopback so far

Every rank runs inside the same namespace and talks over its ``lo``, so ``tc`` on ``lo`` limits
the AGGREGATE traffic of all ranks (one shared link of that rate, like a switch port shared by
all ranks), and ``/sys/class/net/lo/statistics/tx_bytes`` read inside the namespace counts every
byte any rank sent (nothing else lives there). Loopback delivers each packet once, so the
counter is the total of all ranks' transmissions.

The namespace is deleted on exit, also when the body raises; processes still inside it (ours:
the workers started in it) are killed by pid first, because a namespace with live processes
outlives ``ip netns del``. Namespaces left by a run that was killed (``kill -9``) are named
``sparsecomm-bench-<pid>-<n>`` and removed by :func:`remove_stale` once their pid is gone.

Where a namespace cannot be made (not root, no ``ip``/``tc``, no ``sch_tbf``), ``Link`` runs on
the host's loopback, unshaped, and says why in :attr:`Link.fallback`; rows measured so must be
marked, since the host's ``lo`` counter also counts other programs' traffic.
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import time

PREFIX = "sparsecomm-bench-"
INSTALL_HINT = "install iproute2 (Debian/Ubuntu: `apt-get install -y iproute2`; Fedora: `dnf install iproute-tc`)"
_counter = itertools.count()
_RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit)$")
_RATE_SCALE = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
UNSHAPED = ("unshaped", "none", "", None)


def parse_rate(rate: str | None) -> float | None:
    """Bits per second of a tc rate string (``"100mbit"``, ``"1gbit"``); None for unshaped."""
    if rate in UNSHAPED:
        return None
    m = _RATE_RE.match(str(rate).strip().lower())
    if not m:
        raise ValueError(f"rate={rate!r} is not a tc rate; use e.g. 100mbit, 1gbit, 10gbit or 'unshaped'")
    return float(m.group(1)) * _RATE_SCALE[m.group(2)]


def tbf_burst_bytes(bits_per_s: float) -> int:
    """tbf bucket size: 256 KiB (accurate at 1 Gbit), larger at higher rates so that one kernel
    tick's worth of traffic (~2 ms) fits; otherwise tbf cannot reach a 10 Gbit rate."""
    return max(256 * 1024, int(bits_per_s / 8 * 0.002))


def why_no_namespace() -> str | None:
    """None if this process can create and shape namespaces, else the reason (with the fix)."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "not root: creating a network namespace needs root (run the benchmark as root)"
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        return f"{' and '.join(missing)} not found: {INSTALL_HINT}"
    return None


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


def list_namespaces() -> list[str]:
    if shutil.which("ip") is None:
        return []
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped by its parent, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:
        return True


def namespace_pids(name: str) -> list[int]:
    """The processes inside network namespace ``name`` (``ip netns pids``); [] if it has none or is gone."""
    return [int(p) for p in _run(["ip", "netns", "pids", name], check=False).stdout.split() if p.isdigit()]


def signal_pids(pids: list[int], sig: int) -> None:
    """Send ``sig`` to each of ``pids``; one that has exited meanwhile is passed over."""
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def signal_until_empty(name: str, sig: int, timeout: float) -> bool:
    """Send ``sig`` to every process inside namespace ``name`` until none is left or ``timeout``
    seconds have passed; True if none is left. The processes are read again each round, so one that
    enters meanwhile (a child forked, ``ip netns exec`` reaching its command) is signalled too."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in namespace_pids(name) if pid_alive(p)]
        if not alive:
            return True
        if time.monotonic() > deadline:
            return False
        signal_pids(alive, sig)
        time.sleep(0.05)


def _kill_inside(name: str) -> None:
    """Kill the processes inside our namespace ``name`` (workers we started): SIGTERM, then SIGKILL,
    each for up to 5 s (:func:`signal_until_empty`)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if signal_until_empty(name, sig, 5):
            return


def delete_namespace(name: str) -> None:
    """Kill what runs inside ``name`` and delete it (no error if it is already gone)."""
    if name not in list_namespaces():
        return
    _kill_inside(name)
    _run(["ip", "netns", "del", name], check=False)


def remove_stale() -> list[str]:
    """Delete ``sparsecomm-bench-<pid>-<n>`` namespaces whose creating process is gone."""
    removed = []
    for name in list_namespaces():
        m = re.match(re.escape(PREFIX) + r"(\d+)-\d+$", name)
        if m and not pid_alive(int(m.group(1))):
            delete_namespace(name)
            removed.append(name)
    return removed


class Link:
    """A network namespace with ``lo`` up and shaped to ``rate`` (None/"unshaped": not shaped).

    Attributes:
        rate: the tc rate string, or "unshaped".
        name: the namespace name, or None on the fallback.
        fallback: None when isolated in a namespace; else why the host loopback is used.
    """

    def __init__(self, rate: str | None = None, *, allow_fallback: bool = True, isolate: bool = True):
        self.isolate = isolate
        self.bits_per_s = parse_rate(rate)
        self.rate = "unshaped" if self.bits_per_s is None else str(rate).lower()
        self.allow_fallback = allow_fallback
        self.name: str | None = None
        self.fallback: str | None = None

    # --- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> "Link":
        reason = why_no_namespace() if self.isolate else "isolation turned off (--no-namespace)"
        if reason is None:
            name = f"{PREFIX}{os.getpid()}-{next(_counter)}"
            try:
                self.name = name
                _run(["ip", "netns", "add", name])
                _run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])
                if self.bits_per_s is not None:
                    burst = tbf_burst_bytes(self.bits_per_s)
                    _run(["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", "tbf",
                          "rate", self.rate, "burst", str(burst), "latency", "100ms"])
                return self
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
                err = getattr(e, "stderr", "") or str(e)
                self.close()
                reason = f"could not set up namespace {name}: {err.strip()}"
                if not self.allow_fallback:
                    raise RuntimeError(reason) from e
        elif not self.allow_fallback and self.isolate:
            raise RuntimeError(reason)
        self.fallback = f"{reason}; ran on the host loopback, unshaped"
        self.rate = "unshaped"
        self.bits_per_s = None
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.name is not None:
            delete_namespace(self.name)
            self.name = None

    # --- use --------------------------------------------------------------------------------
    @property
    def isolated(self) -> bool:
        return self.name is not None

    @property
    def label(self) -> str:
        return self.rate if self.isolated else "unshaped*"

    def wrap(self, cmd: list[str]) -> list[str]:
        """``cmd`` prefixed to run inside the namespace (unchanged on the fallback)."""
        return ["ip", "netns", "exec", self.name, *cmd] if self.isolated else list(cmd)

    def env(self, base: dict | None = None) -> dict:
        """Environment for processes on this link: rendezvous and Gloo on 127.0.0.1 / lo."""
        env = dict(os.environ if base is None else base)
        env.update(MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo")
        return env

    def tx_bytes(self) -> int:
        """Bytes transmitted on the link's ``lo`` so far (namespace's own counter when isolated)."""
        if self.isolated:
            out = _run(["ip", "netns", "exec", self.name, "cat", "/sys/class/net/lo/statistics/tx_bytes"])
            return int(out.stdout.strip())
        with open("/sys/class/net/lo/statistics/tx_bytes") as f:
            return int(f.read().strip())

    def qdisc(self) -> str:
        """``tc qdisc show dev lo`` inside the namespace (empty on the fallback)."""
        if not self.isolated:
            return ""
        return _run(["ip", "netns", "exec", self.name, "tc", "qdisc", "show", "dev", "lo"]).stdout.strip()
