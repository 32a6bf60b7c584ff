"""The squeeze stage (docs/method.md §1): train a BN teacher on a data set, cache it, and resolve the
``--teacher`` argument (a checkpoint, a library model, a list taking turns, or the cached default)."""
from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Optional

import torch

from ..data.sets import fits_in_memory, materialize, require_val
from ..fileio import cache_dir
from ..models.arch import build_arch, default_arch
from ..models.teachers import Teacher, load_teacher, save_teacher
from ..train.classifier import accuracy, train_classifier

__all__ = ["squeeze", "resolve_teachers", "default_teacher_path", "TEACHER_RECIPE"]

#: bumped whenever the squeeze recipe (training code, defaults) changes what a default teacher is
TEACHER_RECIPE = 2

logger = logging.getLogger(__name__)


def default_teacher_path(data, arch: str, seed: int) -> Path:
    """The cached default teacher: keyed by data set, architecture, seed and ``TEACHER_RECIPE``, so a
    teacher trained by another version's recipe is never taken for this one's."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(data.name).name if os.sep in data.name else data.name).strip("-")
    return cache_dir() / "teachers" / f"{slug or 'data'}-{data.fingerprint}-{arch}-seed{seed}-r{TEACHER_RECIPE}.pt"


def squeeze(data, arch: Optional[str] = None, epochs: Optional[int] = None, batch_size: Optional[int] = None,
            lr: Optional[float] = None, seed: int = 0, device="cpu", out=None, progress: bool = True,
            workers: int = 0) -> Teacher:
    """Train a BN teacher on ``data.train`` (SGD + one-cycle, crop + flip), measure its top-1 on
    ``data.val``, and save the checkpoint atomically to ``out`` (when given).

    Defaults: ConvNet-BN for 30 epochs of batch 64 on digits (1,437 images), ResNet-18 for 30 epochs
    of batch 128 otherwise (lr 0.05).
    """
    arch = arch or default_arch(data)
    epochs = epochs if epochs is not None else 30
    batch_size = batch_size or (64 if data.name == "digits" else 128)
    lr = lr if lr is not None else 0.05
    torch.manual_seed(seed)
    model, kw = build_arch(arch, len(data.classes), data.size)
    train, val = data.train, data.val
    require_val(data, "squeeze (the teacher's accuracy)")
    if fits_in_memory(train, data.size):
        train, _ = materialize(train, data.size, progress=progress, what="train images")
    if fits_in_memory(val, data.size):
        val, _ = materialize(val, data.size, progress=progress, what="val images")
    t0 = time.perf_counter()
    train_classifier(model, train, epochs=epochs, batch_size=batch_size, lr=lr, mean=data.mean, std=data.std,
                     device=device, seed=seed, flip=data.flip, progress=progress, size=data.size, workers=workers)
    acc = accuracy(model, val, mean=data.mean, std=data.std, device=device, size=data.size, workers=workers)
    logger.info(f"[squeeze] {arch} on {data.name}: top-1 {acc:.2f}% on {len(data.val)} val images "
        f"({epochs} epochs, {time.perf_counter() - t0:.1f} s)")
    teacher = Teacher(model.eval(), arch, data.classes, data.size, data.mean, data.std, acc, out)
    if out is not None:
        save_teacher(out, teacher, kw, dataset=data.name, seed=seed, epochs=epochs)
    return teacher


def resolve_teachers(specs, data, device="cpu", seed: int = 0, weights=None, arch=None, epochs=None,
                     progress=True, workers: int = 0, heads=None):
    """``--teacher`` (comma-separated list, round-robin over recover batches as in FADRM+) or, when
    empty, the default teacher for ``data`` squeezed once and cached (keyed by data set, arch, seed).
    ``heads`` (``--teacher-head``): the classifier layer's name, one for every teacher or a comma-separated
    list with one per teacher (an empty entry: that teacher's last nn.Linear or its checkpoint's record)."""
    if heads and not specs:
        raise ValueError("--teacher-head names a layer of a --teacher; the default teacher's head is its last layer")
    if not specs:
        arch = arch or default_arch(data)
        path = default_teacher_path(data, arch, seed)
        if path.is_file():
            t = load_teacher(path, data, device)
            logger.info(f"[squeeze] reusing cached teacher {path} (top-1 {t.accuracy:.2f}%)")
            return [t]
        logger.info(f"[squeeze] no teacher given: training the default {arch} teacher for {data.name} (cached at {path})")
        return [squeeze(data, arch, epochs=epochs, seed=seed, device=device, out=path, progress=progress,
                        workers=workers)]
    specs = [s for s in str(specs).split(",") if s]
    names = str(heads).split(",") if heads else [""]
    if len(names) == 1:
        names = names * len(specs)
    if len(names) != len(specs):
        raise ValueError(f"--teacher-head lists {len(names)} heads for {len(specs)} teachers: give one name for "
                         f"all, or one per teacher (an empty entry keeps that teacher's own)")
    return [load_teacher(s, data, device, weights, head=h.strip() or None) for s, h in zip(specs, names)]
