"""The relabel stage (docs/method.md §1): stored FKD-style soft labels per evaluation seed, streamed to
``labels/seed*.npy`` (+ ``.json``), and the tensor export ``export.pt``."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..data.tensors import normalise_pixels
from ..fileio import save_torch
from ..models.features import teacher_fingerprint
from ..train.labels import StoredLogits, write_logits
from ..train.student import relabel_batches
from .config import EvalConfig
from .output import load_distilled

__all__ = ["relabel_stage", "stored_labels"]

logger = logging.getLogger(__name__)


def relabel_stage(data, teacher, out, ecfg: EvalConfig, device="cpu", progress: bool = True) -> dict:
    """Stored soft labels for every evaluation seed (``labels/seed{s}.npy`` + ``.json``: the teacher's fp16
    logits for each augmented batch the student protocol draws, streamed to disk, see
    :mod:`reta_fast.train.labels`) and the tensor export ``export.pt`` (uint8 images, targets, classes,
    mean/std and the teacher's logits on the un-augmented images)."""
    ecfg.validate()
    out = Path(out)
    u8, y, ids = load_distilled(out, data.classes, data.mean, data.std, data.size, raw=True)
    teacher.model.to(device).eval()
    info = dict(images=len(y), seeds=list(ecfg.seeds))
    for s in ecfg.seeds:
        path = out / "labels" / f"seed{s}.npy"
        meta = dict(_label_settings(ecfg, len(y), data.flip), seed=s, ids=[list(i) for i in ids],
                    teacher=teacher_fingerprint(teacher.model))
        rows = ecfg.epochs * len(y)
        write_logits(path, relabel_batches(teacher.model, u8, epochs=ecfg.epochs, batch_size=ecfg.batch_size,
                                           crop_scale=ecfg.crop_scale, flip=data.flip, cutmix=ecfg.cutmix, seed=s,
                                           device=device, progress=progress, mean=data.mean, std=data.std),
                     rows=rows, classes=len(data.classes), meta=meta)
        logger.info(f"[relabel] ({rows}, {len(data.classes)}) fp16 logits for seed {s} -> {path}")
    with torch.no_grad():
        plain = torch.cat([teacher.model(normalise_pixels(u8[a:a + 256], data.mean, data.std).to(device)).half().cpu()
                           for a in range(0, len(u8), 256)])
    save_torch(out / "export.pt", dict(images=u8, targets=y, classes=list(data.classes), mean=list(data.mean),
                                       std=list(data.std), soft_labels=plain, ids=ids))
    logger.info(f"[relabel] tensor export {out / 'export.pt'}")
    return info


def _label_settings(ecfg: EvalConfig, n: int, flip: bool) -> dict:
    """What stored soft labels depend on besides the seed: the stream must be replayed exactly."""
    return dict(epochs=ecfg.epochs, batch_size=ecfg.batch_size, n=n, crop_scale=[float(v) for v in ecfg.crop_scale],
                cutmix=bool(ecfg.cutmix), flip=bool(flip))


def stored_labels(out: Path, s: int, ecfg: EvalConfig, ids, flip: bool, classes: int, teacher):
    """The stored soft labels of seed ``s``, checked against everything they depend on: the student
    protocol's settings, the seed, the images (ids, in order), the class count and the teacher."""
    path = out / "labels" / f"seed{s}.npy"
    if not path.is_file():
        older = [p.name for p in (out / "labels").glob(f"seed{s}.*") if p.suffix in (".logits", ".pt")]
        hint = (f" ({older[0]} was written by an older reta_fast in a format this version does not read)"
                if older else "")
        raise FileNotFoundError(f"no stored soft labels {str(path)!r}{hint}: run `reta relabel` with the same "
                                f"evaluation settings first, or use --labels online")
    logits = StoredLogits(path)
    meta = logits.meta
    n = len(ids)
    want = _label_settings(ecfg, n, flip)
    got = {k: meta.get(k) for k in want}
    problems = []
    if got != want:
        problems.append(f"settings {got} vs this evaluation's {want}")
    if meta.get("seed") != s:
        problems.append(f"seed {meta.get('seed')} vs {s}")
    if tuple(logits.shape) != (ecfg.epochs * n, classes):
        problems.append(f"shape {tuple(logits.shape)} vs {(ecfg.epochs * n, classes)}")
    if meta.get("ids") is not None and meta["ids"] != [list(i) for i in ids]:
        problems.append("other images (the set changed since relabel)")
    if meta.get("teacher") is not None and meta["teacher"] != teacher_fingerprint(teacher):
        problems.append("another teacher")
    if problems:
        raise ValueError(f"stored soft labels {str(path)!r} do not match this "
                         f"evaluation ({'; '.join(problems)}): run `reta relabel` again")
    return logits
