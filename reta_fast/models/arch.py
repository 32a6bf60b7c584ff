"""The architectures reta_fast trains itself (teachers and students), by name."""
from __future__ import annotations

import re
from typing import Optional, Tuple

from torch import nn

from . import nets

__all__ = ["build_arch", "default_arch"]


def default_arch(data) -> str:
    """ConvNet-BN for the embedded digits (seconds on a CPU), ResNet-18 otherwise (CIFAR stem <= 64 px)."""
    return "convnet" if data.name == "digits" else "resnet18"


def build_arch(arch: str, num_classes: int, size: int, kwargs: Optional[dict] = None) -> Tuple[nn.Module, dict]:
    """A fresh ``convnet`` (ConvNet-BN) or ``resnet18`` (CIFAR stem up to 64 px); ``kwargs`` as stored
    in a checkpoint override the size-based defaults."""
    if kwargs is not None and (arch.startswith("convnet") or arch == "resnet18"):
        return (nets.resnet18 if arch == "resnet18" else nets.convnet_bn)(**kwargs), dict(kwargs)
    wide = re.fullmatch(r"convnet-w(\d+)", arch)
    if arch == "convnet" or wide:
        width = int(wide.group(1)) if wide else (32 if size <= 16 else 64)
        kw = dict(num_classes=num_classes, width=width, depth=2 if size <= 16 else 3)
        return nets.convnet_bn(**kw), kw
    if arch == "resnet18":
        kw = dict(num_classes=num_classes, cifar_stem=size <= 64)
        return nets.resnet18(**kw), kw
    raise ValueError(f"unknown teacher architecture {arch!r}: use convnet, convnet-w<width>, resnet18, "
                     f"torchvision:<name> or timm:<name>")
