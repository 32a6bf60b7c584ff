"""The topology diagnostics of finished sets in a ``bench/quality.py`` work folder, computed anew from their
images: for each set, the Betti-curve distances and PTA's loss against the run's real points, on the images
as they are (what ``reta report`` shows for runs made since these diagnostics existed; this script scores
sets made before, and any variant side by side).

    python bench/set_topology.py --work bench/out/quality/cpu-71a7796f8490 --ipc 50 --seeds 0 1 2 \\
        --sets reta reta-no-pta fadrm

Each line: a set folder (``<name>-ipc<IPC>-seed<s>``), its Betti-0 and Betti-1 distances and PTA loss; then
the mean over seeds per name. Needs the work folder's teacher (``teacher-*.pt``) and pools.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="a quality.py work folder (<work>/<scale>-<fingerprint>)")
    ap.add_argument("--ipc", type=int, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="distillation seeds")
    ap.add_argument("--sets", nargs="+", required=True, help="set folder names without -ipc<N>-seed<s>")
    ap.add_argument("--k", type=int, default=None, help="mutual k-NN k (default: the pipeline's, min(10, IPC // 2))")
    args = ap.parse_args(argv)
    from reta_fast.models.features import teacher_features
    from reta_fast.models.teachers import load_teacher
    from reta_fast.retrieval.pool import PatchPool
    from reta_fast.stages.distill import _real_points, set_topology
    from reta_fast.stages.output import load_distilled

    work = Path(args.work)
    tpaths = sorted(work.glob("teacher-*.pt"))
    if len(tpaths) != 1:
        print(f"set_topology: {work} must hold one teacher-*.pt, found {len(tpaths)}", file=sys.stderr)
        return 2
    teacher = load_teacher(str(tpaths[0]))
    k = args.k or min(10, args.ipc // 2)
    scores = {}
    for s in args.seeds:
        pool_dir = work / ("pool" if s == 0 else f"pool-seed{s}")
        if not pool_dir.is_dir():
            print(f"set_topology: no pool for seed {s} ({pool_dir})", file=sys.stderr)
            return 2
        pool = PatchPool.load(pool_dir, verify=False)
        real = _real_points(teacher.model, pool, args.ipc, s, "cpu")  # the run's real points (PTA's real side)
        for name in args.sets:
            out = work / f"{name}-ipc{args.ipc}-seed{s}"
            if not out.is_dir():
                print(f"{out.name}: missing, skipped", flush=True)
                continue
            x, y, _ = load_distilled(out, pool.classes, pool.mean, pool.std)
            with torch.no_grad():
                f = torch.cat([teacher_features(teacher.model, x[a:a + 256])[1].float() for a in range(0, len(x), 256)])
            syn = torch.stack([f[y == c][:args.ipc] for c in range(len(pool.classes))])
            r = set_topology(real, syn, k)
            scores.setdefault(name, []).append(r)
            print(f"{out.name}: Betti-0 {r['b0']:.4f}  Betti-1 {r['b1']:.4f}  PTA loss {r['pta']:.4f}", flush=True)
    print(f"\nmean over seeds (IPC {args.ipc}, mutual {k}-NN, {args.ipc} points per class):")
    for name, rows in scores.items():
        print(f"  {name}: " + "  ".join(f"{key} {np.mean([r[key] for r in rows]):.4f}" for key in ("b0", "b1", "pta"))
              + f"  ({len(rows)} seeds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
