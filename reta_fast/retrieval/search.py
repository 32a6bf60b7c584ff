"""Dynamic Retrieval Connection (DRC, docs/method.md §3): the complexity proxy, the grouped
fit-complexity search and the residual injection.

Retrieval semantics (defined by :func:`retrieve_ref`; every backend returns exactly its answer):
for a synthetic image with feature ``q`` and class ``y``, the index into the pool of
``argmin_o (1 - lam) ||q - z(o)||^2 + lam c(o)`` over the patches ``o`` of class ``y``, computed in
float64; among equal scores the **smaller pool index** wins.

The fast path searches the few best candidates per query in fp32 (the fused Triton kernel on the GPU,
a batched GEMM over padded classes elsewhere) and certifies each answer with an error bound on the
fp32 scores: a candidate more than two bounds ahead of the next is the float64 winner; otherwise the
candidates are re-ranked with the reference's float64 formula, and a query whose float64 best is not
below the smallest score an unseen patch could have (last candidate's fp32 score minus the bound) is
recomputed by brute force over its class.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Optional

import torch

from .._validate import check_finite, check_labels

__all__ = ["retrieve", "retrieve_ref"]

# Candidates kept per query by the fp32 search before the float64 re-rank.
RETRIEVE_CANDIDATES = 4
# Elements per temporary of the torch candidate search (padded classes x queries x patches).
TORCH_CHUNK_ELEMS = 1 << 24
# Scores from the fp32 expansion are within REL_ERR(D) * ((1 - lam)(|q|^2 + max|z|^2) + lam max c)
# of float64: rounding of each product and of the D-term accumulation (D 2^-24 worst case), doubled.
_FP32_REL = lambda d: 2.0 * (d + 8) * 2.0**-24  # noqa: E731
# tf32 tiles round inputs to 10 mantissa bits (see reta_fast.knn.TF32_REL_ERR).
_TF32_REL = lambda d: 2.0**-8 + _FP32_REL(d)  # noqa: E731


# --------------------------------------------------------------------------------------------
# complexity proxy


# --------------------------------------------------------------------------------------------
# retrieval


def _check_features(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape [n, D], got {tuple(x.shape)}")
    check_finite(x, name)
    return x


def _validate_retrieval(query_feats, query_labels, pool_feats, pool_labels, pool_complexity, lam, num_classes):
    q = _check_features(query_feats, "query_feats")
    z = _check_features(pool_feats, "pool_feats")
    if z.shape[0] == 0:
        raise ValueError("the pool is empty (pool_feats has 0 rows)")
    if q.shape[1] != z.shape[1]:
        raise ValueError(f"feature dimensions differ: query_feats has D={q.shape[1]}, pool_feats has D={z.shape[1]}")
    if z.device != q.device:
        raise ValueError(f"pool_feats is on {z.device} but query_feats is on {q.device}")
    ql = check_labels(query_labels, q.shape[0], "query_labels", q.device, num_classes)
    pl = check_labels(pool_labels, z.shape[0], "pool_labels", q.device, num_classes)
    if not isinstance(pool_complexity, torch.Tensor) or not pool_complexity.is_floating_point():
        raise TypeError("pool_complexity must be a floating-point torch.Tensor")
    if pool_complexity.shape != (z.shape[0],):
        raise ValueError(f"pool_complexity must have shape [{z.shape[0]}], got {tuple(pool_complexity.shape)}")
    if pool_complexity.device != q.device:
        raise ValueError(f"pool_complexity is on {pool_complexity.device} but query_feats is on {q.device}")
    check_finite(pool_complexity, "pool_complexity")
    if bool((pool_complexity < 0).any()):
        raise ValueError("pool_complexity must be >= 0 (the proxy is a variance)")
    if not (isinstance(lam, (int, float)) and 0.0 <= lam <= 1.0):
        raise ValueError(f"lam must be a number in [0, 1], got {lam!r}")
    if q.shape[0]:
        missing = ~torch.isin(ql, pl)
        if bool(missing.any()):
            cls = sorted(set(ql[missing].cpu().tolist()))
            raise ValueError(f"classes {cls[:10]} of query_labels have no patches in the pool")
    return q, ql, z, pl, pool_complexity


def _scores_f64(q: torch.Tensor, z: torch.Tensor, c: torch.Tensor, lam: float) -> torch.Tensor:
    """The reference score ``(1 - lam) ||q - z||^2 + lam c`` in float64 (broadcasting on the last
    dimension); reference and re-rank share it so equal inputs give bit-equal scores."""
    return (1.0 - lam) * (q.double() - z.double()).pow(2).sum(-1) + lam * c.double()


def retrieve_ref(query_feats, query_labels, pool_feats, pool_labels, pool_complexity, lam: float = 0.1,
                 exclusive: bool = False) -> torch.Tensor:
    """Brute-force reference of :func:`retrieve` (float64, materialises the B x P scores)."""
    q, ql, z, pl, c = _validate_retrieval(query_feats, query_labels, pool_feats, pool_labels, pool_complexity, lam, None)
    s = _scores_f64(q[:, None, :], z[None, :, :], c[None, :], lam)
    s = torch.where(ql[:, None] == pl[None, :], s, float("inf"))
    if not exclusive:
        return s.argmin(dim=1)  # first minimum: the smaller pool index on ties
    out = torch.empty(q.shape[0], dtype=torch.int64, device=q.device)
    for i in range(q.shape[0]):  # greedy, queries in index order
        j = int(s[i].argmin())
        if not math.isfinite(float(s[i, j])):
            raise ValueError(f"exclusive retrieval: class {int(ql[i])} has fewer patches than queries")
        out[i] = j
        s[:, j] = float("inf")
    return out


def _candidates_torch(q, qsq, z, bias, q_off, p_off, lam, kc):
    """fp32 candidates per class (the CPU counterpart of the fused kernel): classes padded to the
    largest query/pool count and searched with one batched GEMM per chunk of classes."""
    B, D = q.shape
    dev = q.device
    score = torch.full((B, kc), float("inf"), dtype=torch.float32, device=dev)
    idx = torch.full((B, kc), -1, dtype=torch.int64, device=dev)
    q_cnt, p_cnt = q_off.diff(), p_off.diff()
    classes = (q_cnt > 0).nonzero().flatten()
    qmax, pmax = int(q_cnt.max()), int(p_cnt[classes].max())
    m = min(kc, pmax)
    per_chunk = max(1, TORCH_CHUNK_ELEMS // max(1, qmax * pmax, qmax * D, pmax * D))
    qf, zf = q.float(), z.float()
    uniform = bool((q_cnt == qmax).all()) and bool((p_cnt == pmax).all())  # every class equally full
    for c0 in range(0, classes.numel(), per_chunk):
        cls = classes[c0:c0 + per_chunk]
        G = cls.numel()
        # padded [G, qmax] / [G, pmax] index grids into the sorted queries / pool (-1 = padding)
        qi = q_off[cls][:, None] + torch.arange(qmax)
        pi = p_off[cls][:, None] + torch.arange(pmax)
        qi = torch.where(torch.arange(qmax) < q_cnt[cls][:, None], qi, -1).to(dev)
        pi = torch.where(torch.arange(pmax) < p_cnt[cls][:, None], pi, -1).to(dev)
        if uniform:  # consecutive equal blocks: views, no gather
            qpad = qf[c0 * qmax:(c0 + G) * qmax].view(G, qmax, D)
            zpad = zf[c0 * pmax:(c0 + G) * pmax].view(G, pmax, D)
        else:
            qpad = qf[qi.clamp_min(0)]  # [G, qmax, D]
            zpad = zf[pi.clamp_min(0)]  # [G, pmax, D]
        b = torch.where(pi >= 0, bias[pi.clamp_min(0)], float("inf"))
        s = torch.baddbmm(b[:, None, :], qpad, zpad.transpose(1, 2), alpha=-2.0 * (1.0 - lam))
        s = s + qsq[qi.clamp_min(0)][:, :, None]
        v, j = torch.topk(s, m, dim=2, largest=False, sorted=True)
        cand = torch.gather(pi[:, None, :].expand(-1, qmax, -1), 2, j)
        keep = qi >= 0
        rows = qi[keep]
        score[rows, :m] = v[keep]
        idx[rows, :m] = torch.where(torch.isfinite(v[keep]), cand[keep], -1)
    return score, idx


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    """Row squared norms in fp32 without an ``[n, D]`` temporary (and never through a TF32 GEMM)."""
    return torch.linalg.vector_norm(x.float(), dim=1).pow(2)


def _triton_ok(t: torch.Tensor) -> bool:
    if not (t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))):
        return False
    try:
        from .. import kernels  # noqa: F401  (optional: needs triton)
    except Exception:
        return False
    return True


def retrieve(
    query_feats: torch.Tensor,
    query_labels: torch.Tensor,
    pool_feats,
    pool_labels: Optional[torch.Tensor] = None,
    pool_complexity: Optional[torch.Tensor] = None,
    lam: float = 0.1,
    exclusive: bool = False,
    resolution: Optional[int] = None,
    backend: str = "auto",
    precision: str = "ieee",
) -> torch.Tensor:
    """DRC retrieval: for each query, the pool index of its class's best fit-complexity patch.

    Args:
        query_feats: ``[B, D]`` float features of the synthetic images (normalise them yourself,
            as the pool's are: docs/method.md §3 uses L2-normalised penultimate teacher features).
        query_labels: ``[B]`` integer classes.
        pool_feats: ``[P, D]`` float pool features, or a :class:`reta_fast.PatchPool` (then
            ``pool_labels``/``pool_complexity`` come from it, at ``resolution``).
        pool_labels: ``[P]`` integer classes of the pool patches.
        pool_complexity: ``[P]`` float, ``>= 0`` (see :func:`patch_complexity`).
        lam: weight of the complexity term, in ``[0, 1]`` (paper: 0.1).
        exclusive: if True, patches are distinct within a class: queries, in index order, each take
            their best patch not yet taken (greedy; ties by smaller pool index). Needs at least as
            many patches as queries in every class.
        backend: ``"auto"`` (fused Triton kernel on CUDA, per-class GEMM elsewhere), ``"triton"``,
            ``"torch"``.
        precision: ``"ieee"`` or ``"tf32"`` for the kernel's fp32 tiles; the answer is the same.

    Returns:
        ``[B]`` int64 indices into the pool, on the device of ``query_feats``; exactly
        :func:`retrieve_ref`'s answer.
    """
    from_pool = hasattr(pool_feats, "retrieval_tensors")
    if from_pool:
        if pool_labels is not None or pool_complexity is not None:
            raise ValueError("pass either a PatchPool or the three pool tensors, not both")
        dev = query_feats.device if isinstance(query_feats, torch.Tensor) else "cpu"
        pool_feats, pool_labels, pool_complexity = pool_feats.retrieval_tensors(resolution, device=dev)
    elif pool_labels is None or pool_complexity is None:
        raise ValueError("pool_labels and pool_complexity are required with pool_feats tensors")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"precision must be 'ieee' or 'tf32', got {precision!r}")
    q, ql, z, pl, c = _validate_retrieval(query_feats, query_labels, pool_feats, pool_labels, pool_complexity, lam, None)
    B, D = q.shape
    if B == 0:
        return torch.zeros(0, dtype=torch.int64, device=q.device)
    if from_pool:  # a PatchPool's features are L2-normalised: raw queries would make lam meaningless
        n2 = float(q.detach().float().pow(2).sum(1).sub(1).abs().max())  # host sync, once per call
        if not n2 <= 0.05:
            raise ValueError(f"query_feats are not L2-normalised (|‖q‖² − 1| up to {n2:.3g}) while the PatchPool's "
                             f"features are: pass torch.nn.functional.normalize(feats, dim=1)")
    if exclusive:
        with torch.no_grad():
            return _retrieve_exclusive(q, ql, z, pl, c, lam)
    with torch.no_grad():
        return _retrieve_fast(q, ql, z, pl, c, lam, backend, precision)


def _retrieve_fast(q, ql, z, pl, c, lam, backend, precision):
    B, D = q.shape
    dev = q.device
    # Dense class ids 0..n_cls-1 over the classes present, whatever the ids (memory and the kernel's
    # work list then scale with the number of classes, not with the largest id).
    ids, inv = torch.unique(torch.cat([ql, pl]), return_inverse=True)
    n_cls = ids.numel()  # host sync: the work list is built on the host
    ql, pl = inv[:B], inv[B:]
    q_order = torch.sort(ql, stable=True).indices
    p_order = torch.sort(pl, stable=True).indices  # stable: index order kept inside a class
    q_off = torch.zeros(n_cls + 1, dtype=torch.int64)
    p_off = torch.zeros(n_cls + 1, dtype=torch.int64)
    q_off[1:] = torch.bincount(ql, minlength=n_cls).cumsum(0).cpu()
    p_off[1:] = torch.bincount(pl, minlength=n_cls).cumsum(0).cpu()
    # Already class-sorted inputs (a PatchPool is stored that way) are used as they are: no copy.
    qs = q if bool((ql[1:] >= ql[:-1]).all()) else q[q_order]  # host sync
    zs = z if bool((pl[1:] >= pl[:-1]).all()) else z[p_order]  # host sync
    # The fp32 search needs one dtype on both sides: a shared half type, else fp32 (float64 inputs
    # are searched in fp32 and re-ranked in float64 like the others).
    search_dtype = q.dtype if (q.dtype == z.dtype and q.dtype in (torch.float16, torch.bfloat16)) else torch.float32
    qs_search, zs_search = qs.to(search_dtype), zs.to(search_dtype)
    q_sq = _sq_norms(qs)
    z_sq = _sq_norms(z)  # original order
    qsq = (1.0 - lam) * q_sq
    bias = ((1.0 - lam) * z_sq + lam * c.float())[p_order]
    kc = RETRIEVE_CANDIDATES
    use_triton = backend == "triton" or (backend == "auto" and _triton_ok(q))
    if use_triton:
        if not _triton_ok(q):
            raise RuntimeError("backend='triton' requested but Triton cannot run here (no CUDA device "
                               "and TRITON_INTERPRET unset, or triton missing)")
        from ..kernels import retrieve_fwd

        approx, cand = retrieve_fwd(qs_search, qsq, zs_search, bias, q_off, p_off, lam, kc, precision)
        cand = torch.where(cand < z.shape[0], cand, -1)  # empty slots of classes smaller than kc
        approx = torch.where(cand >= 0, approx, float("inf"))
    else:
        if q.is_cuda:
            warnings.warn("reta_fast: triton unavailable; retrieve uses the batched torch search", RuntimeWarning)
        approx, cand = _candidates_torch(qs_search, qsq, zs_search, bias, q_off, p_off, lam, kc)
    orig = torch.where(cand >= 0, p_order[cand.clamp_min(0)], -1)  # original pool indices

    # Error bound of the fp32 scores, per query: every patch's fp32 score is within `bound` of its
    # float64 score.
    # tf32 tiles in the kernel, or cuBLAS allowed to use TF32 for the torch path's fp32 GEMMs
    tf32 = (use_triton and precision == "tf32") or (not use_triton and dev.type == "cuda" and (
        torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"))
    rel = (_TF32_REL if tf32 else _FP32_REL)(D)
    zmax = torch.zeros(n_cls, dtype=torch.float32, device=dev).scatter_reduce(0, pl, z_sq, "amax")
    cmax = torch.zeros(n_cls, dtype=torch.float32, device=dev).scatter_reduce(0, pl, c.float(), "amax")
    qcls = ql[q_order]
    bound = (rel * ((1.0 - lam) * (q_sq + zmax[qcls]) + lam * cmax[qcls]) + 1e-30).double()
    class_size = p_off.diff().to(dev)[qcls]
    best = orig[:, 0].clone()
    # 1) a clear fp32 winner (next candidate more than 2 bounds behind) is the float64 winner too
    a = approx.double()
    clear = (class_size == 1) | (a[:, 1] - a[:, 0] > 2 * bound) if kc > 1 else class_size == 1
    # fp32 overflow (huge features or complexities) leaves no usable candidate: brute force those
    broken = (orig[:, 0] < 0) | ~torch.isfinite(a[:, 0]) | ~torch.isfinite(bound)
    clear = clear & ~broken
    # 2) otherwise re-rank the candidates with the reference's float64 formula ...
    rows = (~clear).nonzero().flatten()  # host sync
    if rows.numel():
        o = orig[rows]
        valid = o >= 0
        exact = torch.where(valid, _scores_f64(qs[rows][:, None, :], z[o.clamp_min(0)], c[o.clamp_min(0)], lam),
                            float("inf"))
        by_idx = torch.sort(torch.where(valid, o, z.shape[0]), dim=1)  # (score, index) order
        ex_sorted = torch.gather(exact, 1, by_idx.indices)
        first = torch.sort(ex_sorted, dim=1, stable=True).indices[:, :1]
        best[rows] = torch.gather(by_idx.values, 1, first)[:, 0]
        # ... and certify: unseen patches score at least the last candidate's fp32 score - bound
        certain = ((class_size[rows] <= kc) | (ex_sorted.gather(1, first)[:, 0] < a[rows, -1] - bound[rows])) & \
            ~broken[rows]
        for i in rows[~certain].cpu().tolist():  # 3) brute force over the class (host loop, rare)
            k = int(qcls[i])
            members = p_order[int(p_off[k]): int(p_off[k + 1])]
            best[i] = members[int(_scores_f64(qs[i][None, :], z[members], c[members], lam).argmin())]
    out = torch.empty_like(best)
    out[q_order] = best
    return out


def _retrieve_exclusive(q, ql, z, pl, c, lam):
    """Greedy assignment without replacement, class by class, with exact float64 scores."""
    out = torch.empty(q.shape[0], dtype=torch.int64, device=q.device)
    for cls in torch.unique(ql).cpu().tolist():  # host loop over the classes present
        qi = (ql == cls).nonzero().flatten()
        pi = (pl == cls).nonzero().flatten()
        if pi.numel() < qi.numel():
            raise ValueError(f"exclusive retrieval: class {cls} has {pi.numel()} patches for {qi.numel()} queries")
        s = _scores_f64(q[qi][:, None, :], z[pi][None, :, :], c[pi][None, :], lam)
        for r in range(qi.numel()):
            j = int(s[r].argmin())
            out[qi[r]] = pi[j]
            s[:, j] = float("inf")
    return out


# --------------------------------------------------------------------------------------------
# residual connection


