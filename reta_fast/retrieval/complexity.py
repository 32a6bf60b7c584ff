"""The complexity proxy of DRC (docs/method.md §3): spatial variance of the squared gradient magnitude of
the Gaussian-smoothed patch, optionally scaled to [0, 1] within each class."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._validate import check_finite, check_labels

__all__ = ["patch_complexity"]


def _gaussian_kernel(sigma: float, dtype, device) -> torch.Tensor:
    radius = int(4.0 * sigma + 0.5)  # scipy.ndimage's truncate=4.0
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def _blur_matrix(n: int, sigma: float, dtype, device) -> torch.Tensor:
    """``[n, n]`` matrix M with ``(v @ M)[j] = sum_k g[k] v[clamp(j + k - r, 0, n - 1)]``: a 1-D
    Gaussian blur with replicated borders (scipy's ``mode="nearest"``)."""
    g = _gaussian_kernel(sigma, torch.float64, "cpu")
    r = (g.numel() - 1) // 2
    j = torch.arange(n)[None, :]
    src = (j + torch.arange(-r, r + 1)[:, None]).clamp(0, n - 1)  # [2r + 1, n]
    m = torch.zeros(n, n, dtype=torch.float64)
    m.index_put_((src.flatten(), j.expand_as(src).flatten()), g[:, None].expand_as(src).flatten(), accumulate=True)
    return m.to(dtype=dtype, device=device)


def patch_complexity(images: torch.Tensor, sigma: float = 1.0, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Complexity proxy ``c(o) = Var_u ||grad (G_sigma * o)(u)||^2`` of each image (docs/method.md §3).

    Args:
        images: ``[N, C, H, W]`` (or ``[C, H, W]``) float tensor, any device; finite.
        sigma: Gaussian smoothing width in pixels (``0``: no smoothing). The kernel is truncated at
            ``int(4 sigma + 0.5)`` pixels and borders are replicated (scipy's ``mode="nearest"``).
        labels: optional ``[N]`` class labels; then the values are min-max scaled to ``[0, 1]``
            within each class (a class whose values are all equal gets 0) [ours], so that the
            retrieval weight ``lam`` is meaningful whatever the data set.

    Returns:
        ``[N]`` float32 (float64 for float64 input). The gradient is ``numpy.gradient``'s (central
        differences inside, one-sided at the borders); ``||.||^2`` sums the channels; ``Var`` is the
        population variance over the ``H x W`` positions.
    """
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError("images must be a floating-point torch.Tensor")
    x = images.unsqueeze(0) if images.dim() == 3 else images
    if x.dim() != 4:
        raise ValueError(f"images must have shape [N, C, H, W] or [C, H, W], got {tuple(images.shape)}")
    if x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"images must be at least 2x2 pixels, got {tuple(x.shape[2:])}")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    check_finite(x, "images")
    x = x if x.dtype == torch.float64 else x.float()
    N, C, H, W = x.shape
    if sigma > 0:
        # Separable blur as two small matrix products with the replicate border folded into the
        # matrices: much faster than single-channel convolutions on the CPU, same result.
        x = torch.matmul(_blur_matrix(H, float(sigma), x.dtype, x.device).T, x)
        x = torch.matmul(x, _blur_matrix(W, float(sigma), x.dtype, x.device))
    gy, gx = torch.gradient(x, dim=(2, 3))
    energy = (gx.pow(2) + gy.pow(2)).sum(1)  # [N, H, W]
    c = energy.flatten(1).var(1, unbiased=False)
    if labels is None:
        return c
    labels = check_labels(labels, N, "labels", device=c.device)
    n_cls = int(labels.max()) + 1 if N else 0
    lo = torch.full((n_cls,), float("inf"), dtype=c.dtype, device=c.device).scatter_reduce(0, labels, c, "amin")
    hi = torch.full((n_cls,), float("-inf"), dtype=c.dtype, device=c.device).scatter_reduce(0, labels, c, "amax")
    span = (hi - lo)[labels]
    return torch.where(span > 0, (c - lo[labels]) / span.clamp_min(torch.finfo(c.dtype).tiny), torch.zeros_like(c))
