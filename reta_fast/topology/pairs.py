"""Persistence pairings of graph flag complexes (docs/method.md §4): integer edge indices, no gradient.

Filtration and tie rule (the native core, the reference and the docs agree on it):

* vertices enter at 0; an edge enters at its weight; edges are ordered by ``(weight, edge index)``;
* a triangle exists iff its three edges do, enters at its longest edge, and triangles are ordered by
  the ranks of their edges ``(max, middle, min)`` compared lexicographically.

* H0: Kruskal with union-find. Each merging edge is the death of a component born at 0. The number
  of components that never merge is returned per graph.
* H1: a cycle is born at a positive edge (one that closes a cycle) and dies at the longest edge of
  the triangle whose reduced boundary has that edge as its pivot. Pairs whose birth and death edge
  coincide (zero persistence, most triangles) are dropped; positive edges that are never paired are
  the essential H1 classes.

With the compiled extension both come from one batched native call (GIL released). Without it the
reference path runs: a Python union-find for H0 (same tie rule, identical output) and GUDHI's
``flag_persistence_generators`` for H1 (identical diagrams; under exactly equal weights GUDHI may
pick a different but equally valid edge for a pair). ``backend="device"`` computes H0 with tensor ops on
the graph's device (:mod:`reta_fast.topology.h0_device`).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import numpy as np
import torch

from .. import _ext
from .._validate import check_positive_int
from .h0_device import h0_forest_mask
from .segments import segment_ids

__all__ = ["PersistencePairs", "persistence_pairs", "persistence_pairs_ref"]


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


# --------------------------------------------------------------------------------------------
# input checks


def _check_graph_input(edges, weights, num_nodes, offsets, per_edge: bool, to_host: bool = True):
    """Check types, shapes, devices, offsets and node counts; with ``per_edge`` also every edge
    (range, self-loops, duplicates) and weight (finite, >= 0). The native core runs the per-edge
    checks itself in one linear pass, with the same messages, so the Python side skips them there.
    Returns ``(edges int64, weights float64, offsets, nodes)``: edges and weights on the host, or with
    ``to_host=False`` where they are (their per-edge checks then cost one host read of five flags).
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
    dest = "cpu" if to_host else edges.device  # host synchronisation when the graph is copied to the host
    e = edges.detach().to(dest, torch.int64)
    w = weights.detach().to(dest, torch.float64)
    if per_edge:
        _check_edges(e, w, offsets_t, nodes)
    return e, w, offsets_t, nodes


def _check_edges(e, w, offsets_t, nodes) -> None:
    """Per-edge checks of the reference and device paths (messages as the native core's), on the edges'
    device: one host read of five flags; only an invalid graph costs more (to name the offending edge)."""
    if not e.numel():
        return
    dev = e.device
    gid = segment_ids(offsets_t, dev)
    hi = nodes.to(dev)[gid]
    bad = (e < 0).any(1) | (e[:, 0] >= hi) | (e[:, 1] >= hi)
    loops = e[:, 0] == e[:, 1]
    m = int(nodes.max()) + 1
    key = torch.sort((gid * m + e.min(1).values) * m + e.max(1).values).values
    flags = torch.stack([bad.any(), loops.any(), (~torch.isfinite(w)).any(), (w < 0).any(),
                         (key[1:] == key[:-1]).any()])
    if not bool(flags.any()):  # host synchronisation: the verdict
        return
    e, w, gid, hi = e.cpu(), w.cpu(), gid.cpu(), hi.cpu()  # an invalid graph: find and name the problem
    bad, loops = bad.cpu(), loops.cpu()
    desc = lambda i: f"edges[{i}] = ({int(e[i, 0])}, {int(e[i, 1])}) of graph {int(gid[i])}"  # noqa: E731
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{desc(i)} has an endpoint outside [0, {int(hi[i])}) (num_nodes[{int(gid[i])}] = {int(hi[i])})")
    if bool(loops.any()):
        raise ValueError(f"{desc(int(loops.nonzero()[0]))} is a self-loop")
    bad_w = ~torch.isfinite(w)
    if bool(bad_w.any()):
        i = int(bad_w.nonzero()[0])
        raise ValueError(f"weights[{i}] = {float(w[i])} (graph {int(gid[i])}) is not finite")
    if bool((w < 0).any()):
        i = int((w < 0).nonzero()[0])
        raise ValueError(f"weights[{i}] = {float(w[i])} (graph {int(gid[i])}) is negative: edge lengths must be >= 0")
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
            :mod:`reta_fast.topology.h0_device`; no copy of the graph to the host, see
            ``h0_pairs_device``).

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


def h0_pairs_device(edges: torch.Tensor, weights: torch.Tensor, num_nodes, offsets=None):
    """:func:`reta_fast.persistence_pairs` with ``maxdim=0`` computed by :func:`h0_forest_mask` on the
    device of ``edges``/``weights``; equal to the native union-find's answer (death edges in
    filtration order per graph, component counts). The graph is never copied to the host: host
    synchronisations are the input checks' verdict (one read of five flags), the output size and the
    result (the merging edges, ``[E_merge]``). Returns CPU tensors like the other backends."""
    dev = weights.device
    e, w, offsets_t, nodes = _check_graph_input(edges, weights, num_nodes, offsets, per_edge=True, to_host=False)
    B, E = offsets_t.numel() - 1, e.shape[0]
    gid = segment_ids(offsets_t, dev)
    node_off = torch.cat([torch.zeros(1, dtype=torch.int64), nodes.cumsum(0)]).to(dev)
    u, v = e[:, 0] + node_off[gid], e[:, 1] + node_off[gid]
    rank = torch.empty(E, dtype=torch.int64, device=dev)
    rank[torch.argsort(w, stable=True)] = torch.arange(E, device=dev)  # (length, edge index)
    N = int(nodes.sum())
    mst = h0_forest_mask(u, v, rank, N, int(nodes.max()) if B else 0)
    idx = mst.nonzero().flatten()  # host synchronisation: the output size
    idx = idx[torch.argsort(gid[idx] * max(E, 1) + rank[idx])]
    per_graph = torch.bincount(gid[idx], minlength=B).cpu() if idx.numel() else torch.zeros(B, dtype=torch.int64)
    h0_off = torch.cat([torch.zeros(1, dtype=torch.int64), per_graph.cumsum(0)])
    comps = nodes - per_graph
    z = torch.zeros(B + 1, dtype=torch.int64)
    return PersistencePairs(idx.cpu(), h0_off, comps, torch.zeros((0, 2), dtype=torch.int64), z,
                            torch.zeros(0, dtype=torch.int64), z.clone())
