"""Images held in memory as tensors: the embedded ``digits`` data set, and pixel normalisation."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["TensorImageDataset", "digits_dataset", "normalise_pixels", "normalise", "denormalise", "channel_stats",
           "IMAGENET_MEAN", "IMAGENET_STD", "DIGITS_MEAN", "DIGITS_STD"]


IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


DIGITS_MEAN = (0.5, 0.5, 0.5)


DIGITS_STD = (0.25, 0.25, 0.25)


class TensorImageDataset:
    """Images held as a tensor ``[N, 3, H, W]`` (uint8, or float in [0, 1]) with ``targets`` and ``classes``;
    items are ``(float [3, H, W] in [0, 1], label)`` like a torchvision data set."""

    def __init__(self, images: torch.Tensor, targets: Sequence[int], classes: Sequence[str]):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
        if len(targets) != images.shape[0]:
            raise ValueError(f"{len(targets)} targets for {images.shape[0]} images")
        self.images, self.targets, self.classes = images, [int(t) for t in targets], [str(c) for c in classes]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        x = self.images[i]
        return (x.float() / 255.0 if not x.is_floating_point() else x.float()), self.targets[i]

    def tensors(self):
        x = self.images
        return (x.float() / 255.0 if not x.is_floating_point() else x.float()), torch.tensor(self.targets)


def digits_dataset(split: str = "train", size: int = 16, test_fraction: float = 0.2, seed: int = 0) -> TensorImageDataset:
    """scikit-learn's 1,797 8x8 digits (shipped with the package, no download) as 3-channel images
    resized to ``size``, split per class into train/test with a fixed seed."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") from exc
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # [N, 1, 8, 8] in [0, 1]
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):  # stratified split
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        test[idx[: int(round(test_fraction * idx.numel()))]] = True
    keep = test if split == "test" else ~test
    x = F.interpolate(x[keep], size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return TensorImageDataset(x.expand(-1, 3, -1, -1).contiguous(), y[keep].tolist(), [str(c) for c in range(10)])


def normalise_pixels(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 pixels ``[N, 3, H, W]`` -> normalised float32 (``(x / 255 - mean) / std``)."""
    return normalise(x.float() / 255.0, mean, std)


def channel_stats(mean, std, device, dims: int = 4):
    """``mean``/``std`` as tensors on ``device`` shaped to broadcast over channels of a ``dims``-D batch (4:
    ``[N, C, H, W]``, 3: ``[C, H, W]``); one small host-to-device copy each."""
    shape = (1, -1, 1, 1) if dims == 4 else (-1, 1, 1)
    return (torch.tensor(mean, dtype=torch.float32).to(device).view(shape),
            torch.tensor(std, dtype=torch.float32).to(device).view(shape))


def normalise(x, mean, std):
    """``(x - mean) / std`` per channel of float pixels in [0, 1] (``[N, C, H, W]`` or ``[C, H, W]``)."""
    m, s = channel_stats(mean, std, x.device, x.dim())
    return (x - m) / s


def denormalise(x, mean, std):
    """The inverse of :func:`normalise`: ``x * std + mean`` per channel."""
    m, s = channel_stats(mean, std, x.device, x.dim())
    return x * s + m
