"""Position-causal FlashAttention over a permuted layout: the engine of both sparse variants.

Query/key dropping and hash buckets both reorder tokens before attention: dropping
*compacts* the kept queries and keys to the front (:func:`compact_layout`), hashing
*sorts* them by bucket (:func:`bucket_sort_layout`).  Either way each (batch, head)
gets its own permutation, and every slot carries the token's original position
(and, for hashing, its bucket).  The kernels here then compute, for query slot a
and key slot b::

    allowed(a, b) = kpos[b] <= qpos[a]  and  kbucket[b] == qbucket[a]

which is exact causal attention on the original positions.  Padding slots have
position -1 and never take part.

Tile-skipping rule.  For query tile T and key tile S let ``qmax(T)`` be the largest
query position in T and ``kmin(S)`` the smallest key position in S.  S is computed
for T iff::

    kmin(S) <= qmax(T)   and   [bucket range of S] overlaps [bucket range of T]

Every other pair holds no allowed (a, b) and is never loaded.  Because the layout is
sorted (by position, or by bucket then position), the key tiles whose buckets overlap
a query tile form one contiguous run, found by :func:`tile_tables` with a binary
search per tile (``O(n_tiles log n_tiles)``, no pass over all tile pairs); inside the
run the kernel checks ``kmin(S) <= qmax(T)`` with one scalar load per tile.  The
backward walks the same pairs from the key side.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import _runtime
from .layout import (  # noqa: F401  (re-exported for existing imports)
    INT32_MAX, PAD, TileStats, bucket_sort_layout, compact_layout, gather_tokens, scatter_tokens, tile_tables,
)
from ._steps import (
    LOG2E,
    KernelAttention,
    attention_grads_step,
    dot_precision,
    finish_softmax,
    kernel_config,
    launch_params,
    load_tile,
    mma,
    online_softmax_step,
    record_tile,
    softmax_delta,
    store_tile,
)

if TYPE_CHECKING:  # pragma: no cover
    from .tiles import TileRecord

# --------------------------------------------------------------------------------------
# The same tables on the device, in one launch (what the attention functions use)
# --------------------------------------------------------------------------------------


@triton.jit
def _search(ARR, n, x, RIGHT: tl.constexpr, PAD_AS_MAX: tl.constexpr, STEPS: tl.constexpr):
    """Vectorised binary search in the non-decreasing ``ARR[0:n]``: for each ``x``, the
    first index whose value is ``> x`` (``RIGHT``) or ``>= x``.  ``PAD_AS_MAX`` reads
    negative entries (padding tiles) as +inf."""
    lo = tl.zeros_like(x)
    hi = tl.zeros_like(x) + n
    for _ in tl.static_range(STEPS):
        mid = (lo + hi) // 2
        active = lo < hi
        val = tl.load(ARR + mid, mask=active, other=0)
        if PAD_AS_MAX:
            val = tl.where(val < 0, 2147483647, val)
        if RIGHT:
            right = val <= x
        else:
            right = val < x
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    return lo


@triton.jit
def _plan_kernel(QPOS, KPOS, QB, KB, QMAX, KMIN, QB_LO, QB_HI, KB_LO, KB_HI, K_LO, K_HI, Q_LO, Q_HI,
                 n_q, n_k, n_q_tiles, n_k_tiles,
                 HAS_BUCKETS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CHUNK: tl.constexpr, STEPS: tl.constexpr):
    """One program per (batch, head): the :class:`TileStats` summaries, then the runs
    of :func:`tile_tables`, without a round of small PyTorch ops per call."""
    bh = tl.program_id(0).to(tl.int64)
    QPOS += bh * n_q
    QB += bh * n_q
    KPOS += bh * n_k
    KB += bh * n_k
    QMAX += bh * n_q_tiles
    KMIN += bh * n_k_tiles
    QB_LO += bh * n_q_tiles
    QB_HI += bh * n_q_tiles
    KB_LO += bh * n_k_tiles
    KB_HI += bh * n_k_tiles
    K_LO += bh * n_q_tiles
    K_HI += bh * n_q_tiles
    Q_LO += bh * n_k_tiles
    Q_HI += bh * n_k_tiles
    BIG: tl.constexpr = 2147483647

    n_real_q_tiles = tl.full([], 0, tl.int32)
    for start in range(0, n_q_tiles, CHUNK):
        t = start + tl.arange(0, CHUNK)
        slots = t[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        pos = tl.load(QPOS + slots, mask=slots < n_q, other=-1)
        qmax = tl.max(pos, 1)
        tl.store(QMAX + t, qmax, mask=t < n_q_tiles)
        n_real_q_tiles += tl.sum((qmax >= 0).to(tl.int32), 0)
        if HAS_BUCKETS:
            b = tl.load(QB + slots, mask=slots < n_q, other=0)
            tl.store(QB_LO + t, tl.min(tl.where(pos >= 0, b, BIG), 1), mask=t < n_q_tiles)
            tl.store(QB_HI + t, tl.where(qmax >= 0, tl.max(tl.where(pos >= 0, b, -1), 1), BIG), mask=t < n_q_tiles)
    for start in range(0, n_k_tiles, CHUNK):
        t = start + tl.arange(0, CHUNK)
        slots = t[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        pos = tl.load(KPOS + slots, mask=slots < n_k, other=BIG)  # padding already reads BIG
        kmin = tl.min(pos, 1)
        tl.store(KMIN + t, kmin, mask=t < n_k_tiles)
        if HAS_BUCKETS:
            b = tl.load(KB + slots, mask=slots < n_k, other=0)
            tl.store(KB_LO + t, tl.min(tl.where(pos < BIG, b, BIG), 1), mask=t < n_k_tiles)
            tl.store(KB_HI + t, tl.where(kmin < BIG, tl.max(tl.where(pos < BIG, b, -1), 1), BIG), mask=t < n_k_tiles)
    # The searches below read summaries other threads of this program wrote.
    tl.debug_barrier()

    for start in range(0, n_q_tiles, CHUNK):
        t = start + tl.arange(0, CHUNK)
        qmax = tl.load(QMAX + t, mask=t < n_q_tiles, other=-1)
        if HAS_BUCKETS:
            lo = _search(KB_HI, n_k_tiles, tl.load(QB_LO + t, mask=t < n_q_tiles, other=BIG), False, False, STEPS)
            hi = _search(KB_LO, n_k_tiles, tl.load(QB_HI + t, mask=t < n_q_tiles, other=BIG), True, False, STEPS)
        else:
            lo = tl.zeros_like(qmax)
            hi = _search(KMIN, n_k_tiles, qmax, True, False, STEPS)
        hi = tl.minimum(tl.where(qmax >= 0, tl.maximum(hi, lo), lo), n_k_tiles)
        tl.store(K_LO + t, lo, mask=t < n_q_tiles)
        tl.store(K_HI + t, hi, mask=t < n_q_tiles)
    for start in range(0, n_k_tiles, CHUNK):
        t = start + tl.arange(0, CHUNK)
        kmin = tl.load(KMIN + t, mask=t < n_k_tiles, other=BIG)
        if HAS_BUCKETS:
            lo = _search(QB_HI, n_q_tiles, tl.load(KB_LO + t, mask=t < n_k_tiles, other=BIG), False, False, STEPS)
            hi = _search(QB_LO, n_q_tiles, tl.load(KB_HI + t, mask=t < n_k_tiles, other=BIG), True, False, STEPS)
        else:
            lo = _search(QMAX, n_q_tiles, kmin, False, True, STEPS)
            hi = tl.zeros_like(kmin) + n_real_q_tiles
        hi = tl.minimum(tl.where(kmin < BIG, tl.maximum(hi, lo), lo), n_q_tiles)
        tl.store(Q_LO + t, lo, mask=t < n_k_tiles)
        tl.store(Q_HI + t, hi, mask=t < n_k_tiles)


def device_tile_tables(q_pos, k_pos_big, q_buckets, k_buckets, block_m, block_n):
    """``(qmax, kmin, k_lo, k_hi, q_lo, q_hi)`` as :class:`TileStats` and :func:`tile_tables`
    compute them, from one kernel launch.  ``k_pos_big`` marks padding with INT32_MAX."""
    B, H, n_q = q_pos.shape
    n_k = k_pos_big.shape[-1]
    n_qt, n_kt = triton.cdiv(n_q, block_m), triton.cdiv(n_k, block_n)
    # One buffer per tile axis; each table is a contiguous (B, H, n_tiles) slice.
    per_q = torch.empty((5, B, H, n_qt), dtype=torch.int32, device=q_pos.device)
    per_k = torch.empty((5, B, H, n_kt), dtype=torch.int32, device=q_pos.device)
    qmax, qb_lo, qb_hi, k_lo, k_hi = per_q
    kmin, kb_lo, kb_hi, q_lo, q_hi = per_k
    has_b = q_buckets is not None
    _plan_kernel[(B * H,)](
        q_pos, k_pos_big, q_buckets if has_b else q_pos, k_buckets if has_b else k_pos_big,
        qmax, kmin, qb_lo, qb_hi, kb_lo, kb_hi, k_lo, k_hi, q_lo, q_hi, n_q, n_k, n_qt, n_kt,
        HAS_BUCKETS=has_b, BLOCK_M=block_m, BLOCK_N=block_n, CHUNK=16,
        STEPS=max(n_qt, n_kt).bit_length() + 1,
    )
    return qmax, kmin, k_lo, k_hi, q_lo, q_hi


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _allowed(qpos, kpos, qb, kb, HAS_BUCKETS: tl.constexpr):
    """Exact mask inside a tile: causal on original positions (and same bucket)."""
    ok = kpos[None, :] <= qpos[:, None]
    if HAS_BUCKETS:
        ok = ok & (kb[None, :] == qb[:, None])
    return ok


@triton.jit
def _load_meta(POS, BUCKET, slots, n, pad, HAS_BUCKETS: tl.constexpr):
    """Positions (``pad`` past ``n``) and buckets of a tile of slots."""
    pos = tl.load(POS + slots, mask=slots < n, other=pad)
    if HAS_BUCKETS:
        bucket = tl.load(BUCKET + slots, mask=slots < n, other=-1)
    else:
        bucket = pos
    return pos, bucket


@triton.jit
def _token_rows(IDX, slots, n, GATHER: tl.constexpr):
    """Rows of the ``(B, H, N, D)`` tensors held by a tile of slots.

    With ``GATHER`` the layout is a permutation ``IDX`` of the tokens and the kernels
    read and write the user's tensors through it, so no permuted copy of q, k, v,
    o or their gradients is ever made; slots past ``n`` map to row ``n``, which every
    load and store masks.  Without it, slots are rows.
    """
    if GATHER:
        return tl.load(IDX + slots, mask=slots < n, other=n)
    else:
        return slots


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, qpos, qb, k_tile, K, V, KPOS, KB, KIDX, sk_n, sv_n, n_k, qk_scale,
              HAS_BUCKETS: tl.constexpr, GATHER: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    slots = k_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    kpos, kb = _load_meta(KPOS, KB, slots, n_k, 2147483647, HAS_BUCKETS)
    rows = _token_rows(KIDX, slots, n_k, GATHER)
    k = load_tile(K, rows, cols, sk_n, n_k, HEAD_DIM, BLOCK_D)
    v = load_tile(V, rows, cols, sv_n, n_k, HEAD_DIM, BLOCK_D)
    allowed = _allowed(qpos, kpos, qb, kb, HAS_BUCKETS)
    return online_softmax_step(acc, m_i, l_i, q, k, v, allowed, qk_scale, True, DOT_PRECISION)


@triton.jit
def _dkdv_tile(dk, dv, k, v, kpos, kb, q_tile, Q, DO, LSE, DELTA, QPOS, QB, QIDX, sq_n, sdo_n, n_q, qk_scale,
               HAS_BUCKETS: tl.constexpr, GATHER: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    slots = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    qpos, qb = _load_meta(QPOS, QB, slots, n_q, -1, HAS_BUCKETS)
    rows = _token_rows(QIDX, slots, n_q, GATHER)
    q = load_tile(Q, rows, cols, sq_n, n_q, HEAD_DIM, BLOCK_D)
    do = load_tile(DO, rows, cols, sdo_n, n_q, HEAD_DIM, BLOCK_D)
    # Slots past n_q read lse = +inf, so their p is 0 without a mask.
    lse2 = tl.load(LSE + slots, mask=slots < n_q, other=float("inf"))
    delta = tl.load(DELTA + rows, mask=rows < n_q, other=0.0)
    allowed = _allowed(qpos, kpos, qb, kb, HAS_BUCKETS)
    p, ds = attention_grads_step(q, k, v, do, lse2, delta, allowed, qk_scale, True, DOT_PRECISION)
    dv += mma(tl.trans(p).to(do.dtype), do, DOT_PRECISION)
    dk += mma(tl.trans(ds).to(q.dtype), q, DOT_PRECISION)
    return dk, dv


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, qpos, qb, k_tile, K, V, KPOS, KB, KIDX, sk_n, sv_n, n_k, qk_scale,
             HAS_BUCKETS: tl.constexpr, GATHER: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    slots = k_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    kpos, kb = _load_meta(KPOS, KB, slots, n_k, 2147483647, HAS_BUCKETS)
    rows = _token_rows(KIDX, slots, n_k, GATHER)
    k = load_tile(K, rows, cols, sk_n, n_k, HEAD_DIM, BLOCK_D)
    v = load_tile(V, rows, cols, sv_n, n_k, HEAD_DIM, BLOCK_D)
    allowed = _allowed(qpos, kpos, qb, kb, HAS_BUCKETS)
    p, ds = attention_grads_step(q, k, v, do, lse2, delta, allowed, qk_scale, True, DOT_PRECISION)
    return dq + mma(ds.to(k.dtype), k, DOT_PRECISION)


@triton.jit
def _permuted_fwd_kernel(
    Q, K, V, O, LSE, QPOS, KPOS, QB, KB, QIDX, KIDX, K_LO, K_HI, QMAX, KMIN, REC,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
    H, n_q, n_k, n_q_tiles, n_k_tiles, qk_scale,
    HAS_BUCKETS: tl.constexpr, GATHER: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, RECORD: tl.constexpr,
):
    q_tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    bh64 = bh.to(tl.int64)
    Q += b * sq_b + h * sq_h
    K += b * sk_b + h * sk_h
    V += b * sv_b + h * sv_h
    O += b * so_b + h * so_h
    QPOS += bh64 * n_q
    QB += bh64 * n_q
    QIDX += bh64 * n_q
    KPOS += bh64 * n_k
    KB += bh64 * n_k
    KIDX += bh64 * n_k
    REC += bh64 * n_q_tiles * n_k_tiles

    slots = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    qpos, qb = _load_meta(QPOS, QB, slots, n_q, -1, HAS_BUCKETS)
    rows = _token_rows(QIDX, slots, n_q, GATHER)
    q = load_tile(Q, rows, cols, sq_n, n_q, HEAD_DIM, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    qmax = tl.load(QMAX + bh64 * n_q_tiles + q_tile)
    lo = tl.load(K_LO + bh64 * n_q_tiles + q_tile)
    hi = tl.load(K_HI + bh64 * n_q_tiles + q_tile)
    if HAS_BUCKETS:
        # A run of bucket-overlapping key tiles; some start after this tile's last query.
        for k_tile in range(lo, hi):
            if tl.load(KMIN + bh64 * n_k_tiles + k_tile) <= qmax:
                acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, qpos, qb, k_tile, K, V, KPOS, KB, KIDX, sk_n, sv_n,
                                          n_k, qk_scale, HAS_BUCKETS, GATHER, HEAD_DIM, BLOCK_D, BLOCK_N,
                                          DOT_PRECISION)
                record_tile(REC, q_tile, k_tile, n_k_tiles, RECORD)
    else:
        # Positions ascend, so every tile of the prefix [0, hi) starts early enough.
        for k_tile in range(lo, hi):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, qpos, qb, k_tile, K, V, KPOS, KB, KIDX, sk_n, sv_n,
                                      n_k, qk_scale, HAS_BUCKETS, GATHER, HEAD_DIM, BLOCK_D, BLOCK_N,
                                      DOT_PRECISION)
            record_tile(REC, q_tile, k_tile, n_k_tiles, RECORD)

    out, lse2 = finish_softmax(acc, m_i, l_i)
    store_tile(O, out, rows, cols, so_n, n_q, HEAD_DIM, BLOCK_D)
    tl.store(LSE + bh64 * n_q + slots, lse2, mask=slots < n_q)


@triton.jit
def _permuted_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, QPOS, KPOS, QB, KB, QIDX, KIDX,
    K_LO, K_HI, Q_LO, Q_HI, QMAX, KMIN, REC_KV, REC_Q,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sdo_b, sdo_h, sdo_n,
    H, n_q, n_k, n_q_tiles, n_k_tiles, qk_scale, sm_scale,
    HAS_BUCKETS: tl.constexpr, GATHER: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, RECORD: tl.constexpr,
):
    """Program ``t``: dK, dV of key tile ``t`` over the query tiles that see it, then
    dQ of query tile ``t`` over the key tiles it sees; the same pairs as the forward.
    ``LSE`` is in slot order; ``DELTA`` and the gradients are in token order."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    bh64 = bh.to(tl.int64)
    Q += b * sq_b + h * sq_h
    K += b * sk_b + h * sk_h
    V += b * sv_b + h * sv_h
    DO += b * sdo_b + h * sdo_h
    LSE += bh64 * n_q
    DELTA += bh64 * n_q
    QPOS += bh64 * n_q
    QB += bh64 * n_q
    QIDX += bh64 * n_q
    KPOS += bh64 * n_k
    KB += bh64 * n_k
    KIDX += bh64 * n_k
    DQ += bh64 * n_q * HEAD_DIM
    DK += bh64 * n_k * HEAD_DIM
    DV += bh64 * n_k * HEAD_DIM
    QMAX += bh64 * n_q_tiles
    KMIN += bh64 * n_k_tiles
    REC_KV += bh64 * n_q_tiles * n_k_tiles
    REC_Q += bh64 * n_q_tiles * n_k_tiles
    cols = tl.arange(0, BLOCK_D)

    # ---- dK, dV for key tile `tile` ----
    if tile < n_k_tiles:
        slots = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        kpos, kb = _load_meta(KPOS, KB, slots, n_k, 2147483647, HAS_BUCKETS)
        rows = _token_rows(KIDX, slots, n_k, GATHER)
        k = load_tile(K, rows, cols, sk_n, n_k, HEAD_DIM, BLOCK_D)
        v = load_tile(V, rows, cols, sv_n, n_k, HEAD_DIM, BLOCK_D)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        kmin = tl.load(KMIN + tile)
        lo = tl.load(Q_LO + bh64 * n_k_tiles + tile)
        hi = tl.load(Q_HI + bh64 * n_k_tiles + tile)
        if HAS_BUCKETS:
            for q_tile in range(lo, hi):
                if tl.load(QMAX + q_tile) >= kmin:
                    dk, dv = _dkdv_tile(dk, dv, k, v, kpos, kb, q_tile, Q, DO, LSE, DELTA, QPOS, QB, QIDX,
                                        sq_n, sdo_n, n_q, qk_scale, HAS_BUCKETS, GATHER, HEAD_DIM, BLOCK_D,
                                        BLOCK_M, DOT_PRECISION)
                    record_tile(REC_KV, q_tile, tile, n_k_tiles, RECORD)
        else:
            for q_tile in range(lo, hi):
                dk, dv = _dkdv_tile(dk, dv, k, v, kpos, kb, q_tile, Q, DO, LSE, DELTA, QPOS, QB, QIDX,
                                    sq_n, sdo_n, n_q, qk_scale, HAS_BUCKETS, GATHER, HEAD_DIM, BLOCK_D,
                                    BLOCK_M, DOT_PRECISION)
                record_tile(REC_KV, q_tile, tile, n_k_tiles, RECORD)
        store_tile(DK, dk * sm_scale, rows, cols, HEAD_DIM, n_k, HEAD_DIM, BLOCK_D)
        store_tile(DV, dv, rows, cols, HEAD_DIM, n_k, HEAD_DIM, BLOCK_D)

    # ---- dQ for query tile `tile` ----
    if tile < n_q_tiles:
        slots = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        qpos, qb = _load_meta(QPOS, QB, slots, n_q, -1, HAS_BUCKETS)
        rows = _token_rows(QIDX, slots, n_q, GATHER)
        q = load_tile(Q, rows, cols, sq_n, n_q, HEAD_DIM, BLOCK_D)
        do = load_tile(DO, rows, cols, sdo_n, n_q, HEAD_DIM, BLOCK_D)
        lse2 = tl.load(LSE + slots, mask=slots < n_q, other=float("inf"))
        delta = tl.load(DELTA + rows, mask=rows < n_q, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        qmax = tl.load(QMAX + tile)
        lo = tl.load(K_LO + bh64 * n_q_tiles + tile)
        hi = tl.load(K_HI + bh64 * n_q_tiles + tile)
        if HAS_BUCKETS:
            for k_tile in range(lo, hi):
                if tl.load(KMIN + k_tile) <= qmax:
                    dq = _dq_tile(dq, q, do, lse2, delta, qpos, qb, k_tile, K, V, KPOS, KB, KIDX, sk_n, sv_n,
                                  n_k, qk_scale, HAS_BUCKETS, GATHER, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
                    record_tile(REC_Q, tile, k_tile, n_k_tiles, RECORD)
        else:
            for k_tile in range(lo, hi):
                dq = _dq_tile(dq, q, do, lse2, delta, qpos, qb, k_tile, K, V, KPOS, KB, KIDX, sk_n, sv_n,
                              n_k, qk_scale, HAS_BUCKETS, GATHER, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
                record_tile(REC_Q, tile, k_tile, n_k_tiles, RECORD)
        store_tile(DQ, dq * sm_scale, rows, cols, HEAD_DIM, n_q, HEAD_DIM, BLOCK_D)


# --------------------------------------------------------------------------------------
# Python side
# --------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """Everything a pass needs besides q, k, v: positions, buckets, token indices, tile tables.

    The tables (``qmax``, ``kmin`` and the runs) are views of one int32 buffer filled by
    :func:`device_tile_tables`; ``stats()`` recomputes the readable :class:`TileStats`.
    """

    q_pos: Tensor
    k_pos: Tensor  # padding as INT32_MAX
    q_buckets: Tensor | None
    k_buckets: Tensor | None
    q_index: Tensor | None
    k_index: Tensor | None
    qmax: Tensor
    kmin: Tensor
    k_lo: Tensor
    k_hi: Tensor
    q_lo: Tensor
    q_hi: Tensor
    block_m: int
    block_n: int

    @classmethod
    def make(cls, q_pos, k_pos, q_buckets, k_buckets, cfg, q_index=None, k_index=None) -> "_Plan":
        def int32(x):
            return None if x is None else x.to(torch.int32).contiguous()
        q_pos, qb, kb, qi, ki = int32(q_pos), int32(q_buckets), int32(k_buckets), int32(q_index), int32(k_index)
        k_pos = torch.where(k_pos < 0, INT32_MAX, k_pos).to(torch.int32).contiguous()
        tables = device_tile_tables(q_pos, k_pos, qb, kb, cfg["BLOCK_M"], cfg["BLOCK_N"])
        return cls(q_pos, k_pos, qb, kb, qi, ki, *tables, cfg["BLOCK_M"], cfg["BLOCK_N"])

    def stats(self) -> TileStats:
        k_pos = torch.where(self.k_pos == INT32_MAX, PAD, self.k_pos)
        return TileStats.of(self.q_pos, k_pos, self.q_buckets, self.k_buckets, self.block_m, self.block_n)

    def meta_args(self):
        """Kernel pointer arguments; absent buckets/indices pass a stand-in never read."""
        def either(x, stand_in):
            return stand_in if x is None else x
        return (self.q_pos, self.k_pos, either(self.q_buckets, self.q_pos), either(self.k_buckets, self.k_pos),
                either(self.q_index, self.q_pos), either(self.k_index, self.k_pos))

    def constexprs(self):
        return dict(HAS_BUCKETS=self.q_buckets is not None, GATHER=self.q_index is not None)


def _dims(q, k, cfg):
    B, H, n_q, D = q.shape
    n_k = k.shape[2]
    return B, H, n_q, n_k, D, triton.cdiv(n_q, cfg["BLOCK_M"]), triton.cdiv(n_k, cfg["BLOCK_N"])


def permuted_forward(q, k, v, plan: _Plan, sm_scale, cfg, record=None):
    """Forward kernel; ``o`` is in token order when the plan gathers, else in slot order."""
    B, H, n_q, n_k, D, n_qt, n_kt = _dims(q, k, cfg)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    o = _runtime.new_output((B, H, n_q, D), q.dtype, q.device)
    lse2 = _runtime.new_output((B, H, n_q), torch.float32, q.device)
    rec = record.buffer("fwd", (B, H, n_qt, n_kt), q.device) if record is not None else lse2
    _permuted_fwd_kernel[(n_qt, B * H)](
        q, k, v, o, lse2, *plan.meta_args(), plan.k_lo, plan.k_hi, plan.qmax, plan.kmin, rec,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        H, n_q, n_k, n_qt, n_kt, sm_scale * LOG2E,
        **plan.constexprs(), HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], DOT_PRECISION=dot_precision(q.dtype),
        RECORD=record is not None, **launch_params(cfg),
    )
    return o, lse2


def permuted_backward(q, k, v, o, lse2, do, plan: _Plan, sm_scale, cfg, record=None):
    B, H, n_q, n_k, D, n_qt, n_kt = _dims(q, k, cfg)
    q, k, v, do = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, do))
    delta = softmax_delta(o, do)
    dq = _runtime.new_output((B, H, n_q, D), q.dtype, q.device)
    dk = _runtime.new_output((B, H, n_k, D), k.dtype, k.device)
    dv = _runtime.new_output((B, H, n_k, D), v.dtype, v.device)
    if record is not None:
        rec_kv = record.buffer("bwd_kv", (B, H, n_qt, n_kt), q.device)
        rec_q = record.buffer("bwd_q", (B, H, n_qt, n_kt), q.device)
    else:
        rec_kv = rec_q = delta
    _permuted_bwd_kernel[(max(n_qt, n_kt), B * H)](
        q, k, v, do, lse2, delta, dq, dk, dv, *plan.meta_args(),
        plan.k_lo, plan.k_hi, plan.q_lo, plan.q_hi, plan.qmax, plan.kmin, rec_kv, rec_q,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        H, n_q, n_k, n_qt, n_kt, sm_scale * LOG2E, sm_scale,
        **plan.constexprs(), HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], DOT_PRECISION=dot_precision(q.dtype),
        RECORD=record is not None, **launch_params(cfg, backward=True),
    )
    return dq, dk, dv


def run_permuted(q, k, v, q_pos, k_pos, q_buckets, k_buckets, sm_scale, kernel_options, tile_record, kind,
                 q_index=None, k_index=None):
    """Shared tail of every sparse entry point (inputs already checked and laid out).

    With ``q_index``/``k_index`` (full permutations, from the layout functions) q, k, v
    stay in token order and the kernels gather and scatter through the indices; the
    output comes back in token order.
    """
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    cfg = kernel_config(q.shape[-1], q.device, kernel_options)
    plan = _Plan.make(q_pos, k_pos, q_buckets, k_buckets, cfg, q_index, k_index)
    if tile_record is not None:
        tile_record.start(kind, cfg)
        tile_record.stats = plan.stats()
    settings = dict(plan=plan, sm_scale=sm_scale, cfg=cfg, record=tile_record)
    return KernelAttention.apply(q, k, v, partial(permuted_forward, **settings),
                                 partial(permuted_backward, **settings))


def _check_sorted(name: str, x: Tensor, real: Tensor, then: Tensor | None = None) -> None:
    """Real slots first, ``x`` non-decreasing over them (ties broken by ascending ``then``)."""
    if bool((real[..., 1:] & ~real[..., :-1]).any()):
        raise ValueError(f"{name}: padding slots (position -1) must come after all real slots")
    down = x[..., 1:] < x[..., :-1]
    if then is not None:
        down |= (x[..., 1:] == x[..., :-1]) & (then[..., 1:] < then[..., :-1])
    bad = down & real[..., 1:]
    if bool(bad.any()):
        raise ValueError(f"{name} must be non-decreasing along the layout (see permuted_attention's docstring)")


def permuted_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    q_buckets: Tensor | None = None,
    k_buckets: Tensor | None = None,
    sm_scale: float | None = None,
    *,
    kernel_options: dict | None = None,
    tile_record: "TileRecord | None" = None,
) -> Tensor:
    """Position-causal attention on tensors that are already compacted or sorted.

    For researchers who keep their tokens in a permuted layout between layers and
    want to skip the gather/scatter of :func:`~sparseflash.qk_sparse_attention` and
    :func:`~sparseflash.hash_sparse_attention`.

    Args:
        q: ``(B, H, Nq, D)``; k, v: ``(B, H, Nk, D)``, in the layout's slot order.
        q_pos, k_pos: integer ``(B, H, Nq)`` / ``(B, H, Nk)``: each slot's original
            position; ``-1`` marks a padding slot.  Padding comes after all real
            slots.  Without buckets, real positions must ascend; with buckets the
            slots must be sorted by bucket, then by position.
        q_buckets, k_buckets: optional integer ``(B, H, Nq)`` / ``(B, H, Nk)``.

    Slot a attends to slot b iff ``0 <= k_pos[b] <= q_pos[a]`` (and buckets equal).
    A slot with nothing to attend to (padding included) outputs 0.

    Returns:
        ``(B, H, Nq, D)`` in slot order.
    """
    _runtime.check_qkv(q, k, v)
    _runtime.check_per_token("q_pos", q_pos, q, "int")
    _runtime.check_per_token("k_pos", k_pos, k, "int")
    if (q_buckets is None) != (k_buckets is None):
        raise ValueError("give both q_buckets and k_buckets, or neither")
    q_real, k_real = q_pos >= 0, k_pos >= 0
    if q_buckets is None:
        _check_sorted("q_pos", q_pos, q_real)
        _check_sorted("k_pos", k_pos, k_real)
    else:
        _runtime.check_per_token("q_buckets", q_buckets, q, "int")
        _runtime.check_per_token("k_buckets", k_buckets, k, "int")
        _check_sorted("q_buckets", q_buckets, q_real, q_pos)
        _check_sorted("k_buckets", k_buckets, k_real, k_pos)
    return run_permuted(q, k, v, q_pos, k_pos, q_buckets, k_buckets, sm_scale, kernel_options,
                        tile_record, "permuted")
