"""Mutual k-nearest-neighbour graphs of point clouds (docs/method.md §4, "Graph").

Semantics (defined by :func:`knn_ref`, every backend must agree with it):

* distances are Euclidean; neighbours of ``i`` are the ``k`` points ``j != i`` with the smallest
  squared distance, **ties broken by the smaller index** ``j``;
* an undirected edge ``(i, j)``, ``i < j``, is kept iff ``j`` is among ``i``'s neighbours and ``i``
  among ``j``'s ("mutual");
* ``k >= n - 1`` means every pair is an edge;
* the reported edge length is ``||x_i - x_j||`` computed from the difference vector (not from the
  ``|x|^2 + |y|^2 - 2 x.y`` expansion the search uses), so zero-length edges between duplicate
  points are exactly 0 and gradients are accurate.

Backends: ``"triton"`` (fused distance tiles + running top-k, :mod:`reta_fast.kernels.knn`),
``"torch"`` (row-chunked ``addmm`` + ``topk`` with exact tie resolution), ``"auto"`` (triton on
CUDA when available, torch otherwise).
"""
from __future__ import annotations

import os
import warnings
from typing import NamedTuple, Optional

import torch
from torch.autograd.function import once_differentiable

from .._validate import check_k, check_points
from .segments import segment_ids

__all__ = ["KNNGraph", "mutual_knn_graph", "knn_ref", "mutual_knn_ref", "knn", "knn_unchecked", "edge_lengths",
           "edge_weights", "mutual_knn_edges", "rerank_certified"]

# Largest k the fused kernel keeps in registers; larger k uses the torch backend.
TRITON_MAX_K = 64
# Elements per temporary of the torch backend and of the exact re-rank (chunks of rows).
TORCH_CHUNK_ELEMS = 1 << 24
# Largest B * N^2 for which edge_weights uses a batched Gram matrix.
GRAM_MAX_ELEMS = 1 << 24
# ... and when its B N^2 entries are at most this many times the edges: a GEMM entry costs far less
# than a gathered difference row. Measured on the 2-core CPU, d=512: N^2/(E/B) = 16 (100 x 64 pts):
# Gram 4.0 ms vs differences 56 ms; 47 (10 x 256): 4.0 vs 7.8 ms; 1076 (1 x 2000): 22 vs 1.9 ms.
GRAM_OVER_DIFF = 128
# Extra candidates a low-precision search keeps for the exact re-rank.
CANDIDATE_MARGIN = 8
# Bound on |approx - exact| / (|x_i|^2 + max_j |x_j|^2) of a tf32 distance tile: inputs rounded to
# 10 mantissa bits (2^-11 relative each) give |x.y| errors <= 2^-10 |x||y| plus fp32 accumulation
# (D 2^-24); d2 carries twice that, and 2 x |x||y| <= |x|^2 + |y|^2, giving 2^-10.
TF32_REL_ERR = 2.0**-8  # 4x: the hardware may truncate to tf32 rather than round (2^-10 each)


class KNNGraph(NamedTuple):
    """A batch of undirected graphs, one per point set.

    Attributes:
        edges: ``[E, 2]`` int64, local node ids ``i < j`` within each graph, sorted by ``(i, j)``.
        lengths: ``[E]`` float (dtype of the points), ``||x_i - x_j||``; differentiable.
        offsets: ``[B + 1]`` int64 (CPU); graph ``g`` owns ``edges[offsets[g]:offsets[g+1]]``.
        num_nodes: number of nodes of every graph (``n``).
    """

    edges: torch.Tensor
    lengths: torch.Tensor
    offsets: torch.Tensor
    num_nodes: int

    @property
    def batch_size(self) -> int:
        return self.offsets.numel() - 1


# --------------------------------------------------------------------------------------------
# reference


def knn_ref(points: torch.Tensor, k: int) -> torch.Tensor:
    """Reference k-NN: ``[B, N, k]`` int64 neighbour indices sorted by (distance, index).

    Materialises all pairwise squared distances in float64; for tests and small inputs only.
    """
    x = points.double()
    d2 = (x.unsqueeze(2) - x.unsqueeze(1)).pow(2).sum(-1)  # [B, N, N]
    d2.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    # Stable sort keeps the smaller index first among equal distances: the documented tie rule.
    order = torch.sort(d2, dim=-1, stable=True).indices
    return order[..., :k]


def mutual_knn_ref(points: torch.Tensor, k: int) -> list[set[tuple[int, int]]]:
    """Reference mutual k-NN edge sets (one Python set of ``(i, j)``, ``i < j``, per graph)."""
    points = check_points(points)
    n = points.shape[1]
    out = []
    if k >= n - 1:
        return [{(i, j) for i in range(n) for j in range(i + 1, n)} for _ in range(points.shape[0])]
    nbr = knn_ref(points, k).tolist()
    for g in nbr:
        sets = [set(row) for row in g]
        out.append({(i, j) for i in range(n) for j in sets[i] if i < j and i in sets[j]})
    return out


# --------------------------------------------------------------------------------------------
# backends for the directed k-NN


def _knn_rows_torch(x: torch.Tensor, sq: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """Exact neighbours of the query ``rows`` in each of ``G`` sets ``x`` ``[G, N, D]`` (``sq``:
    squared norms ``[G, N]``), ``1 <= k <= N - 1``: returns ``[G, len(rows), k]``.

    fp32: one ``topk`` over packed ``(distance bits, index)`` int64 keys gives the (distance, index)
    order exactly, ties included, with no data-dependent step (no host synchronisation). float64 (whose
    distances do not fit a key): ``topk`` on the distances, one extra neighbour showing whether the k-th
    distance ties the next, and such rows re-solved with a stable sort (one host synchronisation).
    """
    G, N, _ = x.shape
    R = rows.numel()
    d2 = torch.baddbmm(sq[:, None, :] + sq[:, rows, None], x[:, rows], x.transpose(1, 2), alpha=-2.0)
    d2.clamp_(min=0.0)
    d2[:, torch.arange(R, device=x.device), rows] = float("inf")
    if d2.dtype == torch.float32:
        keys = _pack(d2, torch.arange(N, device=x.device))
        return torch.topk(keys, k, dim=2, largest=False, sorted=True).indices
    vals, idx = torch.topk(d2, k + 1, dim=2, largest=False, sorted=True)
    idx = idx[..., :k]
    tied = (vals[..., k - 1] == vals[..., k]).nonzero()  # host sync (nonzero): float64 only
    if tied.numel():
        g, r = tied[:, 0], tied[:, 1]
        idx[g, r] = torch.sort(d2[g, r], dim=1, stable=True).indices[:, :k]
    idx = torch.sort(idx, dim=2).values  # then order by (value, index)
    return torch.gather(idx, 2, torch.sort(torch.gather(d2, 2, idx), dim=2, stable=True).indices)


def _knn_torch(points: torch.Tensor, k: int) -> torch.Tensor:
    """Exact k-NN in blocks of (sets, rows) whose distance temporary is at most
    ``TORCH_CHUNK_ELEMS``: many small sets share one batched GEMM, a large set is cut in rows."""
    B, N, _ = points.shape
    x = points if points.dtype in (torch.float32, torch.float64) else points.float()
    sq = x.pow(2).sum(-1)
    out = torch.empty((B, N, k), dtype=torch.int64, device=points.device)
    rows_per = max(1, min(N, TORCH_CHUNK_ELEMS // N))
    sets_per = max(1, TORCH_CHUNK_ELEMS // (N * N)) if rows_per == N else 1
    for b0 in range(0, B, sets_per):
        b1 = min(B, b0 + sets_per)
        for r0 in range(0, N, rows_per):
            rows = torch.arange(r0, min(N, r0 + rows_per), device=points.device)
            out[b0:b1, r0:r0 + rows.numel()] = _knn_rows_torch(x[b0:b1], sq[b0:b1], rows, k)
    return out


def _pack(d2: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered by (d2, idx) for fp32 ``d2 >= 0`` (IEEE bits are monotone there)."""
    return ((d2 + 0.0).view(torch.int32).to(torch.int64) << 32) | idx


def rerank_certified(points: torch.Tensor, cand_d2: torch.Tensor, cand: torch.Tensor, k: int,
                     rel_err: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k-NN from approximate candidates, with a certificate per row.

    ``cand`` ``[B, N, KC]`` are the best ``KC > k`` candidates by approximate squared distances
    ``cand_d2`` (sorted ascending), each within ``rel_err * (|x_i|^2 + max_j |x_j|^2)`` of exact.
    Candidates are re-ranked by exact fp32 distances (from difference vectors). A row is certain
    when its exact k-th distance is below the smallest value any non-candidate can have exactly,
    ``cand_d2[..., -1] - bound``; the others are recomputed exactly. Returns ``(idx [B, N, k],
    n_recomputed_rows)``.
    """
    B, N, KC = cand.shape
    D = points.shape[2]
    x = points.float()
    sq = x.pow(2).sum(-1)
    exact = torch.empty((B, N, KC), dtype=torch.float32, device=x.device)
    chunk = max(1, TORCH_CHUNK_ELEMS // max(KC * D, 1))
    for b in range(B):
        for r0 in range(0, N, chunk):
            r1 = min(N, r0 + chunk)
            exact[b, r0:r1] = (x[b, r0:r1, None, :] - x[b][cand[b, r0:r1]]).pow(2).sum(-1)
    keys = torch.sort(_pack(exact, cand), dim=-1).values[..., :k]
    idx = keys & 0xFFFFFFFF
    if KC >= N - 1:  # every other point was a candidate: nothing can be missing
        return idx, torch.zeros((), dtype=torch.int64)
    kth = (keys[..., -1] >> 32).to(torch.int32).view(torch.float32)
    bound = rel_err * (sq + sq.amax(dim=1, keepdim=True)) + 1e-30
    unsure = ~(kth < cand_d2[..., -1] - bound)
    bad = unsure.nonzero()  # host sync: rows that need the exact fallback
    for b in bad[:, 0].unique().cpu().tolist():
        rows = bad[bad[:, 0] == b, 1]
        idx[b, rows] = _knn_rows_torch(x[b:b + 1], sq[b:b + 1], rows, k)[0]
    return idx, torch.tensor(bad.shape[0])


def _triton_usable(points: torch.Tensor) -> tuple[bool, str]:
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if not (points.is_cuda or (interpret and points.device.type == "cpu")):
        return False, "points are not on a CUDA device (or on the CPU under TRITON_INTERPRET=1)"
    try:
        from .. import kernels  # noqa: F401  (optional: needs triton)
    except Exception as exc:  # pragma: no cover - depends on the install
        return False, f"triton kernels unavailable ({exc})"
    return True, ""


def knn(points: torch.Tensor, k: int, backend: str = "auto", precision: str = "ieee") -> torch.Tensor:
    """Directed k-NN indices ``[B, N, k]`` (int64, sorted by (distance, index)); no gradient.

    ``points`` is ``[B, N, D]`` with ``1 <= k <= N - 1``. ``precision="tf32"`` lets the Triton
    kernel search ``k + CANDIDATE_MARGIN`` candidates on tensor cores and re-rank them exactly
    (:func:`rerank_certified`): same neighbours as ``"ieee"``, rows it cannot certify are recomputed.
    Host synchronisations: one for the finiteness check of ``points``; the fp32 ``"ieee"`` search itself
    has none (``"tf32"``'s certificate and float64's tie handling have one each).
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"precision must be 'ieee' or 'tf32', got {precision!r}")
    points = check_points(points)
    k = check_k(k)
    if k > points.shape[1] - 1:
        raise ValueError(f"k must be <= n - 1 = {points.shape[1] - 1} for the directed k-NN, got {k}")
    return knn_unchecked(points, k, backend, precision)


def knn_unchecked(points: torch.Tensor, k: int, backend: str = "auto", precision: str = "ieee") -> torch.Tensor:
    """:func:`knn` on validated ``points`` ``[B, N, D]`` (``1 <= k <= N - 1``, backend and precision
    checked): no argument checks, so no host synchronisation on the fp32 ``"ieee"`` paths."""
    with torch.no_grad():
        # Distances are translation invariant but the |x|^2 + |y|^2 - 2 x.y expansion is not: move
        # each set next to the origin so far-off data keeps its precision. Subtracting one of its
        # points (not the mean) keeps integer coordinates integer, so exact ties stay exact. Half
        # precision inputs are shifted (and then searched) in fp32, where the shift is exact.
        if points.dtype in (torch.float16, torch.bfloat16):
            points = points.float()
        points = points - points[:, :1]
        if backend != "torch":
            ok, why = _triton_usable(points)
            if ok and k <= TRITON_MAX_K and points.dtype != torch.float64:
                from ..kernels import knn_fwd  # optional: needs triton

                kc = min(points.shape[1] - 1, k + CANDIDATE_MARGIN)
                if precision == "ieee" or kc > TRITON_MAX_K:
                    return knn_fwd(points, k)[1]
                d2, cand = knn_fwd(points, kc, precision="tf32")
                return rerank_certified(points, d2, cand, k, TF32_REL_ERR)[0]
            if ok:
                why = f"the Triton kernel needs k <= {TRITON_MAX_K} and fp32/fp16/bf16 points (k={k}, {points.dtype})"
            if backend == "triton":
                if not _triton_usable(points)[0]:
                    raise RuntimeError(f"backend='triton' requested but {why}")
                raise ValueError(f"backend='triton': {why}")
            if points.is_cuda:
                warnings.warn(f"reta_fast: {why}; the k-NN search uses the torch backend", RuntimeWarning)
        return _knn_torch(points, k)


# --------------------------------------------------------------------------------------------
# differentiable edge lengths


class _EdgeLength(torch.autograd.Function):
    """``||x[src] - x[dst]||`` over flat points ``[M, D]``; gradient 0 at zero length.

    The ``[E, D]`` differences are kept for the backward rather than gathered again: callers pass
    only the O(n) edges a diagram reads, so the memory is small and the second gather is saved.
    """

    @staticmethod
    def forward(ctx, x, src, dst):
        diff = x[src] - x[dst]
        length = diff.norm(dim=1)
        ctx.save_for_backward(src, dst, diff, length)
        ctx.num_points = x.shape[0]
        ctx.mark_non_differentiable(src, dst)
        return length

    @staticmethod
    @once_differentiable  # the saved differences are detached: a double backward would be wrong
    def backward(ctx, grad):
        src, dst, diff, length = ctx.saved_tensors
        # d|u|/du = u/|u|; at |u| = 0 take the 0 subgradient (duplicate points stay put).
        scale = torch.where(length > 0, grad / length.clamp_min(torch.finfo(length.dtype).tiny), 0.0)
        g = diff * scale[:, None]
        gx = torch.zeros((ctx.num_points, diff.shape[1]), dtype=diff.dtype, device=diff.device)
        gx.index_add_(0, src, g)
        gx.index_add_(0, dst, -g)
        return gx, None, None


def edge_lengths(points: torch.Tensor, edges: torch.Tensor, offsets: torch.Tensor,
                 graph_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact, differentiable lengths ``||x_i - x_j||`` of ``edges`` over ``points`` ``[B, N, D]``.

    ``edges`` are local ids; graph ``g`` owns ``edges[offsets[g]:offsets[g+1]]``, or, when
    ``graph_ids`` ``[E]`` is given, edge ``e`` belongs to graph ``graph_ids[e]`` (``offsets`` unused).
    Returns ``[E]`` in the dtype of ``points``; the gradient at a zero length is 0.
    """
    B, N, D = points.shape
    if graph_ids is None:
        graph_ids = segment_ids(offsets, edges.device)
    base = graph_ids * N
    flat = points.reshape(B * N, D)
    return _EdgeLength.apply(flat, edges[:, 0] + base, edges[:, 1] + base)


# --------------------------------------------------------------------------------------------
# public entry


def _mutual_from_knn(nbr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutual edges from directed neighbours ``[B, N, k]``: sorted ``[E, 2]`` local edges, offsets."""
    B, N, k = nbr.shape
    dev = nbr.device
    g = torch.arange(B, device=dev).view(B, 1, 1).expand(B, N, k)
    i = torch.arange(N, device=dev).view(1, N, 1).expand(B, N, k)
    fwd = ((g * N + i) * N + nbr).reshape(-1)  # key of the directed edge i -> j
    rev = ((g * N + nbr) * N + i).reshape(-1)  # key of j -> i
    fwd_sorted = torch.sort(fwd).values
    pos = torch.searchsorted(fwd_sorted, rev).clamp_max(fwd_sorted.numel() - 1)
    mutual = (fwd_sorted[pos] == rev) & (i.reshape(-1) < nbr.reshape(-1))
    keys = torch.sort(fwd[mutual]).values  # (graph, i, j) lexicographic
    gi, rem = keys // (N * N), keys % (N * N)
    edges = torch.stack([rem // N, rem % N], dim=1)
    counts = torch.bincount(gi, minlength=B).cpu()  # host sync: offsets are needed on the host
    offsets = torch.zeros(B + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    return edges, offsets


def mutual_knn_edges(pts: torch.Tensor, k: int, backend: str = "auto", precision: str = "ieee"):
    """Edges of the mutual k-NN graphs of validated points ``[B, N, D]``, no lengths:
    ``(edges [E, 2] int64, offsets [B + 1] int64 on the CPU)``."""
    B, N, _ = pts.shape
    if k >= N - 1:
        iu = torch.triu_indices(N, N, 1, device=pts.device).T
        return iu.repeat(B, 1), torch.arange(B + 1, dtype=torch.int64) * iu.shape[0]
    return _mutual_from_knn(knn(pts.detach(), k, backend=backend, precision=precision))


@torch.no_grad()
def edge_weights(points: torch.Tensor, edges: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Detached edge lengths ``[E]`` for ordering edges in a filtration, computed cheaply.

    Small sets use one batched Gram matrix (``B N^2 D`` FLOPs, no ``[E, D]`` temporary):
    ``sqrt(max(|x_i|^2 + |x_j|^2 - 2 x_i.x_j, 0))``, accurate to about ``1e-7 (|x_i|^2 + |x_j|^2)``
    in d^2 (so near-zero lengths are only accurate to ~3e-4 for unit features). Large sets use exact
    difference vectors in row chunks. Differentiable, exact lengths come from :func:`edge_lengths`.
    """
    B, N, D = points.shape
    gid = segment_ids(offsets, edges.device)
    i, j = edges[:, 0], edges[:, 1]
    x = points.detach()
    x = x if x.dtype == torch.float64 else x.float()  # fp16/bf16 would overflow or blur |x|^2
    x = x - x[:, :1]  # the Gram expansion is accurate near the origin (see knn())
    if B * N * N <= GRAM_MAX_ELEMS and B * N * N <= GRAM_OVER_DIFF * max(1, edges.shape[0]):
        sq = x.pow(2).sum(-1)
        gram = torch.bmm(x, x.transpose(1, 2))
        d2 = sq[gid, i] + sq[gid, j] - 2 * gram[gid, i, j]
        return d2.clamp_min(0).sqrt()
    flat = x.reshape(B * N, D)
    src, dst = gid * N + i, gid * N + j
    out = torch.empty(edges.shape[0], dtype=x.dtype, device=x.device)
    step = max(1, TORCH_CHUNK_ELEMS // D)
    for e0 in range(0, edges.shape[0], step):
        out[e0:e0 + step] = (flat[src[e0:e0 + step]] - flat[dst[e0:e0 + step]]).norm(dim=1)
    return out


def mutual_knn_graph(points: torch.Tensor, k: int, backend: str = "auto", precision: str = "ieee") -> KNNGraph:
    """Mutual k-NN graph of each point set (docs/method.md §4).

    Args:
        points: ``[n, d]`` or ``[b, n, d]`` floating tensor, finite, ``n >= 2`` (one graph per set).
        k: neighbours per point, ``>= 1``; ``k >= n - 1`` gives every pair.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` for the neighbour search (module docstring).
        precision: ``"ieee"`` or ``"tf32"`` (Triton search on tensor cores + exact re-rank, see
            :func:`knn`); the neighbours are the same.

    Returns:
        :class:`KNNGraph` with edges ``i < j`` sorted per graph and exact lengths differentiable
        with respect to ``points``.
    """
    pts = check_points(points)
    k = check_k(k)
    edges, offsets = mutual_knn_edges(pts, k, backend, precision)
    return KNNGraph(edges, edge_lengths(pts, edges, offsets), offsets, pts.shape[1])
