"""Teachers: the squeeze stage (train a BN teacher on a data set), teacher checkpoints, and loading a
teacher by path or by name from torchvision / timm.

A reta_fast teacher checkpoint is a ``torch.save`` dict::

    {"format": 1, "arch": "resnet18" | "convnet" | "torchvision:<name>" | "timm:<name>",
     "arch_kwargs": {...}, "state_dict": {...}, "classes": [...], "size": int, "mean": [...],
     "std": [...], "dataset": str, "seed": int, "accuracy": float | None, "epochs": int}

It records the class order and the normalisation, so a teacher is never used with the wrong ones.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import nn

from . import models
from .fileio import save_torch

__all__ = ["Teacher", "build_arch", "default_arch", "squeeze", "load_teacher", "save_teacher", "cache_dir",
           "default_teacher_path"]

TEACHER_FORMAT = 1


class Teacher:
    """A frozen teacher network with the metadata the pipeline needs.

    Attributes: ``model`` (eval mode), ``name`` (arch), ``classes``, ``size``, ``mean``, ``std``,
    ``accuracy`` (top-1 % on the validation split when known), ``path`` (checkpoint, if any).
    """

    def __init__(self, model: nn.Module, name: str, classes, size: int, mean, std, accuracy=None, path=None):
        self.model, self.name = model.eval(), name
        self.classes, self.size = list(classes), int(size)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.accuracy, self.path = accuracy, path

    def __repr__(self) -> str:
        acc = f", top-1 {self.accuracy:.2f}%" if self.accuracy is not None else ""
        return f"Teacher({self.name}, {len(self.classes)} classes, {self.size} px{acc})"


def cache_dir() -> Path:
    """``$RETA_FAST_CACHE`` or ``~/.cache/reta_fast``."""
    return Path(os.environ.get("RETA_FAST_CACHE", Path.home() / ".cache" / "reta_fast"))


def default_arch(data) -> str:
    """ConvNet-BN for the embedded digits (seconds on a CPU), ResNet-18 otherwise (CIFAR stem <= 64 px)."""
    return "convnet" if data.name == "digits" else "resnet18"


def build_arch(arch: str, num_classes: int, size: int, kwargs: Optional[dict] = None) -> Tuple[nn.Module, dict]:
    """A fresh ``convnet`` (ConvNet-BN) or ``resnet18`` (CIFAR stem up to 64 px); ``kwargs`` as stored
    in a checkpoint override the size-based defaults."""
    if kwargs is not None and (arch.startswith("convnet") or arch == "resnet18"):
        return (models.resnet18 if arch == "resnet18" else models.convnet_bn)(**kwargs), dict(kwargs)
    wide = re.fullmatch(r"convnet-w(\d+)", arch)
    if arch == "convnet" or wide:
        width = int(wide.group(1)) if wide else (32 if size <= 16 else 64)
        kw = dict(num_classes=num_classes, width=width, depth=2 if size <= 16 else 3)
        return models.convnet_bn(**kw), kw
    if arch == "resnet18":
        kw = dict(num_classes=num_classes, cifar_stem=size <= 64)
        return models.resnet18(**kw), kw
    raise ValueError(f"unknown teacher architecture {arch!r}: use convnet, convnet-w<width>, resnet18, "
                     f"torchvision:<name> or timm:<name>")


def default_teacher_path(data, arch: str, seed: int) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(data.name).name if os.sep in data.name else data.name).strip("-")
    return cache_dir() / "teachers" / f"{slug or 'data'}-{data.fingerprint}-{arch}-seed{seed}.pt"


def save_teacher(path, teacher: Teacher, arch_kwargs: dict, **meta) -> Path:
    ckpt = dict(format=TEACHER_FORMAT, arch=teacher.name, arch_kwargs=arch_kwargs,
                state_dict={k: v.detach().cpu() for k, v in teacher.model.state_dict().items()},
                classes=teacher.classes, size=teacher.size, mean=list(teacher.mean), std=list(teacher.std),
                accuracy=teacher.accuracy, **meta)
    return save_torch(path, ckpt)


def squeeze(data, arch: Optional[str] = None, epochs: Optional[int] = None, batch_size: Optional[int] = None,
            lr: Optional[float] = None, seed: int = 0, device="cpu", out=None, progress: bool = True,
            workers: int = 0, log=print) -> Teacher:
    """Train a BN teacher on ``data.train`` (SGD + one-cycle, crop + flip), measure its top-1 on
    ``data.val``, and save the checkpoint atomically to ``out`` (when given).

    Defaults: ConvNet-BN for 30 epochs of batch 64 on digits (1,437 images), ResNet-18 for 30 epochs
    of batch 128 otherwise (lr 0.05).
    """
    from .datasets import fits_in_memory, materialize
    from .train import accuracy, train_classifier

    arch = arch or default_arch(data)
    epochs = epochs if epochs is not None else 30
    batch_size = batch_size or (64 if data.name == "digits" else 128)
    lr = lr if lr is not None else 0.05
    torch.manual_seed(seed)
    model, kw = build_arch(arch, len(data.classes), data.size)
    train, val = data.train, data.val
    if fits_in_memory(train, data.size):
        train, _ = materialize(train, data.size, progress=progress, what="train images")
    if fits_in_memory(val, data.size):
        val, _ = materialize(val, data.size, progress=progress, what="val images")
    t0 = time.perf_counter()
    train_classifier(model, train, epochs=epochs, batch_size=batch_size, lr=lr, mean=data.mean, std=data.std,
                     device=device, seed=seed, flip=data.flip, progress=progress, size=data.size, workers=workers)
    acc = accuracy(model, val, mean=data.mean, std=data.std, device=device, size=data.size, workers=workers)
    log(f"[squeeze] {arch} on {data.name}: top-1 {acc:.2f}% on {len(data.val)} val images "
        f"({epochs} epochs, {time.perf_counter() - t0:.1f} s)")
    teacher = Teacher(model.eval(), arch, data.classes, data.size, data.mean, data.std, acc, out)
    if out is not None:
        save_teacher(out, teacher, kw, dataset=data.name, seed=seed, epochs=epochs)
    return teacher


def load_teacher(spec, data=None, device="cpu", weights: Optional[str] = None) -> Teacher:
    """A teacher from a reta_fast checkpoint path, or ``torchvision:<name>`` / ``timm:<name>``
    (``weights``: a state-dict file, or torchvision's ``DEFAULT``; the class order is then the data
    set's, which must have as many classes as the model's head).

    Raises ValueError naming the problem for an unreadable checkpoint, a class order or image size
    that differs from ``data``'s, or a model without BatchNorm / Linear head where one is needed.
    """
    spec = str(spec)
    if spec.startswith(("torchvision:", "timm:")):
        return _named_teacher(spec, data, device, weights)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"teacher {spec!r} is neither a checkpoint file nor torchvision:<name> / timm:<name>")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        arch, kw, sd = ckpt["arch"], ckpt["arch_kwargs"], ckpt["state_dict"]
        classes, size, mean, std = ckpt["classes"], ckpt["size"], ckpt["mean"], ckpt["std"]
    except Exception as exc:  # noqa: BLE001 - any unpickling/key problem means "not a teacher checkpoint"
        raise ValueError(f"teacher checkpoint {str(path)!r} is unreadable or not a reta_fast teacher: {exc!r}") from None
    if arch.startswith(("torchvision:", "timm:")):
        model = _named_model(arch, len(classes), None)
    else:
        model, _ = build_arch(arch, len(classes), size, kw)
    try:
        model.load_state_dict(sd)
    except RuntimeError as exc:
        raise ValueError(f"teacher checkpoint {str(path)!r} does not fit architecture {arch}: {exc}") from None
    if data is not None:
        _check_against(data, classes, size, str(path))
    return Teacher(model.to(device).eval(), arch, classes, size, mean, std, ckpt.get("accuracy"), path)


def _check_against(data, classes, size, what):
    if list(map(str, classes)) != list(data.classes):
        raise ValueError(f"teacher {what} was trained with classes {list(classes)[:5]}... but the data set has "
                         f"{list(data.classes)[:5]}...: a wrong class order silently ruins a distilled set")
    if int(size) != int(data.size):
        raise ValueError(f"teacher {what} expects {size} px images, the data set is read at {data.size} px: "
                         f"pass --size {size}")


def _named_model(spec: str, num_classes: int, weights: Optional[str]) -> nn.Module:
    lib, name = spec.split(":", 1)
    if lib == "torchvision":
        try:
            import torchvision
        except ImportError:
            raise ImportError(f"teacher {spec!r} needs torchvision (pip install torchvision)") from None
        try:
            if weights == "DEFAULT":
                return torchvision.models.get_model(name, weights="DEFAULT")
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        except (ValueError, KeyError) as exc:
            raise ValueError(f"torchvision has no model {name!r}: {exc}") from None
        except (OSError, RuntimeError) as exc:  # download failed
            raise ValueError(f"could not fetch torchvision weights for {name!r}: {exc}; pass --teacher-weights "
                               f"FILE") from None
    try:
        import timm
    except ImportError:
        raise ImportError(f"teacher {spec!r} needs timm (pip install timm)") from None
    try:
        return timm.create_model(name, pretrained=weights == "DEFAULT", num_classes=num_classes)
    except (RuntimeError, OSError) as exc:
        raise ValueError(f"could not create timm model {name!r}: {exc}") from None


def _named_teacher(spec, data, device, weights) -> Teacher:
    if data is None:
        raise ValueError(f"teacher {spec!r} needs the data set (class order, image size)")
    if weights is None:
        raise ValueError(f"teacher {spec!r} needs --teacher-weights FILE (or DEFAULT for the library's pretrained "
                         f"weights): a randomly initialised teacher cannot distil anything")
    model = _named_model(spec, len(data.classes), weights)
    if weights not in (None, "DEFAULT"):
        try:
            sd = torch.load(weights, map_location="cpu", weights_only=True)
            sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
            model.load_state_dict(sd)
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            raise ValueError(f"teacher weights {weights!r} could not be loaded into {spec}: {exc}") from None
    head = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if head and head[-1].out_features != len(data.classes):
        raise ValueError(f"teacher {spec} predicts {head[-1].out_features} classes, the data set has "
                         f"{len(data.classes)}")
    return Teacher(model.to(device).eval(), spec, data.classes, data.size, data.mean, data.std, None, None)


def resolve_teachers(specs, data, device="cpu", seed: int = 0, weights=None, arch=None, epochs=None,
                     progress=True, log=print, workers: int = 0):
    """``--teacher`` (comma-separated list, round-robin over recover batches as in FADRM+) or, when
    empty, the default teacher for ``data`` squeezed once and cached (keyed by data set, arch, seed)."""
    if not specs:
        arch = arch or default_arch(data)
        path = default_teacher_path(data, arch, seed)
        if path.is_file():
            t = load_teacher(path, data, device)
            log(f"[squeeze] reusing cached teacher {path} (top-1 {t.accuracy:.2f}%)")
            return [t]
        log(f"[squeeze] no teacher given: training the default {arch} teacher for {data.name} (cached at {path})")
        return [squeeze(data, arch, epochs=epochs, seed=seed, device=device, out=path, progress=progress, log=log,
                        workers=workers)]
    out = []
    for s in [s for s in str(specs).split(",") if s]:
        out.append(load_teacher(s, data, device, weights))
    return out
