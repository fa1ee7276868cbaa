"""Multi-node runs in the cluster in a box (cluster/box.py): 2 emulated nodes, a real torchrun
c10d rendezvous across them, a real Slurm 22.05 (slurm-wlm + munge) over them.

Root only (network namespaces); skipped with the reason otherwise, or when iproute2, slurm-wlm
or munge is missing (``.ci/run`` installs them as root). One box for the module, torn down at
the end (``box down``: every process in it killed by pid). The jobs are the default digits job,
shortened; a 1-node x 4-process run of the same job is the reference for the 2 x 2 runs: same
world size, same rank order (node1's workers are ranks 0, 1: torch's c10d rendezvous orders the
nodes by hostname), so Gloo's ring all-reduce adds the same numbers in the same order and the
final parameters are bit-identical.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apptest import cmdline
from benchmarks import comm_results  # ring prediction and the 10% check of the communication benchmark
from cluster import box

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "cluster" / "slurm_train.sbatch"
BOX_NAME = "scbox-test"
RDZV_PORT = 29400
pytestmark = [pytest.mark.box, pytest.mark.timeout(900)]  # a test may start the module's box and 2-3 jobs


@pytest.fixture(scope="module")
def cluster():
    reason = box.why_not(slurm=True)
    if reason:
        pytest.skip(f"cluster in a box: {reason}")
    box.down(BOX_NAME)  # a box left by a killed run of these tests
    st = box.up(2, link="1gbit", slurm=True, name=BOX_NAME)
    try:
        yield st
    finally:
        # `box down` with a job running: nothing of it, of Slurm or of munged may survive
        try:
            res = box.run(st, "node1", ["sbatch", "--parsable", "--nodes=2", "-o", "/dev/null", "--wrap",
                                        "srun sleep 600"], capture_output=True, text=True, timeout=60)
            deadline = time.monotonic() + 30
            while res.returncode == 0 and job(st, res.stdout.strip()).get("JobState") != "RUNNING" \
                    and time.monotonic() < deadline:
                time.sleep(0.2)
        except Exception:  # noqa: BLE001 (the teardown below must run; the checks say what is left)
            pass
        pids = [p for ns in box.namespaces(BOX_NAME) for p in box.ns_pids(ns)] + [st["pids"]["munged"]]
        box.down(BOX_NAME)
        left = box.namespaces(BOX_NAME)
        assert not left, f"box down left namespaces {left}"
        alive = [p for p in pids if box.netem.pid_alive(p)]
        assert not alive, f"box down left processes {alive}"
        assert not os.path.exists(st["dir"])


def app_env(st, **extra) -> dict:
    env = box.env(st)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
               PYTHON=sys.executable, PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
               LOGLEVEL="WARNING", HYDRA_FULL_ERROR="1")
    env.pop("SPARSECOMM_ERROR_DIR", None)
    env.update(extra)
    return env


def job_args(out: Path, steps: int, *extra: str, density: str | None = "0.2") -> list[str]:
    """The default digits job, shortened (20 dense steps, then the FISH mask), with a 20% mask so
    that the masked gradient sync is what each step sends (see the eth0 test). DDP's broadcast of
    BatchNorm buffers (comm.sync_buffers, 1.8 kB/step) stays on: without it each rank keeps its
    own running statistics, a checkpoint holds rank 0's only, and a resumed run is not exact."""
    return [f"out_dir={out}", f"steps={steps}", "eval_every=0", *([f"mask.density={density}"] if density else []),
            *extra]


def torchrun(nnodes: int, nproc: int, rdzv: str, rid: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv, "--rdzv-id", rid, "-m", "sparsecomm.app.train", *args]


def run_nodes(st, cmds: dict[str, list[str]], cwd: Path, timeout: float = 600, env=None,
              self_loopback: bool = False) -> dict[str, subprocess.CompletedProcess]:
    """Start ``cmds[node]`` on every node at once; wait for all; their (rc, output)."""
    procs = {n: box.popen(st, n, c, cwd=cwd, env=env or app_env(st), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, self_loopback=self_loopback)
             for n, c in cmds.items()}
    out = {}
    deadline = time.monotonic() + timeout
    for n, p in procs.items():
        try:
            text, _ = p.communicate(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            text = p.communicate()[0] + "\n[test] killed: timeout"
        out[n] = subprocess.CompletedProcess(p.args, p.returncode, text)
    return out


def eth0_tx(st) -> dict[str, int]:
    """Bytes each node has sent on eth0 so far."""
    return {n: box.counters(st, n)["eth0"]["tx_bytes"] for n in st["nodes"]}


def params(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model.safetensors"))


def assert_same_params(a: dict, b: dict, what: str) -> None:
    import torch

    assert a.keys() == b.keys()
    diff = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not diff, f"{what}: parameters differ (max abs diff per tensor): {diff}"


def assert_close_params(run_dir: Path, ref_dir: Path, what: str, rel: float = 2e-3) -> None:
    """The run's final parameters (and buffers) are the reference run's up to float summation
    order: ||run - ref|| <= rel x ||ref - base||, base being the model after the dense warm-up
    (``base.safetensors``), i.e. the difference is a small fraction of what the masked phase
    changed. Measured: 2e-4 after resuming at step 10; a resume that restored the wrong BatchNorm
    buffers differed by 0.07-0.18 per tensor (~1e-2 and more of that change)."""
    import torch

    run, ref, base = params(run_dir), params(ref_dir), load_base(ref_dir)
    assert run.keys() == ref.keys() == base.keys()

    def flat(d):
        return torch.cat([d[k].double().flatten() for k in sorted(d)])

    gap, moved = float((flat(run) - flat(ref)).norm()), float((flat(ref) - flat(base)).norm())
    print(f"{what}: ||run - ref|| = {gap:.3g}, ||ref - base|| = {moved:.3g} (ratio {gap / moved:.2g})")
    assert gap <= rel * moved, f"{what}: ||run - ref|| = {gap:.3g} > {rel} x ||ref - base|| = {rel * moved:.3g}"


def load_base(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "base.safetensors"))


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# --- 1. torchrun across two nodes ------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """1 node x 4 processes of the job, in the box (node1): the run the 2 x 2 runs must equal."""
    done: dict[tuple, Path] = {}

    def run(steps: int, *extra: str) -> Path:
        if (steps, *extra) in done:
            return done[(steps, *extra)]
        tmp = tmp_path_factory.mktemp(f"ref{steps}")
        rid = f"ref{steps}"
        res = run_nodes(cluster, {"node1": torchrun(1, 4, f"node1:{RDZV_PORT + 50}", rid,
                                                     *job_args(tmp / "out", steps, *extra))}, tmp)
        assert res["node1"].returncode == 0, res["node1"].stdout[-3000:]
        done[(steps, *extra)] = tmp / "out" / rid
        return done[(steps, *extra)]
    return run


def two_node_run(st, tmp: Path, rid: str, steps: int, *extra: str, self_loopback=False, port=RDZV_PORT):
    cmds = {n: torchrun(2, 2, f"node1:{port}", rid, *job_args(tmp / "out", steps, *extra)) for n in st["nodes"]}
    return run_nodes(st, cmds, tmp, self_loopback=self_loopback)


@pytest.fixture(scope="module")
def two_node_runs(cluster, tmp_path_factory):
    """Two runs of the job on 2 nodes x 2 workers, their outputs and each node's eth0 bytes:
    ``short`` (30 steps) with every node's hostname on 127.0.1.1 (Debian's /etc/hosts: the
    interface pick of sparsecomm/app/netif.py must act), ``long`` (40 steps) with the box's hosts file.
    Same traffic per step (eth0 both times); ``long`` has 10 more masked steps."""
    tmp = tmp_path_factory.mktemp("two")
    runs = {}
    for key, steps, loop in (("short", 30, True), ("long", 40, False)):
        before = eth0_tx(cluster)
        res = two_node_run(cluster, tmp, key, steps, self_loopback=loop, port=RDZV_PORT + steps)
        after = eth0_tx(cluster)
        runs[key] = {"steps": steps, "res": res, "dir": tmp / "out" / key,
                     "eth0": {n: after[n] - before[n] for n in after}}
    return runs


def completed(run: dict) -> None:
    for n, r in run["res"].items():
        assert r.returncode == 0, f"{n}:\n{r.stdout[-3000:]}"


def test_torchrun_two_nodes_equals_one_node(two_node_runs, reference):
    """Bit-identical: same world size, same rank order, the same ring all-reduce summation order."""
    run = two_node_runs["long"]
    completed(run)
    assert sorted(p.name for p in run["dir"].parent.iterdir()) == ["long", "short"]
    assert summary(run["dir"])["world_size"] == 4
    assert_same_params(params(run["dir"]), params(reference(run["steps"])), "2 nodes x 2 vs 1 node x 4")


def test_eth0_bytes_per_masked_step_match_the_ring(two_node_runs):
    """Each node's eth0 per masked step (the 10 extra steps of ``long``) vs a ring all-reduce over
    ranks 0,1 | 2,3: each node sends one ring edge's traffic, 2(W-1)/W x the hook's payload. Within
    10% with nothing added for headers: the job's 20% mask makes the payload (120 kB/rank/step)
    dwarf the per-message TCP/Gloo overhead (~6 kB/node/step here, twice the 3 kB payload of the
    default 0.5% mask) and the BatchNorm buffer broadcast (1.8 kB/step)."""
    short, long = two_node_runs["short"], two_node_runs["long"]
    completed(short)
    completed(long)
    extra = long["steps"] - short["steps"]
    payload = (summary(long["dir"])["bytes_sent"] - summary(short["dir"])["bytes_sent"]) / extra
    assert payload > 0
    expected = comm_results.ring_factor(4) * payload
    for node in long["eth0"]:
        measured = (long["eth0"][node] - short["eth0"][node]) / extra
        print(f"{node}: eth0 {measured:.0f} B per masked step, ring prediction {expected:.0f} B "
              f"({measured / expected - 1:+.1%}); payload {payload:.0f} B/rank/step")
        assert abs(measured / expected - 1) <= 0.10, (
            f"{node}: eth0 {measured:.0f} B/step vs ring prediction {expected:.0f} B ({measured / expected - 1:+.1%})")


# --- 4. interface selection -----------------------------------------------------------------------
def test_loopback_hostname_picks_the_interface_and_says_so(two_node_runs):
    """Every hostname on 127.0.1.1 (no cluster.socket_ifname): node2 takes the route to node1,
    node1 (the rendezvous host: its route is lo) its only other interface; both log it."""
    run = two_node_runs["short"]
    completed(run)
    out = {n: r.stdout for n, r in run["res"].items()}
    assert "hostname node1 resolves to 127.0.1.1 (loopback): using eth0, the only interface besides lo" in out["node1"]
    assert "hostname node2 resolves to 127.0.1.1 (loopback): using eth0, the interface that routes to the " \
           "rendezvous host node1 (10.213.7.11)" in out["node2"]


def test_loopback_hostname_and_no_way_to_tell_stops_with_one_line(cluster, tmp_path):
    """The rendezvous host's name on 127.0.1.1 and two interfaces up: no guess, one line naming
    cluster.socket_ifname, exit 2, before any connection (a rank of a 2-node world, as torchrun
    would start it)."""
    ns = box.netns(cluster, "node1")
    subprocess.run(["ip", "-n", ns, "link", "add", "extra0", "type", "veth", "peer", "name", "extra1"], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "addr", "add", "10.99.0.1/24", "dev", "extra0"], check=True)
        for dev in ("extra0", "extra1"):
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        env = app_env(cluster, RANK="0", LOCAL_RANK="0", WORLD_SIZE="4", LOCAL_WORLD_SIZE="2", MASTER_ADDR="node1",
                      MASTER_PORT="29999", GROUP_RANK="0")
        res = box.run(cluster, "node1", [sys.executable, "-m", "sparsecomm.app.train", *job_args(tmp_path / "out", 30)],
                      self_loopback=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    finally:
        subprocess.run(["ip", "-n", ns, "link", "del", "extra0"], check=False)
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(lines) == 1 and "set cluster.socket_ifname=" in lines[0] and "127.0.1.1" in lines[0], res.stderr
    assert "eth0, extra0" in lines[0]


# --- Slurm --------------------------------------------------------------------------------------
def sbatch(st, cwd: Path, *args: str, env=None) -> str:
    """Submit from node1 (a client on the box's network); returns the job id."""
    res = box.run(st, "node1", ["sbatch", "--parsable", *args], cwd=cwd, env=env or app_env(st),
                  capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


def job(st, jobid: str) -> dict[str, str]:
    """``scontrol show job -o`` as a dict (JobState, ExitCode, Restarts, ...)."""
    res = box.run(st, "node1", ["scontrol", "show", "job", "-o", jobid], capture_output=True, text=True, timeout=30)
    fields = {}
    for tok in res.stdout.split():
        k, _, v = tok.partition("=")
        fields.setdefault(k, v)
    return fields

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def scontrol(st, *args: str) -> None:
    res = box.run(st, "node1", ["scontrol", *args], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, f"scontrol {' '.join(args)}: {res.stderr}"


def slurm_state(st) -> str:
    """What Slurm says of the box's jobs and nodes, and the end of slurmctld's log: why a job waits."""
    out = []
    for cmd in (["squeue", "-a", "-o", "%i %j %T %r %N"], ["sinfo", "-N", "-o", "%N %T %E"]):
        res = box.run(st, "node1", cmd, capture_output=True, text=True, timeout=30)
        out.append(f"$ {' '.join(cmd)}\n{res.stdout}{res.stderr}")
    log = Path(st["dir"], "slurmctld.log")
    out.append("slurmctld.log:\n" + (log.read_text()[-3000:] if log.exists() else "(none)"))
    return "\n".join(out)


def give_up(st, message: str, *scancel: str) -> None:
    """Fail with ``message`` and why Slurm's jobs wait (:func:`slurm_state`), after ``scancel *scancel``
    has freed the nodes for the next test."""
    state = slurm_state(st)
    box.run(st, "node1", ["scancel", *scancel], timeout=30)
    pytest.fail(f"{message}\n{state}")


def wait_job(st, jobid: str, timeout: float = 300, until=TERMINAL) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        j = job(st, jobid)
        if j.get("JobState") in until:
            return j
        if time.monotonic() > deadline:
            give_up(st, f"job {jobid} not done after {timeout:.0f} s: {j.get('JobState')} ({j.get('Reason')})", jobid)
        time.sleep(0.5)


def slurm_job_args(out: Path, steps: int, *extra: str, density: str | None = "0.2") -> list[str]:
    return ["cluster.backend=gloo", "cluster.device=cpu", *job_args(out, steps, *extra, density=density)]

SBATCH_OPTS = ("--nodes=2", "--gpus-per-node=0", "--cpus-per-task=2")  # the script asks for 4 GPUs, 32 CPUs


def test_sbatch_two_nodes_completes_with_one_run_dir(cluster, reference, tmp_path):
    env = app_env(cluster, SPARSECOMM_GPUS_PER_NODE="2")
    jobid = sbatch(cluster, tmp_path, *SBATCH_OPTS, f"--output={tmp_path}/slurm-%j.out", str(SBATCH),
                   *slurm_job_args(tmp_path / "out", 40), env=env)
    j = wait_job(cluster, jobid)
    log = (tmp_path / f"slurm-{jobid}.out").read_text()
    assert (j["JobState"], j["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert "2 node(s) x 2 worker(s) (cluster.backend=gloo cluster.device=cpu), rendezvous node1:29500" in log
    assert [p.name for p in (tmp_path / "out").iterdir()] == [jobid]
    assert summary(tmp_path / "out" / jobid)["world_size"] == 4
    assert_same_params(params(tmp_path / "out" / jobid), params(reference(40)), "sbatch 2 x 2 vs 1 node x 4")


SWEEP_TIMEOUT_S = 240


def test_submitit_sweep_every_job_completes(cluster, tmp_path):
    """The sweep config as documented; on the box: 2 nodes x 1 task per job, no GPUs, small memory.
    cluster.master_port=null: both jobs share the head node, so each takes a port from its job id."""
    env = app_env(cluster, SPARSECOMM_GPUS_PER_NODE="1")
    densities = ("0.005", "0.02")
    cmd = [str(Path(sys.executable).with_name("sparsecomm-train")), "-m", "hydra/launcher=submitit_slurm",
           "cluster=slurm", f"mask.density={','.join(densities)}", "hydra.launcher.nodes=2",
           "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
           "cluster.master_port=null", *slurm_job_args(tmp_path / "out", 30, density=None), "run_id=sweep"]
    try:
        res = box.run(cluster, "node1", cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                      timeout=SWEEP_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:  # the sweep waits for its jobs: say why they did not end
        said = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x for x in (e.stdout or "", e.stderr or ""))
        give_up(cluster, f"the sweep did not end in {SWEEP_TIMEOUT_S} s (10-15 s when it works):\n{said[-4000:]}",
                "--user", "root")
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    sweep = tmp_path / "out" / "multirun" / "sweep"
    jobs = sorted(p for p in sweep.iterdir() if p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"], sorted(p.name for p in sweep.iterdir())
    for p, density in zip(jobs, densities):
        s = summary(p)
        assert s["world_size"] == 2 and s["steps"] == 30 and abs(s["density"] - float(density)) < 1e-3, s


# --- 3. faults across nodes --------------------------------------------------------------------
def checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step-*.ckpt"))


def test_node_killed_mid_job_then_resubmitted_resumes_and_matches(cluster, reference, tmp_path):
    """SIGKILL every process of node 2 (slurmd, slurmstepd, torchrun, workers) after the job's
    second checkpoint; Slurm declares node 2 failed (SlurmdTimeout=10 s) and ends the job
    (--no-requeue); node 2 comes back (a fresh slurmd) and the same job is submitted again with
    run_id=<first job id>: it resumes from the last checkpoint of that run directory and ends with
    the uninterrupted run's parameters (up to float summation order: see below). (Slurm's own
    requeue, same job id, was tried first: the requeued run was SIGTERMed ~40 s in on node 2,
    twice, for a reason not found in the daemons' logs; a resubmitted job has a new id and runs
    undisturbed.)"""
    st = cluster
    env = app_env(st, SPARSECOMM_GPUS_PER_NODE="2")
    args = slurm_job_args(tmp_path / "out", 40, "checkpoint.every=5")
    first = sbatch(st, tmp_path, *SBATCH_OPTS, "--no-requeue", f"--output={tmp_path}/slurm-%j.out", str(SBATCH),
                   *args, env=env)
    run_dir = tmp_path / "out" / first
    deadline = time.monotonic() + 240
    while len(checkpoints(run_dir)) < 2:  # past the first checkpoint, not yet done
        assert job(st, first).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), \
            (tmp_path / f"slurm-{first}.out").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.05)
    assert box.kill_node(st, "node2")
    j = wait_job(st, first, timeout=120)
    assert j["JobState"] != "COMPLETED" and not (run_dir / "model.safetensors").exists(), \
        "the job finished before node 2 was killed: nothing was tested"
    done_before = checkpoints(run_dir)
    box.restart(st, "node2")
    box.wait_idle(st, ["node2"], timeout=60)
    second = sbatch(st, tmp_path, *SBATCH_OPTS, f"--output={tmp_path}/slurm-%j.out", str(SBATCH), *args,
                    f"run_id={first}", env=env)
    j = wait_job(st, second, timeout=300)
    log = (tmp_path / f"slurm-{second}.out").read_text()
    daemons = "".join(f"\n{n}:\n" + Path(st["dir"], n).read_text()[-2000:]
                      for n in ("slurmctld.log", "slurmd-node1.log", "slurmd-node2.log"))
    assert (j["JobState"], j["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:] + daemons
    assert [p.name for p in (tmp_path / "out").iterdir()] == [first]
    s = summary(run_dir)
    assert s["resumed_from"] and Path(s["resumed_from"]).name in {p.name for p in done_before}, s["resumed_from"]
    # Not bit for bit on 4 ranks (measured; the cause is our reading, not verified): the resumed
    # processes' first step reduces with DDP's initial bucket layout, the uninterrupted run's same
    # step with the layout rebuilt after its first step; the ring's chunks (which rank adds which
    # elements, in which order) move with the layout, a+b+c+d in another order differs in the last
    # bits, and AdamW carries it on. On 2 ranks (a+b = b+a) resume is bit-exact (test_fault.py).
    assert_close_params(run_dir, reference(40), "killed, resubmitted, resumed")


def test_job_cancelled_at_time_limit_leaves_a_checkpoint_to_resume(cluster, reference, tmp_path):
    """``scancel --signal=TERM`` (what Slurm sends at ``--time``): the workers stop at the next
    step boundary (``logging.log_every=1``: every step), checkpoint and exit. Checkpoints are on
    but none is periodic before step 1000 (``checkpoint.every=1000``), so the one there was
    written on SIGTERM. The requeued job resumes from it and ends with the uninterrupted run's
    parameters."""
    st = cluster
    env = app_env(st, SPARSECOMM_GPUS_PER_NODE="2")
    jobid = sbatch(st, tmp_path, *SBATCH_OPTS, "--requeue", f"--output={tmp_path}/slurm-%j.out", str(SBATCH),
                   *slurm_job_args(tmp_path / "out", 40, "checkpoint.every=1000", "logging.log_every=1"), env=env)
    run_dir = tmp_path / "out" / jobid
    deadline = time.monotonic() + 240
    while not (run_dir / "mask.safetensors").exists():  # step 20 reached: the masked phase runs
        assert time.monotonic() < deadline and job(st, jobid).get("JobState") in ("PENDING", "RUNNING")
        time.sleep(0.05)
    box.run(st, "node1", ["scancel", "--signal=TERM", jobid], timeout=30)
    wait_job(st, jobid, timeout=120)
    assert checkpoints(run_dir), "SIGTERM left no checkpoint"
    assert not (run_dir / "model.safetensors").exists(), "the job finished before SIGTERM: nothing was tested"
    res = box.run(st, "node1", ["scontrol", "requeue", jobid], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    j = wait_job(st, jobid, timeout=300)
    assert (j["JobState"], j["ExitCode"]) == ("COMPLETED", "0:0")
    assert summary(run_dir)["resumed_from"]
    assert_close_params(run_dir, reference(40), "SIGTERM, requeued, resumed")

# --- a node that stops answering ---------------------------------------------------------------
HANG_TIMEOUT_S = 20
HANG_MARGIN_S = 180  # the silent-rank check, torch elastic's 30 s shutdown of a stopped worker, exits


def metrics_step(run_dir: Path) -> int:
    """The last train step rank 0 logged (0 if none yet)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(x)["step"] for x in lines if x.strip().startswith("{") and '"train"' in x]
    return max(steps, default=0)


def start_two_nodes(st, tmp: Path, rid: str, port: int) -> dict[str, tuple[subprocess.Popen, Path]]:
    """Both nodes' torchrun, each writing its output to a file (a pipe would also wait for any
    worker a launcher left behind)."""
    args = job_args(tmp / "out", 100000, "logging.log_every=5", f"cluster.timeout_s={HANG_TIMEOUT_S}",
                    "checkpoint.every=20")
    procs = {}
    for n in st["nodes"]:
        log = tmp / f"{n}.out"
        with open(log, "w") as f:
            procs[n] = (box.popen(st, n, torchrun(2, 2, f"node1:{port}", rid, *args), cwd=tmp, env=app_env(st),
                                  stdout=f, stderr=subprocess.STDOUT), log)
    return procs


def wait_training(procs: dict, run_dir: Path, step: int = 25, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while metrics_step(run_dir) < step:
        for n, (p, log) in procs.items():
            assert p.poll() is None, f"{n} exited early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no train record at step {step} after {timeout} s"
        time.sleep(0.2)


def finish(procs: dict, timeout: float, enough=lambda took: False) -> dict[str, tuple[int | None, str, float]]:
    """Each node's (exit code, output, seconds until it exited); a node still running is killed (rc None).
    Waits until every node's launcher has exited, ``enough(took)`` holds, or ``timeout``."""
    t0, took = time.monotonic(), {}
    while len(took) < len(procs) and time.monotonic() < t0 + timeout and not enough(took):
        for n, (p, _) in procs.items():
            if n not in took and p.poll() is not None:
                took[n] = time.monotonic() - t0
        time.sleep(0.2)
    out = {}
    for n, (p, log) in procs.items():
        if n not in took:
            p.kill()
            p.wait()
        out[n] = (p.returncode if n in took else None, log.read_text(), took.get(n, float("nan")))
    return out


def node_worker(st, node: str, rid: str, rank: int) -> int:
    for pid in box.ns_pids(box.netns(st, node)):
        try:
            env = set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if {f"TORCHELASTIC_RUN_ID={rid}".encode(), f"RANK={rank}".encode()} <= env:
            return pid
    raise AssertionError(f"no worker of rank {rank} on {node}")


def assert_stopped_lines(out: dict, node: str, *must: str, launcher_exits: bool = True) -> None:
    rc, text, took = out[node]
    if launcher_exits:
        assert rc not in (0, None), f"{node}: rc {rc} after {took:.0f} s\n{text[-3000:]}"
    lines = [x for x in text.splitlines() if "stopped answering" in x]
    assert lines and all(x.startswith("sparsecomm: stopped at step ") for x in lines), text[-3000:]
    # each line ends with the command that resumes: torchrun's options and the run id to pass
    assert all("resume with the same torchrun options" in x and " run_id=" in x for x in lines), lines
    for m in must:
        assert any(m in x for x in lines), (m, lines)
    print(f"{node}: exit {rc} after {took:.0f} s: {lines[0]}")


def test_a_node_whose_link_goes_down_ends_the_job_in_bounded_time(cluster, tmp_path):
    """node2's eth0 down mid-run: node1's ranks name ranks 2, 3 (node2) and node1's torchrun exits
    non-zero; node2's ranks lose the store on node1 and exit with their line too, all within timeout +
    margin. node2's torchrun itself is not waited for: cut off from its rendezvous host, torch's c10d
    agent blocks in its keep-alive and ``num_nodes_waiting`` store calls (measured: still there
    200 s later); under Slurm, ``srun --kill-on-bad-exit=1`` in cluster/slurm_train.sbatch ends it
    when node1's task fails."""
    procs = start_two_nodes(cluster, tmp_path, "down", RDZV_PORT + 70)
    ns = box.netns(cluster, "node2")
    try:
        wait_training(procs, tmp_path / "out" / "down")
        subprocess.run(["ip", "-n", ns, "link", "set", "eth0", "down"], check=True)

        def node2_workers() -> list[int]:  # the app's processes there, not torchrun (its arguments name the app too)
            return [p for p in box.ns_pids(ns) if b"sparsecomm.app.train" in cmdline(p)
                    and b"torch.distributed.run" not in cmdline(p)]
        # node1's launcher and node2's workers end; node2's launcher would not (see above)
        out = finish(procs, HANG_TIMEOUT_S + HANG_MARGIN_S, enough=lambda took: "node1" in took and not node2_workers())
        leftover = node2_workers()
    finally:
        subprocess.run(["ip", "-n", ns, "link", "set", "eth0", "up"], check=False)
        box.kill_node(cluster, "node2")  # whatever of this job is left there
        box.restart(cluster, "node2")
    assert_stopped_lines(out, "node1", "rank 2 (node2", "rank 3 (node2")
    assert_stopped_lines(out, "node2", "the job's store at", launcher_exits=False)
    assert not leftover, f"workers of node2 still running after their launcher exited: {leftover}"


def test_a_stopped_worker_on_another_node_ends_the_job_in_bounded_time(cluster, tmp_path):
    """SIGSTOP rank 2 (node2): the other ranks name it; both torchruns exit non-zero within
    timeout + margin (node2's agent SIGKILLs its stopped worker after its shutdown timeout)."""
    procs = start_two_nodes(cluster, tmp_path, "sigstop", RDZV_PORT + 71)
    pid = None
    try:
        wait_training(procs, tmp_path / "out" / "sigstop")
        pid = node_worker(cluster, "node2", "sigstop", 2)
        os.kill(pid, signal.SIGSTOP)
        out = finish(procs, HANG_TIMEOUT_S + HANG_MARGIN_S)
    finally:
        if pid is not None and box.netem.pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert_stopped_lines(out, "node1", f"rank 2 (node2, pid {pid})")
    assert_stopped_lines(out, "node2", f"rank 2 (node2, pid {pid})")


def test_sbatch_with_the_scripts_own_defaults_runs_on_a_cpu_cluster(cluster, tmp_path):
    """No resource options, no PYTHON, no cluster overrides: the header's request fits CPU nodes, the
    script finds a Python that imports sparsecomm and runs one Gloo worker per node."""
    env = app_env(cluster)
    env.pop("PYTHON")
    jobid = sbatch(cluster, tmp_path, f"--output={tmp_path}/slurm-%j.out", str(SBATCH),
                   f"out_dir={tmp_path / 'out'}", "steps=30", "eval_every=0", env=env)
    j = wait_job(cluster, jobid)
    log = (tmp_path / f"slurm-{jobid}.out").read_text()
    assert (j["JobState"], j["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert "2 node(s) x 1 worker(s) (cluster.backend=gloo cluster.device=cpu)" in log, log[-3000:]
    s = summary(tmp_path / "out" / jobid)
    assert s["world_size"] == 2 and s["backend"] == "gloo", s
