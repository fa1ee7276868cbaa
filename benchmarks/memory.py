"""Peak memory of choosing a mask and of training: sparsecomm against dense DDP + AdamW (issue 13).

    python benchmarks/memory.py                                   # 128 MiB and 1 GiB MLPs, every row
    python benchmarks/memory.py --sizes-mib 128 1024 4096 --dense-max-mib 1024
    sudo python benchmarks/memory.py --headline --cap-gib 8       # + the 2-rank fit in a capped cgroup
    python benchmarks/memory.py --render-only                     # tables, verdicts, plot from memory.json

The model is an MLP of 8 ``nn.Linear(w, w)`` layers (fp32, w chosen for the size), classifying
its own w outputs; the data is one random batch. Every measurement runs in a FRESH Python process
(``--worker``): it builds the model, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``
``5``; ``resource.getrusage`` where that is unavailable), reads the current RSS, runs the step
under test and reports ``VmHWM - RSS before``: the peak extra resident memory the step needed on
top of the model. On a CUDA device the same is read from ``torch.cuda.max_memory_allocated``.
Rows (``--steps`` steps each for the training rows, one Gloo rank, density 0.5%):

    random_mask            sparsecomm.random_mask (streamed top-k)
    fisher_mask            sparsecomm.fisher_mask, layers engine, 64 examples
    concat (before)        the previous random_mask: every score as float64, concatenated
    ddp                    DDP(gradient_as_bucket_view=True), forward+backward, no optimizer:
                           DDP's own share (its gradient buckets)
    sparsecomm             random mask + DDP(bucket view) + masked hook + MaskedAdamW
    pipeline               fisher_mask, then the sparsecomm row: what a FISH run needs at its peak
    dense                  DDP (torch's defaults) + torch.optim.AdamW
    dense, bucket view     DDP(gradient_as_bucket_view=True) + torch.optim.AdamW

``--headline`` fits ``peak RSS of a rank = a + b x model bytes`` to the pipeline and to the best
dense row, predicts the largest model that 2 ranks fit in the machine's memory (MemTotal less
``--reserve-gib``) and in the cap, and checks the prediction: both 2-rank runs (fisher_mask + 5
masked steps; DDP + AdamW 5 steps) launched inside a memory cgroup capped at ``--cap-gib`` (the
OOM killer then stops only them), at 0.95x (``--verify-at``) the sparsecomm bound, where dense must
not fit, and at 0.95x the dense bound. Root is needed for the cgroup (v2 ``memory.max`` or v1
``memory.limit_in_bytes``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import report  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
LAYERS = 8
ROWS = ("random_mask", "fisher_mask", "concat", "ddp", "sparsecomm", "pipeline", "dense", "dense_bv")
LABELS = {"random_mask": "random_mask", "fisher_mask": "fisher_mask", "concat": "concat top-k (before)",
          "ddp": "DDP alone (its buckets)", "sparsecomm": "DDP + hook + MaskedAdamW",
          "pipeline": "fisher_mask, then DDP + hook + MaskedAdamW", "dense": "dense DDP + AdamW",
          "dense_bv": "dense DDP (bucket view) + AdamW"}
TRAINING = ("ddp", "sparsecomm", "pipeline", "dense", "dense_bv")
SPEC_EXTRA: dict = {}  # set from the command line for every worker (e.g. glibc_default)


def width_for(mib: float) -> int:
    """w such that 8 Linear(w, w) layers (weights + biases) hold about ``mib`` MiB of fp32."""
    w = int((mib * MIB / 4 / LAYERS) ** 0.5)
    return w - (w % 16)


def model_bytes(w: int) -> int:
    return LAYERS * (w * w + w) * 4


# --- the worker: one measurement in a fresh process --------------------------------------------

def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakRSS:
    """Peak resident memory since :meth:`reset`, in bytes (Linux VmHWM, else getrusage's lifetime peak)."""

    def __init__(self):
        self.exact = False

    def reset(self) -> int:
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact = _status_kib("VmHWM") is not None
        except OSError:
            self.exact = False
        return self.current()

    @staticmethod
    def current() -> int:
        kib = _status_kib("VmRSS")
        if kib is not None:
            return kib * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak(self) -> int:
        kib = _status_kib("VmHWM") if self.exact else None
        return kib * 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _build(w: int, device):
    import torch
    from torch import nn

    torch.manual_seed(0)
    with torch.device(device):
        model = nn.Sequential(*[nn.Linear(w, w) for _ in range(LAYERS)])
    return model


def _concat_random_mask(model, density: float, seed: int = 0):
    """The previous random_mask: n float64 scores, concatenated, compared whole (for the 'before' row)."""
    import torch

    from sparsecomm.mask import Mask

    params = dict(model.named_parameters())
    k = round(density * sum(p.numel() for p in params.values()))
    gen = torch.Generator().manual_seed(seed)
    scores = {n: torch.rand(p.shape, generator=gen, dtype=torch.float64) for n, p in params.items()}
    flat = torch.cat([s.reshape(-1).to(torch.float64).cpu() for s in scores.values()])
    threshold = torch.topk(flat, k, sorted=True).values[-1]
    sel = flat > threshold
    ties = (flat == threshold).nonzero().reshape(-1)[:k - int(sel.sum())]
    sel[ties] = True
    bits, offset = {}, 0
    for n, s in scores.items():
        bits[n] = sel[offset:offset + s.numel()].reshape(s.shape)
        offset += s.numel()
    return Mask(bits)


def _train(model, what: str, steps: int, density: float, batch, mask=None) -> dict:
    """DDP (+ hook + MaskedAdamW, or + AdamW) for ``steps`` steps. Returns what it held."""
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    import sparsecomm

    x, y = batch
    loss_fn = torch.nn.functional.cross_entropy
    bucket_view = what != "dense"
    ddp = DDP(model, gradient_as_bucket_view=bucket_view, broadcast_buffers=False)
    info = {"gradient_as_bucket_view": bucket_view}
    if what in ("sparsecomm", "pipeline"):
        if mask is None:
            mask = sparsecomm.random_mask(model, density=density, seed=0)
        state = sparsecomm.register_masked_allreduce(ddp, mask)
        opt = sparsecomm.MaskedAdamW(model, mask, lr=1e-4)
        info["k"] = mask.num_selected
    elif what in ("dense", "dense_bv"):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        opt = None
    for _ in range(steps):
        loss_fn(ddp(x), y).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
    if what in ("sparsecomm", "pipeline"):
        info["optimizer_state_bytes"] = opt.state_bytes()
        info["bytes_sent"] = state.bytes_sent
    elif opt is not None:
        info["optimizer_state_bytes"] = sum(v.numel() * v.element_size() for st in opt.state.values()
                                            for v in st.values() if isinstance(v, torch.Tensor))
    info["loss_finite"] = bool(torch.isfinite(loss_fn(model(x), y)))
    return info


def worker(spec: dict) -> dict:
    """Run one row (``spec['what']``) on a model of width ``spec['width']``; report peak extra bytes."""
    import torch
    import torch.distributed as dist

    import sparsecomm

    torch.set_num_threads(int(spec.get("threads", 1)))
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group("gloo")
        else:
            store = tempfile.NamedTemporaryFile(delete=False)
            dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
    device = torch.device(spec.get("device", "cpu"))
    cuda = device.type == "cuda"
    w, what, steps, density = int(spec["width"]), spec["what"], int(spec["steps"]), float(spec["density"])
    rank, world = dist.get_rank(), dist.get_world_size()
    rss = PeakRSS()
    rss_start = rss.current()
    if spec.get("warmup", True):  # one-time costs (libraries, thread pools, Gloo, DDP) out of the figure
        warm = dict(spec, width=64, warmup=False, fisher_samples=32, barrier=False)
        worker(warm)
        gc.collect()
    model = _build(w, device)
    g = torch.Generator().manual_seed(1 + rank)
    batch = (torch.randn(spec["batch"], w, generator=g).to(device),
             torch.randint(w, (spec["batch"],), generator=g).to(device))
    fisher_data = [(torch.randn(32, w, generator=g).to(device), torch.randint(w, (32,), generator=g).to(device))
                   for _ in range(max(1, spec["fisher_samples"] // 32 // world))]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_dev = torch.cuda.memory_allocated()
    base = rss.reset()
    t0 = time.perf_counter()
    out = {"what": what, "width": w, "model_bytes": model_bytes(w), "rank": rank, "world": world, "steps": 0,
           "rss_runtime": rss_start, "rss_before": base, "peak_exact": rss.exact}
    phases = {}
    mask = None
    if what in ("random_mask", "concat"):
        mask = (sparsecomm.random_mask(model, density=density, seed=0) if what == "random_mask"
                else _concat_random_mask(model, density))
        out["k"] = mask.num_selected
    if what in ("fisher_mask", "pipeline"):
        mask = sparsecomm.fisher_mask(model, fisher_data, torch.nn.functional.cross_entropy, density=density,
                                      num_samples=spec["fisher_samples"], engine="layers")
        out["k"] = mask.num_selected
        phases["fisher_mask"] = rss.peak() - base
        if what == "pipeline":
            out["mask_bits_bytes"] = mask.numel  # 1 byte per entry
            rss.reset()  # the training phase's own peak, from the RSS it starts at (holding the mask)
            phases["train_start"] = rss.current() - base
    if what in TRAINING:
        out.update(_train(model, what, steps, density, batch, mask=mask))
        out["steps"] = steps
        phases["train"] = rss.peak() - base
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["peak_extra"] = max([rss.peak() - base, *phases.values()])
    out["phases"] = phases
    if cuda:
        torch.cuda.synchronize()
        out["device_peak_extra"] = torch.cuda.max_memory_allocated() - base_dev
    out["rss_peak_total"] = base + out["peak_extra"]
    if spec.get("barrier", True):
        dist.barrier()
    return out


def _worker_main(path: str) -> None:
    with open(path) as f:
        spec = json.load(f)
    res = worker(spec)
    print("[memory] " + json.dumps(res), flush=True)


# --- the parent: fresh processes, the cgroup, the table -------------------------------------------

def _env(threads: int, glibc_default: bool = False) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    if not glibc_default:  # blocks >= 128 KiB are mmapped and go back to the OS when freed: RSS = live memory
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 << 10))
    root = os.path.dirname(HERE)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def run_fresh(spec: dict, *, world: int = 1, cage: "Cage | None" = None, timeout: float = 1800) -> dict:
    """Run ``spec`` in ``world`` fresh processes (ranks, Gloo over 127.0.0.1), optionally inside ``cage``.

    Returns ``{"ok", "ranks": [rank results], "rc": [exit codes], "tail"}``.
    """
    import socket

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        spec_path = f.name
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    try:
        for r in range(world):
            env = _env(int(spec.get("threads", 1)), bool(spec.get("glibc_default")))
            if world > 1:
                env.update(RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", spec_path]
            if cage is not None:
                cmd = cage.wrap(cmd)
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs, rcs = [], []
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                o, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                o, _ = p.communicate()
            outs.append(o)
            rcs.append(p.returncode)
            if p.returncode != 0:  # a rank died (e.g. OOM-killed): the others would wait forever
                for q in procs:
                    if q.poll() is None:
                        q.kill()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        os.unlink(spec_path)
    ranks = []
    for o in outs:
        for line in o.splitlines():
            if line.startswith("[memory] "):
                ranks.append(json.loads(line[len("[memory] "):]))
    ok = all(rc == 0 for rc in rcs) and len(ranks) == world
    return {"ok": ok, "ranks": ranks, "rc": rcs, "tail": "\n".join("\n".join(o.splitlines()[-6:]) for o in outs)}


class Cage:
    """A memory cgroup (v2 ``memory.max``, else v1 ``memory.limit_in_bytes``) that the ranks start in.

    The OOM killer acts inside it only: a run that needs more than the cap is killed, nothing
    else on the machine is touched. Needs root; removed on exit.
    """

    def __init__(self, cap_bytes: int, name: str | None = None):
        self.cap = int(cap_bytes)
        name = name or f"sparsecomm-memory-{os.getpid()}"
        v2 = "/sys/fs/cgroup"
        if os.path.exists(os.path.join(v2, "cgroup.controllers")):
            self.version, self.path = 2, os.path.join(v2, name)
        elif os.path.isdir("/sys/fs/cgroup/memory"):
            self.version, self.path = 1, os.path.join("/sys/fs/cgroup/memory", name)
        else:
            raise RuntimeError("no memory cgroup (v2 or v1) under /sys/fs/cgroup")

    def __enter__(self) -> "Cage":
        os.makedirs(self.path, exist_ok=True)
        if self.version == 2:
            self._write("memory.max", str(self.cap))
            self._write("memory.swap.max", "0", missing_ok=True)
        else:
            self._write("memory.limit_in_bytes", str(self.cap))
            self._write("memory.memsw.limit_in_bytes", str(self.cap), missing_ok=True)
        return self

    def _write(self, fname: str, value: str, missing_ok: bool = False) -> None:
        try:
            with open(os.path.join(self.path, fname), "w") as f:
                f.write(value)
        except OSError:
            if not missing_ok:
                raise

    def _read(self, fname: str) -> str | None:
        try:
            with open(os.path.join(self.path, fname)) as f:
                return f.read()
        except OSError:
            return None

    def wrap(self, cmd: list[str]) -> list[str]:
        """A command line that joins this cgroup, then execs ``cmd`` (children stay in it)."""
        procs = os.path.join(self.path, "cgroup.procs")
        return ["/bin/sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh", *cmd]

    def reset_peak(self) -> None:
        if self.version == 1:
            self._write("memory.max_usage_in_bytes", "0", missing_ok=True)

    def peak(self) -> int | None:
        v = self._read("memory.peak" if self.version == 2 else "memory.max_usage_in_bytes")
        return int(v) if v and v.strip().isdigit() else None

    def oom_kills(self) -> int:
        text = self._read("memory.events" if self.version == 2 else "memory.oom_control") or ""
        for line in text.splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def __exit__(self, *exc) -> None:
        for _ in range(50):
            try:
                os.rmdir(self.path)
                return
            except OSError:
                time.sleep(0.1)


def meminfo_bytes(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def measure_sizes(sizes_mib, *, steps: int, density: float, dense_max_mib: float, concat_max_mib: float,
                  threads: int, batch: int, fisher_samples: int, device: str, rows_wanted=ROWS,
                  echo=print) -> list[dict]:
    rows = []
    for mib in sizes_mib:
        w = width_for(mib)
        for what in (r for r in ROWS if r in rows_wanted):
            if what in ("dense", "dense_bv") and mib > dense_max_mib:
                echo(f"  {mib:g} MiB {what}: skipped (--dense-max-mib {dense_max_mib:g})")
                continue
            if what == "concat" and mib > concat_max_mib:
                continue
            spec = {"width": w, "what": what, "steps": steps, "density": density, "threads": threads,
                    "batch": batch, "fisher_samples": fisher_samples, "device": device, **SPEC_EXTRA}
            res = run_fresh(spec)
            if not res["ok"]:
                echo(f"  {mib:g} MiB {what}: FAILED rc={res['rc']}\n{res['tail']}")
                rows.append({"what": what, "width": w, "model_bytes": model_bytes(w), "failed": res["tail"][-400:]})
                continue
            r = res["ranks"][0]
            r["ratio"] = r["peak_extra"] / r["model_bytes"]
            echo(f"  {r['model_bytes'] / MIB:,.0f} MiB model, {LABELS[what]}: +{r['peak_extra'] / MIB:,.0f} MiB "
                 f"({r['ratio']:.2f}x), {r['seconds']} s")
            rows.append(r)
    return rows


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares ``y = a + b x``."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else my / mx
    return my - b * mx, b


def per_rank_models(rows: list[dict]) -> dict:
    """Fits of a rank's peak total RSS against model bytes, for the pipeline and the best dense row."""
    fits = {}
    for what in ("pipeline", "dense", "dense_bv"):
        pts = [(r["model_bytes"], r["rss_peak_total"]) for r in rows if r["what"] == what and "failed" not in r]
        if len(pts) >= 2:
            fits[what] = fit_line(pts)
    return fits


def largest_model(fit: tuple[float, float], budget: float, world: int = 2) -> float:
    a, b = fit
    return (budget / world - a) / b


def headline(rows: list[dict], *, cap: int, reserve: int, steps: int, density: float, threads: int, batch: int,
             fisher_samples: int, verify: bool, verify_at: float = 0.95, echo=print) -> dict:
    fits = per_rank_models(rows)
    out = {"fits": {k: {"a": a, "b": b} for k, (a, b) in fits.items()}, "cap_bytes": cap, "reserve_bytes": reserve}
    if "pipeline" not in fits or not ({"dense", "dense_bv"} & set(fits)):
        out["note"] = "need the pipeline and a dense row at two sizes or more"
        return out
    machine = meminfo_bytes("MemTotal") - reserve
    dense_key = "dense_bv" if "dense_bv" in fits else "dense"
    out["machine_budget_bytes"] = machine
    out["dense_row"] = dense_key
    for label, budget in (("machine", machine), ("cap", cap)):
        s, d = largest_model(fits["pipeline"], budget), largest_model(fits[dense_key], budget)
        out[label] = {"sparsecomm_bytes": s, "dense_bytes": d, "ratio": s / d if d > 0 else None,
                      "dense_default_bytes": largest_model(fits["dense"], budget) if "dense" in fits else None}
        echo(f"  predicted, 2 ranks in {budget / GIB:.1f} GiB ({label}): sparsecomm {s / GIB:.2f} GiB model, "
             f"dense {d / GIB:.2f} GiB ({s / d:.2f}x)")
    if not verify:
        return out
    checks = []
    s_cap, d_cap = out["cap"]["sparsecomm_bytes"], out["cap"]["dense_bytes"]
    plan = [("pipeline", verify_at * s_cap, True), (dense_key, verify_at * s_cap, False),
            (dense_key, verify_at * d_cap, True)]
    for what, target, expect_fit in plan:
        w = width_for(target / MIB)
        spec = {"width": w, "what": what, "steps": steps, "density": density, "threads": threads, "batch": batch,
                "fisher_samples": fisher_samples, "device": "cpu", **SPEC_EXTRA}
        free = meminfo_bytes("MemAvailable")
        if free < cap + reserve:
            echo(f"  verification skipped: MemAvailable {free / GIB:.1f} GiB < cap {cap / GIB:.1f} GiB + reserve")
            checks.append({"what": what, "model_bytes": model_bytes(w), "expect_fit": expect_fit, "skipped": True})
            continue
        with Cage(cap) as cage:
            cage.reset_peak()
            t0 = time.monotonic()
            res = run_fresh(spec, world=2, cage=cage, timeout=1800)
            c = {"what": what, "model_bytes": model_bytes(w), "expect_fit": expect_fit, "fits": res["ok"],
                 "rc": res["rc"], "oom_kills": cage.oom_kills(), "cgroup_peak": cage.peak(),
                 "rank_peaks": [r["rss_peak_total"] for r in res["ranks"]], "seconds": round(time.monotonic() - t0, 1)}
        checks.append(c)
        echo(f"  2 ranks, {LABELS[what]}, {c['model_bytes'] / GIB:.2f} GiB model in a {cap / GIB:.1f} GiB cgroup: "
             f"{'fits' if c['fits'] else 'does not fit'} (expected: {'fits' if expect_fit else 'does not fit'}; "
             f"cgroup peak {(c['cgroup_peak'] or 0) / GIB:.2f} GiB, OOM kills {c['oom_kills']}, rc {c['rc']})")
    out["checks"] = checks
    return out


# --- reporting -------------------------------------------------------------------------------------

def _mib(x):
    return None if x is None else f"{x / MIB:,.0f}"


def size_table(rows: list[dict]) -> str:
    sizes = sorted({r["model_bytes"] for r in rows})
    by = {(r["model_bytes"], r["what"]): r for r in rows}
    cols = [w for w in ROWS if any((s, w) in by for s in sizes)]
    head = "| fp32 model | " + " | ".join(LABELS[w] for w in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for s in sizes:
        cells = []
        for w in cols:
            r = by.get((s, w))
            pipe = by.get((s, "pipeline"))
            if r is None and w == "fisher_mask" and pipe and "fisher_mask" in pipe.get("phases", {}):
                cells.append(f"{pipe['phases']['fisher_mask'] / MIB:,.0f} MiB ({pipe['phases']['fisher_mask'] / s:.2f}x)*")
            elif r is None:
                cells.append("-")
            elif "failed" in r:
                cells.append("failed")
            else:
                cells.append(f"{r['peak_extra'] / MIB:,.0f} MiB ({r['peak_extra'] / s:.2f}x)")
        lines.append(f"| {s / MIB:,.0f} MiB | " + " | ".join(cells) + " |")
    if any("*" in line for line in lines[2:]):
        lines.append("\n\\* the fisher_mask phase of the pipeline row (same process, same baseline)")
    return "\n".join(lines)


def breakdown_table(rows: list[dict]) -> str:
    """Where a rank's extra bytes go, per model size: the tensors that explain each row, next to the row.

    n = model entries, k = selected entries, L = the largest layer's weight (4n / 8 for this MLP).
    """
    sizes = sorted({r["model_bytes"] for r in rows})
    by = {(r["model_bytes"], r["what"]): r for r in rows if "failed" not in r}
    lines = ["| fp32 model (n entries) | fisher_mask: scores 4n + L | measured | DDP alone: buckets 4n + one "
             "gradient L | measured | + hook + MaskedAdamW: + bits n + 52k | measured | dense AdamW (bucket view): "
             "buckets 4n + moments 8n + L | measured |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in sizes:
        n = s // 4
        k = round(0.005 * n)
        layer = 4 * n // LAYERS

        def got(w):
            r = by.get((s, w))
            if r is None and w == "fisher_mask" and (s, "pipeline") in by:
                return f"{by[(s, 'pipeline')]['phases'].get('fisher_mask', 0) / MIB:,.0f}*"
            return "-" if r is None else f"{r['peak_extra'] / MIB:,.0f}"

        lines.append(f"| {s / MIB:,.0f} MiB ({n:,}) | {(4 * n + layer) / MIB:,.0f} | {got('fisher_mask')} | "
                     f"{(4 * n + layer) / MIB:,.0f} | {got('ddp')} | {(5 * n + layer + 52 * k) / MIB:,.0f} | "
                     f"{got('sparsecomm')} | {(12 * n + layer) / MIB:,.0f} | {got('dense_bv')} |")
    return "\n".join(lines)


def verdicts_for(rows: list[dict], head: dict | None) -> list[dict]:
    vs = []
    for r in rows:
        if "failed" in r:
            continue
        if r["what"] == "fisher_mask":
            vs.append(report.verdict(f"fisher_mask extra <= 1.25x the model ({r['model_bytes'] / MIB:,.0f} MiB)",
                                     r["ratio"] <= 1.25, f"{r['ratio']:.2f}x"))
        if r["what"] == "pipeline" and "fisher_mask" in r.get("phases", {}) \
                and not any(q["what"] == "fisher_mask" and q["model_bytes"] == r["model_bytes"] for q in rows):
            ratio = r["phases"]["fisher_mask"] / r["model_bytes"]
            vs.append(report.verdict(f"fisher_mask extra <= 1.25x the model ({r['model_bytes'] / MIB:,.0f} MiB, "
                                     f"pipeline's phase)", ratio <= 1.25, f"{ratio:.2f}x"))
        if r["what"] == "random_mask":
            n = r["model_bytes"] // 4
            bound = n + 3 * 8 * (1 << 20) + 64 * r["k"] + 64 * MIB  # bits + chunk work + O(k) + allocator slack
            vs.append(report.verdict(f"random_mask extra is the bits (n bytes) + O(k) + a chunk "
                                     f"({r['model_bytes'] / MIB:,.0f} MiB)", r["peak_extra"] <= bound,
                                     f"{r['peak_extra'] / MIB:,.0f} MiB; n = {n / MIB:,.0f} MiB"))
    if head and "machine" in head:
        m = head["machine"]
        vs.append(report.verdict("largest model, 2 ranks, this machine: fisher_mask + 5 masked steps >= 1.4x dense "
                                 "DDP + AdamW (predicted from the fits)", m["ratio"] is not None and m["ratio"] >= 1.4,
                                 f"{m['sparsecomm_bytes'] / GIB:.2f} GiB vs {m['dense_bytes'] / GIB:.2f} GiB "
                                 f"({m['ratio']:.2f}x)"))
        for c in head.get("checks", []):
            if c.get("skipped"):
                vs.append(report.verdict(f"2 ranks, {LABELS[c['what']]}, {c['model_bytes'] / GIB:.2f} GiB in the "
                                         f"{head['cap_bytes'] / GIB:.0f} GiB cgroup", None, "skipped: no room"))
                continue
            vs.append(report.verdict(
                f"2 ranks, {LABELS[c['what']]}, {c['model_bytes'] / GIB:.2f} GiB model in the "
                f"{head['cap_bytes'] / GIB:.0f} GiB cgroup {'fits' if c['expect_fit'] else 'does not fit'}",
                c["fits"] == c["expect_fit"],
                f"{'fits' if c['fits'] else 'killed'} (cgroup peak {(c['cgroup_peak'] or 0) / GIB:.2f} GiB, "
                f"OOM kills {c['oom_kills']})"))
    return vs


def plot(rows: list[dict], out: str) -> str | None:
    plt = report.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for what, style in (("fisher_mask", "o-"), ("random_mask", "s-"), ("ddp", "^:"), ("pipeline", "D-"),
                        ("dense", "x--"), ("dense_bv", "v--")):
        pts = sorted((r["model_bytes"] / MIB, r["peak_extra"] / MIB) for r in rows
                     if r["what"] == what and "failed" not in r)
        if what == "fisher_mask":  # sizes measured only through the pipeline: its fisher_mask phase
            have = {x for x, _ in pts}
            pts = sorted(pts + [(r["model_bytes"] / MIB, r["phases"]["fisher_mask"] / MIB) for r in rows
                                if r["what"] == "pipeline" and "fisher_mask" in r.get("phases", {})
                                and r["model_bytes"] / MIB not in have])
        if pts:
            ax.plot(*zip(*pts), style, label=LABELS[what])
    sizes = sorted({r["model_bytes"] / MIB for r in rows})
    for mult, ls in ((1.25, ":"), (4, ":")):
        ax.plot(sizes, [mult * s for s in sizes], ls, color="grey", linewidth=0.8)
        ax.annotate(f"{mult:g}x model", (sizes[-1], mult * sizes[-1]), fontsize=7, color="grey")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sizes, [f"{x:,.0f}" for x in sizes])
    ax.minorticks_off()
    ax.set_xlabel("fp32 model size (MiB)")
    ax.set_ylabel("peak extra RSS above the model (MiB)")
    ax.set_title("Peak extra memory of one rank (fresh process per point)")
    ax.legend(fontsize=7)
    return report.save_figure(plt, fig, out, "memory.png")


def render(result: dict, out: str) -> str:
    rows, head = result["rows"], result.get("headline")
    verdicts = verdicts_for(rows, head)
    result["verdicts"] = verdicts
    text = (f"Command: `{result['command']}` ({result['environment']['date']}, {result['environment']['cpus']} CPUs)\n\n"
            "Peak extra resident memory of one rank above the model (fresh process per cell, "
            f"{result['steps']} steps, density {result['density'] * 100:g}%):\n\n" + size_table(rows)
            + "\n\nWhere the bytes go (MiB; n = model entries, k = selected entries; analytic next to measured):\n\n"
            + breakdown_table(rows))
    if head and "machine" in head:
        m, c = head["machine"], head["cap"]
        fits = head["fits"]
        text += ("\n\nPer-rank peak RSS fitted as a + b x model bytes: "
                 + "; ".join(f"{LABELS[k]}: {v['a'] / MIB:,.0f} MiB + {v['b']:.2f} x model" for k, v in fits.items())
                 + f".\n\nLargest fp32 model for 2 ranks (predicted): in {head['machine_budget_bytes'] / GIB:.1f} GiB "
                 f"(MemTotal less {head['reserve_bytes'] / GIB:g} GiB): sparsecomm {m['sparsecomm_bytes'] / GIB:.2f} GiB, "
                 f"dense {m['dense_bytes'] / GIB:.2f} GiB ({m['ratio']:.2f}x); in the {head['cap_bytes'] / GIB:g} GiB "
                 f"cgroup: {c['sparsecomm_bytes'] / GIB:.2f} GiB vs {c['dense_bytes'] / GIB:.2f} GiB.")
        if head.get("checks"):
            text += "\n\n| 2 ranks in the cgroup | model | expected | outcome | cgroup peak | per-rank peak RSS |\n|---|---|---|---|---|---|\n"
            for ch in head["checks"]:
                if ch.get("skipped"):
                    text += f"| {LABELS[ch['what']]} | {ch['model_bytes'] / GIB:.2f} GiB | - | skipped | - | - |\n"
                    continue
                text += (f"| {LABELS[ch['what']]} | {ch['model_bytes'] / GIB:.2f} GiB | "
                         f"{'fits' if ch['expect_fit'] else 'killed'} | {'fits' if ch['fits'] else 'killed (OOM)'} | "
                         f"{(ch['cgroup_peak'] or 0) / GIB:.2f} GiB | "
                         + (", ".join(f"{p / GIB:.2f}" for p in ch["rank_peaks"]) + " GiB" if ch["rank_peaks"] else "-")
                         + " |\n")
    text += "\n\n" + report.verdicts_md(verdicts)
    if any(r["what"] in ROWS for r in rows):
        p = plot(rows, out)
        if p:
            text += "\n\n![peak extra memory](memory.png)"
    return text


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--sizes-mib", nargs="*", type=float, default=[128, 1024])
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="which rows to measure")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--density", type=float, default=0.005)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--fisher-samples", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dense-max-mib", type=float, default=float("inf"),
                   help="skip the dense rows above this size (they need ~4-5x the model)")
    p.add_argument("--concat-max-mib", type=float, default=128, help="the 'before' row up to this size only")
    p.add_argument("--headline", action="store_true", help="fit, predict and verify the 2-rank bound")
    p.add_argument("--no-verify", action="store_true", help="with --headline: predict only, no cgroup runs")
    p.add_argument("--cap-gib", type=float, default=8.0, help="memory cgroup cap for the verification runs")
    p.add_argument("--verify-at", type=float, default=0.95,
                   help="check at this fraction of each predicted bound (sparsecomm's: dense must not fit there)")
    p.add_argument("--reserve-gib", type=float, default=1.0, help="left to the OS when predicting for the machine")
    p.add_argument("--glibc-default", action="store_true",
                   help="leave glibc's dynamic mmap threshold on (freed 128 KiB-32 MiB blocks may stay resident)")
    p.add_argument("--merge", action="store_true", help="keep rows of other sizes from the existing memory.json")
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--out", default=report.RESULTS)
    a = p.parse_args(argv)
    if a.worker:
        _worker_main(a.worker)
        return {}
    os.makedirs(a.out, exist_ok=True)
    SPEC_EXTRA["glibc_default"] = bool(a.glibc_default)
    path = os.path.join(a.out, "memory.json")
    if a.render_only:
        with open(path) as f:
            result = json.load(f)
    else:
        rows = measure_sizes(a.sizes_mib, steps=a.steps, density=a.density, dense_max_mib=a.dense_max_mib,
                             concat_max_mib=a.concat_max_mib, threads=a.threads, batch=a.batch,
                             fisher_samples=a.fisher_samples, device=a.device, rows_wanted=a.rows)
        previous = {}
        if a.merge and os.path.exists(path):
            with open(path) as f:
                previous = json.load(f)
            have = {(r["model_bytes"], r["what"]) for r in rows}
            rows = sorted([r for r in previous["rows"] if (r["model_bytes"], r["what"]) not in have] + rows,
                          key=lambda r: (r["model_bytes"], ROWS.index(r["what"])))
        command = report.command_line(__file__, argv)
        if previous.get("command"):
            command = previous["command"] + "` then `" + command
        result = {"command": command, "environment": report.environment(), "rows": rows,
                  "steps": a.steps, "density": a.density}
        if not a.headline and "headline" in previous:
            result["headline"] = previous["headline"]
        if a.headline:
            result["headline"] = headline(rows, cap=int(a.cap_gib * GIB), reserve=int(a.reserve_gib * GIB),
                                          steps=a.steps, density=a.density, threads=a.threads, batch=a.batch,
                                          fisher_samples=a.fisher_samples, verify=not a.no_verify,
                                          verify_at=a.verify_at)
    text = render(result, a.out)
    report.publish(a.out, "memory", "Memory", result, text)
    print(text)
    report.print_verdicts(result["verdicts"])
    return result


if __name__ == "__main__":
    main()
