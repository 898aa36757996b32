"""Solutions to the exercises of notebook 03 (FlashAttention in Triton).

Each name is what its checker in ``sparseflash.exercises`` expects.
"""
import math

import torch

import sparseflash  # noqa: F401  (first: turns on Triton's interpreter when there is no GPU)
import sparseflash.reference as ref
import triton
import triton.language as tl
from sparseflash.flash import flash_attention
from sparseflash._steps import (LOG2E, dot_precision, finish_softmax, load_tile, online_softmax_step,
                                record_tile, store_tile)
from sparseflash.tiles import TileRecord

__all__ = ["scores_computed", "window_attention", "empty_row", "kernel_bf16_error", "tile_products"]

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Exercise 1: 16×16 wastes the least on the diagonal (1.06× the allowed pairs at N = 256, against
# 1.25× for 64×64), but a GPU wants large tiles: each tile's loads are reused BLOCK times, and
# tensor-core products need at least 16 rows; small tiles are memory-bound.
def scores_computed(N, bm, bn):
    q, k, v = (torch.randn(1, 1, N, 32, device=device) for _ in range(3))
    rec = TileRecord()
    flash_attention(q, k, v, causal=True, kernel_options={"BLOCK_M": bm, "BLOCK_N": bn}, tile_record=rec)
    return int((rec.maps["fwd"][0, 0] > 0).sum()) * bm * bn


# Exercise 2: the dense forward with a window.  Every visited tile is masked (a simpler kernel than
# flash.py's, which splits off the mask-free tiles); the key loop starts at the tile of key
# max(first query - WINDOW + 1, 0) and ends where the causal loop ends.
@triton.jit
def _window_fwd_kernel(Q, K, V, O, REC, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                       so_b, so_h, so_n, H, N, qk_scale, WINDOW,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, RECORD: tl.constexpr):
    q_tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * sq_b + h * sq_h
    K += b * sk_b + h * sk_h
    V += b * sv_b + h * sv_h
    O += b * so_b + h * so_h
    rows = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    q = load_tile(Q, rows, cols, sq_n, N, HEAD_DIM, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_k_tiles = tl.cdiv(N, BLOCK_N)
    REC += bh.to(tl.int64) * tl.cdiv(N, BLOCK_M) * n_k_tiles
    q_lo = q_tile * BLOCK_M
    q_hi = tl.minimum(q_lo + BLOCK_M, N) - 1
    first = tl.maximum(q_lo - WINDOW + 1, 0) // BLOCK_N
    for k_tile in range(first, q_hi // BLOCK_N + 1):
        keys = k_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        k = load_tile(K, keys, cols, sk_n, N, HEAD_DIM, BLOCK_D)
        v = load_tile(V, keys, cols, sv_n, N, HEAD_DIM, BLOCK_D)
        allowed = (keys[None, :] <= rows[:, None]) & (keys[None, :] > rows[:, None] - WINDOW) & (keys[None, :] < N)
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, q, k, v, allowed, qk_scale, True, DOT_PRECISION)
        record_tile(REC, q_tile, k_tile, n_k_tiles, RECORD)
    out, lse2 = finish_softmax(acc, m_i, l_i)
    store_tile(O, out, rows, cols, so_n, N, HEAD_DIM, BLOCK_D)


def window_attention(q, k, v, window, tile_record=None, block_m=32, block_n=32):
    B, H, N, D = q.shape
    o = torch.empty_like(q)
    n_qt, n_kt = triton.cdiv(N, block_m), triton.cdiv(N, block_n)
    if tile_record is not None:
        tile_record.start("window", {"BLOCK_M": block_m, "BLOCK_N": block_n})
        rec = tile_record.buffer("fwd", (B, H, n_qt, n_kt), q.device)
    else:
        rec = o
    _window_fwd_kernel[(n_qt, B * H)](
        q, k, v, o, rec, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        H, N, LOG2E / math.sqrt(D), window,
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION=dot_precision(q.dtype), RECORD=tile_record is not None)
    return o


# Exercise 3: nothing is ever added to such a row: m stays -inf, l = 0, acc = 0.  Without
# m_shift, p = 2^(s - m) = 2^(-inf - (-inf)) = 2^nan = nan.  finish_softmax gives out = 0 and
# lse2 = +inf, so the backward's p = 2^(s - lse2) = 0: no gradient.  lse2 = 0 would give
# p = 2^s ≠ 0 (gradient for keys the row never saw); lse2 = -inf would give p = +inf.
empty_row = dict(m=-math.inf, l=0.0, acc=0.0, lse2=math.inf)


# Exercise 4: the kernel's error hardly grows with N (float32 accumulators); the rounding of
# p to bfloat16 before p @ v dominates, with the final rounding of the output.
def kernel_bf16_error(n):
    q, k, v = (torch.randn(1, 2, n, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    out = flash_attention(q, k, v, causal=True)
    truth = ref.attention(q, k, v, causal=True)
    return ((out.double() - truth).norm() / truth.norm()).item()


# Exercise 5: atomic dQ: s, dp, dv, dk, dq = 5 products per pair.  Two loops: s, dp, dv, dk,
# then s, dp, dq again = 7.  The atomic version pays with contended float32 atomics into a
# dQ buffer, a conversion pass, and run-to-run differences in the last bits; it tends to win
# for long sequences with few heads, the two-loop one when B·H fills the GPU anyway.
tile_products = dict(atomic=5, two_loops=7)
