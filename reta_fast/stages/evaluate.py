"""The evaluate stage (docs/method.md §5): train students from scratch on the distilled set and on a random
real subset of the same size, report their top-1 with the teacher's, in ``eval.json``."""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from ..data.sets import fits_in_memory, materialize, random_real_images, require_val
from ..fileio import read_json, write_json
from ..models.arch import build_arch, default_arch
from ..train.classifier import accuracy, dist_world
from ..train.student import train_student
from .config import EvalConfig
from .output import load_distilled
from .relabel import stored_labels

__all__ = ["evaluate"]

logger = logging.getLogger(__name__)


def _student(name: Optional[str], data, teacher_name: str):
    arch = name or (teacher_name if teacher_name == "resnet18" or teacher_name.startswith("convnet")
                    else default_arch(data))
    return build_arch(arch, len(data.classes), data.size)[0], arch


def evaluate(data, teacher, out, ecfg: EvalConfig, device="cpu", progress: bool = True,
             ipc: Optional[int] = None, seed: int = 0, workers: int = 0) -> dict:
    """Train a student from scratch on the distilled set of ``out`` for every seed of ``ecfg`` and
    report its top-1 on ``data.val``, with the teacher's top-1 and (``ecfg.baseline``) the random
    real subset at the same IPC trained with the same protocol and seeds. Writes ``eval.json``.

    In a torch.distributed process group (``torchrun ... reta evaluate``) every rank calls it: each
    student is trained with DDP and scored on a share of the validation images; rank 0 writes."""
    ecfg.validate()
    out = Path(out)
    x, y, ids = load_distilled(out, data.classes, data.mean, data.std, data.size, raw=True)  # uint8: 1/4 the memory
    counts = torch.bincount(y, minlength=len(data.classes))
    run = read_json(out / "run.json", "run manifest") if (out / "run.json").is_file() else {}
    ipc = ipc or (run.get("config") or {}).get("ipc") or int(counts.max())
    if int(counts.min()) < ipc:
        missing = [data.classes[c] for c in range(len(data.classes)) if counts[c] < ipc][:5]
        raise ValueError(f"the distilled set in {str(out)!r} is incomplete: classes {missing} have fewer than {ipc} "
                         f"images (finish `reta distill` first)")
    require_val(data, "evaluate (the students' accuracy)")
    val = data.val
    if fits_in_memory(val, data.size):
        val, _ = materialize(val, data.size, progress=progress, what="val images")
    acc_kw = dict(mean=data.mean, std=data.std, device=device, size=data.size, workers=workers)
    teacher.model.to(device).eval()
    t_acc = teacher.accuracy if teacher.accuracy is not None else accuracy(teacher.model, val, **acc_kw)
    sets = {"distilled": x}
    if ecfg.baseline:
        rr = random_real_images(data, ipc, seed)
        sets["random-real"] = torch.stack([rr[(c, i)] for c in range(len(data.classes)) for i in range(ipc)])
    res: Dict[str, List[float]] = {k: [] for k in sets}
    for name, imgs in sets.items():
        for s in ecfg.seeds:
            torch.manual_seed(s)  # the student's initial weights are a function of the seed too
            student, arch = _student(ecfg.student, data, teacher.name)
            soft = None
            if ecfg.labels == "stored" and name == "distilled":
                soft = stored_labels(out, s, ecfg, ids, data.flip, len(data.classes), teacher.model)
            student = train_student(student, None if soft is not None else teacher.model, imgs,
                                    epochs=ecfg.epochs, batch_size=ecfg.batch_size, lr=ecfg.lr,
                                    weight_decay=ecfg.weight_decay, temperature=ecfg.temperature, cutmix=ecfg.cutmix,
                                    crop_scale=ecfg.crop_scale, flip=data.flip, device=device, seed=s,
                                    progress=progress, soft_labels=soft, mean=data.mean, std=data.std)
            acc = accuracy(student, val, **acc_kw)
            res[name].append(acc)
            logger.info(f"[evaluate] {name} (IPC {ipc}) student {arch}, seed {s}: top-1 {acc:.2f}%")

    def stat(v):
        return dict(mean=float(np.mean(v)), std=float(np.std(v)), runs=[float(a) for a in v])

    result = dict(method=run.get("method", "unknown"), ipc=ipc, student=arch, teacher=teacher.name,
                  teacher_top1=float(t_acc), distilled=stat(res["distilled"]),
                  random_real=stat(res["random-real"]) if "random-real" in res else None,
                  protocol=dict(asdict(ecfg), crop_scale=list(ecfg.crop_scale), seeds=list(ecfg.seeds), flip=data.flip),
                  val_images=len(data.val))
    rank, world = dist_world()
    if world > 1:  # students trained with DDP (see train_student)
        result["distributed"] = dict(ranks=world, batchnorm="sync" if torch.device(device).type == "cuda"
                                     else "per-rank share of each batch")
    if rank == 0:
        write_json(out / "eval.json", result)
    return result
