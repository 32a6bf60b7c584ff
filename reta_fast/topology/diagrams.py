"""Differentiable persistence diagrams (docs/method.md §4): pairings computed without gradient
(:mod:`reta_fast.topology.pairs`), diagram values gathered from differentiable edge lengths, so gradients
flow to the points through the gather (the pytorch-topological / GUDHI-TF approach).

For point clouds the filtration order comes from the cheap detached weights of
:func:`reta_fast.topology.knn.edge_weights` (exact up to ~1e-7 relative in d^2), and exact differentiable
lengths are computed only at the O(n) edges the diagrams read (:func:`paired_lengths`), so a near-tie may
pair differently than exact arithmetic would, moving a diagram point by at most that rounding error
(stability of persistence).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch

from .._validate import check_points, check_positive_int
from .knn import KNNGraph, edge_lengths, edge_weights, mutual_knn_edges
from .pairs import PersistencePairs, persistence_pairs
from .segments import segment_ids

__all__ = ["PersistenceDiagrams", "persistence_diagrams", "diagrams_from_pairs", "paired_lengths", "cap_edges_of"]


class PersistenceDiagrams(NamedTuple):
    """Differentiable persistence diagrams of a batch of point sets.

    Attributes:
        h0: ``[M0, 2]`` (birth = 0, death) points; essential components appended per graph when
            ``essential`` is not None.
        h0_offsets: ``[B + 1]`` int64 (CPU).
        h1: ``[M1, 2]`` (birth, death) points (essential loops appended per graph likewise).
        h1_offsets: ``[B + 1]`` int64 (CPU).
        graph: the :class:`KNNGraph` the diagrams were computed on; its ``lengths`` are exact and
            differentiable at the edges the diagrams read, and the detached filtration weights of
            :func:`reta_fast.knn.edge_weights` elsewhere.
        pairs: the :class:`PersistencePairs` gathered from.
    """

    h0: torch.Tensor
    h0_offsets: torch.Tensor
    h1: torch.Tensor
    h1_offsets: torch.Tensor
    graph: KNNGraph
    pairs: PersistencePairs


def _with_essential(points, offsets, extra, extra_offsets):
    """Interleave ``extra`` points after each graph's regular points (graph-major order)."""
    B = offsets.numel() - 1
    if extra.shape[0] == 0:
        return points, offsets
    gid = torch.cat([segment_ids(offsets, "cpu"), segment_ids(extra_offsets, "cpu")])
    order = torch.sort(gid, stable=True).indices.to(points.device)
    merged = torch.cat([points, extra])[order]
    counts = offsets.diff() + extra_offsets.diff()
    new_off = torch.zeros(B + 1, dtype=torch.int64)
    new_off[1:] = counts.cumsum(0)
    return merged, new_off


def check_essential(essential) -> None:
    if essential is None or essential == "max":
        return
    if isinstance(essential, bool) or not isinstance(essential, (int, float)) or not (
            math.isfinite(essential) and essential >= 0):
        raise ValueError(f"essential must be None, 'max' or a finite float >= 0, got {essential!r}")


def cap_edges_of(weights: torch.Tensor, edge_offsets: torch.Tensor) -> torch.Tensor:
    """Per graph, the global index of its longest edge by ``weights`` (smallest index among equal
    ones), or -1 for a graph without edges: ``[B]`` int64 on the device of ``weights``."""
    dev = weights.device
    B = edge_offsets.numel() - 1
    gid = segment_ids(edge_offsets, dev)
    top = torch.full((B,), float("-inf"), dtype=weights.dtype, device=dev)
    top = top.scatter_reduce(0, gid, weights, reduce="amax", include_self=True)
    E = weights.numel()
    cand = torch.where(weights == top[gid], torch.arange(E, device=dev), E)
    first = torch.full((B,), E, dtype=torch.int64, device=dev).scatter_reduce(0, gid, cand, reduce="amin")
    return torch.where(first < E, first, -1)


def paired_lengths(points, edges, edge_offsets, weights, pairs: PersistencePairs, cap_edges=None):
    """Edge lengths ``[E]`` for the diagrams: exact and differentiable (difference vectors through
    :func:`reta_fast.edge_lengths`) at every edge the pairings and ``cap_edges`` read, the detached
    ``weights`` elsewhere. Only the O(n) paired edges pay for an ``[*, D]`` gather and its backward.
    """
    dev = points.device
    # the pairings live on the host (as persistence_pairs returns them); caps may be on the device
    parts = [pairs.h0.cpu(), pairs.h1.reshape(-1).cpu(), pairs.h1_essential.cpu()]
    if cap_edges is not None:
        caps = cap_edges.cpu()  # host synchronisation (public path; the PTA loss plans ahead instead)
        parts.append(caps[caps >= 0])
    used = torch.unique(torch.cat(parts)).to(dev)
    gid = segment_ids(edge_offsets, dev)[used]
    exact = edge_lengths(points, edges[used], edge_offsets, graph_ids=gid)
    return weights.detach().to(points.dtype).index_put((used,), exact)


def diagrams_from_pairs(
    lengths: torch.Tensor,
    edge_offsets: torch.Tensor,
    pairs: PersistencePairs,
    essential: Union[None, str, float] = None,
    cap_edges: Optional[torch.Tensor] = None,
):
    """Gather differentiable diagrams from edge ``lengths`` ``[E]`` at integer ``pairs``.

    ``essential`` decides what happens to classes that never die: ``None`` drops them, ``"max"``
    gives them the death value of the longest edge of their graph (differentiable; ``cap_edges``
    ``[B]`` names that edge, default: :func:`cap_edges_of` ``(lengths)``), a float gives that fixed
    death (raised to the birth value where it would fall below it).

    Returns ``(h0 [M0, 2], h0_offsets, h1 [M1, 2], h1_offsets)``.
    """
    check_essential(essential)
    dev = lengths.device
    h0d = lengths[pairs.h0.to(dev)]
    h0 = torch.stack([torch.zeros_like(h0d), h0d], dim=1)
    h1 = lengths[pairs.h1.to(dev)].reshape(-1, 2)
    h0_off, h1_off = pairs.h0_offsets, pairs.h1_offsets
    if essential is None:
        return h0, h0_off, h1, h1_off
    B = edge_offsets.numel() - 1
    if isinstance(essential, str):
        if essential != "max":
            raise ValueError(f"essential must be None, 'max' or a float, got {essential!r}")
        if cap_edges is None:
            cap_edges = cap_edges_of(lengths.detach(), edge_offsets)
        cap_edges = cap_edges.to(dev)
        # Graphs without edges (-1) get a cap of 0: their components are born and die at 0.
        cap = torch.where(cap_edges >= 0, lengths[cap_edges.clamp_min(0)], torch.zeros((), dtype=lengths.dtype, device=dev))
    else:
        cap = torch.full((B,), float(essential), dtype=lengths.dtype, device=dev)
    comps = pairs.components
    c_off = torch.zeros(B + 1, dtype=torch.int64)
    c_off[1:] = comps.cumsum(0)
    ess0_d = cap[segment_ids(c_off, dev)]
    ess0 = torch.stack([torch.zeros_like(ess0_d), ess0_d], dim=1)
    h0, h0_off = _with_essential(h0, h0_off, ess0, c_off)
    eb = lengths[pairs.h1_essential.to(dev)]
    ed = torch.maximum(cap[segment_ids(pairs.h1_essential_offsets, dev)], eb)
    h1, h1_off = _with_essential(h1, h1_off, torch.stack([eb, ed], dim=1), pairs.h1_essential_offsets)
    return h0, h0_off, h1, h1_off


def persistence_diagrams(
    points: torch.Tensor,
    k: int,
    maxdim: int = 1,
    essential: Union[None, str, float] = None,
    knn_backend: str = "auto",
    backend: str = "auto",
) -> PersistenceDiagrams:
    """Differentiable H0/H1 diagrams of the mutual k-NN flag complex of each point set.

    Args:
        points: ``[n, d]`` or ``[b, n, d]`` finite float tensor (may require grad).
        k: mutual k-NN parameter (``>= n - 1``: complete graph).
        maxdim: 0 or 1.
        essential: treatment of never-dying classes (see :func:`diagrams_from_pairs`).
        knn_backend / backend: backends of :func:`mutual_knn_graph` / :func:`persistence_pairs`.

    Returns:
        :class:`PersistenceDiagrams`; ``h0``/``h1`` are ``[M, 2]`` (birth, death) in the dtype of
        ``points`` with gradients flowing to ``points``.
    """
    pts = check_points(points)
    k = check_positive_int(k, "k")
    check_essential(essential)
    edges, offsets = mutual_knn_edges(pts, k, backend=knn_backend)
    weights = edge_weights(pts, edges, offsets)
    pairs = persistence_pairs(edges, weights, pts.shape[1], maxdim=maxdim, offsets=offsets, backend=backend)
    caps = cap_edges_of(weights, offsets) if essential == "max" else None
    lengths = paired_lengths(pts, edges, offsets, weights, pairs, caps)
    h0, h0_off, h1, h1_off = diagrams_from_pairs(lengths, offsets, pairs, essential, caps)
    return PersistenceDiagrams(h0, h0_off, h1, h1_off, KNNGraph(edges, lengths, offsets, pts.shape[1]), pairs)
