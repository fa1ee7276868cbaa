#!/usr/bin/env python3
"""A cluster in a box: M emulated nodes on this host, optionally with a real Slurm over them.

    sudo python3 -m cluster.box up --nodes 2 --link 1gbit --slurm   # ~2 s once slurm-wlm is installed
    sudo python3 -m cluster.box run node1 hostname                  # -> node1
    sudo python3 -m cluster.box run node1 sbatch --nodes=2 --wrap 'srun hostname'
    sudo python3 -m cluster.box status
    sudo python3 -m cluster.box restart node2                      # power-cycle: SIGKILL all, slurmd again
    sudo python3 -m cluster.box down                                # kills everything in it, by pid

The box only emulates hardware; torchrun, Gloo and Slurm do the work. Layout (``<box>`` is
``$SPARSECOMM_BOX``, default ``scbox``; every name below exists only while the box is up):

* ``<box>-net``: a network namespace holding the bridge ``br0`` (the "switch").
* ``<box>-nodeI`` (I = 1..M): a network namespace per node with ``lo`` and ``eth0``, a veth whose
  peer ``vnodeI`` is enslaved to ``br0``; address ``10.213.7.(10+I)/24``. Traffic between nodes
  crosses ``eth0``; traffic inside a node (to its own address or 127.0.0.1) stays on its ``lo``.
  ``--link RATE`` puts a ``tc tbf`` of RATE on ``eth0`` (node -> switch) and on ``vnodeI``
  (switch -> node): each node has a full-duplex link of RATE; ``lo`` is never shaped. netem is
  not in every kernel, so links have a rate, not a delay.
* ``<box>-ctl``: the controller's namespace (``10.213.7.2``, hostname ``ctl``), with ``--slurm``.
* Every process started in a node (``box run``, slurmd and so its jobs) gets a UTS namespace with
  the node's hostname (torch's c10d rendezvous looks up the machine's own hostname) and a mount
  namespace in which a private hosts file is bind-mounted over ``/etc/hosts``; the host's
  ``/etc/hosts`` is never edited. ``box run --self-loopback`` maps the node's own name to
  127.0.1.1 instead, as Debian's default ``/etc/hosts`` does on a real machine.
* ``--slurm``: Debian's ``slurm-wlm`` 22.05 and ``munge``: one ``munged`` in the root namespace
  (its socket reaches every namespace), ``slurmctld`` in ``<box>-ctl``, ``slurmd -N nodeI`` in
  each node. Clients (``sbatch``, ``srun``, ``squeue``) run through ``box run`` (``SLURM_CONF``
  is set there). Partition ``box``, every node, ``--cpus`` CPUs declared per node.

State (addresses, hosts files, slurm.conf, daemon logs) lives in ``/run/<box>``. Entering a
namespace uses ``nsenter --net`` (``ip netns exec`` remounts /sys and slurmd then cannot find
its cgroups). Inside a node ``/sys/class/net`` still shows the host's interfaces: read byte
counters from ``/proc/net/dev`` (:func:`counters`). Root only.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time

from cluster import netem
from cluster.nodes import (CTL_ADDR, BoxError, box_name, counters, empty, env, kill_node, load, namespaces,  # noqa: F401
                           hosts_text, netns, node_addr, ns_pids, popen, run, save, sh, state_dir, why_not, wrap)
from cluster.slurm import restart, start_slurm, start_slurmd, wait_idle  # noqa: F401  (box.restart etc., as the tests use them)


# --- up ---------------------------------------------------------------------------------------
def up(nodes: int, link: str | None = None, slurm: bool = False, cpus: int = 8, name: str | None = None) -> dict:
    """Create the box; returns its state. Raises BoxError (nothing left behind) on failure."""
    reason = why_not(slurm)
    if reason:
        raise BoxError(reason)
    name = name or box_name()
    if nodes < 1 or nodes > 200:
        raise BoxError(f"--nodes {nodes}: give 1..200 nodes")
    bits = netem.parse_rate(link)
    if load(name) is not None or namespaces(name):
        raise BoxError(f"box {name} is already up (or left over): run `box down` first")
    st = {"name": name, "dir": state_dir(name), "nodes": [f"node{i}" for i in range(1, nodes + 1)],
          "addrs": {f"node{i}": node_addr(i) for i in range(1, nodes + 1)}, "link": link if bits else None,
          "slurm": slurm, "cpus": cpus, "pids": {}}
    os.makedirs(st["dir"], exist_ok=True)
    save(st)
    try:
        _network(st, bits)
        if slurm:
            start_slurm(st)
    except BaseException:
        down(name)
        raise
    return st


def _network(st: dict, bits: float | None) -> None:
    name, br = st["name"], f"{st['name']}-net"
    sh(["ip", "netns", "add", br])
    sh(["ip", "-n", br, "link", "set", "lo", "up"])
    sh(["ip", "-n", br, "link", "add", "br0", "type", "bridge"])
    sh(["ip", "-n", br, "link", "set", "br0", "up"])
    members = [(n, f"{name}-{n}", st["addrs"][n], f"v{n}") for n in st["nodes"]]
    if st["slurm"]:
        members.append(("ctl", f"{name}-ctl", CTL_ADDR, "vctl"))
    for node, ns, addr, peer in members:
        sh(["ip", "netns", "add", ns])
        sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        sh(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", peer, "netns", br])
        sh(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0"])
        sh(["ip", "-n", ns, "link", "set", "eth0", "up"])
        sh(["ip", "-n", br, "link", "set", peer, "master", "br0"])
        sh(["ip", "-n", br, "link", "set", peer, "up"])
        if bits is not None and node != "ctl":
            tbf = ["tbf", "rate", st["link"], "burst", str(netem.tbf_burst_bytes(bits)), "latency", "100ms"]
            sh(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", *tbf])
            sh(["ip", "netns", "exec", br, "tc", "qdisc", "add", "dev", peer, "root", *tbf])
    with open(os.path.join(st["dir"], "hosts"), "w") as f:
        f.write(hosts_text(st))



# --- down -------------------------------------------------------------------------------------
def down(name: str | None = None) -> list[str]:
    """Kill every process in the box's namespaces (by pid), delete them, stop munged, remove the
    state; returns the namespaces deleted. Safe to call on a half-built or absent box."""
    name = name or box_name()
    st = load(name)
    mine = namespaces(name)
    for ns in mine:  # first everything (daemons would restart or requeue things), then delete
        empty(ns)
    for ns in mine:
        sh(["ip", "netns", "del", ns], check=False)
    munge_pid = (st or {}).get("pids", {}).get("munged")
    if munge_pid is None:
        try:
            munge_pid = int(open(os.path.join(state_dir(name), "munge", "munged.pid")).read())
        except (OSError, ValueError):
            munge_pid = None
    if munge_pid and netem.pid_alive(munge_pid) and _is_munged(munge_pid, name):
        os.kill(munge_pid, signal.SIGKILL)
    shutil.rmtree(state_dir(name), ignore_errors=True)
    return mine


def _is_munged(pid: int, name: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        return b"munged" in cmdline and state_dir(name).encode() in cmdline
    except OSError:
        return False


# --- status -----------------------------------------------------------------------------------
def status(name: str | None = None) -> str:
    st = load(name)
    name = name or box_name()
    left = namespaces(name)
    if st is None:
        return f"box {name}: down" + (f" (namespaces left over: {', '.join(left)}; run `box down`)" if left else "")
    lines = [f"box {name}: {len(st['nodes'])} node(s), link {st['link'] or 'unshaped'}, "
             f"slurm {'up' if st['slurm'] else 'off'}, state in {st['dir']}"]
    for n in st["nodes"] + (["ctl"] if st["slurm"] else []):
        ns = netns(st, n)
        c = counters(st, n).get("eth0", {}) if ns in left else {}
        q = sh(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", "eth0"], check=False).stdout.split("\n")[0]
        lines.append(f"  {n:6} {st['addrs'].get(n, CTL_ADDR):12} netns {ns}: {len(ns_pids(ns))} process(es), "
                     f"eth0 tx {c.get('tx_bytes', 0)} B rx {c.get('rx_bytes', 0)} B; {q.strip()}")
    if st["slurm"]:
        out = run(st, "ctl", ["sinfo", "-N", "-o", "%N %P %t %c"], capture_output=True, text=True)
        lines += ["  " + line for line in (out.stdout or out.stderr).strip().splitlines()]
    return "\n".join(lines)


# --- command line -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="box", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)
    u = sub.add_parser("up", help="create the nodes (and Slurm)")
    u.add_argument("--nodes", type=int, required=True)
    u.add_argument("--link", default=None, help="tc rate of each node's eth0, e.g. 100mbit, 1gbit, 10gbit")
    u.add_argument("--slurm", action="store_true", help="also start munged, slurmctld and one slurmd per node")
    u.add_argument("--cpus", type=int, default=8, help="CPUs Slurm is told each node has (default 8)")
    r = sub.add_parser("run", help="run a command on a node (nodeI, or ctl)")
    r.add_argument("--self-loopback", action="store_true",
                   help="the node's own hostname resolves to 127.0.1.1 (Debian's default /etc/hosts)")
    r.add_argument("node")
    r.add_argument("cmd", nargs=argparse.REMAINDER)
    rs = sub.add_parser("restart", help="power-cycle a node: kill every process in it, start its slurmd again")
    rs.add_argument("node")
    sub.add_parser("down", help="kill every process in the box by pid and delete its namespaces")
    sub.add_parser("status", help="nodes, addresses, processes, eth0 counters, Slurm's view")
    a = p.parse_args(argv)
    try:
        if a.verb != "status":
            reason = why_not()
            if reason:
                raise BoxError(reason)
        if a.verb == "up":
            t = time.monotonic()
            st = up(a.nodes, a.link, a.slurm, a.cpus)
            print(f"box {st['name']}: {a.nodes} node(s) up in {time.monotonic() - t:.1f} s; "
                  f"`box run node1 CMD...`" + (", Slurm partition `box`" if a.slurm else ""))
        elif a.verb == "run":
            st = load()
            if st is None:
                raise BoxError(f"box {box_name()} is not up: `box up --nodes M` first")
            if not a.cmd:
                raise BoxError("box run NODE CMD...: no command given")
            cmd = wrap(st, a.node, a.cmd, a.self_loopback)
            os.execvpe(cmd[0], cmd, env(st))
        elif a.verb == "restart":
            st = load()
            if st is None:
                raise BoxError(f"box {box_name()} is not up: `box up --nodes M` first")
            restart(st, a.node)
            print(f"box {st['name']}: {a.node} restarted")
        elif a.verb == "down":
            gone = down()
            print(f"box {box_name()}: down" + (f" ({len(gone)} namespaces deleted)" if gone else ""))
        else:
            print(status())
    except BoxError as e:
        print(f"box: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
