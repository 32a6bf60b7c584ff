"""The ``reta`` subcommands: each resolves its data and teachers, runs its stage, and handles torchrun's
process group (rank 0 builds the pool and merges the stage records)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..data.sets import load_data
from ..fileio import read_json, write_json
from ..models.arch import build_arch, default_arch
from ..models.features import named_feature_head, teacher_fingerprint
from ..models.teachers import Teacher
from ..stages.config import DistillConfig, EvalConfig
from ..stages.distill import build_pool, distill
from ..stages.evaluate import evaluate
from ..stages.plan import calibrate
from ..stages.records import Stage
from ..stages.relabel import relabel_stage
from ..stages.report import write_report
from ..stages.squeeze import default_teacher_path, resolve_teachers, squeeze
from ..stages.ranks import join_process_group, merge_rank_records, rank_world, write_rank_record
from .flags import config_from

logger = logging.getLogger("reta_fast")

def _device(name: str) -> str:
    """``auto``: ``cuda:$LOCAL_RANK`` (torchrun) or ``cuda`` when CUDA is available, else ``cpu``."""

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
    data = load_data(args.data, size=args.size, val=args.val, root=args.data_root)  # fixed split, any --seed
    logger.info(f"[data] {data.describe()}" + "".join(f"; {n}" for n in data.notes))
    return data


def _teachers(args, data):
    """The teachers of ``--teacher``, or the cached default one (squeezed now if missing: that stage's
    record is kept in ``args.squeeze_record`` and written once the output folder is accepted)."""
    arch = getattr(args, "arch", None)
    kw = dict(device=args.device, seed=args.seed, weights=args.teacher_weights, arch=arch,
              epochs=getattr(args, "squeeze_epochs", None), progress=not args.quiet,
              workers=args.workers, heads=args.teacher_head)
    run_json = Path(args.out) / "run.json" if getattr(args, "out", None) else None
    if not args.teacher and args.command in ("relabel", "evaluate", "report") and run_json and run_json.is_file():
        return _recorded_teachers(args, data, run_json, kw)
    if args.teacher or default_teacher_path(data, arch or default_arch(data), args.seed).is_file():
        return resolve_teachers(args.teacher, data, **kw)
    if rank_world()[1] > 1:
        raise ValueError("under torchrun every rank needs the same teacher: run `reta squeeze` (or pass --teacher) "
                         "before launching the ranks")
    with Stage(None, "squeeze", args.device) as st:
        teachers = resolve_teachers(None, data, **kw)
        st.info.update(teacher=teachers[0].name, top1=teachers[0].accuracy, checkpoint=str(teachers[0].path))
    args.squeeze_record = st.record
    return teachers


def _recorded_teachers(args, data, run_json, kw):
    """The teachers ``run.json`` names (later stages use the distilling teacher unless told otherwise),
    refused if the file now holds another network."""
    run = read_json(run_json, "run manifest")
    specs, recorded = run.get("teacher_specs") or [], run.get("teachers") or []
    if not specs:
        raise ValueError(f"{run_json} does not say which teacher distilled this set: pass --teacher")
    if len(specs) != len(recorded):
        raise ValueError(f"{run_json} names {len(specs)} teacher spec(s) for {len(recorded)} teacher(s) (a library "
                         f"teacher without a checkpoint is not recorded): pass --teacher")
    if not kw["heads"] and any(r.get("feature_head") for r in recorded):
        kw = dict(kw, heads=",".join(r.get("feature_head") or "" for r in recorded))
    teachers = resolve_teachers(",".join(specs), data, **kw)
    for t, r in zip(teachers, recorded):
        if teacher_fingerprint(t.model) != r.get("fingerprint"):
            raise ValueError(f"teacher {t.path} is not the network that distilled {args.out} (fingerprint "
                             f"{teacher_fingerprint(t.model)} vs {r.get('fingerprint')}): pass --teacher explicitly")
        # a run made before heads were recorded has no entry: the head named now is taken on trust
        head, recorded_head = named_feature_head(t.model), r.get("feature_head")
        if ("feature_head" in r or not args.teacher_head) and head != recorded_head:
            raise ValueError(f"{args.out} was distilled with the teacher's classifier head "
                             f"{_head_words(recorded_head)}, not {_head_words(head)}: name that head with --teacher-head")
    logger.info(f"[teacher] using the distilling teacher recorded in run.json: {specs[0]}")
    return teachers


def _head_words(head) -> str:
    return repr(head) if head else "its last nn.Linear"


def _keep_squeeze_record(args):
    rec = getattr(args, "squeeze_record", None)
    if rec is not None:
        write_json(Path(args.out) / "stages" / "squeeze.json", rec)
        args.squeeze_record = None


def _distill_config(args) -> DistillConfig:
    return config_from(DistillConfig, args)


def _eval_config(args) -> EvalConfig:
    return config_from(EvalConfig, args, "eval_")


def check_settings(args) -> None:
    """Refuse the command's distill and student settings by name before any data is read or teacher trained
    (the stages validate them again; checks that need the data, e.g. the pool's size, come later)."""
    if getattr(args, "method", None) is not None:  # the commands with distill flags
        _distill_config(args).validate()
    if hasattr(args, "eval_epochs"):  # the commands with student flags
        _eval_config(args).validate()


def cmd_squeeze(args) -> int:
    data = _data(args)
    arch = args.arch or default_arch(data)
    out = args.teacher_out or default_teacher_path(data, arch, args.seed)
    if Path(out).exists():
        raise FileExistsError(f"{out} exists: a teacher is never overwritten (pass --teacher-out elsewhere)")
    with Stage(None, "squeeze", args.device):
        t = squeeze(data, arch, epochs=args.epochs, lr=args.squeeze_lr, seed=args.seed, device=args.device, out=out,
                    progress=not args.quiet, workers=args.workers)
    print(f"teacher {t.name}: top-1 {t.accuracy:.2f}% -> {out}")
    return 0


def _no_bn_check(args, teachers):
    from torch import nn

    if args.r_bn == 0 or args.method in ("random-real", "rded"):
        return
    for t in teachers:
        if not any(isinstance(m, nn.BatchNorm2d) for m in t.model.modules()):
            raise ValueError(f"teacher {t.name} has no BatchNorm2d layer, so BN-statistic matching is impossible: "
                             f"pass --no-bn to recover without it (CE + PTA only)")


def _process_group(args) -> bool:
    return join_process_group(args.device)


def cmd_distill(args, data=None, teachers=None) -> int:
    data = data or _data(args)
    teachers = teachers or _teachers(args, data)
    _no_bn_check(args, teachers)
    cfg = _distill_config(args)
    cfg.validate()
    rank, world = rank_world()
    out = Path(args.out)
    group = _process_group(args)
    if group:
        import torch.distributed as dist

        if rank == 0 and cfg.uses_pool:  # one rank builds the pool; the others then load it
            build_pool(data, teachers[0], cfg, args.device, args.pool, not args.quiet)
        dist.barrier()
    with Stage(out if world == 1 else None, "distill" if world == 1 else f"distill-rank{rank}", args.device) as st:
        st.info.update(distill(data, teachers, out, cfg, device=args.device, pool_dir=args.pool,
                               progress=not args.quiet and rank == 0, rank=rank, world_size=world,
                               teacher_specs=[str(t.path) if t.path else t.name for t in teachers]))
    _keep_squeeze_record(args)
    if world > 1:
        write_rank_record(out, "distill", rank, st.record)
    if group:
        dist.barrier()
        if rank == 0:
            merge_rank_records(out, "distill", world)
    i = st.info
    logger.info(f"[distill] {i['written']} images written, {i['skipped']} already there -> {out / 'images'}")
    return 0


def cmd_relabel(args, data=None, teachers=None) -> int:
    data = data or _data(args)
    teachers = teachers or _teachers(args, data)
    with Stage(Path(args.out), "relabel", args.device) as st:
        st.info.update(relabel_stage(data, teachers[0], args.out, _eval_config(args), device=args.device,
                                     progress=not args.quiet))
    return 0


def cmd_evaluate(args, data=None, teachers=None) -> int:
    data = data or _data(args)
    teachers = teachers or _teachers(args, data)
    rank, world = rank_world()
    if world > 1 and not _process_group(args):
        raise ValueError("`reta evaluate` with WORLD_SIZE > 1 trains each student with DDP and needs torchrun's "
                         "process group (MASTER_ADDR); run it with torchrun, or in one process")
    with Stage(Path(args.out) if rank == 0 else None, "evaluate", args.device, quiet=rank != 0) as st:
        r = evaluate(data, teachers[0], args.out, _eval_config(args), device=args.device,
                     progress=not args.quiet and rank == 0, seed=args.seed, workers=args.workers)
        st.info.update(top1=r["distilled"]["mean"], ranks=world)
    if rank != 0:
        return 0
    rr = r["random_real"]
    print(f"{r['method']} IPC {r['ipc']}: student top-1 {r['distilled']['mean']:.2f} ± {r['distilled']['std']:.2f}% | "
          f"teacher {r['teacher_top1']:.2f}%" + (f" | random real {rr['mean']:.2f} ± {rr['std']:.2f}%" if rr else ""))
    return 0


def cmd_report(args, data=None, teachers=None) -> int:
    data = data or _data(args)
    teachers = teachers or _teachers(args, data)
    write_report(args.out, data, teachers[0], k=args.topo_k or 10, seed=args.seed, device=args.device)
    return 0


def cmd_run(args) -> int:
    data = _data(args)
    teachers = _teachers(args, data)
    cmd_distill(args, data, teachers)
    rank, world = rank_world()
    if world > 1 and not torch.distributed.is_initialized():
        logger.info("[run] ranks without a process group: run `reta evaluate` once every rank has finished")
        return 0
    if args.eval_labels == "stored":  # rank 0 relabels, the others wait for the labels
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
    if args.teacher_head and not args.teacher:
        raise ValueError("--teacher-head names a layer of a --teacher; the default teacher's head is its last layer")
    data = _data(args)
    arch = args.arch or default_arch(data)
    if args.teacher or default_teacher_path(data, arch, args.seed).is_file():
        teacher = resolve_teachers(args.teacher, data, device=args.device, seed=args.seed,
                                   weights=args.teacher_weights, arch=arch, heads=args.teacher_head)[0]
    else:  # the step time does not depend on the weights
        model, _ = build_arch(arch, len(data.classes), data.size)
        teacher = Teacher(model, arch, data.classes, data.size, data.mean, data.std)
        logger.info(f"[plan] no teacher yet: timing an untrained {arch} (the step cost does not depend on weights)")
    cfg = _distill_config(args)
    est = calibrate(data, teacher, cfg, device=args.device, steps=args.calibration_steps, gpus=args.gpus)
    print(f"reta plan: {cfg.method} on {data.name}, IPC {cfg.ipc}, teacher {teacher.name}, {args.gpus} device(s) "
          f"like this one ({args.device})")
    print(est.table())
    return 0

