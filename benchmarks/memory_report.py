"""The memory benchmark's tables, verdicts and plot, from the rows in ``memory.json``."""
from __future__ import annotations

from benchmarks import report
from benchmarks.memory_worker import GIB, LABELS, LAYERS, MIB, RECORDED


def _mib(x):
    return None if x is None else f"{x / MIB:,.0f}"


def size_table(rows: list[dict]) -> str:
    sizes = sorted({r["model_bytes"] for r in rows})
    by = {(r["model_bytes"], r["what"]): r for r in rows}
    cols = [w for w in RECORDED if any((s, w) in by for s in sizes)]
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
    if any(r["what"] in RECORDED for r in rows):
        p = plot(rows, out)
        if p:
            text += "\n\n![peak extra memory](memory.png)"
    return text

