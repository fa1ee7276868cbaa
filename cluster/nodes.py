"""The box's nodes: names, state, and running a command inside a node (its network, UTS and mount
namespaces), its byte counters, killing what runs in it. :mod:`cluster.box` builds and removes the
box; this module only reads its state and enters it. Root only; stdlib only.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys

from cluster import netem

SUBNET = "10.213.7"
CTL_ADDR = f"{SUBNET}.2"
APT_PACKAGES = ("slurm-wlm", "munge")
SLURM_TOOLS = ("slurmctld", "slurmd", "sbatch", "munged")
NET_TOOLS = ("ip", "tc", "nsenter", "unshare")


class BoxError(RuntimeError):
    """A one-line reason the box cannot do what was asked (and the fix)."""


def box_name() -> str:
    return os.environ.get("SPARSECOMM_BOX", "scbox")


def state_dir(name: str | None = None) -> str:
    return os.path.join("/run", name or box_name())


def namespaces(name: str | None = None) -> list[str]:
    """The network namespaces of box ``name`` that exist now (``<name>-net``, ``-ctl``, ``-nodeI``)."""
    pattern = re.compile(rf"{re.escape(name or box_name())}-(net|ctl|node\d+)")
    return [ns for ns in netem.list_namespaces() if pattern.fullmatch(ns)]


def node_addr(i: int) -> str:
    return f"{SUBNET}.{10 + i}"


def why_not(slurm: bool = False) -> str | None:
    """None if this process can run a box (with Slurm if asked), else the reason with the fix."""
    if not sys.platform.startswith("linux"):
        return "the box needs Linux network namespaces"
    if os.geteuid() != 0:
        return "not root: the box creates network namespaces (run as root)"
    missing = [t for t in NET_TOOLS if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not found: apt-get install -y iproute2 util-linux"
    if slurm:
        missing = [t for t in SLURM_TOOLS if shutil.which(t) is None and not os.path.exists(f"/usr/sbin/{t}")]
        if missing:
            return f"{', '.join(missing)} not found: apt-get install -y {' '.join(APT_PACKAGES)}"
    return None


def sh(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)
    if check and proc.returncode != 0:
        raise BoxError(f"{shlex.join(cmd)} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc


def tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


# --- state ------------------------------------------------------------------------------------
def load(name: str | None = None) -> dict | None:
    """The running box's state (``state.json``), or None when no box is up."""
    try:
        with open(os.path.join(state_dir(name), "state.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def save(st: dict) -> None:
    path = os.path.join(st["dir"], "state.json")
    with open(path + ".tmp", "w") as f:
        json.dump(st, f, indent=1)
    os.replace(path + ".tmp", path)


def hosts_text(st: dict, self_loopback: str | None = None) -> str:
    """The private /etc/hosts of the box; ``self_loopback``: map that node to 127.0.1.1 instead."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    if st.get("slurm"):
        lines.append(f"{CTL_ADDR}\tctl")
    if self_loopback:
        lines.append(f"127.0.1.1\t{self_loopback}")
    for n in st["nodes"]:
        if n != self_loopback:
            lines.append(f"{st['addrs'][n]}\t{n}")
    return "\n".join(lines) + "\n"


def hosts_file(st: dict, node: str, self_loopback: bool = False) -> str:
    path = os.path.join(st["dir"], f"hosts-{node}-loopback" if self_loopback else "hosts")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write(hosts_text(st, node if self_loopback else None))
    return path


def netns(st: dict, node: str) -> str:
    """Network namespace name of ``node`` (nodeI or ctl)."""
    if node == "ctl" and st.get("slurm"):
        return f"{st['name']}-ctl"
    if node not in st["nodes"]:
        raise BoxError(f"no node {node!r} in box {st['name']}: nodes are {', '.join(st['nodes'])}"
                       + (", ctl" if st.get("slurm") else ""))
    return f"{st['name']}-{node}"


def wrap(st: dict, node: str, cmd: list[str], self_loopback: bool = False) -> list[str]:
    """``cmd`` as a process of ``node``: its network namespace, and a fresh UTS and mount
    namespace with the node's hostname and the box's hosts file on /etc/hosts. One exec chain:
    the pid returned by Popen is ``cmd``'s."""
    script = 'hostname "$0" && mount --bind "$1" /etc/hosts && shift && exec "$@"'
    return [tool("nsenter"), f"--net=/run/netns/{netns(st, node)}", "--",
            tool("unshare"), "--uts", "--mount", "--propagation", "private", "--",
            "/bin/sh", "-c", script, node, hosts_file(st, node, self_loopback), *cmd]


def env(st: dict, base: dict | None = None) -> dict:
    e = dict(os.environ if base is None else base)
    if st.get("slurm"):
        e["SLURM_CONF"] = os.path.join(st["dir"], "slurm.conf")
    return e


def popen(st: dict, node: str, cmd: list[str], *, self_loopback: bool = False, **kw) -> subprocess.Popen:
    kw.setdefault("env", env(st))
    return subprocess.Popen(wrap(st, node, cmd, self_loopback), **kw)


def run(st: dict, node: str, cmd: list[str], *, self_loopback: bool = False, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("env", env(st))
    return subprocess.run(wrap(st, node, cmd, self_loopback), **kw)


def counters(st: dict, node: str) -> dict[str, dict[str, int]]:
    """``{iface: {"rx_bytes", "rx_packets", "tx_bytes", "tx_packets"}}`` of ``node``'s namespace,
    from its /proc/net/dev."""
    out = sh(["nsenter", f"--net=/run/netns/{netns(st, node)}", "cat", "/proc/net/dev"]).stdout
    return parse_net_dev(out)


def parse_net_dev(text: str) -> dict[str, dict[str, int]]:
    """Parse /proc/net/dev: per interface, bytes and packets received and transmitted."""
    res = {}
    for line in text.splitlines()[2:]:
        name, _, rest = line.partition(":")
        f = rest.split()
        if len(f) >= 9:
            res[name.strip()] = {"rx_bytes": int(f[0]), "rx_packets": int(f[1]), "tx_bytes": int(f[8]),
                                 "tx_packets": int(f[9])}
    return res


ns_pids = netem.namespace_pids  # the processes in a namespace (one home: netem)



def kill_node(st: dict, node: str, sig: int = signal.SIGKILL) -> list[int]:
    """Send ``sig`` to every process in ``node``'s network namespace (what a power cut does)."""
    pids = ns_pids(netns(st, node))
    netem.signal_pids(pids, sig)
    return pids


def empty(ns: str, timeout: float = 10.0) -> None:
    """SIGKILL every process in ``ns`` by pid until none is left (children forked meanwhile too)."""
    netem.signal_until_empty(ns, signal.SIGKILL, timeout)

