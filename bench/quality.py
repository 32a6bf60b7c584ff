"""Distilled-set quality: RETA vs its baselines and ablations on a real data set, side by side.

    python bench/quality.py --data ../shared/data/cifar10-jpeg.tar.gz --scale cpu

For each IPC and method (random-real, rded, sre2l, fadrm, reta, reta --no-drc, reta --no-pta) it distils
with the same teacher, evaluates every set with the same student protocol and seeds, and writes
``results.json`` + ``table.md`` (mean ± std over the seeds, the teacher's accuracy = the full-data
accuracy of that architecture, wall time and peak memory of each distillation) into ``--results``.

Scales (stated in the table):

* ``cpu``: ConvNet-BN width 32 teacher and student (a 2-core CPU finishes in under an hour): teacher 15
  epochs on all training images; 300 recover steps per batch; students 300 epochs (IPC 10) / 150 (IPC 50)
  at AdamW lr 1e-2, batch 50 / 100.
* ``gpu``: the full protocol of METHOD.md section 1: ResNet-18 (CIFAR stem) teacher (60 epochs) and
  student, 1000 recover steps, 300 student epochs at lr 1e-3, batch 64.
* ``gpu-short``: the same with a 15-epoch teacher and 500 recover steps, for a short GPU session
  (e.g. ``--ipcs 10 --methods random-real rded sre2l "fadrm lr 0.05" "reta lr 0.05"``; the data must
  travel with the call: copy the tarball into a git-ignored folder of the checkout and carry it).

``--data`` is an ImageFolder root with ``train/`` and ``test/`` (or ``val/``), or the ``.tar.gz`` of one
(unpacked once into ``$RETA_FAST_CACHE/data``, never into the repository). Work folders go to ``--work``
(default ``bench/out/quality``, git-ignored); a re-run resumes: finished sets and evaluations are reused
when their settings match. No parameter is tuned on the test split.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = [  # (name, DistillConfig overrides); the first seven run by default
    ("random-real", dict(method="random-real", lr=0.25)),  # lr: unused here, pinned as when these ran
    ("rded", dict(method="rded", lr=0.25)),
    ("sre2l", dict(method="sre2l", lr=0.25)),
    ("fadrm", dict(method="fadrm", lr=0.25)),
    ("reta", dict(method="reta", lr=0.25)),
    ("reta --no-drc", dict(method="reta", drc=False, lr=0.25)),
    ("reta --no-pta", dict(method="reta", pta=False, lr=0.25)),
    # the recover lr chosen on the validation split by bench/tune.py (tuning.md), for FADRM and RETA alike;
    # it is reta_fast's default up to 64 px
    ("fadrm lr 0.05", dict(method="fadrm", lr=0.05)),
    ("reta lr 0.05", dict(method="reta", lr=0.05)),
    ("reta lr 0.05 lam_topo 2", dict(method="reta", lr=0.05, lam_topo=2.0)),
    # the ablations at that lr, and other distillation seeds (the pool, initial patches and augmentation
    # streams all change with the seed): how much of a gap is the method and how much the draw
    ("reta lr 0.05 --no-drc", dict(method="reta", lr=0.05, drc=False)),
    ("reta lr 0.05 --no-pta", dict(method="reta", lr=0.05, pta=False)),
    ("fadrm lr 0.05 seed 1", dict(method="fadrm", lr=0.05, seed=1)),
    ("fadrm lr 0.05 seed 2", dict(method="fadrm", lr=0.05, seed=2)),
    ("reta lr 0.05 seed 1", dict(method="reta", lr=0.05, seed=1)),
    ("reta lr 0.05 seed 2", dict(method="reta", lr=0.05, seed=2)),
    ("reta lr 0.05 --no-drc seed 1", dict(method="reta", lr=0.05, drc=False, seed=1)),
    ("reta lr 0.05 --no-drc seed 2", dict(method="reta", lr=0.05, drc=False, seed=2)),
    # IPC 50 leaves each image 300 / 50 = 6 candidate patches in its partition (its own anchor and five
    # lower-ranked ones): does DRC need a larger pool there?
    ("reta lr 0.05 pool 1500", dict(method="reta", lr=0.05, pool_per_class=1500)),
    ("rded seed 1", dict(method="rded", lr=0.25, seed=1)),
    ("rded seed 2", dict(method="rded", lr=0.25, seed=2)),
]
DEFAULT_METHODS = [v[0] for v in VARIANTS[:7]]

SCALES = {
    "cpu": dict(arch="convnet-w32", teacher_epochs=15, iterations=300,
                eval={10: dict(epochs=300, batch_size=50, lr=1e-2), 50: dict(epochs=150, batch_size=100, lr=1e-2)}),
    "gpu": dict(arch="resnet18", teacher_epochs=60, iterations=1000,
                eval={10: dict(epochs=300, batch_size=64, lr=1e-3), 50: dict(epochs=300, batch_size=64, lr=1e-3)}),
    # a GPU data point that fits a short device session (~5 min on an H100 for IPC 10 and the five
    # shipped methods): a shorter-trained ResNet-18 teacher and half the recover steps, the full student
    "gpu-short": dict(arch="resnet18", teacher_epochs=15, iterations=500,
                      eval={10: dict(epochs=300, batch_size=64, lr=1e-3), 50: dict(epochs=300, batch_size=64, lr=1e-3)}),
    "smoke": dict(arch="convnet-w8", teacher_epochs=1, iterations=4,  # the test suite's: checks the plumbing only
                  eval={10: dict(epochs=2, batch_size=8, lr=1e-2)}),
}


def _pool_name(cfg) -> str:
    """One pool folder per seed and pool size (a pool is refused for other parameters)."""
    name = "pool" if cfg.seed == 0 else f"pool-seed{cfg.seed}"
    return name if cfg.pool_per_class == 300 else f"{name}-pc{cfg.pool_per_class}"


def unpack(archive: Path) -> Path:
    """Unpack a ``.tar.gz`` ImageFolder once into the cache (atomically: temp folder + rename)."""
    from reta_fast.fileio import cache_dir

    dest = cache_dir() / "data" / archive.name.replace(".tar.gz", "").replace(".tgz", "")
    if not dest.is_dir():
        tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        print(f"unpacking {archive} -> {dest}", flush=True)
        with tarfile.open(archive) as tf:
            tf.extractall(tmp, filter="data") if sys.version_info >= (3, 12) else tf.extractall(tmp)
        os.rename(tmp, dest)
    subs = [p for p in dest.iterdir() if p.is_dir()]
    return subs[0] if len(subs) == 1 and not (dest / "train").is_dir() else dest


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).replace(" ", "-").lower()
    name = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu-{'-'.join(name.lower().split()[:3])}-{os.cpu_count()}core"


def main(argv=None) -> int:
    from reta_fast import stages as P
    from reta_fast.data.sets import load_data
    from reta_fast.models import load_teacher
    from reta_fast.stages.squeeze import squeeze

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    ap.add_argument("--ipcs", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", default=str(ROOT / "bench" / "out" / "quality"))
    ap.add_argument("--results", help="where results.json/table.md go (default bench/results/quality-<scale>-<machine>)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of an existing results.json that this invocation does not recompute")
    args = ap.parse_args(argv)
    unknown = set(args.methods) - {v[0] for v in VARIANTS}
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; choose from {[v[0] for v in VARIANTS]}")
    src = Path(args.data)
    if not src.exists():
        print(f"quality: data {src} not found (the real CIFAR-10 copy lives in ../shared/data/); nothing to do",
              file=sys.stderr)
        return 2
    root = unpack(src) if src.is_file() else src
    sc = SCALES[args.scale]
    torch.set_num_threads(os.cpu_count() or 1)
    data = load_data(str(root))
    print(data.describe(), flush=True)
    work = Path(args.work) / f"{args.scale}-{data.fingerprint}"
    work.mkdir(parents=True, exist_ok=True)
    tpath = work / f"teacher-{sc['arch']}.pt"
    t0 = time.perf_counter()
    if tpath.is_file():
        teacher = load_teacher(tpath, data, args.device)
        teacher_s = None
    else:
        teacher = squeeze(data, sc["arch"], epochs=sc["teacher_epochs"], device=args.device, out=tpath)
        teacher_s = time.perf_counter() - t0
    print(f"teacher {sc['arch']}: top-1 {teacher.accuracy:.2f}%", flush=True)
    rows = []
    for ipc in args.ipcs:
        ev = sc["eval"][ipc] if ipc in sc["eval"] else sc["eval"][max(sc["eval"])]
        ecfg = P.EvalConfig(student=sc["arch"], epochs=ev["epochs"], batch_size=ev["batch_size"], lr=ev["lr"],
                            seeds=tuple(args.seeds), baseline=False)
        for name, over in VARIANTS:
            if name not in args.methods:
                continue
            out = work / f"{name.replace(' --', '-').replace(' ', '')}-ipc{ipc}"
            cfg = P.DistillConfig(ipc=ipc, iterations=sc["iterations"], **over)
            with P.Stage(out, "distill", args.device, print) as st:
                st.info.update(P.distill(data, [teacher], out, cfg, device=args.device,
                                         pool_dir=work / _pool_name(cfg), progress=False, log=print,
                                         teacher_specs=[str(tpath)]))
            dstage = json.loads((out / "stages" / "distill.json").read_text())
            first = out / "stages" / "distill-first.json"
            if st.info.get("written"):
                shutil.copyfile(out / "stages" / "distill.json", first)
            dinfo = json.loads(first.read_text()) if first.is_file() else dstage
            res = None
            if (out / "eval.json").is_file():
                old = json.loads((out / "eval.json").read_text())
                want = json.loads(json.dumps(dict(asdict(ecfg), crop_scale=list(ecfg.crop_scale),
                                                  seeds=list(ecfg.seeds), flip=data.flip)))
                if old.get("protocol") == want:
                    res = old
            if res is None:
                res = P.evaluate(data, teacher, out, ecfg, device=args.device, progress=False, log=print, ipc=ipc)
            rows.append(dict(name=name, ipc=ipc, top1=res["distilled"], distill_seconds=dinfo["seconds"],
                             distill_peak_bytes=dinfo["peak_bytes"], peak_kind=dinfo["peak_kind"],
                             loss_parts=dinfo.get("loss_parts")))
            print(f"== {name} IPC {ipc}: {res['distilled']['mean']:.2f} ± {res['distilled']['std']:.2f}", flush=True)
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
    except OSError:
        sha = "unknown"
    import reta_fast

    meta = dict(data=str(src.name), classes=len(data.classes), train=len(data.train), test=len(data.val),
                scale=args.scale, settings=dict(sc, eval={str(k): v for k, v in sc["eval"].items()}),
                teacher=dict(arch=sc["arch"], top1=teacher.accuracy, seconds=teacher_s), seeds=args.seeds,
                machine=machine(), device=args.device, torch=torch.__version__, reta_fast=reta_fast.__version__,
                git=sha, date=time.strftime("%Y-%m-%d"))
    results = Path(args.results) if args.results else ROOT / "bench" / "results" / f"quality-{args.scale}-{machine()}"
    results.mkdir(parents=True, exist_ok=True)
    from reta_fast.fileio import atomic_write, write_json

    if args.merge and (results / "results.json").is_file():
        old = json.loads((results / "results.json").read_text())
        if old["meta"]["scale"] == meta["scale"] and old["meta"]["teacher"]["top1"] == meta["teacher"]["top1"]:
            mine = {(r["name"], r["ipc"]) for r in rows}
            rows = [r for r in old["rows"] if (r["name"], r["ipc"]) not in mine] + rows
            order = {v[0]: i for i, v in enumerate(VARIANTS)}
            rows.sort(key=lambda r: (order.get(r["name"], 99), r["ipc"]))
    write_json(results / "results.json", dict(meta=meta, rows=rows))
    table = render(meta, rows)
    atomic_write(results / "table.md", lambda fh: fh.write(table.encode()))
    print(table)
    return 0


def render(meta: dict, rows) -> str:
    ipcs = sorted({r["ipc"] for r in rows})
    names = list(dict.fromkeys(r["name"] for r in rows))
    by = {(r["name"], r["ipc"]): r for r in rows}
    s = meta["settings"]
    L = [f"Distilled-set quality on {meta['data']} ({meta['classes']} classes, {meta['train']} train / {meta['test']} "
         f"test images), scale `{meta['scale']}`: teacher and student {s['arch']}, teacher {s['teacher_epochs']} epochs "
         f"(top-1 {meta['teacher']['top1']:.2f}% = full-data accuracy of this architecture), {s['iterations']} "
         f"recover steps per batch, students: " + "; ".join(
             f"IPC {k}: {v['epochs']} epochs, batch {v['batch_size']}, AdamW lr {v['lr']}" for k, v in s["eval"].items())
         + f". Student top-1 % on the test split, mean ± std over seeds {meta['seeds']}. {meta['machine']}, "
         f"torch {meta['torch']}, git {meta['git']}, {meta['date']}. No parameter tuned on the test split.", "",
         "| method | " + " | ".join(f"IPC {i}" for i in ipcs) + " | " + " | ".join(
             f"distill time IPC {i}" for i in ipcs) + " |",
         "|---|" + "---|" * (2 * len(ipcs))]
    for n in names:
        cells = []
        for i in ipcs:
            r = by.get((n, i))
            cells.append("–" if r is None else f"{r['top1']['mean']:.2f} ± {r['top1']['std']:.2f}")
        times = []
        for i in ipcs:
            r = by.get((n, i))
            times.append("–" if r is None else f"{r['distill_seconds']:.0f} s, {r['distill_peak_bytes'] / 2**20:.0f} MiB")
        L.append(f"| {n} | " + " | ".join(cells) + " | " + " | ".join(times) + " |")
    L.append("")
    L.append("Peak memory: " + ("CUDA max allocated" if rows and rows[0]["peak_kind"].startswith("cuda")
                                else "process peak RSS (monotone over the run)") + ".")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
