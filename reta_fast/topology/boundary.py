"""The host boundary of the topology engine: the one place where point clouds' graphs go to the host for
the native persistence pairing, and where the integer pairings come back (docs/method.md §4).

A refresh of the pairings of ``B`` point sets ``[B, N, D]`` on an accelerator is:

1. :func:`device_graph` - device work only, fixed shapes, no host synchronisation: the directed k-NN
   ``[B, N, k]``, the mutual-edge mask, the filtration weight of every kept edge and a finiteness flag,
   packed into **one** int32 buffer;
2. **one device-to-host transfer** of that buffer (non-blocking into pinned memory on CUDA, completed by
   an event the host waits on: :func:`start_host_copy`);
3. :func:`host_plan` - host work only (numpy and the native core, no torch device operation, so it may
   run in a worker thread): edges and offsets, the H0/H1 pairings, each graph's longest edge, and the
   *index plan* of the diagrams: which point pairs' lengths they read and where each diagram point goes in
   its set's persistence image;
4. **one host-to-device transfer** of the plan, packed into one int64 buffer (:func:`upload`);
5. :func:`plan_diagrams` - device work only: the lengths of the planned point pairs (exact, from
   difference vectors, differentiable), the diagrams gathered from them. Steps that reuse a plan run only
   this step: no transfer, no synchronisation.

The edges and their order are those of :func:`reta_fast.mutual_knn_graph`, and the filtration weights are
computed as :func:`reta_fast.topology.knn.edge_weights` computes them (by a Gram matrix or by difference
vectors, chosen here by the set's shape): up to rounding of the weights, whose near-ties may pair
differently, the pairings are :func:`reta_fast.persistence_pairs`'s on that graph and the diagrams
:func:`reta_fast.persistence_diagrams`'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch

from .knn import GRAM_MAX_ELEMS, TORCH_CHUNK_ELEMS, _EdgeLength, knn_unchecked
from .pairs import persistence_pairs

__all__ = ["device_graph", "start_host_copy", "host_plan", "upload", "plan_diagrams", "graph_plan", "Plan",
           "DevicePlan", "ASYNC_COPY_EVENTS"]

# The Gram matrix of a set costs N^2 D; the difference vectors of its kept neighbour pairs N k D. Up to
# N = GRAM_PER_NEIGHBOUR * k points the Gram matrix is the cheaper way to the weights (the same rule as
# edge_weights': its measured break-even, B N^2 <= 128 E, with E ~ N k / 3 mutual edges per set).
GRAM_PER_NEIGHBOUR = 40

def _cuda_event(device: torch.device):
    """An event recorded on ``device``'s current stream (where a copy of a tensor on it was just queued),
    whichever device is current."""
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


#: Device types whose device-to-host copies are issued non-blocking and completed by an event that the host
#: thread waits on (``type -> factory(device)`` of a recorded event); other accelerators copy blocking.
#: (CUDA also covers ROCm.)
ASYNC_COPY_EVENTS: Dict[str, Callable[[torch.device], object]] = {"cuda": _cuda_event}


# --------------------------------------------------------------------------------------------
# 1. device part


def _pair_weights(x: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
    """``[B, N, k]`` distances ``|x_i - x_nbr[i, m]|`` of ``x`` ``[B, N, D]`` (shifted, fp32/fp64), computed
    as :func:`reta_fast.topology.knn.edge_weights` does for an edge ``(i, j)``: the same value, bit for bit,
    for every kept pair (``i < j``) whichever of its two routes the shape selects."""
    B, N, D = x.shape
    k = nbr.shape[2]
    if B * N * N <= GRAM_MAX_ELEMS and N <= GRAM_PER_NEIGHBOUR * k:
        sq = x.pow(2).sum(-1)
        gram = torch.bmm(x, x.transpose(1, 2))
        d2 = sq[:, :, None] + torch.gather(sq[:, None, :].expand(B, N, N), 2, nbr) - 2 * torch.gather(gram, 2, nbr)
        return d2.clamp_min(0).sqrt()
    out = torch.empty((B, N, k), dtype=x.dtype, device=x.device)
    rows = max(1, TORCH_CHUNK_ELEMS // max(1, k * D))
    flat = x.reshape(B * N, D)
    base = (torch.arange(B, device=x.device) * N).view(B, 1, 1)
    src = torch.arange(B * N, device=x.device).view(B, N, 1).expand(B, N, k).reshape(-1)
    dst = (nbr + base).reshape(-1)
    o = out.view(-1)
    step = rows * k
    for e0 in range(0, B * N * k, step):
        o[e0:e0 + step] = (flat[src[e0:e0 + step]] - flat[dst[e0:e0 + step]]).norm(dim=1)
    return out


def _mutual_keep(nbr: torch.Tensor) -> torch.Tensor:
    """``[B, N, k]`` bool: entry ``(i, m)`` is a mutual edge with ``i < j = nbr[i, m]`` (each undirected edge
    kept once); fixed shape, no synchronisation (sort + searchsorted over the directed-edge keys)."""
    B, N, k = nbr.shape
    dev = nbr.device
    g = torch.arange(B, device=dev).view(B, 1, 1)
    i = torch.arange(N, device=dev).view(1, N, 1)
    fwd = ((g * N + i) * N + nbr).reshape(-1)
    rev = ((g * N + nbr) * N + i).reshape(-1)
    fwd_sorted = torch.sort(fwd).values
    pos = torch.searchsorted(fwd_sorted, rev).clamp_max(fwd_sorted.numel() - 1)
    return ((fwd_sorted[pos] == rev) & (i < nbr).reshape(-1)).view(B, N, k)


@dataclass(frozen=True)
class GraphShape:
    """What the host needs to decode a packed graph: sizes, whether the graph is complete, weight dtype."""

    B: int
    N: int
    k: int  # neighbours per point (N - 1 for a complete graph)
    complete: bool
    float64: bool


def device_graph(x: torch.Tensor, k: int, backend: str = "auto",
                 nonfinite: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, GraphShape]:
    """Mutual k-NN graphs of the detached, validated points ``x`` ``[B, N, D]`` as one packed int32 buffer
    on their device, with no host synchronisation.

    Layout: ``[B * N * k]`` neighbour ids (-1 where the entry is not a kept edge; absent for a complete
    graph, ``k >= N - 1``), then the filtration weights of those entries (``[B, N, k]``, or the ``B N (N-1)/2``
    upper-triangle pairs of a complete graph) as raw fp32 bits (fp64: two int32 words each), then one flag:
    1 when ``x`` (or the accumulated ``nonfinite`` flag, a device bool) saw a NaN or infinity.
    """
    B, N, D = x.shape
    dev = x.device
    xw = x if x.dtype == torch.float64 else x.float()
    bad = ~torch.isfinite(xw).all()
    if nonfinite is not None:
        bad = bad | nonfinite
    xs = xw - xw[:, :1]  # as edge_weights: the Gram expansion is accurate near the origin
    complete = k >= N - 1
    if complete:
        iu = torch.triu_indices(N, N, 1, device=dev)
        sq = xs.pow(2).sum(-1)
        gram = torch.bmm(xs, xs.transpose(1, 2))
        w = (sq[:, iu[0]] + sq[:, iu[1]] - 2 * gram[:, iu[0], iu[1]]).clamp_min(0).sqrt()
        parts = [w.reshape(-1).view(torch.int32)]
        kk = N - 1
    else:
        nbr = knn_unchecked(xw, k, backend)
        keep = _mutual_keep(nbr)
        w = _pair_weights(xs, nbr)
        parts = [torch.where(keep, nbr, -1).to(torch.int32).reshape(-1),
                 torch.where(keep, w, 0).reshape(-1).view(torch.int32)]
        kk = k
    parts.append(bad.to(torch.int32).reshape(1))
    return torch.cat(parts), GraphShape(B, N, kk, complete, xw.dtype == torch.float64)


def start_host_copy(t: torch.Tensor):
    """``(host tensor, wait)``: the device-to-host copy of ``t`` started; call ``wait()`` (if not None)
    before reading it. Non-blocking with an event on :data:`ASYNC_COPY_EVENTS` device types; blocking
    (``wait`` None) elsewhere; the tensor itself on the CPU."""
    if t.device.type == "cpu":
        return t, None
    make_event = ASYNC_COPY_EVENTS.get(t.device.type)
    if make_event is None:
        return t.to("cpu"), None  # host synchronisation: a blocking copy on this device type
    host = t.to("cpu", non_blocking=True)  # pinned destination: the copy runs in the device's stream order
    event = make_event(t.device)
    return host, event.synchronize


# --------------------------------------------------------------------------------------------
# 2. host part


@dataclass
class Plan:
    """The index plan of a batch of diagrams (host side, numpy int64): everything the device needs to
    gather the diagrams of ``B`` sets of ``N`` points from their coordinates.

    ``src``/``dst`` ``[L]``: flat point ids (``set * N + i``) of the ``L`` point pairs whose lengths the
    diagrams read. Diagram values index ``lengths_ext = [lengths, 0, essential value]`` (``ZERO = L``,
    ``CONST = L + 1``). H0 points ``[P0]``: ``h0_death`` (birth 0), ``h0_set``. H1 points ``[P1]``:
    ``h1_birth``, ``h1_death``, ``h1_ess`` (1: death = max(death, birth), for classes that never die),
    ``h1_set``, ``h1_pos`` (slot within its set; ``h1_width`` = the most points of any set).
    """

    B: int
    N: int
    src: np.ndarray
    dst: np.ndarray
    h0_death: np.ndarray
    h0_set: np.ndarray
    h1_birth: np.ndarray
    h1_death: np.ndarray
    h1_ess: np.ndarray
    h1_set: np.ndarray
    h1_pos: np.ndarray
    h1_width: int
    essential_value: float
    pairs: object  # the PersistencePairs (CPU) the plan was made from
    finite: bool
    extent: Tuple[float, float, float] = (0.0, 0.0, 0.0)  # max H0 death, H1 persistence, H1 birth

    @property
    def L(self) -> int:
        return int(self.src.shape[0])


def _decode(buf: np.ndarray, shape: GraphShape):
    """Edges ``[E, 2]`` (local ids, sorted by (set, i, j)), weights ``[E]`` float64, offsets ``[B + 1]``,
    finite flag, from a packed buffer (see :func:`device_graph`)."""
    B, N, k = shape.B, shape.N, shape.k
    wwords = 2 if shape.float64 else 1
    finite = not bool(buf[-1])
    if shape.complete:
        iu = np.triu_indices(N, 1)
        E1 = iu[0].size
        w = buf[: B * E1 * wwords].view(np.float64 if shape.float64 else np.float32).astype(np.float64)
        edges = np.tile(np.stack(iu, 1).astype(np.int64), (B, 1))
        offsets = np.arange(B + 1, dtype=np.int64) * E1
        return edges, w, offsets, finite
    n = B * N * k
    nbr = buf[:n].reshape(B, N, k)
    wall = buf[n: n + n * wwords].view(np.float64 if shape.float64 else np.float32).reshape(B, N, k)
    g, i, m = np.nonzero(nbr >= 0)
    j = nbr[g, i, m].astype(np.int64)
    order = np.argsort((g.astype(np.int64) * N + i) * N + j, kind="stable")
    g, i, j = g[order], i[order], j[order]
    w = wall[g, i, m[order]].astype(np.float64)
    offsets = np.zeros(B + 1, dtype=np.int64)
    np.cumsum(np.bincount(g, minlength=B), out=offsets[1:])
    return np.stack([i.astype(np.int64), j], 1), w, offsets, finite


def _segments(counts: np.ndarray):
    """``(set id, slot within the set)`` of each row of sets holding ``counts`` rows, in set order."""
    sets = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return sets, np.arange(sets.size, dtype=np.int64) - starts[sets]


def host_plan(buf, shape: GraphShape, essential: Union[None, str, float] = "max", maxdim: int = 1,
              backend: str = "auto") -> Plan:
    """Pairings and the index plan from a packed graph on the host (a CPU tensor or numpy int32 array).
    Pure host work: safe in a worker thread while the device goes on."""
    buf = buf.numpy() if isinstance(buf, torch.Tensor) else np.asarray(buf)
    edges, w, offsets, finite = _decode(buf, shape)
    B, N = shape.B, shape.N
    if not finite:  # nothing to pair: the caller raises, naming its input
        z = np.zeros(0, dtype=np.int64)
        return Plan(B, N, z, z, z, z, z, z, z, z, z, 0, 0.0, None, False)
    pairs = persistence_pairs(torch.from_numpy(edges), torch.from_numpy(w), N, maxdim=maxdim,
                              offsets=torch.from_numpy(offsets), backend=backend)
    gid = np.repeat(np.arange(B, dtype=np.int64), np.diff(offsets))
    node = lambda e: (gid[e] * N + edges[e, 0], gid[e] * N + edges[e, 1])  # noqa: E731
    h0 = pairs.h0.numpy()
    h1 = pairs.h1.numpy().reshape(-1, 2)
    ess1 = pairs.h1_essential.numpy()
    comps = pairs.components.numpy()
    want_caps = essential == "max"
    caps = np.full(B, -1, dtype=np.int64)
    nonempty = np.flatnonzero(np.diff(offsets))
    if want_caps and nonempty.size:  # each set's longest edge by weight, the smallest index among equal ones
        top = np.maximum.reduceat(w, offsets[nonempty])
        longest = np.full(B, np.inf)
        longest[nonempty] = top
        hit = np.flatnonzero(w == longest[gid])
        first_set, first = np.unique(gid[hit], return_index=True)
        caps[first_set] = hit[first]
    used = [h0, h1[:, 0], h1[:, 1], ess1, caps[caps >= 0]]
    sizes = np.cumsum([0] + [u.size for u in used])
    used_edges = np.concatenate(used).astype(np.int64)
    src, dst = node(used_edges)
    L = int(sizes[-1])
    ZERO, CONST = L, L + 1
    cap_idx = np.full(B, ZERO, dtype=np.int64)  # a set without edges: its components die at 0
    cap_idx[caps >= 0] = sizes[4] + np.arange(int((caps >= 0).sum()))
    if isinstance(essential, str):
        ess_death = cap_idx
        ess_value = 0.0
    else:
        ess_death = np.full(B, CONST, dtype=np.int64)
        ess_value = 0.0 if essential is None else float(essential)
    # H0: per set its merges (Kruskal order), then its never-merging components
    h0_off = pairs.h0_offsets.numpy()
    reg_set, _ = _segments(np.diff(h0_off))
    reg_idx = sizes[0] + np.arange(h0.size, dtype=np.int64)
    if essential is None:
        h0_death, h0_set = reg_idx, reg_set
    else:
        ess_set, _ = _segments(comps)
        h0_death = np.concatenate([reg_idx, ess_death[ess_set]])
        h0_set = np.concatenate([reg_set, ess_set])
        order = np.argsort(h0_set, kind="stable")
        h0_death, h0_set = h0_death[order], h0_set[order]
    # H1: per set its finite pairs, then its never-dying loops
    h1_off = pairs.h1_offsets.numpy()
    e_off = pairs.h1_essential_offsets.numpy()
    reg_set1, _ = _segments(np.diff(h1_off))
    births = sizes[1] + np.arange(h1.shape[0], dtype=np.int64)
    deaths = sizes[2] + np.arange(h1.shape[0], dtype=np.int64)
    flags = np.zeros(h1.shape[0], dtype=np.int64)
    sets1 = reg_set1
    if essential is not None and ess1.size:
        ess_set1, _ = _segments(np.diff(e_off))
        births = np.concatenate([births, sizes[3] + np.arange(ess1.size, dtype=np.int64)])
        deaths = np.concatenate([deaths, ess_death[ess_set1]])
        flags = np.concatenate([flags, np.ones(ess1.size, dtype=np.int64)])
        sets1 = np.concatenate([reg_set1, ess_set1])
        order = np.argsort(sets1, kind="stable")
        births, deaths, flags, sets1 = births[order], deaths[order], flags[order], sets1[order]
    counts1 = np.bincount(sets1, minlength=B)
    _, pos1 = _segments(counts1)
    # the diagrams' extent from the filtration weights (within ~1e-7 of the exact lengths): image grids
    lw = np.concatenate([w[used_edges], [0.0, ess_value]])
    b1, d1 = lw[births], lw[deaths]
    d1 = np.where(flags > 0, np.maximum(d1, b1), d1)
    top = lambda v: float(v.max()) if v.size else 0.0  # noqa: E731
    extent = (top(lw[h0_death]), top(d1 - b1), top(b1))
    return Plan(B, N, src, dst, h0_death, h0_set, births, deaths, flags, sets1, pos1,
                int(counts1.max()) if B else 0, ess_value, pairs, finite, extent)


# --------------------------------------------------------------------------------------------
# 3. back to the device


@dataclass
class DevicePlan:
    """A :class:`Plan`'s index tensors on the device (views of one uploaded buffer) and its host sizes."""

    B: int
    N: int
    L: int
    src: torch.Tensor
    dst: torch.Tensor
    h0_death: torch.Tensor
    h0_set: torch.Tensor
    h1_birth: torch.Tensor
    h1_death: torch.Tensor
    h1_ess: torch.Tensor
    h1_set: torch.Tensor
    h1_pos: torch.Tensor
    h1_width: int
    essential_value: float
    pairs: object
    extent: Tuple[float, float, float] = (0.0, 0.0, 0.0)


_FIELDS = ("src", "dst", "h0_death", "h0_set", "h1_birth", "h1_death", "h1_ess", "h1_set", "h1_pos")


def upload(plan: Plan, device) -> DevicePlan:
    """One host-to-device transfer of the plan's index arrays (pinned and non-blocking on CUDA)."""
    arrays = [getattr(plan, f).astype(np.int64, copy=False) for f in _FIELDS]
    host = torch.from_numpy(np.concatenate(arrays))
    device = torch.device(device)
    if device.type == "cpu":
        buf = host
    else:
        if device.type == "cuda":
            host = host.pin_memory()
        buf = host.to(device, non_blocking=device.type in ASYNC_COPY_EVENTS)
    views, at = {}, 0
    for f, a in zip(_FIELDS, arrays):
        views[f] = buf[at: at + a.size]
        at += a.size
    return DevicePlan(plan.B, plan.N, plan.L, h1_width=plan.h1_width, essential_value=plan.essential_value,
                      pairs=plan.pairs, extent=plan.extent, **views)


def graph_plan(x: torch.Tensor, k: int, essential="max", maxdim: int = 1, knn_backend: str = "auto",
               backend: str = "auto", nonfinite: Optional[torch.Tensor] = None) -> Plan:
    """Steps 1-3 in one call on this thread: the (host) plan of the detached points ``x`` ``[B, N, D]``.
    One device-to-host transfer (and wait) on an accelerator."""
    packed, shape = device_graph(x, k, knn_backend, nonfinite)
    host, wait = start_host_copy(packed)
    if wait is not None:
        wait()
    return host_plan(host, shape, essential, maxdim, backend)


# --------------------------------------------------------------------------------------------
# 4. diagrams on the device


def plan_lengths(points: torch.Tensor, plan: DevicePlan) -> torch.Tensor:
    """``[L + 2]``: the planned pairs' exact, differentiable lengths, then 0 and the essential value."""
    B, N, D = points.shape
    lengths = _EdgeLength.apply(points.reshape(B * N, D), plan.src, plan.dst)
    # device-side constants (fill kernels, no copy from the host)
    return torch.cat([lengths, lengths.new_zeros(1), lengths.new_full((1,), plan.essential_value)])


def plan_diagrams(points: torch.Tensor, plan: DevicePlan):
    """``(h0 deaths [P0], h1 (birth, death) [P1, 2])`` of the planned sets over ``points`` ``[B, N, D]``,
    gathered from exact lengths, differentiable; no host synchronisation."""
    lengths = plan_lengths(points, plan)
    h0 = lengths[plan.h0_death]
    b = lengths[plan.h1_birth]
    d = lengths[plan.h1_death]
    d = torch.where(plan.h1_ess.bool(), torch.maximum(d, b), d)
    return h0, torch.stack([b, d], dim=1)
