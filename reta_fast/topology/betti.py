"""Betti curves of point sets, and the distance between two families of them: the paper's diagnostic of the
pull-to-anchor effect (docs/method.md §4.9): a synthetic Betti-0 curve shifted left (components merging
early) and a suppressed Betti-1 curve (lost loops), measured against the real set's."""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F

from .diagrams import persistence_diagrams

__all__ = ["betti_curves", "betti_distance", "ESSENTIAL_CAP"]

#: death of classes that never die, above every distance of L2-normalised features (<= 2)
ESSENTIAL_CAP = 2.5


@torch.no_grad()
def betti_curves(points: torch.Tensor, k: int, grid: torch.Tensor, mean: bool = True) -> Dict[str, np.ndarray]:
    """Betti-0 and Betti-1 curves of the point sets ``points`` ``[C, m, D]`` (L2-normalised first), of the
    mutual k-NN flag complex filtered by edge length, sampled at ``grid`` ``[T]``: ``[T]`` means over the
    sets, or ``[C, T]`` per set with ``mean=False``."""
    pts = F.normalize(points.float(), dim=-1)
    dg = persistence_diagrams(pts, min(k, pts.shape[1] - 1), maxdim=1, essential=ESSENTIAL_CAP)
    t = grid.view(1, -1).cpu()
    C = pts.shape[0]

    def curve(d, off, dim):
        out = torch.zeros(C, grid.numel())
        bars_all = d.detach().cpu()
        for c in range(C):
            bars = bars_all[off[c]:off[c + 1]]
            if bars.numel():
                alive = (bars[:, :1] <= t) & (t < bars[:, 1:2]) if dim else (t < bars[:, 1:2])
                out[c] = alive.sum(0).float()
        return (out.mean(0) if mean else out).numpy()

    return dict(b0=curve(dg.h0, dg.h0_offsets, 0), b1=curve(dg.h1, dg.h1_offsets, 1))


def betti_distance(real: torch.Tensor, syn: torch.Tensor, k: int, steps: int = 64) -> Dict[str, float]:
    """Mean over sets of the L1 distance between the real and synthetic Betti-0 and Betti-1 curves on
    ``[0, 2]`` (the range of distances of L2-normalised features), each curve divided by the set's size:
    0 for identical topology, up to about 2 for Betti-0."""
    grid = torch.linspace(0, 2, steps)
    a = betti_curves(real, k, grid, mean=False)
    b = betti_curves(syn, k, grid, mean=False)
    dt = float(grid[1] - grid[0])
    return {name: float(np.abs(a[name] - b[name]).sum(1).mean() * dt / real.shape[1]) for name in ("b0", "b1")}
