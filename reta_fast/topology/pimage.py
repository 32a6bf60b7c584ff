"""Differentiable persistence images (Adams et al., JMLR 2017; docs/method.md §4).

A diagram point (b, d) is mapped to (b, p = d - b) and spread by a Gaussian of width ``sigma``
over a fixed grid; each point is weighted by ``w(p) = clamp(p / p_max, 0, 1)``. The grid follows
GUDHI's ``PersistenceImage`` convention so the two can be compared directly: pixel centres are
``linspace(lo, hi, resolution)`` on each axis, rows index persistence and columns birth, and each
Gaussian is normalised to unit mass (``1 / (2 pi sigma^2)``; ``1 / (sqrt(2 pi) sigma)`` in 1-D).

The Gaussian is separable, so the image of a diagram is ``G_p^T diag(w) G_b``: two ``[m, R]``
factors and one matrix product, never an ``[m, R, R]`` temporary.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .segments import segment_ids

__all__ = ["persistence_image", "persistence_image_ref", "batched_images", "gaussian_factors"]


def _axis(lo: float, hi: float, resolution: int, dtype, device) -> torch.Tensor:
    return torch.linspace(lo, hi, resolution, dtype=dtype, device=device)


def _check(diagram, resolution, pers_range, birth_range, sigma):
    if not isinstance(diagram, torch.Tensor):
        raise TypeError(f"diagram must be a torch.Tensor, got {type(diagram).__name__}")
    if not diagram.is_floating_point():
        raise TypeError(f"diagram must be a floating-point tensor, got dtype {diagram.dtype}")
    if diagram.dim() != 2 or diagram.shape[1] != 2:
        raise ValueError(f"diagram must have shape [m, 2] (birth, death), got {tuple(diagram.shape)}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 2:
        raise ValueError(f"resolution must be an integer >= 2, got {resolution!r}")
    for name, r in (("pers_range", pers_range), ("birth_range", birth_range)):
        if r is not None and not (len(r) == 2 and math.isfinite(r[0]) and math.isfinite(r[1]) and r[1] > r[0]):
            raise ValueError(f"{name} must be a finite (lo, hi) with hi > lo, got {r!r}")
    if sigma is not None and not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a positive finite float, got {sigma!r}")
    if diagram.numel() and not bool(torch.isfinite(diagram).all()):
        raise ValueError("diagram contains NaN or infinite values (cap or drop essential classes first)")


def persistence_image(
    diagram: torch.Tensor,
    resolution: int = 32,
    pers_range: Tuple[float, float] = (0.0, 1.0),
    birth_range: Optional[Tuple[float, float]] = (0.0, 1.0),
    sigma: Optional[float] = None,
    p_max: Optional[float] = None,
    offsets: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Persistence image(s) of a diagram, differentiable with respect to the diagram.

    Args:
        diagram: ``[m, 2]`` float (birth, death) points; finite.
        resolution: pixels per axis ``R``.
        pers_range: ``(lo, hi)`` of the persistence axis (first and last pixel centre).
        birth_range: ``(lo, hi)`` of the birth axis, or ``None`` for a 1-D image over persistence
            only (H0 diagrams, whose births are all 0).
        sigma: Gaussian width; default: one pixel spacing of the persistence axis.
        p_max: persistence at which the weight saturates; default ``pers_range[1]``.
        offsets: ``[B + 1]`` int64 boundaries for a batch of diagrams concatenated in ``diagram``.

    Returns:
        ``[R, R]`` (rows: persistence, columns: birth), or ``[R]`` when ``birth_range`` is None;
        with ``offsets``, a leading batch dimension ``B``. Same dtype and device as ``diagram``.
    """
    _check(diagram, resolution, pers_range, birth_range, sigma)
    if sigma is None:
        sigma = (pers_range[1] - pers_range[0]) / (resolution - 1)
    p_max = pers_range[1] if p_max is None else p_max
    if not p_max > 0:
        raise ValueError(f"p_max must be > 0, got {p_max!r}")
    if offsets is None:
        gp, gb = gaussian_factors(diagram, resolution, pers_range, birth_range, sigma, p_max)
        return gp.sum(0) if birth_range is None else gp.T @ gb
    offsets = torch.as_tensor(offsets).cpu()
    if offsets.is_floating_point() or offsets.dim() != 1 or offsets.numel() < 2:
        raise ValueError("offsets must be a 1-D integer sequence [B + 1] with B >= 1")
    offsets = offsets.long()
    if int(offsets[0]) != 0 or int(offsets[-1]) != diagram.shape[0] or bool((offsets.diff() < 0).any()):
        raise ValueError(f"offsets must start at 0, be non-decreasing and end at m={diagram.shape[0]}, "
                         f"got {offsets.tolist()[:8]}")
    B = offsets.numel() - 1
    counts = offsets.diff()
    gid = segment_ids(offsets)
    pos = torch.arange(diagram.shape[0]) - offsets[:-1][gid]
    width = int(counts.max()) if B else 0
    return batched_images(diagram, gid.to(diagram.device), pos.to(diagram.device), B, width, resolution, pers_range,
                          birth_range, sigma, p_max)


def gaussian_factors(diagram, resolution, pers_range, birth_range, sigma, p_max):
    """The separable factors of each point's image: ``[m, R]`` over persistence (weight folded in) and
    ``[m, R]`` over birth (None for a 1-D image)."""
    dt, dev = diagram.dtype, diagram.device
    b, p = diagram[:, 0], diagram[:, 1] - diagram[:, 0]
    w = (p / p_max).clamp(0.0, 1.0)
    gp = torch.exp(-0.5 * ((p[:, None] - _axis(*pers_range, resolution, dt, dev)) / sigma) ** 2)
    gp = gp * (w / (math.sqrt(2 * math.pi) * sigma))[:, None]  # [m, R], weight folded in
    if birth_range is None:
        return gp, None
    gb = torch.exp(-0.5 * ((b[:, None] - _axis(*birth_range, resolution, dt, dev)) / sigma) ** 2)
    return gp, gb / (math.sqrt(2 * math.pi) * sigma)


def batched_images(diagram, gid, pos, B: int, width: int, resolution: int, pers_range, birth_range, sigma: float,
                   p_max: float) -> torch.Tensor:
    """Images ``[B, R, R]`` (``[B, R]`` when ``birth_range`` is None) of ``B`` diagrams stored together:
    point ``r`` of ``diagram`` ``[m, 2]`` belongs to diagram ``gid[r]`` at slot ``pos[r] < width`` (device
    index tensors, so a caller that keeps them pays no host transfer). No checks, no host synchronisation."""
    gp, gb = gaussian_factors(diagram, resolution, pers_range, birth_range, sigma, p_max)
    if gb is None:
        return torch.zeros((B, resolution), dtype=gp.dtype, device=gp.device).index_add(0, gid, gp)
    # Pad each diagram's factors to [B, width, R] and contract with one batched matmul.
    P = torch.zeros((B, width, resolution), dtype=gp.dtype, device=gp.device).index_put((gid, pos), gp)
    G = torch.zeros((B, width, resolution), dtype=gp.dtype, device=gp.device).index_put((gid, pos), gb)
    return torch.bmm(P.transpose(1, 2), G)


def persistence_image_ref(diagram, resolution=32, pers_range=(0.0, 1.0), birth_range=(0.0, 1.0),
                          sigma=None, p_max=None) -> torch.Tensor:
    """Direct evaluation with an explicit ``[m, R, R]`` (or ``[m, R]``) sum; the semantics oracle."""
    if sigma is None:
        sigma = (pers_range[1] - pers_range[0]) / (resolution - 1)
    p_max = pers_range[1] if p_max is None else p_max
    x = diagram.double()
    b, p = x[:, 0], x[:, 1] - x[:, 0]
    w = (p / p_max).clamp(0.0, 1.0)
    up = torch.linspace(*pers_range, resolution, dtype=torch.float64)
    if birth_range is None:
        g = torch.exp(-((p[:, None] - up) ** 2) / (2 * sigma**2)) / (math.sqrt(2 * math.pi) * sigma)
        return (w[:, None] * g).sum(0)
    ub = torch.linspace(*birth_range, resolution, dtype=torch.float64)
    d2 = (p[:, None, None] - up[None, :, None]) ** 2 + (b[:, None, None] - ub[None, None, :]) ** 2
    g = torch.exp(-d2 / (2 * sigma**2)) / (2 * math.pi * sigma**2)
    return (w[:, None, None] * g).sum(0)
