"""A bounded soak of elastic restarts (issue 6; not run in CI).

    python -m benchmarks.soak [--steps 400] [--kill-every 100] [--checkpoint-every 25] [--seed 0]

Runs the app (digits, FISH mask, 2 Gloo ranks) under ``torchrun --max-restarts`` and SIGKILLs a
random rank at a random step around every ``--kill-every`` steps (only once the previous restart
has resumed). Next to it, the same config uninterrupted. Reports the restarts, the steps lost
(trained before a kill but after the checkpoint the run resumed from, so trained twice), and
whether the final parameters equal the uninterrupted run's, tensor by tensor. Writes
``benchmarks/results/soak.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
from benchmarks.apprun import read_events, torchrun_app, worker_pid


def steps_lost(evs: list[dict]) -> tuple[int, list[dict]]:
    """Per resume: the last step trained before it minus the step it resumed from."""
    lost, detail, last = 0, [], 0
    for e in evs:
        if e["event"] == "train":
            last = e["step"]
        elif e["event"] == "resume":
            detail.append({"resumed_at": e["step"], "trained_before": last, "lost": last - e["step"]})
            lost += last - e["step"]
            last = e["step"]
    return lost, detail


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--kill-every", type=int, default=100)
    p.add_argument("--checkpoint-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    a = p.parse_args()
    rng = random.Random(a.seed)
    out = Path(a.out or tempfile.mkdtemp(prefix="sparsecomm-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    args = [f"steps={a.steps}", "batch_size=16", "eval_every=0", "logging.progress=false", "logging.log_every=1",
            "mask.num_samples=64", "schedule.dense_steps=20", "cluster.num_threads=1", "cluster.nproc_per_node=2",
            f"checkpoint.every={a.checkpoint_every}", "checkpoint.keep=2"]
    planned = max(a.steps // a.kill_every - 1, 1)
    run_id = f"soak{os.getpid()}"
    t0 = time.time()
    ref = torchrun_app(out, "reference", args, log=out / "reference.log")
    soak = torchrun_app(out, run_id, args, max_restarts=planned + 1, log=out / f"{run_id}.log")
    kills: list[dict] = []
    next_kill = a.kill_every + rng.randint(-a.kill_every // 4, a.kill_every // 4)
    resumes_seen = 0
    try:
        while soak.poll() is None:
            evs = read_events(out / run_id, live=True)
            resumes = sum(e["event"] == "resume" for e in evs)
            trained = [e["step"] for e in evs if e["event"] == "train"]
            ready = resumes == len(kills)  # the previous kill has been recovered from
            if ready and trained and trained[-1] >= next_kill and len(kills) < planned and trained[-1] < a.steps - 5:
                rank = rng.randint(0, 1)
                pid = worker_pid(run_id, rank)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    kills.append({"step_seen": trained[-1], "rank": rank, "pid": pid,
                                  "t": round(time.time() - t0, 1)})
                    print(f"[{time.time() - t0:6.1f} s] SIGKILL rank {rank} (pid {pid}) at step ~{trained[-1]}",
                          flush=True)
                    next_kill = trained[-1] + a.kill_every + rng.randint(-a.kill_every // 4, a.kill_every // 4)
            if resumes > resumes_seen:
                resumes_seen = resumes
                last = [e for e in evs if e["event"] == "resume"][-1]
                print(f"[{time.time() - t0:6.1f} s] resumed at step {last['step']}", flush=True)
            time.sleep(0.05)
        soak_s = time.time() - t0
        ref.wait(timeout=600)
    finally:
        for proc in (soak, ref):
            if proc.poll() is None:
                proc.kill()

    evs = read_events(out / run_id, live=True)
    lost, detail = steps_lost(evs)
    result = {"steps": a.steps, "kill_every": a.kill_every, "checkpoint_every": a.checkpoint_every, "seed": a.seed,
              "soak_exit": soak.returncode, "reference_exit": ref.returncode, "kills": kills,
              "restarts": sum(e["event"] == "resume" for e in evs), "steps_lost": lost, "resumes": detail,
              "soak_wall_s": round(soak_s, 1), "out": str(out)}
    match = None
    if soak.returncode == 0 and ref.returncode == 0:
        import torch
        from safetensors.torch import load_file

        x = load_file(str(out / "reference" / "model.safetensors"))
        y = load_file(str(out / run_id / "model.safetensors"))
        match = x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        result["max_abs_diff"] = max(float((x[k].double() - y[k].double()).abs().max()) for k in x) if x.keys() == y.keys() else None
    result["params_match"] = match
    print(f"soak: {a.steps} steps, checkpoint every {a.checkpoint_every}, {len(kills)} SIGKILLs "
          f"(ranks {[k['rank'] for k in kills]}), {result['restarts']} restarts resumed, {lost} steps lost "
          f"(recomputed) {[d['lost'] for d in detail]}, exit codes soak={soak.returncode} reference={ref.returncode}")
    print(f"soak: final parameters equal the uninterrupted run's, tensor by tensor: {match}"
          + (f" (max |diff| {result['max_abs_diff']:.3g})" if result.get("max_abs_diff") is not None else ""))
    print(f"soak: wall {soak_s:.0f} s; logs and run dirs in {out}")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "soak.json").write_text(json.dumps(result, indent=2))
    sys.exit(0 if match else 1)


if __name__ == "__main__":
    main()
