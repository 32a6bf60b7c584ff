"""Fused k-nearest-neighbour search: distance tiles + a running top-k, never an n x n matrix.

Tie rule (the one the PyTorch reference uses): neighbours are ordered by (squared distance, index),
so among equally distant points the smaller index wins; see ``_common.py`` for the packed keys.
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
def _knn_fwd_kernel(
    x_ptr,  # [B, N, D] fp32/fp16/bf16: points
    sqn_ptr,  # [B, N] fp32: squared norms of the points
    out_ptr,  # [B, N, KP] int64: packed (d2, index) keys of the KC best candidates, unsorted
    N,
    D,
    stride_xb,
    stride_xn,
    stride_xd,
    stride_sb,
    stride_ob,
    stride_on,
    KC: tl.constexpr,  # candidates kept per row
    KP: tl.constexpr,  # KC rounded up to a power of two (slots >= KC are padding)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,  # cast tiles to fp32 before tl.dot (interpreter, or fp32 inputs)
    PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 tiles: "ieee" or "tf32"
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # int64 offsets: B * N * D may exceed 2**31
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    x_b = x_ptr + b * stride_xb
    sq_r = tl.load(sqn_ptr + b * stride_sb + rows, mask=row_ok, other=0.0)

    best = init_topk(BLOCK_M, KP, KC)

    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        acc = dot_tile(x_b, rows, row_ok, stride_xn, stride_xd, x_b, cols, col_ok, stride_xn, stride_xd, D,
                       BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, PRECISION)
        sq_c = tl.load(sqn_ptr + b * stride_sb + cols, mask=col_ok, other=0.0)
        d2 = sq_r[:, None] + sq_c[None, :] - 2.0 * acc
        valid = col_ok[None, :] & (cols[None, :] != rows[:, None]) & row_ok[:, None]
        best = merge_topk(best, pack_keys(d2, cols[None, :], valid), KC)

    slot = tl.arange(0, KP)
    out = out_ptr + b * stride_ob + rows[:, None].to(tl.int64) * stride_on + slot[None, :]
    tl.store(out, best, mask=row_ok[:, None] & (slot[None, :] < KC))


def knn_fwd(points: torch.Tensor, k: int, precision: str = "ieee"):
    """Launch the fused kNN kernel.

    Args:
        points: ``[B, N, D]`` fp32/fp16/bf16 on a CUDA device (or CPU under ``TRITON_INTERPRET=1``).
        k: candidates per point, ``1 <= k <= min(N - 1, 64)``.
        precision: ``"ieee"`` (exact fp32 products) or ``"tf32"`` (tensor cores for fp32 inputs;
            the caller re-ranks exactly, see ``reta_fast.knn``).

    Returns:
        ``(d2, idx)``: ``[B, N, k]`` fp32 squared distances as the kernel computed them
        (``|x|^2 + |y|^2 - 2 x.y``, clamped at 0) and int64 indices, sorted by (distance, index).
    """
    if points.dim() != 3:
        raise ValueError(f"points must be [B, N, D], got {tuple(points.shape)}")
    B, N, D = points.shape
    if not 1 <= k <= min(N - 1, 64):
        raise ValueError(f"knn_fwd needs 1 <= k <= min(N - 1, 64), got k={k}, N={N}")
    if N >= EMPTY_BASE.value:
        raise ValueError(f"knn_fwd supports N < 2**30 points per set, got {N}")
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"precision must be 'ieee' or 'tf32', got {precision!r}")
    points = points.contiguous()
    sqn = points.float().pow(2).sum(-1).contiguous()
    kp = triton.next_power_of_2(k)
    out = torch.empty((B, N, kp), dtype=torch.int64, device=points.device)
    block_d = max(16, min(64, triton.next_power_of_2(D)))  # tl.dot needs K >= 16
    if _INTERPRET:  # the interpreter pays per op, not per element: few large blocks
        block_m, block_n, warps = 64, 128, 4
    else:
        block_m, block_n, warps = 64, 64, 4
    grid = (triton.cdiv(N, block_m), B)
    with torch.cuda.device(points.device) if points.is_cuda else contextlib.nullcontext():
        _knn_fwd_kernel[grid](
            points, sqn, out, N, D,
            points.stride(0), points.stride(1), points.stride(2),
            sqn.stride(0), out.stride(0), out.stride(1),
            KC=k, KP=kp, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            DOT_FP32=_INTERPRET or points.dtype == torch.float32,
            PRECISION=precision,
            num_warps=warps,
        )
    keys = out[..., :k].sort(dim=-1).values  # int64 order == (distance, index) order
    return unpack_keys(keys)
