"""Mutual k-nearest-neighbour graphs of point clouds (METHOD.md section 4, "Graph").

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
from typing import NamedTuple

import torch

from ._validate import check_k, check_points

__all__ = ["KNNGraph", "mutual_knn_graph", "knn_ref", "mutual_knn_ref", "knn", "edge_lengths"]

# Largest k the fused kernel keeps in registers; larger k uses the torch backend.
TRITON_MAX_K = 64
# Rows per chunk of the torch backend: bounds its temporary to CHUNK x n distances.
TORCH_CHUNK_ELEMS = 1 << 24


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
    n = x.shape[1]
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


def _knn_torch(points: torch.Tensor, k: int) -> torch.Tensor:
    """Row-chunked ``addmm`` + ``topk``; exact tie resolution by index at the k-th distance."""
    B, N, _ = points.shape
    x = points if points.dtype in (torch.float32, torch.float64) else points.float()
    sq = x.pow(2).sum(-1)
    chunk = max(1, min(N, TORCH_CHUNK_ELEMS // max(N, 1)))
    out = torch.empty((B, N, k), dtype=torch.int64, device=points.device)
    for b in range(B):
        for r0 in range(0, N, chunk):
            r1 = min(N, r0 + chunk)
            d2 = torch.addmm(sq[b, None, :] + sq[b, r0:r1, None], x[b, r0:r1], x[b].T, alpha=-2.0)
            d2.clamp_(min=0.0)
            rows = torch.arange(r0, r1, device=points.device)
            d2[rows - r0, rows] = float("inf")
            vals, idx = torch.topk(d2, k, dim=1, largest=False, sorted=False)
            # topk does not promise the smaller index among equal values. Rows whose k-th value is
            # shared with an element outside the selection are re-solved with a stable sort; in
            # the others the selected set is exact and only needs ordering by (value, index).
            kth = vals.max(dim=1, keepdim=True).values
            tied = ((d2 <= kth).sum(1) > k).nonzero().flatten()
            if tied.numel():
                idx[tied] = torch.sort(d2[tied], dim=1, stable=True).indices[:, :k]
            idx = torch.sort(idx, dim=1).values
            idx = torch.gather(idx, 1, torch.sort(torch.gather(d2, 1, idx), dim=1, stable=True).indices)
            out[b, r0:r1] = idx
    return out


def _triton_usable(points: torch.Tensor) -> tuple[bool, str]:
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if not (points.is_cuda or interpret):
        return False, "points are not on a CUDA device"
    try:
        from . import kernels  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return False, f"triton kernels unavailable ({exc})"
    return True, ""


def knn(points: torch.Tensor, k: int, backend: str = "auto") -> torch.Tensor:
    """Directed k-NN indices ``[B, N, k]`` (int64, sorted by (distance, index)); no gradient.

    ``points`` is ``[B, N, D]`` with ``1 <= k <= N - 1``.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    with torch.no_grad():
        if backend != "torch":
            ok, why = _triton_usable(points)
            if ok and k <= TRITON_MAX_K and points.dtype != torch.float64:
                from .kernels import knn_fwd

                return knn_fwd(points, k)[1]
            if backend == "triton":
                if not ok:
                    raise RuntimeError(f"backend='triton' requested but {why}")
                raise ValueError(
                    f"backend='triton' supports k <= {TRITON_MAX_K} and fp32/fp16/bf16 points, "
                    f"got k={k}, dtype={points.dtype}"
                )
            if points.is_cuda:
                warnings.warn(f"reta_fast: {why}; mutual_knn_graph uses the torch backend", RuntimeWarning)
        return _knn_torch(points, k)


# --------------------------------------------------------------------------------------------
# differentiable edge lengths


class _EdgeLength(torch.autograd.Function):
    """``||x[src] - x[dst]||`` over flat points ``[M, D]``; gradient 0 at zero length."""

    @staticmethod
    def forward(ctx, x, src, dst):
        diff = x[src] - x[dst]
        length = diff.norm(dim=1)
        ctx.save_for_backward(x, src, dst, length)
        ctx.mark_non_differentiable(src, dst)
        return length

    @staticmethod
    def backward(ctx, grad):
        x, src, dst, length = ctx.saved_tensors
        # d|u|/du = u/|u|; at |u| = 0 take the 0 subgradient (duplicate points stay put).
        scale = torch.where(length > 0, grad / length.clamp_min(torch.finfo(length.dtype).tiny), 0.0)
        g = (x[src] - x[dst]) * scale[:, None]
        gx = torch.zeros_like(x)
        gx.index_add_(0, src, g)
        gx.index_add_(0, dst, -g)
        return gx, None, None


def edge_lengths(points: torch.Tensor, edges: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Differentiable lengths of ``edges`` (local ids, graph ``g`` = ``edges[offsets[g]:offsets[g+1]]``)
    over ``points`` ``[B, N, D]``: returns ``[E]`` in the dtype of ``points``."""
    B, N, D = points.shape
    counts = (offsets[1:] - offsets[:-1]).to(edges.device)
    base = torch.repeat_interleave(torch.arange(B, device=edges.device) * N, counts)
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


def mutual_knn_graph(points: torch.Tensor, k: int, backend: str = "auto") -> KNNGraph:
    """Mutual k-NN graph of each point set (METHOD.md section 4).

    Args:
        points: ``[n, d]`` or ``[b, n, d]`` floating tensor, finite, ``n >= 2`` (one graph per set).
        k: neighbours per point, ``>= 1``; ``k >= n - 1`` gives every pair.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` for the neighbour search (module docstring).

    Returns:
        :class:`KNNGraph` with edges ``i < j`` sorted per graph and lengths differentiable
        with respect to ``points``.
    """
    pts = check_points(points)
    k = check_k(k)
    B, N, _ = pts.shape
    if k >= N - 1:
        iu = torch.triu_indices(N, N, 1, device=pts.device).T
        edges = iu.repeat(B, 1)
        offsets = torch.arange(B + 1, dtype=torch.int64) * iu.shape[0]
    else:
        nbr = knn(pts.detach(), k, backend=backend)
        edges, offsets = _mutual_from_knn(nbr)
    lengths = edge_lengths(pts, edges, offsets)
    return KNNGraph(edges, lengths, offsets, N)
