"""The residual connection of the recover loop (docs/method.md §2): the synthetic image mixed with a
real patch (DRC's retrieved patch, or FADRM's static anchor) at the next block's resolution."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["residual_inject"]


def residual_inject(x: torch.Tensor, patches: torch.Tensor, alpha: float = 0.5,
                    size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """The residual connection of docs/method.md §2: ``alpha * resize(x) + (1 - alpha) * resize(patches)``.

    Args:
        x: ``[N, C, H, W]`` synthetic images.
        patches: ``[N, C, h, w]`` retrieved (or anchor) patches, same normalisation as ``x``.
        alpha: weight of the synthetic image, in ``[0, 1]`` (paper: 0.5).
        size: output ``(H', W')`` (an int means square); default: ``x``'s size.

    Both are resampled bilinearly (antialiased when shrinking). Returns ``[N, C, H', W']`` in
    ``x``'s dtype; differentiable in both inputs.
    """
    for name, t in (("x", x), ("patches", patches)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 4:
            raise ValueError(f"{name} must be a floating-point [N, C, H, W] tensor")
    if x.shape[:2] != patches.shape[:2]:
        raise ValueError(f"x and patches must agree in [N, C], got {tuple(x.shape[:2])} and {tuple(patches.shape[:2])}")
    if x.device != patches.device:
        raise ValueError(f"patches is on {patches.device} but x is on {x.device}")
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if size is None:
        size = tuple(x.shape[2:])
    elif isinstance(size, int):
        size = (size, size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be a positive int or (H, W), got {size!r}")

    def resize(t):
        if tuple(t.shape[2:]) == tuple(size):
            return t
        shrink = t.shape[2] > size[0] or t.shape[3] > size[1]
        # antialiased resampling has no half-precision CPU kernel: resample in fp32 there
        work = t.float() if (shrink and not t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)) else t
        return F.interpolate(work, size=size, mode="bilinear", align_corners=False, antialias=shrink).to(t.dtype)

    return alpha * resize(x) + (1.0 - alpha) * resize(patches.to(x.dtype))
