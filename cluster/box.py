#!/usr/bin/env python3
"""A cluster in a box: M emulated nodes on this host, optionally with a real Slurm over them.

    sudo python3 cluster/box.py up --nodes 2 --link 1gbit --slurm   # ~2 s once slurm-wlm is installed
    sudo python3 cluster/box.py run node1 hostname                  # -> node1
    sudo python3 cluster/box.py run node1 sbatch --nodes=2 --wrap 'srun hostname'
    sudo python3 cluster/box.py status
    sudo python3 cluster/box.py restart node2                      # power-cycle: SIGKILL all, slurmd again
    sudo python3 cluster/box.py down                                # kills everything in it, by pid

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
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))
import netem  # noqa: E402  (tc rate parsing, tbf burst size, namespace listing, their processes)

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


def _sh(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)
    if check and proc.returncode != 0:
        raise BoxError(f"{shlex.join(cmd)} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc


def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


# --- state ------------------------------------------------------------------------------------
def load(name: str | None = None) -> dict | None:
    """The running box's state (``state.json``), or None when no box is up."""
    try:
        with open(os.path.join(state_dir(name), "state.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _save(st: dict) -> None:
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
    return [_tool("nsenter"), f"--net=/run/netns/{netns(st, node)}", "--",
            _tool("unshare"), "--uts", "--mount", "--propagation", "private", "--",
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
    out = _sh(["nsenter", f"--net=/run/netns/{netns(st, node)}", "cat", "/proc/net/dev"]).stdout
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
    _save(st)
    try:
        _network(st, bits)
        if slurm:
            _slurm(st)
    except BaseException:
        down(name)
        raise
    return st


def _network(st: dict, bits: float | None) -> None:
    name, br = st["name"], f"{st['name']}-net"
    _sh(["ip", "netns", "add", br])
    _sh(["ip", "-n", br, "link", "set", "lo", "up"])
    _sh(["ip", "-n", br, "link", "add", "br0", "type", "bridge"])
    _sh(["ip", "-n", br, "link", "set", "br0", "up"])
    members = [(n, f"{name}-{n}", st["addrs"][n], f"v{n}") for n in st["nodes"]]
    if st["slurm"]:
        members.append(("ctl", f"{name}-ctl", CTL_ADDR, "vctl"))
    for node, ns, addr, peer in members:
        _sh(["ip", "netns", "add", ns])
        _sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        _sh(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", peer, "netns", br])
        _sh(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0"])
        _sh(["ip", "-n", ns, "link", "set", "eth0", "up"])
        _sh(["ip", "-n", br, "link", "set", peer, "master", "br0"])
        _sh(["ip", "-n", br, "link", "set", peer, "up"])
        if bits is not None and node != "ctl":
            tbf = ["tbf", "rate", st["link"], "burst", str(netem.tbf_burst_bytes(bits)), "latency", "100ms"]
            _sh(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", *tbf])
            _sh(["ip", "netns", "exec", br, "tc", "qdisc", "add", "dev", peer, "root", *tbf])
    with open(os.path.join(st["dir"], "hosts"), "w") as f:
        f.write(hosts_text(st))


SLURM_CONF = """\
# slurm.conf of the box {name} (written by cluster/box.py; one host, emulated nodes)
ClusterName={name}
SlurmctldHost=ctl({ctl})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire=10
CredType=cred/munge
StateSaveLocation={dir}/slurmctld
SlurmdSpoolDir={dir}/slurmd-%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
SchedulerParameters=batch_sched_delay=0
SlurmdParameters=config_overrides
JobRequeue=1
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=10
InactiveLimit=0
NodeName=DEFAULT CPUs={cpus} RealMemory=4096 State=UNKNOWN
{node_lines}
PartitionName=box Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


def _slurm(st: dict) -> None:
    d = st["dir"]
    munge_dir = os.path.join(d, "munge")
    os.makedirs(munge_dir, exist_ok=True)
    shutil.chown(munge_dir, "munge", "munge")
    os.chmod(munge_dir, 0o755)
    socket = os.path.join(munge_dir, "munge.socket")
    _sh(["runuser", "-u", "munge", "--", _tool("munged"), f"--socket={socket}",
         f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log",
         f"--seed-file={munge_dir}/munged.seed"])
    st["pids"]["munged"] = int(open(f"{munge_dir}/munged.pid").read().strip())
    _save(st)
    node_lines = "\n".join(f"NodeName={n} NodeAddr={st['addrs'][n]} NodeHostname={n}" for n in st["nodes"])
    conf = SLURM_CONF.format(name=st["name"], ctl=CTL_ADDR, munge_socket=socket, dir=d, cpus=st["cpus"],
                             node_lines=node_lines)
    path = os.path.join(d, "slurm.conf")
    with open(path, "w") as f:
        f.write(conf)
    os.makedirs(os.path.join(d, "slurmctld"), exist_ok=True)
    procs = {"slurmctld": _daemon(st, "ctl", [_tool("slurmctld"), "-D", "-i", "-f", path])}
    for n in st["nodes"]:
        procs[f"slurmd-{n}"] = start_slurmd(st, n)
    st["pids"].update({k: p.pid for k, p in procs.items()})
    _save(st)
    wait_idle(st, st["nodes"], procs)


def _daemon(st: dict, node: str, cmd: list[str]) -> subprocess.Popen:
    with open(os.path.join(st["dir"], "daemons.out"), "ab") as log:
        return popen(st, node, cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                     start_new_session=True)


def start_slurmd(st: dict, node: str) -> subprocess.Popen:
    """Start ``slurmd -N node`` in ``node`` (its jobs inherit the node's namespaces)."""
    return _daemon(st, node, [_tool("slurmd"), "-D", "-N", node, "-f", os.path.join(st["dir"], "slurm.conf")])


def wait_idle(st: dict, nodes: list[str], procs: dict | None = None, timeout: float = 30.0,
              ok=("idle",)) -> None:
    """Until Slurm reports ``nodes`` in a state of ``ok`` (sinfo %t); BoxError if a daemon in
    ``procs`` dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        dead = [k for k, p in (procs or {}).items() if p.poll() is not None]
        if dead:
            raise BoxError(f"{', '.join(dead)} exited: see {st['dir']}/daemons.out and {st['dir']}/*.log")
        out = run(st, "ctl", ["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True)
        states = dict(line.split() for line in out.stdout.splitlines() if len(line.split()) == 2)
        if out.returncode == 0 and all(states.get(n) in ok for n in nodes):
            return
        if time.monotonic() > deadline:
            raise BoxError(f"Slurm nodes not idle after {timeout:.0f} s ({out.stdout.strip() or out.stderr.strip()}): "
                           f"see {st['dir']}/slurmctld.log")
        time.sleep(0.2)


def restart(st: dict, node: str, timeout: float = 60.0) -> None:
    """Power-cycle ``node``: SIGKILL every process in it, then (with Slurm) start its slurmd again
    and wait until Slurm sees it respond (``ReturnToService=2``; it may still run a job)."""
    _empty(netns(st, node))
    if st.get("slurm") and node != "ctl":
        p = start_slurmd(st, node)
        st["pids"][f"slurmd-{node}"] = p.pid
        _save(st)
        wait_idle(st, [node], {node: p}, timeout=timeout, ok=("idle", "mix", "alloc", "comp"))


# --- down -------------------------------------------------------------------------------------
ns_pids = netem.namespace_pids  # the processes in a namespace (one home: netem)


def kill_node(st: dict, node: str, sig: int = signal.SIGKILL) -> list[int]:
    """Send ``sig`` to every process in ``node``'s network namespace (what a power cut does)."""
    pids = ns_pids(netns(st, node))
    netem.signal_pids(pids, sig)
    return pids


def _empty(ns: str, timeout: float = 10.0) -> None:
    """SIGKILL every process in ``ns`` by pid until none is left (children forked meanwhile too)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in ns_pids(ns) if netem.pid_alive(p)]
        if not alive or time.monotonic() > deadline:
            return
        netem.signal_pids(alive, signal.SIGKILL)
        time.sleep(0.05)


def down(name: str | None = None) -> list[str]:
    """Kill every process in the box's namespaces (by pid), delete them, stop munged, remove the
    state; returns the namespaces deleted. Safe to call on a half-built or absent box."""
    name = name or box_name()
    st = load(name)
    mine = namespaces(name)
    for ns in mine:  # first everything (daemons would restart or requeue things), then delete
        _empty(ns)
    for ns in mine:
        _sh(["ip", "netns", "del", ns], check=False)
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
        q = _sh(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", "eth0"], check=False).stdout.split("\n")[0]
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
