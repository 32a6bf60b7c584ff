"""Draw the benchmark plots from saved results (a separate step from measuring):
``python bench/plot.py bench/results/<machine>/results.json`` writes ``<op>.png`` (median time vs
work per call, log-log, one line per implementation, p20-p80 as error bars) and ``summary.png``
beside the JSON."""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python bench/plot.py RESULTS_JSON", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(argv[0])
    data = json.loads(path.read_text())
    meta, rows = data["meta"], data["rows"]
    by_op = defaultdict(list)
    for r in rows:
        by_op[r["op"]].append(r)
    plotted = []
    for op, rs in by_op.items():
        lines = defaultdict(list)
        for r in rs:
            work = (r["rate"] * r["median_ms"] / 1e3) if r.get("rate") else None
            if work:
                lines[r["impl"]].append((work, r["median_ms"], r["p20_ms"], r["p80_ms"], r.get("unit") or ""))
        if not any(len(v) for v in lines.values()):
            continue
        fig, ax = plt.subplots(figsize=(5.5, 4))
        unit = ""
        for impl, pts in lines.items():
            pts.sort()
            x = [p[0] for p in pts]
            y = [p[1] for p in pts]
            err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
            style = "-o" if impl.startswith("reta_fast") else "--s"
            ax.errorbar(x, y, yerr=err, fmt=style, capsize=3, label=impl)
            unit = pts[0][4].replace("/s", "")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"work per call ({unit})")
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{op} on {meta['device_name']} ({meta['device']})", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path.parent / f"{op}.png", dpi=110)
        plt.close(fig)
        plotted.append(op)
    # summary: ours vs the best baseline at the largest size of each op
    names, ratios = [], []
    for op, rs in by_op.items():
        cfgs = [r["config"] for r in rs]
        last = cfgs[-1]
        at = [r for r in rs if r["config"] == last]
        ours = next((r for r in at if r.get("is_ours_first")), None)
        # baselines only: the recover-step row is a cost reference, not a competing tool
        base = [r for r in at if not r["impl"].startswith("reta_fast") and "recover step" not in r["impl"]]
        if ours and base:
            best = min(base, key=lambda r: r["median_ms"])
            names.append(f"{op}\nvs {best['impl']}")
            ratios.append(best["median_ms"] / ours["median_ms"])
    if names:
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.2))
        colors = ["tab:green" if v >= 1 else "tab:red" for v in ratios]
        ax.barh(range(len(names)), ratios, color=colors)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("speed-up of reta_fast over the fastest baseline (largest size; <1 = slower)")
        ax.set_title(f"{meta['device_name']} ({meta['device']}), git {meta['git']}", fontsize=9)
        for i, v in enumerate(ratios):
            ax.text(v, i, f" {v:.1f}x", va="center", fontsize=7)
        fig.tight_layout()
        fig.savefig(path.parent / "summary.png", dpi=110)
        plt.close(fig)
        plotted.append("summary")
    print("wrote", ", ".join(f"{p}.png" for p in plotted), "in", path.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
