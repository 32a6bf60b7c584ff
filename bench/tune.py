"""Tune RETA's free parameters on a validation split carved from the *training* images, never on the
test split: validation = training images that are not in the patch pool (so no distilled image is
made from them), ``--val-per-class`` per class.

    python bench/tune.py --work bench/out/quality/cpu-<fingerprint> --data <ImageFolder root> --ipc 10

Needs the teacher and pool of a ``bench/quality.py`` run (same ``--work`` folder). Each variant is a
set of ``DistillConfig`` overrides; every set is evaluated with the quality script's student protocol
and seeds on the validation split. Writes ``tuning.json`` + ``tuning.md`` into ``--results``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import ROOT, SCALES, machine  # noqa: E402

VARIANTS = {  # lr 0.25 was the default when these ran (METHOD.md's [pred] value)
    "reta (defaults)": dict(method="reta", lr=0.25),
    "reta --no-drc": dict(method="reta", drc=False, lr=0.25),
    "fadrm": dict(method="fadrm", lr=0.25),
    "reta lr 0.05": dict(method="reta", lr=0.05),
    "reta --no-drc lr 0.05": dict(method="reta", drc=False, lr=0.05),
    "fadrm lr 0.05": dict(method="fadrm", lr=0.05),
    "reta --no-drc lam_topo 2": dict(method="reta", drc=False, lam_topo=2.0, lr=0.25),
    "reta --no-drc topo_k 4": dict(method="reta", drc=False, topo_k=4, lr=0.25),
    "reta unpartitioned DRC": dict(method="reta", partition=False, lr=0.25),
    "reta DRC lam 0": dict(method="reta", lam=0.0, lr=0.25),
    "reta alpha 0.75": dict(method="reta", alpha=0.75, lr=0.25),
    # second round, combining the first round's winners
    "reta lr 0.05 lam_topo 2": dict(method="reta", lr=0.05, lam_topo=2.0),
    "reta --no-drc lr 0.05 lam_topo 2": dict(method="reta", drc=False, lr=0.05, lam_topo=2.0),
}


def main(argv=None) -> int:
    from reta_fast import stages as P
    from reta_fast.data.sets import Subset, load_data
    from reta_fast.retrieval import PatchPool
    from reta_fast.models import load_teacher

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--work", required=True, help="a bench/quality.py work folder (teacher + pool)")
    ap.add_argument("--scale", default="cpu", choices=sorted(SCALES))
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--val-per-class", type=int, default=300)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--results", default=None)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sc = SCALES[args.scale]
    work = Path(args.work)
    data = load_data(args.data)
    teacher = load_teacher(work / f"teacher-{sc['arch']}.pt", data)
    pool = PatchPool.load(work / "pool", teacher=teacher.model)
    used = set(np.asarray(pool.source_index).tolist())
    targets = np.asarray(data.train.targets)
    rng = np.random.default_rng(1234)
    val_idx = []
    for c in range(len(data.classes)):
        free = [i for i in np.flatnonzero(targets == c).tolist() if i not in used]
        val_idx += sorted(rng.choice(free, size=min(args.val_per_class, len(free)), replace=False).tolist())
    data.val = Subset(data.train, sorted(val_idx))
    print(f"validation: {len(data.val)} training images outside the pool", flush=True)
    ev = sc["eval"].get(args.ipc, sc["eval"][max(sc["eval"])])
    ecfg = P.EvalConfig(student=sc["arch"], epochs=ev["epochs"], batch_size=ev["batch_size"], lr=ev["lr"],
                        seeds=tuple(args.seeds), baseline=False)
    rows = []
    for name in args.variants:
        over = VARIANTS[name]
        out = work / "tune" / f"ipc{args.ipc}-{name.replace(' ', '_').replace('-', '')}"
        cfg = P.DistillConfig(ipc=args.ipc, iterations=sc["iterations"], **over)
        t0 = time.perf_counter()
        P.distill(data, [teacher], out, cfg, pool_dir=work / "pool", progress=False, log=lambda m: None)
        if (out / "eval-val.json").is_file():
            res = json.loads((out / "eval-val.json").read_text())
        else:
            res = P.evaluate(data, teacher, out, ecfg, progress=False, log=lambda m: None, ipc=args.ipc)
            os.replace(out / "eval.json", out / "eval-val.json")
        rows.append(dict(name=name, overrides=over, val_top1=res["distilled"], seconds=time.perf_counter() - t0))
        print(f"== {name}: val {res['distilled']['mean']:.2f} ± {res['distilled']['std']:.2f}", flush=True)
    results = Path(args.results) if args.results else ROOT / "bench" / "results" / f"quality-{args.scale}-{machine()}"
    results.mkdir(parents=True, exist_ok=True)
    from reta_fast.fileio import atomic_write, write_json

    write_json(results / "tuning.json", dict(ipc=args.ipc, seeds=args.seeds, val_images=len(data.val), rows=rows))
    L = [f"Tuning at IPC {args.ipc} on {len(data.val)} validation images (training images outside the patch pool; "
         f"the test split is never used), student protocol of scale `{args.scale}`, seeds {args.seeds}.", "",
         "| variant | overrides | validation top-1 % |", "|---|---|---|"]
    for r in rows:
        L.append(f"| {r['name']} | `{r['overrides']}` | {r['val_top1']['mean']:.2f} ± {r['val_top1']['std']:.2f} |")
    table = "\n".join(L) + "\n"
    atomic_write(results / "tuning.md", lambda fh: fh.write(table.encode()))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
