"""Inputs shared by the benchmark modules (clustered features like a teacher's, fixed seeds)."""
from __future__ import annotations

import torch


def clustered(b: int, n: int, d: int, device: str = "cpu", seed: int = 0, clusters: int = 8) -> torch.Tensor:
    """``[b, n, d]`` fp32 points around ``clusters`` centres per set, L2-normalised like features."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, clusters, d, generator=g)
    idx = torch.randint(0, clusters, (b, n), generator=g)
    x = torch.gather(centres, 1, idx[..., None].expand(b, n, d)) + 0.7 * torch.randn(b, n, d, generator=g)
    return torch.nn.functional.normalize(x, dim=-1).to(device)


def graphs(b: int, n: int, d: int, k: int, seed: int = 0):
    """Mutual k-NN graphs of clustered points: (edges, weights, offsets) on the CPU."""
    import reta_fast as rf

    g = rf.mutual_knn_graph(clustered(b, n, d, seed=seed), k)
    return g.edges, g.lengths.detach(), g.offsets
