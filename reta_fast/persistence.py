"""Persistence pairings of graph flag complexes, and differentiable diagrams (METHOD.md section 4).

Filtration and tie rule (the native core, the reference and the docs agree on it):

* vertices enter at 0; an edge enters at its weight; edges are ordered by ``(weight, edge index)``;
* a triangle exists iff its three edges do, enters at its longest edge, and triangles are ordered by
  the ranks of their edges ``(max, middle, min)`` compared lexicographically.

Pairings are integer edge indices, computed without gradient. Diagrams are built by gathering the
differentiable edge lengths at those indices, so gradients flow to the points through the gather
(the pytorch-topological / GUDHI-TF approach). For point clouds the filtration order comes from the
cheap detached weights of :func:`reta_fast.knn.edge_weights` (exact up to ~1e-7 relative in d^2), and
exact differentiable lengths are computed only at the O(n) edges the diagrams read
(:func:`paired_lengths`), so a near-tie may pair differently than exact arithmetic would, moving a
diagram point by at most that rounding error (stability of persistence).

* H0: Kruskal with union-find. Each merging edge is the death of a component born at 0. The number
  of components that never merge is returned per graph.
* H1: a cycle is born at a positive edge (one that closes a cycle) and dies at the longest edge of
  the triangle whose reduced boundary has that edge as its pivot. Pairs whose birth and death edge
  coincide (zero persistence, most triangles) are dropped; positive edges that are never paired are
  the essential H1 classes.

With the compiled extension both come from one batched native call (GIL released). Without it the
reference path runs: a Python union-find for H0 (same tie rule, identical output) and GUDHI's
``flag_persistence_generators`` for H1 (identical diagrams; under exactly equal weights GUDHI may
pick a different but equally valid edge for a pair).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from . import _ext
from ._validate import check_points, check_positive_int
from .knn import KNNGraph, edge_lengths, edge_weights, mutual_knn_edges

__all__ = [
    "PersistencePairs",
    "PersistenceDiagrams",
    "persistence_pairs",
    "persistence_pairs_ref",
    "persistence_diagrams",
    "diagrams_from_pairs",
    "paired_lengths",
    "cap_edges_of",
]


class PersistencePairs(NamedTuple):
    """Integer pairings of a batch of graphs (all indices are global edge indices, int64, CPU).

    Attributes:
        h0: ``[M0]`` merging (death) edges, Kruskal order within each graph.
        h0_offsets: ``[B + 1]``; graph ``g`` owns ``h0[h0_offsets[g]:h0_offsets[g+1]]``.
        components: ``[B]`` number of connected components (essential H0 classes) per graph.
        h1: ``[M1, 2]`` (birth edge, death edge) pairs.
        h1_offsets: ``[B + 1]``.
        h1_essential: ``[K1]`` birth edges of H1 classes that never die.
        h1_essential_offsets: ``[B + 1]``.
    """

    h0: torch.Tensor
    h0_offsets: torch.Tensor
    components: torch.Tensor
    h1: torch.Tensor
    h1_offsets: torch.Tensor
    h1_essential: torch.Tensor
    h1_essential_offsets: torch.Tensor


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


# --------------------------------------------------------------------------------------------
# input checks


def _check_graph_input(edges, weights, num_nodes, offsets, per_edge: bool):
    """Check types, shapes, devices, offsets and node counts; with ``per_edge`` also every edge
    (range, self-loops, duplicates) and weight (finite, >= 0). The native core runs the per-edge
    checks itself in one linear pass, with the same messages, so the Python side skips them there.
    """
    if not isinstance(edges, torch.Tensor):
        raise TypeError(f"edges must be a torch.Tensor, got {type(edges).__name__}")
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a torch.Tensor, got {type(weights).__name__}")
    if edges.dtype.is_floating_point or edges.dtype == torch.bool or edges.is_complex():
        raise TypeError(f"edges must be an integer tensor, got dtype {edges.dtype}")
    if not weights.is_floating_point():
        raise TypeError(f"weights must be a floating-point tensor, got dtype {weights.dtype}")
    if edges.device != weights.device:
        raise ValueError(f"edges is on {edges.device} but weights is on {weights.device}")
    if edges.dim() != 2 or edges.shape[1] != 2:
        raise ValueError(f"edges must have shape [E, 2], got {tuple(edges.shape)}")
    if weights.shape != (edges.shape[0],):
        raise ValueError(f"weights must have shape [E] = [{edges.shape[0]}], got {tuple(weights.shape)}")
    if offsets is None:
        offsets_t = torch.tensor([0, edges.shape[0]], dtype=torch.int64)
    else:
        offsets_t = torch.as_tensor(offsets, dtype=torch.int64).cpu()
        if offsets_t.dim() != 1 or offsets_t.numel() < 2:
            raise ValueError("offsets must be a 1-D sequence [B + 1] with B >= 1")
        if offsets_t[0] != 0 or offsets_t[-1] != edges.shape[0] or bool((offsets_t.diff() < 0).any()):
            raise ValueError(
                f"offsets must start at 0, be non-decreasing and end at E={edges.shape[0]}, "
                f"got {offsets_t.tolist()[:8]}..."
            )
    B = offsets_t.numel() - 1
    if isinstance(num_nodes, torch.Tensor):
        if num_nodes.is_floating_point():
            raise TypeError(f"num_nodes must hold integers, got dtype {num_nodes.dtype}")
        nodes = num_nodes.to(torch.int64).cpu().reshape(-1)
    elif isinstance(num_nodes, (list, tuple, np.ndarray)):
        arr = np.asarray(num_nodes)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"num_nodes must hold integers, got dtype {arr.dtype}")
        nodes = torch.as_tensor(arr.astype(np.int64), dtype=torch.int64).reshape(-1)
    else:
        nodes = torch.full((B,), check_positive_int(num_nodes, "num_nodes", 0), dtype=torch.int64)
    if nodes.numel() != B:
        raise ValueError(f"num_nodes has {nodes.numel()} entries but there are {B} graphs")
    if bool((nodes < 0).any()):
        raise ValueError("num_nodes must be >= 0")
    # Host synchronisation: the pairings are computed on the CPU.
    e = edges.detach().to("cpu", torch.int64)
    w = weights.detach().to("cpu", torch.float64)
    if per_edge:
        _check_edges(e, w, offsets_t, nodes)
    return e, w, offsets_t, nodes


def _check_edges(e, w, offsets_t, nodes) -> None:
    """Per-edge checks of the reference path (messages as the native core's)."""
    if not e.numel():
        return
    B = offsets_t.numel() - 1
    gid = torch.repeat_interleave(torch.arange(B), offsets_t.diff())
    hi = nodes[gid]
    desc = lambda i: f"edges[{i}] = ({int(e[i, 0])}, {int(e[i, 1])}) of graph {int(gid[i])}"  # noqa: E731
    bad = (e < 0).any(1) | (e[:, 0] >= hi) | (e[:, 1] >= hi)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{desc(i)} has an endpoint outside [0, {int(hi[i])}) (num_nodes[{int(gid[i])}] = {int(hi[i])})")
    loops = e[:, 0] == e[:, 1]
    if bool(loops.any()):
        raise ValueError(f"{desc(int(loops.nonzero()[0]))} is a self-loop")
    bad_w = ~torch.isfinite(w)
    if bool(bad_w.any()):
        i = int(bad_w.nonzero()[0])
        raise ValueError(f"weights[{i}] = {float(w[i])} (graph {int(gid[i])}) is not finite")
    if bool((w < 0).any()):
        i = int((w < 0).nonzero()[0])
        raise ValueError(f"weights[{i}] = {float(w[i])} (graph {int(gid[i])}) is negative: edge lengths must be >= 0")
    m = int(nodes.max()) + 1
    key = (gid * m + e.min(1).values) * m + e.max(1).values
    if torch.unique(key).numel() != key.numel():
        raise ValueError("edges: duplicate edge within a graph (two edges join the same vertices)")


# --------------------------------------------------------------------------------------------
# reference path


def _h0_ref(e: np.ndarray, w: np.ndarray, lo: int, hi: int, n: int) -> tuple[list[int], int]:
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    deaths = []
    order = np.lexsort((np.arange(lo, hi), w[lo:hi])) + lo  # by (weight, index)
    for idx in order.tolist():
        ra, rb = find(int(e[idx, 0])), find(int(e[idx, 1]))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
            deaths.append(idx)
    return deaths, n - len(deaths)


def _h1_gudhi(e: np.ndarray, w: np.ndarray, lo: int, hi: int, n: int):
    import gudhi

    st = gudhi.SimplexTree()
    for v in range(n):
        st.insert([v], 0.0)
    lookup = {}
    for idx in range(lo, hi):
        a, b = int(e[idx, 0]), int(e[idx, 1])
        st.insert([a, b], float(w[idx]))
        lookup[(min(a, b), max(a, b))] = idx
    st.expansion(2)
    # Z/2 coefficients, as the native core (GUDHI's default field is Z/11: graphs whose H1 has
    # 2-torsion pair differently there).
    st.compute_persistence(homology_coeff_field=2, persistence_dim_max=True, min_persistence=-1.0)
    _, regular, _, essential = st.flag_persistence_generators()

    def edge(a, b):
        return lookup[(min(a, b), max(a, b))]

    pairs = []
    if len(regular) > 0:
        for a, b, c, d in np.asarray(regular[0]).reshape(-1, 4).tolist():
            pb, pd = edge(a, b), edge(c, d)
            if pb != pd:
                pairs.append((pb, pd))
    ess = []
    if len(essential) > 0:
        ess = sorted((edge(a, b) for a, b in np.asarray(essential[0]).reshape(-1, 2).tolist()),
                     key=lambda i: (w[i], i))
    return pairs, ess


def persistence_pairs_ref(edges, weights, num_nodes, maxdim: int = 1, offsets=None) -> PersistencePairs:
    """Reference pairings: Python union-find (H0) and GUDHI (H1); same arguments as
    :func:`persistence_pairs`."""
    e_t, w_t, offsets_t, nodes = _check_graph_input(edges, weights, num_nodes, offsets, per_edge=True)
    return _pairs_reference(e_t.numpy(), w_t.numpy(), offsets_t, nodes, maxdim)


def _pairs_reference(e, w, offsets_t, nodes, maxdim) -> PersistencePairs:
    off = offsets_t.tolist()
    h0, comps, h1, ess = [], [], [], []
    h0_off, h1_off, ess_off = [0], [0], [0]
    for g in range(len(off) - 1):
        n = int(nodes[g])
        d, c = _h0_ref(e, w, off[g], off[g + 1], n)
        h0 += d
        comps.append(c)
        h0_off.append(len(h0))
        if maxdim >= 1:
            p, s = _h1_gudhi(e, w, off[g], off[g + 1], n)
            h1 += p
            ess += s
        h1_off.append(len(h1))
        ess_off.append(len(ess))
    i64 = torch.int64
    return PersistencePairs(
        torch.tensor(h0, dtype=i64),
        torch.tensor(h0_off, dtype=i64),
        torch.tensor(comps, dtype=i64),
        torch.tensor(h1, dtype=i64).reshape(-1, 2),
        torch.tensor(h1_off, dtype=i64),
        torch.tensor(ess, dtype=i64),
        torch.tensor(ess_off, dtype=i64),
    )


# --------------------------------------------------------------------------------------------
# public pairings


def persistence_pairs(
    edges: torch.Tensor,
    weights: torch.Tensor,
    num_nodes: Union[int, Sequence[int], torch.Tensor],
    maxdim: int = 1,
    offsets=None,
    backend: str = "auto",
) -> PersistencePairs:
    """Persistence pairings (integer edge indices, no gradient) of weighted graphs' flag complexes.

    Args:
        edges: ``[E, 2]`` integer tensor; endpoints are local node ids of their graph.
        weights: ``[E]`` finite float tensor (the filtration values of the edges).
        num_nodes: nodes per graph: an int (all graphs) or one per graph.
        maxdim: 0 (components only) or 1 (components and loops).
        offsets: ``[B + 1]`` graph boundaries in ``edges`` (``None``: a single graph).
        backend: ``"auto"`` (native when built), ``"native"`` (raise if missing), ``"reference"``, or
            ``"device"`` (H0 only: Borůvka with tensor ops on the inputs' device,
            :mod:`reta_fast.h0_device`; no copy of the graph to the host).

    Returns:
        :class:`PersistencePairs` (CPU tensors; global edge indices).
    """
    if maxdim not in (0, 1):
        raise ValueError(f"maxdim must be 0 or 1, got {maxdim!r}")
    if backend not in ("auto", "native", "reference", "device"):
        raise ValueError(f"backend must be 'auto', 'native', 'reference' or 'device', got {backend!r}")
    if backend == "device":
        if maxdim != 0:
            raise ValueError("backend='device' computes H0 only: pass maxdim=0 (or another backend for H1)")
        from .h0_device import h0_pairs_device

        return h0_pairs_device(edges, weights, num_nodes, offsets)
    use_native = backend == "native" or (backend == "auto" and _ext.has_native())
    e_t, w_t, offsets_t, nodes = _check_graph_input(edges, weights, num_nodes, offsets, per_edge=not use_native)
    if not use_native:
        return _pairs_reference(e_t.numpy(), w_t.numpy(), offsets_t, nodes, maxdim)
    C = _ext.require_native("persistence_pairs")
    r = C.persistence_pairs(e_t.numpy(), w_t.numpy(), offsets_t.numpy(), nodes.numpy(), maxdim)
    t = torch.from_numpy
    empty = torch.zeros(offsets_t.numel(), dtype=torch.int64)
    if maxdim == 0:
        return PersistencePairs(
            t(r["h0_death_edges"]), t(r["h0_offsets"]), t(r["h0_components"]),
            torch.zeros((0, 2), dtype=torch.int64), empty, torch.zeros(0, dtype=torch.int64), empty,
        )
    return PersistencePairs(
        t(r["h0_death_edges"]), t(r["h0_offsets"]), t(r["h0_components"]),
        t(r["h1_pairs"]).reshape(-1, 2), t(r["h1_offsets"]),
        t(r["h1_essential"]), t(r["h1_essential_offsets"]),
    )


# --------------------------------------------------------------------------------------------
# differentiable diagrams


def _segment_ids(offsets: torch.Tensor, device) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets.diff()).to(device)


def _with_essential(points, offsets, extra, extra_offsets):
    """Interleave ``extra`` points after each graph's regular points (graph-major order)."""
    B = offsets.numel() - 1
    if extra.shape[0] == 0:
        return points, offsets
    gid = torch.cat([_segment_ids(offsets, "cpu"), _segment_ids(extra_offsets, "cpu")])
    order = torch.sort(gid, stable=True).indices.to(points.device)
    merged = torch.cat([points, extra])[order]
    counts = offsets.diff() + extra_offsets.diff()
    new_off = torch.zeros(B + 1, dtype=torch.int64)
    new_off[1:] = counts.cumsum(0)
    return merged, new_off


def _check_essential(essential) -> None:
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
    gid = _segment_ids(edge_offsets, dev)
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
    parts = [pairs.h0, pairs.h1.reshape(-1), pairs.h1_essential]
    if cap_edges is not None:
        parts.append(cap_edges[cap_edges >= 0].cpu())
    used = torch.unique(torch.cat(parts)).to(dev)
    gid = _segment_ids(edge_offsets, dev)[used]
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
    _check_essential(essential)
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
    ess0_d = cap[_segment_ids(c_off, dev)]
    ess0 = torch.stack([torch.zeros_like(ess0_d), ess0_d], dim=1)
    h0, h0_off = _with_essential(h0, h0_off, ess0, c_off)
    eb = lengths[pairs.h1_essential.to(dev)]
    ed = torch.maximum(cap[_segment_ids(pairs.h1_essential_offsets, dev)], eb)
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
    _check_essential(essential)
    edges, offsets = mutual_knn_edges(pts, k, backend=knn_backend)
    weights = edge_weights(pts, edges, offsets)
    pairs = persistence_pairs(edges, weights, pts.shape[1], maxdim=maxdim, offsets=offsets, backend=backend)
    caps = cap_edges_of(weights, offsets) if essential == "max" else None
    lengths = paired_lengths(pts, edges, offsets, weights, pairs, caps)
    h0, h0_off, h1, h1_off = diagrams_from_pairs(lengths, offsets, pairs, essential, caps)
    return PersistenceDiagrams(h0, h0_off, h1, h1_off, KNNGraph(edges, lengths, offsets, pts.shape[1]), pairs)
