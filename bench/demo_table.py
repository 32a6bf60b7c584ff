"""The README's demo table, written by running ``reta demo`` for each method, as a new user would.

    python bench/demo_table.py [--readme README.md] [--threads N]

Every method runs ``python -m reta_fast.cli demo --method M`` (the embedded digits, nothing downloaded) in a
fresh output folder, with a fresh cache shared by the runs (so the teacher is trained once, by this
version, never taken from an older install's cache). The table (student top-1 mean ± std over the demo's
evaluation seeds, and the random real subset every run evaluates beside it) is printed and, with
``--readme``, written between the ``<!-- demo:begin -->`` / ``<!-- demo:end -->`` markers. Results depend on
the thread count and the CPU model (floating-point summation order, BLAS kernels), so the count is fixed
(``--threads``, default 2) and both are stated.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = [("sre2l", []), ("rded", []), ("fadrm", []), ("reta --no-drc", ["--no-drc"]), ("reta --no-pta", ["--no-pta"]),
           ("reta", [])]


def run(method: str, extra, work: Path, env) -> dict:
    out = work / method.replace(" --", "-")
    cmd = [sys.executable, "-m", "reta_fast.cli", "demo", "--method", method.split()[0], *extra, "--out", str(out),
           "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads((out / "eval.json").read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readme", help="write the table into this file between the demo markers")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    rows, baseline, meta = [], None, None
    with tempfile.TemporaryDirectory(prefix="reta-demo-table-") as tmp:
        env = dict(os.environ, RETA_FAST_CACHE=str(Path(tmp) / "cache"), OMP_NUM_THREADS=str(args.threads),
                   MKL_NUM_THREADS=str(args.threads))
        for name, extra in METHODS:
            t0 = time.perf_counter()
            res = run(name, extra, Path(tmp), env)
            rows.append((name, res["distilled"], time.perf_counter() - t0))
            baseline = baseline or res["random_real"]
            meta = meta or res
            print(f"{name}: {res['distilled']['mean']:.2f} ± {res['distilled']['std']:.2f}", flush=True)
    import torch

    import reta_fast
    from reta_fast.stages.records import cpu_model

    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip() or "unknown"
    p = meta["protocol"]
    lines = [f"Written by `python bench/demo_table.py --readme README.md` (reta_fast {reta_fast.__version__}, git "
             f"{sha}, torch {torch.__version__}, {cpu_model()} ({platform.machine()}), {args.threads} threads, "
             f"{time.strftime('%Y-%m-%d')}): `reta demo --method M` in a fresh folder and cache; student "
             f"{meta['student']} trained {p['epochs']} epochs at lr {p['lr']}, top-1 % on the digits' test split, "
             f"mean ± std over evaluation seeds {p['seeds']}; teacher {meta['teacher_top1']:.1f}%.", "",
             "| method | top-1 % | wall time (distill + evaluate) |", "|---|---|---|",
             f"| random real | {baseline['mean']:.2f} ± {baseline['std']:.2f} | – |"]
    lines += [f"| {name} | {r['mean']:.2f} ± {r['std']:.2f} | {sec:.0f} s |" for name, r, sec in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.readme:
        path = Path(args.readme)
        text = path.read_text()
        a, b = "<!-- demo:begin -->", "<!-- demo:end -->"
        if a not in text or b not in text:
            raise SystemExit(f"{path} has no {a} ... {b} markers")
        head, rest = text.split(a, 1)
        _, tail = rest.split(b, 1)
        path.write_text(head + a + "\n" + table + b + tail)
        print(f"wrote the table into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
