"""Fused grouped fit-complexity search (DRC retrieval, METHOD.md section 3).

For each query q of class c, the best candidates among the pool patches o of class c by
``J = (1 - lam) |q - z(o)|^2 + lam c(o)``, computed as ``(1 - lam) |q|^2 + bias(o) - 2 (1 - lam) q.z``
with ``bias(o) = (1 - lam) |z(o)|^2 + lam c(o)``. Distance tiles, bias and a running top-KC are fused:
the B x P score matrix is never materialised. Queries and pool are sorted by class; the host builds
a work list of tiles (query range, pool range) that never cross a class.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from ._common import EMPTY_BASE, dot_tile, init_topk, merge_topk, pack_keys, unpack_keys

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _retrieve_fwd_kernel(
    q_ptr,  # [B, D] fp32/fp16/bf16: queries, sorted by class
    qsq_ptr,  # [B] fp32: (1 - lam) |q|^2
    z_ptr,  # [P, D] fp32/fp16/bf16: pool features, sorted by class
    bias_ptr,  # [P] fp32: (1 - lam) |z|^2 + lam c
    tiles_ptr,  # [T, 4] int32: query start, query end, pool start, pool end of each work tile
    out_ptr,  # [B, KP] int64: packed (score, sorted-pool index) keys of the KC best, unsorted
    D,
    scale,  # fp32: 2 (1 - lam)
    stride_qb,
    stride_qd,
    stride_zp,
    stride_zd,
    stride_ob,
    KC: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    t = tl.program_id(0)
    q0 = tl.load(tiles_ptr + 4 * t)
    q1 = tl.load(tiles_ptr + 4 * t + 1)
    p0 = tl.load(tiles_ptr + 4 * t + 2)
    p1 = tl.load(tiles_ptr + 4 * t + 3)
    rows = q0 + tl.arange(0, BLOCK_Q)
    row_ok = rows < q1
    qsq = tl.load(qsq_ptr + rows, mask=row_ok, other=0.0)
    best = init_topk(BLOCK_Q, KP, KC)
    for start in range(p0, p1, BLOCK_P):
        cols = start + tl.arange(0, BLOCK_P)
        col_ok = cols < p1
        acc = dot_tile(q_ptr, rows, row_ok, stride_qb, stride_qd, z_ptr, cols, col_ok, stride_zp, stride_zd, D,
                       BLOCK_Q, BLOCK_P, BLOCK_D, DOT_FP32, PRECISION)
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
        score = qsq[:, None] + bias[None, :] - scale * acc
        valid = row_ok[:, None] & col_ok[None, :]
        best = merge_topk(best, pack_keys(score, cols[None, :], valid), KC)
    slot = tl.arange(0, KP)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_ob + slot[None, :], best,
             mask=row_ok[:, None] & (slot[None, :] < KC))


def retrieve_fwd(q: torch.Tensor, qsq: torch.Tensor, z: torch.Tensor, bias: torch.Tensor,
                 q_offsets: torch.Tensor, p_offsets: torch.Tensor, lam: float, kc: int,
                 precision: str = "ieee"):
    """Top-``kc`` candidates per query within its class.

    Args:
        q: ``[B, D]`` queries sorted by class; ``qsq``: ``[B]`` fp32 ``(1 - lam) |q|^2``.
        z: ``[P, D]`` pool features sorted by class; ``bias``: ``[P]`` fp32.
        q_offsets, p_offsets: ``[C + 1]`` int64 CPU class boundaries of the sorted queries / pool.
        kc: candidates per query, ``1 <= kc <= 64`` and at most the smallest class pool with queries.

    Returns:
        ``(score, idx)``: ``[B, kc]`` fp32 approximate scores and int64 sorted-pool indices,
        ordered by (score, index).
    """
    B, D = q.shape
    P = z.shape[0]
    if P >= EMPTY_BASE.value:
        raise ValueError(f"retrieve_fwd supports pools of < 2**30 patches, got {P}")
    if not 1 <= kc <= 64:
        raise ValueError(f"kc must be in [1, 64], got {kc}")
    block_q = 64 if _INTERPRET else 32
    block_p = 128 if _INTERPRET else 64
    block_d = max(16, min(64, triton.next_power_of_2(D)))  # tl.dot needs K >= 16
    tiles = []
    qo, po = q_offsets.tolist(), p_offsets.tolist()
    for c in range(len(qo) - 1):
        for s in range(qo[c], qo[c + 1], block_q):
            tiles.append((s, min(qo[c + 1], s + block_q), po[c], po[c + 1]))
    kp = triton.next_power_of_2(kc)
    out = torch.empty((B, kp), dtype=torch.int64, device=q.device)
    if tiles:
        tiles_t = torch.tensor(tiles, dtype=torch.int32, device=q.device)
        q, z = q.contiguous(), z.contiguous()
        ctx = torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()
        with ctx:
            _retrieve_fwd_kernel[(len(tiles),)](
                q, qsq.contiguous(), z, bias.contiguous(), tiles_t, out, D, 2.0 * (1.0 - lam),
                q.stride(0), q.stride(1), z.stride(0), z.stride(1), out.stride(0),
                KC=kc, KP=kp, BLOCK_Q=block_q, BLOCK_P=block_p, BLOCK_D=block_d,
                DOT_FP32=_INTERPRET or q.dtype == torch.float32, PRECISION=precision, num_warps=4,
            )
    return unpack_keys(out[:, :kc].sort(dim=1).values)
