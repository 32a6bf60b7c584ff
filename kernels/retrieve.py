"""Fused grouped fit-complexity search (DRC retrieval, docs/method.md §3).

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
from .configs import Ptr, Variant, arg_cases

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
MAX_KC = 64
PRECISIONS = ("ieee", "tf32")
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# KC only bounds loops and masks: one compiled kernel per KP serves every KC <= KP.
_NOSPEC = ("KC",)


@triton.jit(do_not_specialize=_NOSPEC)
def _retrieve_fwd_kernel(
    q_ptr,  # [B, D] fp32/fp16/bf16: queries, sorted by class
    qsq_ptr,  # [B] fp32: (1 - lam) |q|^2
    z_ptr,  # [P, D] fp32/fp16/bf16: pool features, sorted by class
    bias_ptr,  # [P] fp32: (1 - lam) |z|^2 + lam c
    tiles_ptr,  # [T, 4] int32: query start, query end, pool start, pool end of each work tile
    out_ptr,  # [B, KP] int64: packed (score, sorted-pool index) keys of the KC best, unsorted
    D,
    KC,  # candidates kept per query, <= KP
    scale,  # fp32: 2 (1 - lam)
    stride_qb,
    stride_qd,
    stride_zp,
    stride_zd,
    stride_ob,
    KP: tl.constexpr,  # KC rounded up to a power of two (slots >= KC are padding)
    BLOCK_Q: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,  # fp32 tiles into tl.dot (fp32 inputs, or any input in the interpreter)
    PRECISION: tl.constexpr,  # tl.dot input_precision of fp32 tiles: "ieee" or "tf32"
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


def retrieve_launch_config(q_dtype: torch.dtype, z_dtype: torch.dtype, precision: str, kc: int, D: int,
                           interpret: bool = _INTERPRET) -> dict:
    """The launch configuration of :func:`retrieve_fwd`: ``{"constexprs": {...}, "options": {...}}``: the
    constexprs and the compile options (``num_warps``, ``num_stages``, ``maxnreg``) of the launch.

    The only place its block sizes, warps and stages are chosen; :func:`retrieve_configs` enumerates
    its GPU answers for the ahead-of-time resource check (``bench/kernel_resources.py``).
    """
    if q_dtype != z_dtype or q_dtype not in DTYPES:
        raise ValueError(f"retrieve_fwd needs queries and pool of one dtype among fp32/fp16/bf16, got "
                         f"{q_dtype} and {z_dtype}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'ieee' or 'tf32', got {precision!r}")
    if not 1 <= kc <= MAX_KC:
        raise ValueError(f"kc must be in [1, {MAX_KC}], got {kc}")
    dot_fp32 = interpret or q_dtype == torch.float32  # the interpreter's tl.dot takes fp32 tiles
    if not dot_fp32:
        precision = "ieee"  # unused by half tiles: one compiled kernel, not one per value
    kp = triton.next_power_of_2(kc)
    cx = {"KP": kp, "DOT_FP32": dot_fp32, "PRECISION": precision}
    if interpret:  # the interpreter pays per op, not per element: few large blocks
        cx.update(BLOCK_Q=64, BLOCK_P=128, BLOCK_D=max(16, min(64, triton.next_power_of_2(D))))
        return {"constexprs": cx, "options": {"num_warps": 4, "num_stages": 3}}
    # GPU: one shape for every kc, D and dtype, spill-free on sm_80 and sm_90 (the reasons are knn's,
    # see knn_launch_config; every variant: bench/results/kernel-resources). The previous 32x64 tiles
    # with BLOCK_D up to 64 and 4 warps: fp32 ieee 255 registers + 296 B of stack on sm_80. BLOCK_Q =
    # 32: a class holds few queries (IPC), so taller tiles would mostly be masked rows. BLOCK_D = 16
    # and maxnreg=255 as for knn; with 32x64 tiles, 8 warps and 2 stages: at most 190 registers (fp32
    # ieee; tf32 110, fp16/bf16 96), none spilled. Without maxnreg 18 of 224 (variant, target) pairs
    # spilled, with maxnreg=128 17 (all fp32 ieee on sm_90).
    cx.update(BLOCK_Q=32, BLOCK_P=64, BLOCK_D=16)
    return {"constexprs": cx, "options": {"num_warps": 8, "num_stages": 2, "maxnreg": 255}}


def retrieve_fwd(q: torch.Tensor, qsq: torch.Tensor, z: torch.Tensor, bias: torch.Tensor,
                 q_offsets: torch.Tensor, p_offsets: torch.Tensor, lam: float, kc: int,
                 precision: str = "ieee"):
    """Top-``kc`` candidates per query within its class.

    Args:
        q: ``[B, D]`` queries sorted by class; ``qsq``: ``[B]`` fp32 ``(1 - lam) |q|^2``.
        z: ``[P, D]`` pool features sorted by class, the dtype of ``q`` (fp32, fp16 or bf16);
            ``bias``: ``[P]`` fp32.
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
    cfg = retrieve_launch_config(q.dtype, z.dtype, precision, kc, D)
    cx = cfg["constexprs"]
    block_q = cx["BLOCK_Q"]
    tiles = []
    qo, po = q_offsets.tolist(), p_offsets.tolist()
    for c in range(len(qo) - 1):
        for s in range(qo[c], qo[c + 1], block_q):
            tiles.append((s, min(qo[c + 1], s + block_q), po[c], po[c + 1]))
    out = torch.empty((B, cx["KP"]), dtype=torch.int64, device=q.device)
    if tiles:
        tiles_t = torch.tensor(tiles, dtype=torch.int32, device=q.device)
        q, z = q.contiguous(), z.contiguous()
        ctx = torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()
        with ctx:
            _retrieve_fwd_kernel[(len(tiles),)](
                q, qsq.contiguous(), z, bias.contiguous(), tiles_t, out, D, kc, 2.0 * (1.0 - lam),
                q.stride(0), q.stride(1), z.stride(0), z.stride(1), out.stride(0),
                **cx, **cfg["options"],
            )
    return unpack_keys(out[:, :kc].sort(dim=1).values)


def _args(D: int, kp: int, dtype: str, aligned: bool) -> dict:
    """Representative runtime arguments of one launch: what :func:`retrieve_fwd` passes for
    contiguous ``[B, D]`` queries and ``[P, D]`` pool (unit inner strides, constants for triton).
    Unaligned: the caller's tensors are views at an odd offset."""
    return {"q_ptr": Ptr(dtype, aligned), "qsq_ptr": Ptr("fp32", aligned), "z_ptr": Ptr(dtype, aligned),
            "bias_ptr": Ptr("fp32", aligned), "tiles_ptr": Ptr("i32"), "out_ptr": Ptr("i64"), "D": D, "KC": kp,
            "scale": 1.8, "stride_qb": D, "stride_qd": 1, "stride_zp": D, "stride_zd": 1, "stride_ob": kp}


def retrieve_configs():
    """Every kernel :func:`retrieve_fwd` can launch on a GPU, as :class:`~.configs.Variant` s: fp32
    inputs with each precision and fp16/bf16 inputs (half tiles into ``tl.dot``), each KP (KC in
    1..64 maps to KP in 1, 2, 4, ..., 64 and is a runtime argument), each configuration the launcher
    picks for some D and each argument case of that D (see :func:`~.configs.arg_cases`). Derived from
    :func:`retrieve_launch_config` itself, so the two cannot disagree."""
    seen = set()
    for dtype, name in DTYPES.items():
        for precision in PRECISIONS:
            for kc in range(1, MAX_KC + 1):
                for cfg, case, d, aligned in arg_cases(
                        lambda d, t=dtype, p=precision, kc=kc: retrieve_launch_config(t, t, p, kc, d,
                                                                                      interpret=False)):
                    cx = cfg["constexprs"]
                    v = Variant(kernel="retrieve", module=__name__, fn_name=_retrieve_fwd_kernel.__name__,
                                args=_args(d, cx["KP"], name, aligned), constexprs=cx, options=cfg["options"],
                                label={"dtype": name, "precision": cx["PRECISION"] if cx["DOT_FP32"] else "-",
                                       "case": case}, nospec=_NOSPEC)
                    if v.key() not in seen:
                        seen.add(v.key())
                        yield v
