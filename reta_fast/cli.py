"""Command line entry point ``reta``: the distillation pipeline, stage by stage or all at once.

    reta squeeze   train a BN teacher on a data set (prints its top-1)
    reta distill   build/load the patch pool and write the distilled set (--method reta | baselines)
    reta relabel   stored soft labels for the student protocol + a tensor export
    reta evaluate  train students on the distilled set; top-1 vs the teacher and random real images
    reta report    report.md / report.json with pictures
    reta plan      expected wall time and peak memory of a distill job, from a short calibration
    reta run       all of the above
    reta demo      all of the above on the embedded digits data set (no download, minutes on a CPU)
    reta topo-demo the PTA loss alone on synthetic point clouds

Under ``torchrun`` the distill stage shards its batches over the ranks (``RANK``/``WORLD_SIZE``).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch


def _rings(classes: int, n: int, d: int, noise: float, seed: int) -> torch.Tensor:
    """Per class: two noisy rings (loops, H1) embedded at random in R^d."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(classes, n, generator=g) * 2 * math.pi
    which = torch.randint(0, 2, (classes, n), generator=g).float()
    radius = 1.0 + 0.5 * which
    plane = torch.stack([radius * torch.cos(t) + 3 * which, radius * torch.sin(t)], -1)
    basis = torch.linalg.qr(torch.randn(classes, d, 2, generator=g)).Q  # [C, d, 2] orthonormal
    pts = plane @ basis.transpose(1, 2)
    return pts + noise * torch.randn(classes, n, d, generator=g)


def _summary(dg, g: int) -> str:
    sl = lambda t, o: t[o[g]: o[g + 1]]  # noqa: E731
    h0 = sl(dg.h0, dg.h0_offsets).detach()
    h1 = sl(dg.h1, dg.h1_offsets).detach()
    long_loops = int(((h1[:, 1] - h1[:, 0]) > 0.1).sum()) if h1.numel() else 0
    return (f"components={int(dg.pairs.components[g])}, mean H0 death={float(h0[:, 1].mean()):.3f}, "
            f"H1 bars={h1.shape[0]} (persistence > 0.1: {long_loops})")


def topo_demo(args) -> int:
    import reta_fast as rf

    torch.manual_seed(args.seed)
    C, n, d = args.classes, args.points, args.dim
    print(f"reta_fast {rf.__version__} topology demo: {C} classes x {n} points in R^{d}, k={args.k}; "
          f"native extension: {'yes' if rf.has_native() else 'no (reference path)'}")
    real = _rings(C, n, d, 0.05, args.seed)
    # A "collapsed" synthetic set: the pull-to-anchor failure PTA is meant to undo.
    syn = (0.3 * _rings(C, n, d, 0.02, args.seed + 1)).requires_grad_()
    kw = dict(essential="max")
    t0 = time.perf_counter()
    dr = rf.persistence_diagrams(torch.nn.functional.normalize(real, dim=-1), args.k, **kw)
    ds = rf.persistence_diagrams(torch.nn.functional.normalize(syn.detach(), dim=-1), args.k, **kw)
    print(f"diagrams of {2 * C} point sets in {1e3 * (time.perf_counter() - t0):.1f} ms")
    print(f"  real      class 0: {_summary(dr, 0)}")
    print(f"  synthetic class 0: {_summary(ds, 0)}")
    loss_fn = rf.TopologyAlignmentLoss(k=args.k)
    loss_fn.set_reference(real)
    opt = torch.optim.Adam([syn], lr=args.lr)
    t0 = time.perf_counter()
    first = None
    for step in range(args.steps):
        opt.zero_grad()
        loss = loss_fn(syn)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        first = value if first is None else first
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"  step {step:4d}  PTA loss {value:.5f}")
    dt = time.perf_counter() - t0
    ds = rf.persistence_diagrams(torch.nn.functional.normalize(syn.detach(), dim=-1), args.k, **kw)
    print(f"after {args.steps} PTA steps ({1e3 * dt / args.steps:.1f} ms/step, forward + backward, "
          f"all {C} classes batched):")
    print(f"  synthetic class 0: {_summary(ds, 0)}")
    print(f"PTA loss {first:.5f} -> {value:.5f} ({first / max(value, 1e-12):.1f}x lower)")
    return 0


class _Log:
    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)


def _device(name: str) -> str:
    """``auto``: ``cuda:$LOCAL_RANK`` (torchrun) or ``cuda`` when CUDA is available, else ``cpu``."""
    import os

    if name == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def _data(args):
    from .datasets import load_data

    data = load_data(args.data, size=args.size, val=args.val, root=args.data_root)  # fixed split, any --seed
    args.log(f"[data] {data.describe()}" + "".join(f"; {n}" for n in data.notes))
    return data


def _teachers(args, data):
    """The teachers of ``--teacher``, or the cached default one (squeezed now if missing: that stage's
    record is kept in ``args.squeeze_record`` and written once the output folder is accepted)."""
    from .pipeline import Stage
    from .teachers import default_arch, default_teacher_path, resolve_teachers

    arch = getattr(args, "arch", None)
    kw = dict(device=args.device, seed=args.seed, weights=args.teacher_weights, arch=arch,
              epochs=getattr(args, "squeeze_epochs", None), progress=not args.quiet, log=args.log,
              workers=args.workers)
    run_json = Path(args.out) / "run.json" if getattr(args, "out", None) else None
    if not args.teacher and args.command in ("relabel", "evaluate", "report") and run_json and run_json.is_file():
        return _recorded_teachers(args, data, run_json, kw)
    if args.teacher or default_teacher_path(data, arch or default_arch(data), args.seed).is_file():
        return resolve_teachers(args.teacher, data, **kw)
    if _rank()[1] > 1:
        raise ValueError("under torchrun every rank needs the same teacher: run `reta squeeze` (or pass --teacher) "
                         "before launching the ranks")
    with Stage(None, "squeeze", args.device, args.log) as st:
        teachers = resolve_teachers(None, data, **kw)
        st.info.update(teacher=teachers[0].name, top1=teachers[0].accuracy, checkpoint=str(teachers[0].path))
    args.squeeze_record = st.record
    return teachers


def _recorded_teachers(args, data, run_json, kw):
    """The teachers ``run.json`` names (later stages use the distilling teacher unless told otherwise),
    refused if the file now holds another network."""
    from .fileio import read_json
    from .pool import teacher_fingerprint
    from .teachers import resolve_teachers

    run = read_json(run_json, "run manifest")
    specs, recorded = run.get("teacher_specs") or [], run.get("teachers") or []
    if not specs:
        raise ValueError(f"{run_json} does not say which teacher distilled this set: pass --teacher")
    teachers = resolve_teachers(",".join(specs), data, **kw)
    for t, r in zip(teachers, recorded):
        if teacher_fingerprint(t.model) != r.get("fingerprint"):
            raise ValueError(f"teacher {t.path} is not the network that distilled {args.out} (fingerprint "
                             f"{teacher_fingerprint(t.model)} vs {r.get('fingerprint')}): pass --teacher explicitly")
    args.log(f"[teacher] using the distilling teacher recorded in run.json: {specs[0]}")
    return teachers


def _keep_squeeze_record(args):
    rec = getattr(args, "squeeze_record", None)
    if rec is not None:
        from .fileio import write_json

        write_json(Path(args.out) / "stages" / "squeeze.json", rec)
        args.squeeze_record = None


def _rank():
    import os

    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _distill_config(args):
    from .pipeline import DistillConfig

    return DistillConfig(method=args.method, ipc=args.ipc, ipc_start=args.ipc_start, ipc_end=args.ipc_end,
                         iterations=args.iterations, blocks=args.blocks, resolutions=args.resolutions, batch_classes=args.batch_classes,
                         ipc_per_batch=args.ipc_per_batch, lr=args.lr, jitter=args.jitter, alpha=args.alpha,
                         lam=args.lam, r_bn=0.0 if args.no_bn else args.r_bn, first_bn_weight=args.first_bn_weight,
                         lam_topo=args.lam_topo, topo_k=args.topo_k, points_per_class=args.points_per_class,
                         pool_per_class=args.pool_per_class, pool_candidates=args.pool_candidates,
                         drc=not args.no_drc, pta=not args.no_pta, seed=args.seed, topo_refresh=args.topo_refresh,
                         amp=args.amp, channels_last=args.channels_last, compile=args.compile,
                         topo_overlap=args.topo_overlap)


def _eval_config(args):
    from .pipeline import EvalConfig

    return EvalConfig(student=args.student, epochs=args.eval_epochs, batch_size=args.eval_batch, lr=args.eval_lr,
                      weight_decay=args.eval_wd, temperature=args.temperature, labels=args.labels,
                      seeds=tuple(args.eval_seeds), baseline=not args.no_baseline)


def cmd_squeeze(args) -> int:
    from .pipeline import Stage
    from .teachers import default_arch, default_teacher_path, squeeze

    data = _data(args)
    arch = args.arch or default_arch(data)
    out = args.teacher_out or default_teacher_path(data, arch, args.seed)
    if Path(out).exists():
        raise FileExistsError(f"{out} exists: a teacher is never overwritten (pass --teacher-out elsewhere)")
    with Stage(None, "squeeze", args.device, args.log):
        t = squeeze(data, arch, epochs=args.epochs, lr=args.squeeze_lr, seed=args.seed, device=args.device, out=out,
                    progress=not args.quiet, workers=args.workers, log=args.log)
    print(f"teacher {t.name}: top-1 {t.accuracy:.2f}% -> {out}")
    return 0


def _no_bn_check(args, teachers):
    from torch import nn

    if args.no_bn or args.method in ("random-real", "rded"):
        return
    for t in teachers:
        if not any(isinstance(m, nn.BatchNorm2d) for m in t.model.modules()):
            raise ValueError(f"teacher {t.name} has no BatchNorm2d layer, so BN-statistic matching is impossible: "
                             f"pass --no-bn to recover without it (CE + PTA only)")


def _process_group(args) -> bool:
    """Under torchrun (MASTER_ADDR set) join the process group (NCCL on CUDA, gloo on the CPU) so that
    rank 0 can build the pool before the others start and merge the stage records at the end. A rank
    started alone with only RANK/WORLD_SIZE set (a restart) works without one."""
    import os

    import torch.distributed as dist

    if _rank()[1] == 1 or not dist.is_available() or "MASTER_ADDR" not in os.environ:
        return False
    if not dist.is_initialized():
        import datetime

        if str(args.device).startswith("cuda"):
            torch.cuda.set_device(torch.device(args.device))
        # Ranks wait for rank 0 while it builds the pool, relabels (--labels stored) or writes the report:
        # hours at ImageNet scale, far beyond the default 10-30 min collective timeout.
        timeout = float(os.environ.get("RETA_FAST_DIST_TIMEOUT", 12 * 3600))
        dist.init_process_group("nccl" if str(args.device).startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(seconds=timeout))
    return True


def cmd_distill(args, data=None, teachers=None) -> int:
    from .fileio import read_json, write_json
    from .pipeline import Stage, build_pool, distill, write_stage_record

    data = data or _data(args)
    teachers = teachers or _teachers(args, data)
    _no_bn_check(args, teachers)
    cfg = _distill_config(args)
    cfg.validate()
    rank, world = _rank()
    out = Path(args.out)
    group = _process_group(args)
    if group:
        import torch.distributed as dist

        if rank == 0 and cfg.uses_pool:  # one rank builds the pool; the others then load it
            build_pool(data, teachers[0], cfg, args.device, args.pool, not args.quiet, args.log)
        dist.barrier()
    with Stage(out if world == 1 else None, "distill" if world == 1 else f"distill-rank{rank}", args.device,
               args.log) as st:
        st.info.update(distill(data, teachers, out, cfg, device=args.device, pool_dir=args.pool,
                               progress=not args.quiet and rank == 0, log=args.log, rank=rank, world_size=world,
                               teacher_specs=[str(t.path) if t.path else t.name for t in teachers]))
    _keep_squeeze_record(args)
    if world > 1:
        write_json(out / "stages" / f"distill-rank{rank}.json", st.record)
    if group:
        dist.barrier()
        if rank == 0:  # one record for the whole distillation: wall time of the slowest rank, summed counts
            recs = [read_json(out / "stages" / f"distill-rank{r}.json", "stage record") for r in range(world)]
            merged = dict(recs[0], seconds=max(r["seconds"] for r in recs), ranks=world,
                          peak_bytes=max(r["peak_bytes"] for r in recs),
                          written=sum(r.get("written", 0) for r in recs), skipped=sum(r.get("skipped", 0) for r in recs))
            merged.pop("stage", None)
            write_stage_record(out, "distill", dict(stage="distill", **merged))
    i = st.info
    args.log(f"[distill] {i['written']} images written, {i['skipped']} already there -> {out / 'images'}")
    return 0


def cmd_relabel(args, data=None, teachers=None) -> int:
    from .pipeline import Stage, relabel_stage

    data = data or _data(args)
    teachers = teachers or _teachers(args, data)
    with Stage(Path(args.out), "relabel", args.device, args.log) as st:
        st.info.update(relabel_stage(data, teachers[0], args.out, _eval_config(args), device=args.device,
                                     progress=not args.quiet, log=args.log))
    return 0


def cmd_evaluate(args, data=None, teachers=None) -> int:
    from .pipeline import Stage, evaluate

    data = data or _data(args)
    teachers = teachers or _teachers(args, data)
    rank, world = _rank()
    if world > 1 and not _process_group(args):
        raise ValueError("`reta evaluate` with WORLD_SIZE > 1 trains each student with DDP and needs torchrun's "
                         "process group (MASTER_ADDR); run it with torchrun, or in one process")
    log = args.log if rank == 0 else (lambda m: None)
    with Stage(Path(args.out) if rank == 0 else None, "evaluate", args.device, log) as st:
        r = evaluate(data, teachers[0], args.out, _eval_config(args), device=args.device,
                     progress=not args.quiet and rank == 0, log=log, seed=args.seed, workers=args.workers)
        st.info.update(top1=r["distilled"]["mean"], ranks=world)
    if rank != 0:
        return 0
    rr = r["random_real"]
    print(f"{r['method']} IPC {r['ipc']}: student top-1 {r['distilled']['mean']:.2f} ± {r['distilled']['std']:.2f}% | "
          f"teacher {r['teacher_top1']:.2f}%" + (f" | random real {rr['mean']:.2f} ± {rr['std']:.2f}%" if rr else ""))
    return 0


def cmd_report(args, data=None, teachers=None) -> int:
    from .report import write_report

    data = data or _data(args)
    teachers = teachers or _teachers(args, data)
    write_report(args.out, data, teachers[0], k=args.topo_k or 10, seed=args.seed, device=args.device, log=args.log)
    return 0


def cmd_run(args) -> int:
    data = _data(args)
    teachers = _teachers(args, data)
    cmd_distill(args, data, teachers)
    rank, world = _rank()
    if world > 1 and not torch.distributed.is_initialized():
        args.log("[run] ranks without a process group: run `reta evaluate` once every rank has finished")
        return 0
    if args.labels == "stored":  # rank 0 relabels, the others wait for the labels
        if rank == 0:
            cmd_relabel(args, data, teachers)
        if world > 1:
            torch.distributed.barrier()
    cmd_evaluate(args, data, teachers)  # every rank: the students train with DDP
    if rank != 0:
        return 0
    cmd_report(args, data, teachers)
    print((Path(args.out) / "report.md").read_text())
    return 0


def cmd_plan(args) -> int:
    from .plan import calibrate
    from .teachers import Teacher, build_arch, default_arch, default_teacher_path, resolve_teachers

    data = _data(args)
    arch = args.arch or default_arch(data)
    if args.teacher or default_teacher_path(data, arch, args.seed).is_file():
        teacher = resolve_teachers(args.teacher, data, device=args.device, seed=args.seed,
                                   weights=args.teacher_weights, arch=arch, log=args.log)[0]
    else:  # the step time does not depend on the weights
        model, _ = build_arch(arch, len(data.classes), data.size)
        teacher = Teacher(model, arch, data.classes, data.size, data.mean, data.std)
        args.log(f"[plan] no teacher yet: timing an untrained {arch} (the step cost does not depend on weights)")
    cfg = _distill_config(args)
    est = calibrate(data, teacher, cfg, device=args.device, steps=args.calibration_steps, gpus=args.gpus,
                    log=args.log)
    print(f"reta plan: {cfg.method} on {data.name}, IPC {cfg.ipc}, teacher {teacher.name}, {args.gpus} device(s) "
          f"like this one ({args.device})")
    print(est.table())
    return 0


DEMO = dict(data="digits", method="reta", ipc=10, iterations=200, blocks=4, batch_classes=10, topo_k=4,
            eval_epochs=150, eval_batch=50, eval_lr=1e-2, eval_seeds=[0, 1, 2], out="reta-demo")


def _common(p, demo=False, squeeze=False):
    g = p.add_argument_group("common")
    g.add_argument("--data", default="digits" if demo else None, required=not demo,
                   help="ImageFolder path (ROOT/<class>/ or ROOT/train + ROOT/val), digits, or a torchvision name")
    g.add_argument("--val", help="validation ImageFolder (default: ROOT/val|test, else a 10%% holdout)")
    g.add_argument("--data-root", help="download folder for torchvision data sets")
    g.add_argument("--size", type=int, help="working image size (default: 16 for digits, 32 for CIFAR, probed "
                                             "for folders, at most 224)")
    if not squeeze:
        g.add_argument("--teacher", help="teacher checkpoint, torchvision:<name> or timm:<name>; a comma-separated "
                                          "list takes turns (FADRM+). Default: for distill/run the data set's "
                                          "default teacher, squeezed once and cached; for relabel/evaluate/report "
                                          "the teacher recorded in OUT/run.json")
        g.add_argument("--teacher-weights", help="state-dict file (or DEFAULT) for torchvision:/timm: teachers")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    if not squeeze:
        g.add_argument("--arch", choices=["convnet", "resnet18"],
                       help="architecture of the default teacher when one is squeezed (see reta squeeze)")
        g.add_argument("--squeeze-epochs", type=int, help="epochs of that squeeze")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=0, help="data loader processes for streamed data sets")
    g.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU kernels only (torch.use_deterministic_algorithms; slower)")


def _out(p, demo=False):
    p.add_argument("--out", default=DEMO["out"] if demo else None, required=not demo,
                   help="output folder (resumed if it holds the same run, refused if another)")


def _distill_args(p, demo=False):
    d = DEMO if demo else {}
    g = p.add_argument_group("distill")
    g.add_argument("--method", default=d.get("method", "reta"), choices=["random-real", "rded", "sre2l", "fadrm", "reta"])
    g.add_argument("--ipc", type=int, default=d.get("ipc", 10), help="images per class")
    g.add_argument("--ipc-start", type=int, default=0, help="first ipc index this process makes")
    g.add_argument("--ipc-end", type=int, default=None, help="one past the last ipc index (default: --ipc)")
    g.add_argument("--iterations", type=int, default=d.get("iterations", 1000), help="recover steps per batch")
    g.add_argument("--blocks", type=int, default=d.get("blocks", 4), help="multi-resolution blocks (FADRM)")
    g.add_argument("--resolutions", type=lambda v: [int(r) for r in v.split(",")], default=None,
                   help="one resolution per block, comma-separated (ImageNet: 200,224,200,224); overrides --blocks")
    g.add_argument("--batch-classes", type=int, default=d.get("batch_classes"),
                   help="classes per batch (default: min(classes, 100))")
    g.add_argument("--ipc-per-batch", type=int, default=None,
                   help="items of each class per batch (default: 100 images per batch)")
    g.add_argument("--lr", type=float, default=None,
                   help="recover lr (default: 0.25 above 64 px as in SRe2L/FADRM, 0.05 up to 64 px, tuned on CIFAR-10)")
    g.add_argument("--jitter", type=int, default=None)
    g.add_argument("--alpha", type=float, default=0.5, help="residual weight of the synthetic image")
    g.add_argument("--lam", type=float, default=0.1, help="DRC complexity weight lambda")
    g.add_argument("--r-bn", type=float, default=0.01)
    g.add_argument("--first-bn-weight", type=float, default=10.0)
    g.add_argument("--no-bn", action="store_true", help="no BN-statistic matching (teachers without BatchNorm)")
    g.add_argument("--lam-topo", type=float, default=0.5, help="PTA weight")
    g.add_argument("--topo-k", type=int, default=d.get("topo_k"), help="mutual k-NN k (default min(10, ipc-1))")
    g.add_argument("--points-per-class", type=int, default=32, help="real PTA points per class")
    g.add_argument("--pool", help="patch pool folder (default: a cache folder keyed by data, teacher, params)")
    g.add_argument("--pool-per-class", type=int, default=300)
    g.add_argument("--pool-candidates", type=int, default=1, help="RDED best-of-N crops per image")
    g.add_argument("--no-drc", action="store_true", help="ablation: static anchor instead of DRC retrieval")
    g.add_argument("--no-pta", action="store_true", help="ablation: no topology alignment")
    g.add_argument("--topo-refresh", type=int, default=1,
                   help="recompute PTA's graphs and pairings every T steps, re-gather lengths in between")
    g.add_argument("--topo-overlap", action="store_true",
                   help="compute PTA's pairings in a worker thread during the step, use them one step later")
    e = p.add_argument_group("recover engine (changes images at rounding level; recorded in run.json)")
    e.add_argument("--amp", choices=["bf16"], default=None, help="teacher forward under bf16 autocast")
    e.add_argument("--channels-last", action="store_true", help="teacher and batch in channels-last format")
    e.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile the teacher's forward (reduce-overhead: CUDA graphs on a GPU)")


def _eval_args(p, demo=False):
    d = DEMO if demo else {}
    g = p.add_argument_group("evaluate")
    g.add_argument("--student", choices=["convnet", "resnet18"], help="student architecture (default: the teacher's)")
    g.add_argument("--eval-epochs", type=int, default=d.get("eval_epochs", 300))
    g.add_argument("--eval-batch", type=int, default=d.get("eval_batch", 64))
    g.add_argument("--eval-lr", type=float, default=d.get("eval_lr", 1e-3))
    g.add_argument("--eval-wd", type=float, default=0.01)
    g.add_argument("--temperature", type=float, default=20.0)
    g.add_argument("--labels", choices=["online", "stored"], default="online",
                   help="soft labels from the teacher during training, or stored by `reta relabel`")
    g.add_argument("--eval-seeds", type=int, nargs="+", default=d.get("eval_seeds", [0]))
    g.add_argument("--no-baseline", action="store_true", help="skip the random-real baseline")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reta", description="RETA dataset distillation (reta_fast)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("squeeze", help="train a BN teacher on a data set")
    _common(s, squeeze=True)
    s.add_argument("--arch", choices=["convnet", "resnet18"], help="default: convnet for digits, else resnet18")
    s.add_argument("--epochs", type=int)
    s.add_argument("--squeeze-lr", type=float)
    s.add_argument("--teacher-out", help="checkpoint path (default: the teacher cache)")
    s.set_defaults(func=cmd_squeeze)

    for name, fn, helptext, parts in (
            ("distill", cmd_distill, "write the distilled set", ("d",)),
            ("relabel", cmd_relabel, "stored soft labels + tensor export", ("e",)),
            ("evaluate", cmd_evaluate, "train students on the distilled set", ("e",)),
            ("report", cmd_report, "write report.md/json with pictures", ("k",)),
            ("run", cmd_run, "all stages", ("d", "e")),
            ("demo", cmd_run, "all stages on the embedded digits data set", ("d", "e"))):
        demo = name == "demo"
        q = sub.add_parser(name, help=helptext)
        _common(q, demo)
        _out(q, demo)
        if "d" in parts:
            _distill_args(q, demo)
        if "e" in parts:
            _eval_args(q, demo)
        if "k" in parts:
            q.add_argument("--topo-k", type=int, default=None)
        if "d" not in parts:
            q.set_defaults(method=None)
        q.set_defaults(func=fn)

    q = sub.add_parser("plan", help="estimate a distill job's wall time and peak memory from a short calibration")
    _common(q)
    _distill_args(q)
    q.add_argument("--gpus", type=int, default=1, help="devices (torchrun ranks) the job will use")
    q.add_argument("--calibration-steps", type=int, default=5)
    q.set_defaults(func=cmd_plan, out=None)

    d = sub.add_parser("topo-demo", help="PTA on synthetic point clouds: align a collapsed set to real loops")
    d.add_argument("--classes", type=int, default=8)
    d.add_argument("--points", type=int, default=64)
    d.add_argument("--dim", type=int, default=32)
    d.add_argument("--k", type=int, default=8)
    d.add_argument("--steps", type=int, default=100)
    d.add_argument("--lr", type=float, default=0.05)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=topo_demo)
    return p


_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError, FloatingPointError,
                PermissionError)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "topo-demo":
        for name in ("classes", "points", "dim", "k", "steps"):
            if getattr(args, name) < 1:
                print(f"reta: --{name} must be >= 1", file=sys.stderr)
                return 2
        return args.func(args)
    args.log = _Log(args.quiet)
    if getattr(args, "deterministic", False):
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA initialises
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    ok = False
    try:
        args.device = _device(args.device)
        rc = args.func(args)
        ok = rc == 0
        return rc
    except _USER_ERRORS as exc:
        print(f"reta {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. disk full: the partial file was already removed
        print(f"reta {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"reta {args.command}: interrupted; finished items are kept, re-run the same command to resume",
              file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if ok:  # leave together: a rank tearing gloo down while another still uses it aborts (SIGABRT)
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
