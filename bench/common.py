"""What the benchmark scripts share: inputs (clustered features like a teacher's, fixed seeds) and the
machine's name."""
from __future__ import annotations

import torch

from reta_fast.stages.records import cpu_model  # noqa: F401  (re-exported: the bench scripts name the machine)
from reta_fast.topology import samples


def clustered(b: int, n: int, d: int, device: str = "cpu", seed: int = 0, clusters: int = 8) -> torch.Tensor:
    """``[b, n, d]`` fp32 points around ``clusters`` centres per set, L2-normalised like features."""
    return samples.clustered(b, n, d, seed=seed, clusters=clusters, spread=0.7, normalize=True).to(device)


def graphs(b: int, n: int, d: int, k: int, seed: int = 0):
    """Mutual k-NN graphs of clustered points: (edges, weights, offsets) on the CPU."""
    import reta_fast as rf

    g = rf.mutual_knn_graph(clustered(b, n, d, seed=seed), k)
    return g.edges, g.lengths.detach(), g.offsets
