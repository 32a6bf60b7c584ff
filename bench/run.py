"""One harness for every reta_fast benchmark: ``python bench/run.py [--quick] [--only OP]``.

Each ``bench/<module>.py`` declares ``OPS = {name: Op(...)}``: a sweep of configurations (data) and
a ``setup(cfg, device) -> Case`` returning the implementations to time (ours first, then the
baselines a user would otherwise pick) and the work unit for a roofline-style rate. This file owns
everything else: warm-up, device synchronisation, repetition, median with p20/p80, peak memory,
stamping each row with device, versions and git SHA, the markdown table, and JSON/CSV output.
Speed is reported, never asserted: an op slower than a baseline shows a speedup below 1.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import cpu_model  # noqa: E402

MODULES = ["knn", "persistence", "pimage", "pta", "retrieval", "recover"]


@dataclass
class Case:
    impls: Dict[str, Callable[[], object]]  # first entry is reta_fast's; the rest are baselines
    unit: Optional[str] = None  # e.g. "edges/s", "GFLOP/s"
    work: float = 0.0  # units of work per call (edges, FLOPs, ...)
    note: str = ""


@dataclass
class Op:
    setup: Callable[[dict, str], Case]
    sweep: List[dict]
    quick: List[dict]
    gpu_sweep: List[dict] = field(default_factory=list)  # used instead of sweep on CUDA
    description: str = ""


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_fn(fn, device: str, min_reps: int, budget_s: float):
    """Median, p20, p80 (seconds) and peak CUDA memory (bytes) of ``fn``; warm-up excluded."""
    import torch

    fn()  # warm-up: compilation, caches, allocator
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 200):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > 4 * budget_s:
            break
    peak = (torch.cuda.max_memory_allocated() - base) if device.startswith("cuda") else None
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else [times[0]] * 9
    return statistics.median(times), q[1], q[7], len(times), peak


def stamp(device: str) -> dict:
    import numpy
    import torch

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                             text=True, timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=HERE, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        sha += "-dirty" if dirty else ""
    except Exception:
        sha = "unknown"
    try:
        import triton

        triton_v = triton.__version__
    except Exception:
        triton_v = None
    import reta_fast

    name = torch.cuda.get_device_name() if device.startswith("cuda") else cpu_model()
    return {
        "device": device, "device_name": name, "cpus": os.cpu_count(), "torch": torch.__version__,
        "triton": triton_v, "numpy": numpy.__version__, "python": platform.python_version(),
        "reta_fast": reta_fast.__version__, "native": reta_fast.has_native(), "git": sha,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _fmt_cfg(cfg: dict) -> str:
    """The size columns of a row; ``engine`` (which variants run) is named by the rows themselves."""
    return " ".join(f"{k}={v}" for k, v in cfg.items() if k != "engine")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every op (CI)")
    ap.add_argument("--only", action="append", help="run only this op (repeatable)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--out", default=None, help="results folder (default bench/out/<timestamp>)")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timing per impl and size")
    ap.add_argument("--render", metavar="RESULTS_JSON", help="only re-draw table.md from saved results")
    ap.add_argument("--readme", metavar="README", help="with --render: put the table between the README's "
                    "'<!-- bench:begin -->' and '<!-- bench:end -->' markers")
    args = ap.parse_args(argv)
    if args.render:
        path = Path(args.render)
        data = json.loads(path.read_text())
        table = markdown_table(data["rows"])
        (path.parent / "table.md").write_text(table + "\n")
        if args.readme:
            _update_readme(Path(args.readme), path, data["meta"], table)
        print(table)
        return 0

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda requested but no CUDA device is available")
    budget = args.budget if args.budget is not None else (0.3 if args.quick else 2.0)
    ops = {}
    for mod in MODULES:
        ops.update(importlib.import_module(mod).OPS)
    if args.only:
        unknown = [o for o in args.only if o not in ops]
        if unknown:
            ap.error(f"unknown op(s) {unknown}; choose from {sorted(ops)}")
        ops = {k: v for k, v in ops.items() if k in args.only}
    meta = stamp(device)
    out = Path(args.out) if args.out else HERE / "out" / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"# reta_fast benchmarks on {meta['device_name']} ({device}), torch {meta['torch']}, "
          f"triton {meta['triton']}, native={meta['native']}, git {meta['git']}\n")
    for name, op in ops.items():
        sweep = op.quick if args.quick else (op.gpu_sweep or op.sweep if device.startswith("cuda") else op.sweep)
        for cfg in sweep:
            case = op.setup(dict(cfg), device)
            results = {}
            for impl, fn in case.impls.items():
                med, p20, p80, reps, peak = time_fn(fn, device, min_reps=3 if args.quick else 5, budget_s=budget)
                results[impl] = med
                rows.append({
                    "op": name, "config": _fmt_cfg(cfg), "impl": impl, "median_ms": 1e3 * med,
                    "p20_ms": 1e3 * p20, "p80_ms": 1e3 * p80, "reps": reps,
                    "peak_mem_mib": None if peak is None else peak / 2**20,
                    "rate": (case.work / med) if case.unit and med > 0 else None, "unit": case.unit,
                    "note": case.note, **meta,
                })
            ours_name = next(iter(case.impls))
            for r in rows:
                if r["op"] == name and r["config"] == _fmt_cfg(cfg):
                    r["speedup_of_ours"] = (r["median_ms"] / 1e3) / results[ours_name]
                    r["is_ours_first"] = r["impl"] == ours_name
            print(f"- {name} [{_fmt_cfg(cfg)}] done", flush=True)
    table = markdown_table(rows)
    print("\n" + table)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else ["op"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / "table.md").write_text(table + "\n")
    print(f"\nwrote {out / 'results.json'}, results.csv, table.md")
    return 0


def markdown_table(rows: List[dict]) -> str:
    """The table users read: one line per (op, size, impl); speedup = baseline time / ours."""
    lines = [
        "| op | size | implementation | median ms (p20–p80) | rate | peak MiB | ours vs this |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rate = "" if r["rate"] is None else f"{_si(r['rate'])} {r['unit']}"
        peak = "" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
        sp = r.get("speedup_of_ours", 1.0)
        if r.get("is_ours_first"):
            vs = "—"
        elif r["impl"].startswith("reta_fast"):  # another setting of ours: time relative to the first
            vs = f"(variant of ours: {sp:.2f}× its time)"
        else:
            vs = f"**{sp:.1f}× faster**" if sp >= 1 else f"{1 / sp:.1f}× SLOWER"
        lines.append(f"| {r['op']} | {r['config']} | {r['impl']} | {r['median_ms']:.3f} "
                     f"({r['p20_ms']:.3f}–{r['p80_ms']:.3f}) | {rate} | {peak} | {vs} |")
    return "\n".join(lines)


def _update_readme(readme: Path, results: Path, meta: dict, table: str) -> None:
    text = readme.read_text()
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    if begin not in text or end not in text:
        raise SystemExit(f"{readme} has no {begin} ... {end} markers")
    rel = os.path.relpath(results, readme.parent)
    head = (f"Measured by `python bench/run.py` on {meta['device_name']} ({meta['device']}, {meta['cpus']} cores), "
            f"torch {meta['torch']}, git {meta['git']}, {meta['date'][:10]}; data: `{rel}`.")
    new = f"{begin}\n{head}\n\n{table}\n{end}"
    pre, rest = text.split(begin, 1)
    readme.write_text(pre + new + rest.split(end, 1)[1])


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.2f}"


if __name__ == "__main__":
    sys.exit(main())
