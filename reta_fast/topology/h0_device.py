"""H0 persistence on the device: Borůvka's minimum spanning forest with tensor ops only.

The H0 death edges of a flag filtration are exactly the edges of the minimum spanning forest under
the filtration order (length, edge index) — the edges Kruskal's union-find would merge with. With
that strict total order the forest is unique, so Borůvka's rounds (every component takes its
cheapest outgoing edge, components hook along them, pointer jumping flattens the trees) find the
same edges as the native union-find, on any device and in a fixed number of steps:
``ceil(log2(n_max)) + 1`` rounds of ``ceil(log2(N)) + 1`` jumps. :func:`h0_forest_mask` has no host
synchronisation at all (it can run inside a captured CUDA graph); :func:`reta_fast.topology.pairs.persistence_pairs` (``backend="device"``) adds the
variable-size gather into :class:`reta_fast.PersistencePairs` (one synchronisation for the sizes).
"""
from __future__ import annotations

import math

import torch

__all__ = ["h0_forest_mask"]


def h0_forest_mask(u: torch.Tensor, v: torch.Tensor, rank: torch.Tensor, num_nodes_total: int,
                   max_nodes: int) -> torch.Tensor:
    """``[E]`` bool: the minimum spanning forest of the graph with global endpoints ``u``, ``v``
    ``[E]`` (int64) under the strict order ``rank`` ``[E]`` (a permutation of ``0..E-1``);
    ``max_nodes`` bounds the size of a connected component (rounds needed)."""
    E, N = u.numel(), int(num_nodes_total)
    dev = u.device
    mst = torch.zeros(E, dtype=torch.bool, device=dev)
    if E == 0 or N == 0:
        return mst
    order = torch.empty_like(rank)
    order[rank] = torch.arange(E, device=dev)
    ar = torch.arange(N, device=dev)
    comp = ar.clone()
    inf = torch.full((), E, dtype=rank.dtype, device=dev)
    jumps = max(1, math.ceil(math.log2(max(N, 2)))) + 1
    for _ in range(max(1, math.ceil(math.log2(max(max_nodes, 2)))) + 1):
        cu, cv = comp[u], comp[v]
        key = torch.where(cu != cv, rank, inf)
        best = torch.full((N,), E, dtype=rank.dtype, device=dev)
        best = best.scatter_reduce(0, cu, key, "amin").scatter_reduce(0, cv, key, "amin")
        has = best < E  # a component (root label) with an outgoing edge
        e = order[best.clamp(max=E - 1)]
        mst |= torch.zeros(E, dtype=torch.int32, device=dev).index_add_(0, e, has.to(torch.int32)) > 0
        other = torch.where(comp[u[e]] == ar, comp[v[e]], comp[u[e]])
        parent = torch.where(has, other, ar)
        # with distinct keys the only cycles are pairs that chose the same edge: the smaller id roots it
        pp = parent[parent]
        parent = torch.where((pp == ar) & (ar < parent), ar, parent)
        for _ in range(jumps):
            parent = parent[parent]
        comp = parent[comp]
    return mst


