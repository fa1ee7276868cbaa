"""Slurm over the box's nodes: one ``munged``, ``slurmctld`` in the controller's namespace, one
``slurmd -N nodeI`` per node, their configuration file; restarting a node. Root only; stdlib only.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time

from cluster.nodes import CTL_ADDR, BoxError, empty, netns, popen, run, save, sh, tool

# The scheduling loops run every second (sched_interval, bf_interval; Slurm's defaults are 60 s and
# 30 s): a job that becomes eligible without an event that wakes the scheduler, such as a requeued
# job once its credential's expiry has passed (cred_expire), starts within a second, not up to 30 s later.
# cred_expire (Slurm's default: 120 s) is also how long a launch may take from slurmctld signing the
# job's credential to slurmd checking it; a launch that takes longer fails, and the job is requeued
# and held (pending for good). 30 s leaves room on a busy host (the box's nodes share its cores with
# whatever else runs); a requeued job waits that long before it starts again.
SLURM_CONF = """\
# slurm.conf of the box {name} (written by cluster/box.py; one host, emulated nodes)
ClusterName={name}
SlurmctldHost=ctl({ctl})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire=30
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
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
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


def start_slurm(st: dict) -> None:
    d = st["dir"]
    munge_dir = os.path.join(d, "munge")
    os.makedirs(munge_dir, exist_ok=True)
    shutil.chown(munge_dir, "munge", "munge")
    os.chmod(munge_dir, 0o755)
    socket = os.path.join(munge_dir, "munge.socket")
    sh(["runuser", "-u", "munge", "--", tool("munged"), f"--socket={socket}",
         f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log",
         f"--seed-file={munge_dir}/munged.seed"])
    st["pids"]["munged"] = int(open(f"{munge_dir}/munged.pid").read().strip())
    save(st)
    node_lines = "\n".join(f"NodeName={n} NodeAddr={st['addrs'][n]} NodeHostname={n}" for n in st["nodes"])
    conf = SLURM_CONF.format(name=st["name"], ctl=CTL_ADDR, munge_socket=socket, dir=d, cpus=st["cpus"],
                             node_lines=node_lines)
    path = os.path.join(d, "slurm.conf")
    with open(path, "w") as f:
        f.write(conf)
    os.makedirs(os.path.join(d, "slurmctld"), exist_ok=True)
    procs = {"slurmctld": _daemon(st, "ctl", [tool("slurmctld"), "-D", "-i", "-f", path])}
    for n in st["nodes"]:
        procs[f"slurmd-{n}"] = start_slurmd(st, n)
    st["pids"].update({k: p.pid for k, p in procs.items()})
    save(st)
    wait_idle(st, st["nodes"], procs)


def _daemon(st: dict, node: str, cmd: list[str]) -> subprocess.Popen:
    with open(os.path.join(st["dir"], "daemons.out"), "ab") as log:
        return popen(st, node, cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                     start_new_session=True)


def start_slurmd(st: dict, node: str) -> subprocess.Popen:
    """Start ``slurmd -N node`` in ``node`` (its jobs inherit the node's namespaces)."""
    return _daemon(st, node, [tool("slurmd"), "-D", "-N", node, "-f", os.path.join(st["dir"], "slurm.conf")])


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
    empty(netns(st, node))
    if st.get("slurm") and node != "ctl":
        p = start_slurmd(st, node)
        st["pids"][f"slurmd-{node}"] = p.pid
        save(st)
        wait_idle(st, [node], {node: p}, timeout=timeout, ok=("idle", "mix", "alloc", "comp"))

