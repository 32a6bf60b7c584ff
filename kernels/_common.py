"""Pieces shared by the search kernels: a row-block x column-block dot-product tile, and a running
top-k of packed int64 keys.

A key is ``(float_bits(score) << 32) | index`` for a score >= 0 (IEEE bits are monotone there), so
one integer min/max orders candidates by (score, index): ties go to the smaller index, always.
Module-level values used inside kernels are ``tl.constexpr`` (plain globals do not compile).
"""
import triton
import triton.language as tl

MAX_KEY = tl.constexpr(0x7FFFFFFFFFFFFFFF)  # an invalid candidate
INF_BITS = tl.constexpr(0x7F800000)  # float_bits(+inf)
EMPTY_BASE = tl.constexpr(1 << 30)  # index part of an empty slot; real indices are < 2**30


@triton.jit
def init_topk(BLOCK_M: tl.constexpr, KP: tl.constexpr, KC):
    """``[BLOCK_M, KP]`` running best: KC distinct "infinitely far" keys (so exactly one slot is the
    worst) and padding slots holding -1, which is never the worst and so never replaced. ``KC`` is a
    runtime value (only ``KP`` shapes the tiles), so one compiled kernel serves every ``KC <= KP``."""
    slot = tl.arange(0, KP)
    empty = (tl.full([KP], INF_BITS, tl.int64) << 32) | (slot + EMPTY_BASE).to(tl.int64)
    best = tl.where(slot < KC, empty, -1)
    return tl.broadcast_to(best[None, :], [BLOCK_M, KP])


@triton.jit
def pack_keys(score, idx, valid):
    """Keys of a ``[BLOCK_M, BLOCK_N]`` score tile (scores clamped at +0.0) and int index grid."""
    # max(., 0) removes rounding below zero; "+ 0.0" turns -0.0 into +0.0 so the bits are monotone.
    score = tl.maximum(score, 0.0) + 0.0
    key = (score.to(tl.int32, bitcast=True).to(tl.int64) << 32) | idx.to(tl.int64)
    return tl.where(valid, key, MAX_KEY)


@triton.jit
def merge_topk(best, key, KC):
    """Merge a tile of keys ``[BLOCK_M, BLOCK_N]`` into the running best ``[BLOCK_M, KP]``."""
    # Only as many extraction rounds as the row with the most improving candidates needs: after
    # the first tiles this is usually 0 and the merge is skipped.
    worst = tl.max(best, axis=1)
    # Counted in fp32 (exact up to 2**24): summed as int32, LLVM packed the comparisons into an i16
    # through a 2-byte local array (a st.local/ld.local round trip per tile, 8 B of stack) in every
    # sm_90 ieee variant with 64x32 tiles and 4 warps. It depends on the layout; fp32 never does it.
    n_better = tl.sum((key < worst[:, None]).to(tl.float32), axis=1)
    n_rounds = tl.minimum(tl.max(n_better, axis=0).to(tl.int32), KC)
    for _ in range(0, n_rounds):
        cand = tl.min(key, axis=1)
        worst = tl.max(best, axis=1)
        hit = (best == worst[:, None]) & (cand < worst)[:, None]
        best = tl.where(hit, cand[:, None], best)
        key = tl.where(key == cand[:, None], MAX_KEY, key)
    return best


def unpack_keys(keys):
    """torch int64 keys -> (fp32 scores, int64 indices), in the keys' order."""
    import torch

    return (keys >> 32).to(torch.int32).view(torch.float32), keys & 0xFFFFFFFF


@triton.jit
def dot_tile(a_ptr, rows, row_ok, stride_ar, stride_ad, b_ptr, cols, col_ok, stride_bc, stride_bd, D,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]`` fp32 dot products of rows ``a[rows]`` with rows ``b[cols]`` over ``D``."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        d_ok = dd < D
        # int64 row offsets: rows x stride may exceed 2**31 for large sets
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * stride_ar + dd[None, :] * stride_ad,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        bt = tl.load(b_ptr + cols[None, :].to(tl.int64) * stride_bc + dd[:, None] * stride_bd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        if DOT_FP32:  # the interpreter (and fp32 inputs) take fp32 tiles
            acc += tl.dot(a.to(tl.float32), bt.to(tl.float32), input_precision=PRECISION)
        else:
            acc += tl.dot(a, bt)
    return acc
