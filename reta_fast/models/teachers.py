"""Teacher checkpoints: saving a trained teacher, and loading one by path or by name from torchvision / timm
(training one is the squeeze stage, :mod:`reta_fast.stages.squeeze`).

A reta_fast teacher checkpoint is a ``torch.save`` dict::

    {"format": 1, "arch": "resnet18" | "convnet" | "torchvision:<name>" | "timm:<name>",
     "arch_kwargs": {...}, "state_dict": {...}, "classes": [...], "size": int, "mean": [...],
     "std": [...], "dataset": str, "seed": int, "accuracy": float | None, "epochs": int,
     "feature_head": str}  # only where set_feature_head named a head other than the last nn.Linear

It records the class order and the normalisation, so a teacher is never used with the wrong ones, and the
classifier head whose input are the features everything in reta_fast reads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..fileio import save_torch
from .arch import build_arch
from .features import feature_head, named_feature_head, set_feature_head

__all__ = ["Teacher", "load_teacher", "save_teacher", "TEACHER_FORMAT"]

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


def save_teacher(path, teacher: Teacher, arch_kwargs: dict, **meta) -> Path:
    """Write ``teacher`` as a reta_fast checkpoint (the format above; never half-written)."""
    head = named_feature_head(teacher.model)
    if head is not None:
        meta = dict(meta, feature_head=head)
    ckpt = dict(format=TEACHER_FORMAT, arch=teacher.name, arch_kwargs=arch_kwargs,
                state_dict={k: v.detach().cpu() for k, v in teacher.model.state_dict().items()},
                classes=teacher.classes, size=teacher.size, mean=list(teacher.mean), std=list(teacher.std),
                accuracy=teacher.accuracy, **meta)
    return save_torch(path, ckpt)


def load_teacher(spec, data=None, device="cpu", weights: Optional[str] = None,
                 head: Optional[str] = None) -> Teacher:
    """A teacher from a reta_fast checkpoint path, or ``torchvision:<name>`` / ``timm:<name>``
    (``weights``: a state-dict file, or torchvision's ``DEFAULT``; the class order is then the data
    set's, which must have as many classes as the model's head).

    ``head``: the name of the classifier layer (:func:`reta_fast.models.set_feature_head`) where it is not the
    model's last ``nn.Linear``; a checkpoint that recorded one names it again by itself.

    Raises ValueError naming the problem for an unreadable checkpoint, a class order or image size
    that differs from ``data``'s, a head the model lacks or that disagrees with the checkpoint's, or a
    model without BatchNorm / Linear head where one is needed.
    """
    spec = str(spec)
    if spec.startswith(("torchvision:", "timm:")):
        return _named_teacher(spec, data, device, weights, head)
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
    saved = ckpt.get("feature_head")
    if head is not None and saved is not None and head != saved:
        raise ValueError(f"teacher checkpoint {str(path)!r} records the classifier head {saved!r}, not {head!r}: "
                         f"its features are that layer's input (drop --teacher-head, or name {saved!r})")
    _name_head(model, head if head is not None else saved, str(path), len(classes))
    if data is not None:
        _check_against(data, classes, size, str(path))
    return Teacher(model.to(device).eval(), arch, classes, size, mean, std, ckpt.get("accuracy"), path)


def _name_head(model: nn.Module, head: Optional[str], what: str, num_classes: int, pretrained: bool = False) -> None:
    """Name ``model``'s classifier layer (None: its last nn.Linear), refusing a name it lacks, a layer that is
    not an nn.Linear or one that does not predict ``num_classes`` classes, with the layers it could be."""
    if head is not None:
        try:
            set_feature_head(model, head)
        except ValueError as exc:
            linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            raise ValueError(f"teacher {what}: {exc}; its nn.Linear layers: {linears[-8:] or 'none'}") from None
    if head is None and not any(isinstance(m, nn.Linear) for m in model.modules()):
        return  # refused where the features are needed (feature_head says why)
    out = feature_head(model).out_features
    if out != num_classes:
        named = f"its head {head!r}" if head is not None else "its last nn.Linear"
        hint = (" (pretrained weights predict their own classes: train the head on this data set and pass its "
                "weights with --teacher-weights FILE)" if pretrained else
                "" if head is not None else " (if that layer is not the classifier, name the classifier with "
                                            "--teacher-head)")
        raise ValueError(f"teacher {what} predicts {out} classes with {named}, the data set has {num_classes}{hint}")


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


def _named_teacher(spec, data, device, weights, head) -> Teacher:
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
    _name_head(model, head, spec, len(data.classes), pretrained=weights == "DEFAULT")
    return Teacher(model.to(device).eval(), spec, data.classes, data.size, data.mean, data.std, None, None)


