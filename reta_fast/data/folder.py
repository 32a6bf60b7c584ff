"""Minimal data-set helpers with no torchvision dependency: an ImageFolder reader that skips
unreadable files with a count, and conversion of dataset items to float image tensors."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

__all__ = ["ImageFolder", "to_image_tensor", "dataset_targets", "dataset_classes"]


class ImageFolder:
    """``root/<class>/<image>`` (ImageNet's WNID folders work unchanged); classes sorted by name.

    Items are ``(PIL.Image in RGB, class index)``. Files that cannot be decoded raise on access;
    :func:`reta_fast.PatchPool.build` skips and counts them.
    """

    def __init__(self, root):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data folder {str(self.root)!r} does not exist or is not a folder")
        self.classes: List[str] = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        if not self.classes:
            raise ValueError(f"data folder {str(self.root)!r} has no class sub-folders")
        self.samples: List[Tuple[str, int]] = []
        for i, c in enumerate(self.classes):
            for dirpath, _, files in os.walk(self.root / c, followlinks=False):
                for f in sorted(files):
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, f), i))
        self.samples.sort()
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image

        path, target = self.samples[i]
        with Image.open(path) as im:
            return im.convert("RGB"), target


def to_image_tensor(img) -> torch.Tensor:
    """A PIL image, ``[C, H, W]``/``[H, W]`` tensor or ``[H, W, C]`` array as float ``[3, H, W]`` in [0, 1]."""
    if isinstance(img, torch.Tensor):
        t = img
    elif isinstance(img, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(img))
        t = t.permute(2, 0, 1) if t.dim() == 3 else t
    else:  # PIL
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        t = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3:
        raise ValueError(f"image must be [C, H, W], got shape {tuple(t.shape)}")
    if t.is_floating_point():
        t = t.float()
        if t.numel() and (float(t.min()) < -0.05 or float(t.max()) > 1.05):
            raise ValueError(f"a float image has values in [{float(t.min()):.3g}, {float(t.max()):.3g}]: images must "
                             f"be in [0, 1] (ToTensor, no Normalize: reta_fast normalises with its own mean/std) or "
                             f"uint8 in [0, 255]")
    else:
        t = t.float() / 255.0
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    elif t.shape[0] != 3:
        raise ValueError(f"images must have 1 or 3 channels, got {t.shape[0]}")
    return t


def dataset_targets(dataset) -> Optional[List[int]]:
    """Labels without decoding images when the data set exposes them (``targets``/``labels``)."""
    for name in ("targets", "labels"):
        t = getattr(dataset, name, None)
        if t is not None and len(t) == len(dataset):
            return [int(v) for v in (t.tolist() if hasattr(t, "tolist") else t)]
    return None


def dataset_classes(dataset, targets: Optional[List[int]]) -> List[str]:
    classes = getattr(dataset, "classes", None)
    if classes:
        return [str(c) for c in classes]
    if targets:
        return [str(i) for i in range(max(targets) + 1)]
    raise ValueError("the data set has neither .classes nor .targets: pass classes=[...]")
