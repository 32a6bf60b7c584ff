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
from .configs import Ptr, Variant, arg_cases

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
MAX_K = 64
PRECISIONS = ("ieee", "tf32")
# KC only bounds loops and masks: one compiled kernel per KP serves every KC <= KP (triton would
# otherwise compile KC == 1 and KC % 16 == 0 separately).
_NOSPEC = ("KC",)


@triton.jit(do_not_specialize=_NOSPEC)
def _knn_fwd_kernel(
    x_ptr,  # [B, N, D] fp32: points
    sqn_ptr,  # [B, N] fp32: squared norms of the points
    out_ptr,  # [B, N, KP] int64: packed (d2, index) keys of the KC best candidates, unsorted
    N,
    D,
    KC,  # candidates kept per row, <= KP
    stride_xb,
    stride_xn,
    stride_xd,
    stride_sb,
    stride_ob,
    stride_on,
    KP: tl.constexpr,  # KC rounded up to a power of two (slots >= KC are padding)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" or "tf32"
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
                       BLOCK_M, BLOCK_N, BLOCK_D, True, PRECISION)  # DOT_FP32: fp32 points
        sq_c = tl.load(sqn_ptr + b * stride_sb + cols, mask=col_ok, other=0.0)
        d2 = sq_r[:, None] + sq_c[None, :] - 2.0 * acc
        valid = col_ok[None, :] & (cols[None, :] != rows[:, None]) & row_ok[:, None]
        best = merge_topk(best, pack_keys(d2, cols[None, :], valid), KC)

    slot = tl.arange(0, KP)
    out = out_ptr + b * stride_ob + rows[:, None].to(tl.int64) * stride_on + slot[None, :]
    tl.store(out, best, mask=row_ok[:, None] & (slot[None, :] < KC))


def knn_launch_config(dtype: torch.dtype, precision: str, k: int, D: int, interpret: bool = _INTERPRET) -> dict:
    """The launch configuration of :func:`knn_fwd`: ``{"constexprs": {...}, "options": {...}}``: the
    constexprs and the compile options (``num_warps``, ``num_stages``, ``maxnreg``) of the launch.

    The only place its block sizes, warps and stages are chosen; :func:`knn_configs` enumerates its
    GPU answers for the ahead-of-time resource check (``bench/kernel_resources.py``).
    """
    if dtype != torch.float32:
        raise ValueError(f"knn_fwd takes fp32 points, got {dtype}; cast half-precision points to fp32 first "
                         "(reta_fast's knn does, so the distances and the tie rule are fp32's)")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'ieee' or 'tf32', got {precision!r}")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"knn_fwd needs 1 <= k <= {MAX_K}, got k={k}")
    kp = triton.next_power_of_2(k)
    cx = {"KP": kp, "PRECISION": precision}
    if interpret:  # the interpreter pays per op, not per element: few large blocks
        cx.update(BLOCK_M=64, BLOCK_N=128, BLOCK_D=max(16, min(64, triton.next_power_of_2(D))))
        return {"constexprs": cx, "options": {"num_warps": 4, "num_stages": 3}}
    # GPU: one shape for every k, D and precision, spill-free on sm_80 and sm_90 (every variant:
    # bench/results/kernel-resources). Measured with triton 3.9 (ptxas 12.9 for sm_80, 13.4 for sm_90):
    # * The previous 64x64 tiles, BLOCK_D up to 64, 4 warps, 3 stages: ieee 255 registers + 896 B of
    #   stack per thread on sm_80 (16 B on sm_90), 64 KB of shared memory.
    # * BLOCK_D = 16, tl.dot's minimum, whatever D: ieee tiles go through FMAs and a thread holds its
    #   rows' and columns' BLOCK_D slices. BLOCK_D = 32 ran out of registers (255, then stack) in 24
    #   of 196 (variant, target) pairs with 32x64 tiles, 26 with 64x32 (8 warps, 2 stages, maxnreg=255).
    # * maxnreg=255: left alone, ptxas trades small spills (8-40 B) for occupancy whenever a variant
    #   needs a little over 80 or 128 registers; each of 13 shapes tried (32/64 x 32/64 tiles,
    #   BLOCK_D 16/32, 4/8 warps, 1-3 stages) spilled in 3 to 19 of its (variant, target) pairs.
    #   With maxnreg it allocates what a variant needs: here at most 210 registers (ieee; tf32 128),
    #   so ieee variants above 128 run one 8-warp program per SM. maxnreg=128 spilled in 22 of 112.
    # * 64 rows x 32 columns, 8 warps, 2 stages (the next BLOCK_D slice loads during the FMAs): each
    #   program reads every column tile once, so 64 rows read the points half as often as 32; 64x64
    #   needs up to 254 registers (no headroom).
    cx.update(BLOCK_M=64, BLOCK_N=32, BLOCK_D=16)
    return {"constexprs": cx, "options": {"num_warps": 8, "num_stages": 2, "maxnreg": 255}}


def knn_fwd(points: torch.Tensor, k: int, precision: str = "ieee"):
    """Launch the fused kNN kernel.

    Args:
        points: ``[B, N, D]`` fp32 on a CUDA device (or CPU under ``TRITON_INTERPRET=1``); other
            dtypes raise ``ValueError`` (the caller casts half precision to fp32).
        k: candidates per point, ``1 <= k <= min(N - 1, 64)``.
        precision: ``"ieee"`` (exact fp32 products) or ``"tf32"`` (tensor cores; the caller,
            ``reta_fast``'s ``knn``, re-ranks exactly).

    Returns:
        ``(d2, idx)``: ``[B, N, k]`` fp32 squared distances as the kernel computed them
        (``|x|^2 + |y|^2 - 2 x.y``, clamped at 0) and int64 indices, sorted by (distance, index).
    """
    if points.dim() != 3:
        raise ValueError(f"points must be [B, N, D], got {tuple(points.shape)}")
    B, N, D = points.shape
    if not 1 <= k <= min(N - 1, MAX_K):
        raise ValueError(f"knn_fwd needs 1 <= k <= min(N - 1, {MAX_K}), got k={k}, N={N}")
    if N >= EMPTY_BASE.value:
        raise ValueError(f"knn_fwd supports N < 2**30 points per set, got {N}")
    cfg = knn_launch_config(points.dtype, precision, k, D)
    cx = cfg["constexprs"]
    points = points.contiguous()
    sqn = points.pow(2).sum(-1).contiguous()
    out = torch.empty((B, N, cx["KP"]), dtype=torch.int64, device=points.device)
    grid = (triton.cdiv(N, cx["BLOCK_M"]), B)
    with torch.cuda.device(points.device) if points.is_cuda else contextlib.nullcontext():
        _knn_fwd_kernel[grid](
            points, sqn, out, N, D, k,
            points.stride(0), points.stride(1), points.stride(2),
            sqn.stride(0), out.stride(0), out.stride(1),
            **cx, **cfg["options"],
        )
    keys = out[..., :k].sort(dim=-1).values  # int64 order == (distance, index) order
    return unpack_keys(keys)


def _args(N: int, D: int, kp: int, x_aligned: bool) -> dict:
    """Representative runtime arguments of one launch: what :func:`knn_fwd` passes for ``[B, N, D]``
    contiguous points (``stride_xd`` is always 1, a constant for triton), ``KC = KP``."""
    return {"x_ptr": Ptr("fp32", x_aligned), "sqn_ptr": Ptr("fp32"), "out_ptr": Ptr("i64"), "N": N, "D": D, "KC": kp,
            "stride_xb": N * D, "stride_xn": D, "stride_xd": 1, "stride_sb": N, "stride_ob": N * kp, "stride_on": kp}


def knn_configs():
    """Every kernel :func:`knn_fwd` can launch on a GPU, as :class:`~.configs.Variant` s: each
    precision, each KP (KC in 1..64 maps to KP in 1, 2, 4, ..., 64 and is a runtime argument), each
    configuration the launcher picks for some D and each argument case of that D (see
    :func:`~.configs.arg_cases`). Derived from :func:`knn_launch_config` itself, so the two cannot
    disagree."""
    seen = set()
    for precision in PRECISIONS:
        for k in range(1, MAX_K + 1):
            for cfg, case, d, aligned in arg_cases(
                    lambda d, p=precision, k=k: knn_launch_config(torch.float32, p, k, d, interpret=False)):
                cx = cfg["constexprs"]
                v = Variant(kernel="knn", module=__name__, fn_name=_knn_fwd_kernel.__name__,
                            args=_args(4096 if case == "D%16=0" else 1001, d, cx["KP"], aligned), constexprs=cx,
                            options=cfg["options"], label={"dtype": "fp32", "precision": precision, "case": case},
                            nospec=_NOSPEC)
                if v.key() not in seen:
                    seen.add(v.key())
                    yield v
