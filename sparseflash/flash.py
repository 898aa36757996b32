"""FlashAttention-2 in Triton: forward and backward, causal or not.

Computation, for one (batch, head), queries ``q_i`` and keys ``k_j``::

    s_ij = (q_i · k_j) · sm_scale        (masked to -inf where j > i, if causal)
    o_i  = Σ_j softmax_j(s_ij) v_j
    lse_i = log Σ_j exp(s_ij)           (saved for the backward)

The ``N × N`` matrix ``s`` is never stored.  Each program owns one tile of
``BLOCK_M`` queries and walks over key tiles of ``BLOCK_N`` keys, keeping a running
max ``m``, a running sum ``l`` and an unnormalised output ``acc``: the *online
softmax* (:func:`online_softmax_step`, the one piece every kernel in sparseflash
shares).  The backward recomputes ``p = exp(s - lse)`` tile by tile.

Tile skipping (causal): a key tile whose first key comes after the query tile's
last query holds no allowed pair and is never loaded.  Of the visited tiles only
the ones that straddle the diagonal (or the ragged end of the sequence) are masked.

Grouped-query attention: k and v may have ``Hkv`` heads for ``H`` query heads; query
head ``h`` reads kv head ``h // G``, ``G = H / Hkv`` (a compile-time constant: with
``G = 1`` the kernels are the plain multi-head ones).  dK and dV of a kv head sum over
its ``G`` query heads; the backward's programs share that work (:func:`owns_kv_tile`).

Everything works in base 2: ``exp(x) = exp2(x · log2 e)``, so scores are scaled by
``sm_scale · log2(e)`` once and the kernels use ``exp2``, which is what the hardware has.

On Hopper GPUs (sm_90) the forward of long sequences runs :mod:`sparseflash.hopper`'s kernel
instead (the same outputs, FlashAttention-3's schedule written in Gluon) where it was measured
faster; the backward is always the one here.
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _runtime, hopper
from .launch import launch
from .ops import attention_op, cfg_args, cfg_dict
from ._steps import (  # noqa: F401  (re-exported: notebook 03 reads them as flash.<name>)
    LOG2E,
    add_tile,
    attention_grads_step,
    finish_softmax,
    load_tile,
    mma,
    online_softmax_step,
    dot_precision,
    kernel_config,
    kv_head,
    launch_params,
    owns_kv_tile,
    record_buffers,
    record_tile,
    run_attention,
    softmax_delta,
    store_tile,
)

if TYPE_CHECKING:  # pragma: no cover
    from .tiles import TileRecord

# --------------------------------------------------------------------------------------
# Dense kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _dense_key_range(q_tile, n_q, n_k, window, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles a query tile visits: ``[first, free_lo)`` masked, ``[free_lo, free_hi)``
    mask-free, ``[free_hi, n_visit)`` masked.

    Causal: the query tile's last row is ``i_max``; key tiles starting after it are
    skipped.  A key tile is mask-free when every key is at or before the tile's first
    query and lies inside the sequence.  With a sliding window (``WINDOWED``: key ``j``
    allowed for query ``i`` iff ``i - window < j <= i``) tiles wholly before the first
    query's window are skipped too, and a tile is mask-free only if its first key is
    inside the last query's window: the visited tiles are a diagonal band, masked at
    both edges.  Without a window ``first = free_lo = 0``.
    """
    q_lo = q_tile * BLOCK_M
    i_max = tl.minimum(q_lo + BLOCK_M, n_q) - 1
    if CAUSAL:
        n_visit = tl.minimum(i_max, n_k - 1) // BLOCK_N + 1
        free_hi = tl.minimum(q_lo + 1, n_k) // BLOCK_N
    else:
        n_visit = tl.cdiv(n_k, BLOCK_N)
        free_hi = n_k // BLOCK_N
    first = 0
    free_lo = 0
    if WINDOWED:
        first = tl.minimum(tl.maximum(q_lo - window + 1, 0) // BLOCK_N, n_visit)
        free_lo = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(i_max - window + 1, 0), BLOCK_N), first), n_visit)
        free_hi = tl.maximum(free_hi, free_lo)
    return first, free_lo, free_hi, n_visit


@triton.jit
def _dense_query_range(k_tile, n_q, n_k, window, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query tiles a key tile meets in the backward: ``[first, first_full)`` masked,
    ``[first_full, free_end)`` mask-free (every query at or after every key, and inside
    every key's window), ``[free_end, end)`` masked (the window's far edge; empty
    without a window, where ``free_end = end = n_q_tiles``).

    Keys of a ragged last tile (past ``n_k``) only produce dK/dV rows that are never
    stored, so here only the causal diagonal and the window need a mask (the masked
    dK/dV step tests ``key <= query`` and the window alone).
    """
    n_q_tiles = tl.cdiv(n_q, BLOCK_M)
    k_lo = k_tile * BLOCK_N
    k_last = tl.minimum(k_lo + BLOCK_N, n_k) - 1
    if CAUSAL:
        # The first query tile holding a query at or after this tile's first key.
        first = tl.where(k_lo < n_q, k_lo // BLOCK_M, n_q_tiles)
        first_full = tl.maximum(first, tl.minimum(tl.cdiv(k_last, BLOCK_M), n_q_tiles))
    else:
        first = 0
        first_full = 0
    end = n_q_tiles
    free_end = n_q_tiles
    if WINDOWED:
        # Query i sees key j iff j <= i < j + window: the last query of the band is
        # k_last + window - 1, and a tile is mask-free up to the first key's k_lo + window - 1.
        end = tl.maximum(tl.minimum(tl.cdiv(k_last + window, BLOCK_M), n_q_tiles), first_full)
        free_end = tl.minimum(tl.maximum((k_lo + window) // BLOCK_M, first_full), end)
    return first, first_full, free_end, end


@triton.jit
def _dense_allowed(keys, rows, n_k, window, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):
    """``(rows, keys)`` pairs a masked tile allows: inside the sequence, causal, in the window."""
    allowed = keys[None, :] < n_k
    if CAUSAL:
        allowed = allowed & (keys[None, :] <= rows[:, None])
    if WINDOWED:
        allowed = allowed & (keys[None, :] > rows[:, None] - window)
    return allowed


@triton.jit
def _dense_fwd_step(acc, m_i, l_i, q, rows, k_tile, K, V, sk_n, sv_n, n_k, qk_scale, window,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    keys = k_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    k = load_tile(K, keys, cols, sk_n, n_k, HEAD_DIM, BLOCK_D)
    v = load_tile(V, keys, cols, sv_n, n_k, HEAD_DIM, BLOCK_D)
    allowed = _dense_allowed(keys, rows, n_k, window, CAUSAL, WINDOWED)
    return online_softmax_step(acc, m_i, l_i, q, k, v, allowed, qk_scale, MASKED, DOT_PRECISION)


@triton.jit
def _flash_fwd_kernel(
    Q, K, V, O, LSE, REC,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
    H, n_q, n_k, qk_scale, window,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, INIT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    RECORD: tl.constexpr, GROUP: tl.constexpr,
):
    """Program ``(b·H + h, t)``: output rows of query tile ``q_tile = n_q_tiles - 1 - t`` of
    query head ``h``, which reads kv head ``h // GROUP`` (``GROUP`` query heads per kv head).

    Under a causal mask the last query tiles visit the most key tiles; programs start in
    order of ``t`` (every head's tile ``t`` before any tile ``t + 1``), so the longest rows
    start first and the short ones fill the end of the launch instead of trailing it.

    ``INIT``: the rows' softmax does not start empty but from a finished partial result
    already in ``O`` and ``LSE`` (another kernel's pass over other keys of the same rows):
    ``(m, l, acc) = (lse, 1, o)``, which the online softmax continues exactly (a row with
    ``lse = +inf`` saw no key: ``(-inf, 0, 0)``).  Output and log-sum-exp are overwritten
    in place with the union's."""
    bh = tl.program_id(0)
    q_tile = tl.num_programs(1) - 1 - tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = kv_head(h, GROUP)
    Q += b * sq_b + h * sq_h
    K += b * sk_b + hk * sk_h
    V += b * sv_b + hk * sv_h
    O += b * so_b + h * so_h

    rows = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    q = load_tile(Q, rows, cols, sq_n, n_q, HEAD_DIM, BLOCK_D)
    LSE += bh.to(tl.int64) * n_q
    if INIT:
        lse_in = tl.load(LSE + rows, mask=rows < n_q, other=float("inf"))
        seen = lse_in < float("inf")
        m_i = tl.where(seen, lse_in, float("-inf"))
        l_i = tl.where(seen, 1.0, 0.0)
        acc = load_tile(O, rows, cols, so_n, n_q, HEAD_DIM, BLOCK_D).to(tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    n_k_tiles = tl.cdiv(n_k, BLOCK_N)
    REC += bh.to(tl.int64) * tl.cdiv(n_q, BLOCK_M) * n_k_tiles
    first, free_lo, free_hi, n_visit = _dense_key_range(q_tile, n_q, n_k, window, CAUSAL, WINDOWED, BLOCK_M, BLOCK_N)
    # Tiles wholly below the diagonal (and inside the window) need no mask; those on it, on
    # the window's edge or at the ragged end do.
    for k_tile in range(first, free_lo):
        acc, m_i, l_i = _dense_fwd_step(acc, m_i, l_i, q, rows, k_tile, K, V, sk_n, sv_n, n_k, qk_scale, window,
                                        True, CAUSAL, WINDOWED, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
        record_tile(REC, q_tile, k_tile, n_k_tiles, RECORD)
    for k_tile in range(free_lo, free_hi):
        acc, m_i, l_i = _dense_fwd_step(acc, m_i, l_i, q, rows, k_tile, K, V, sk_n, sv_n, n_k, qk_scale, window,
                                        False, CAUSAL, WINDOWED, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
        record_tile(REC, q_tile, k_tile, n_k_tiles, RECORD)
    for k_tile in range(free_hi, n_visit):
        acc, m_i, l_i = _dense_fwd_step(acc, m_i, l_i, q, rows, k_tile, K, V, sk_n, sv_n, n_k, qk_scale, window,
                                        True, CAUSAL, WINDOWED, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
        record_tile(REC, q_tile, k_tile, n_k_tiles, RECORD)

    out, lse2 = finish_softmax(acc, m_i, l_i)
    store_tile(O, out, rows, cols, so_n, n_q, HEAD_DIM, BLOCK_D)
    tl.store(LSE + rows, lse2, mask=rows < n_q)


@triton.jit
def _flash_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, REC_KV, REC_Q,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sdo_b, sdo_h, sdo_n,
    H, n_q, n_k, qk_scale, sm_scale, window,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, ACCUMULATE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_KV: tl.constexpr, STEP_Q: tl.constexpr, BLOCK_Q: tl.constexpr,
    STEP_K: tl.constexpr, DOT_PRECISION: tl.constexpr, RECORD: tl.constexpr, GROUP: tl.constexpr,
    PARTS: tl.constexpr = 3,
):
    """One launch for the whole backward: program ``(t, b·H + h)`` computes dK, dV of key
    tile ``t`` (``BLOCK_KV`` keys, walking the query tiles that see it ``STEP_Q`` queries at a
    time), then dQ of query tile ``t`` of query head ``h`` (``BLOCK_Q`` queries, walking the
    key tiles it sees ``STEP_K`` keys at a time, as in the forward).  Under a causal mask the
    first part's work falls with ``t`` while the second's grows, so every program does
    about the same.  Gradients are contiguous, dQ ``(B, H, Nq, D)``, dK and dV
    ``(B, H / GROUP, Nk, D)``.  With a tile record the tiles are the forward's:
    ``STEP_Q = BLOCK_Q = BLOCK_M`` and ``BLOCK_KV = STEP_K = BLOCK_N``.

    With ``GROUP > 1`` query heads per kv head, dK and dV of kv head ``h // GROUP`` sum over
    its group's query heads; program ``h`` does key tile ``t`` only if it owns it
    (:func:`owns_kv_tile`), and then walks all the group's heads, accumulating in float32.

    ``ACCUMULATE``: add the gradients to those already in ``DQ``, ``DK``, ``DV`` (another
    kernel's, over other pairs of the same softmax) instead of overwriting them.

    ``PARTS``: 3 does both parts; 1 only dK, dV and 2 only dQ, so that two launches can tile
    them differently.  A dQ-only launch takes its tiles last first (under a causal mask the
    last query tile sees the most keys: the longest programs start first).
    """
    tile = tl.program_id(0)
    if PARTS == 2:
        tile = tl.num_programs(0) - 1 - tile
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = kv_head(h, GROUP)
    Q += b * sq_b + h * sq_h
    K += b * sk_b + hk * sk_h
    V += b * sv_b + hk * sv_h
    DO += b * sdo_b + h * sdo_h
    LSE += bh.to(tl.int64) * n_q
    DELTA += bh.to(tl.int64) * n_q
    DQ += bh.to(tl.int64) * n_q * HEAD_DIM
    DK += kv_head(bh, GROUP).to(tl.int64) * n_k * HEAD_DIM
    DV += kv_head(bh, GROUP).to(tl.int64) * n_k * HEAD_DIM
    # Tile counts as the dK/dV part sees them (and, with a record, the forward).
    n_q_tiles = tl.cdiv(n_q, STEP_Q)
    n_k_tiles = tl.cdiv(n_k, BLOCK_KV)
    REC_KV += bh.to(tl.int64) * n_q_tiles * n_k_tiles
    REC_Q += bh.to(tl.int64) * n_q_tiles * n_k_tiles
    cols = tl.arange(0, BLOCK_D)

    if PARTS & 1:
        # ---- dK, dV for key tile `tile` of kv head h // GROUP ----
        if owns_kv_tile(tile, n_k_tiles, h, GROUP):
            keys = tile * BLOCK_KV + tl.arange(0, BLOCK_KV)
            k = load_tile(K, keys, cols, sk_n, n_k, HEAD_DIM, BLOCK_D)
            v = load_tile(V, keys, cols, sv_n, n_k, HEAD_DIM, BLOCK_D)
            dk = tl.zeros([BLOCK_KV, BLOCK_D], tl.float32)
            dv = tl.zeros([BLOCK_KV, BLOCK_D], tl.float32)
            if GROUP == 1:
                dk, dv = _dense_dkdv_head(dk, dv, k, v, keys, tile, Q, DO, LSE, DELTA, REC_KV, sq_n, sdo_n, n_q, n_k,
                                          n_k_tiles, qk_scale, window, CAUSAL, WINDOWED, HEAD_DIM, BLOCK_D, STEP_Q,
                                          BLOCK_KV, DOT_PRECISION, RECORD)
            else:
                # The group's query heads are h - h % GROUP + g; the pointers are at head h.
                for g in range(GROUP):
                    d = g - h % GROUP
                    dk, dv = _dense_dkdv_head(dk, dv, k, v, keys, tile, Q + d * sq_h, DO + d * sdo_h, LSE + d * n_q,
                                              DELTA + d * n_q, REC_KV + d * n_q_tiles * n_k_tiles, sq_n, sdo_n, n_q,
                                              n_k, n_k_tiles, qk_scale, window, CAUSAL, WINDOWED, HEAD_DIM, BLOCK_D,
                                              STEP_Q, BLOCK_KV, DOT_PRECISION, RECORD)
            add_tile(DK, dk * sm_scale, keys, cols, HEAD_DIM, n_k, HEAD_DIM, BLOCK_D, ACCUMULATE)
            add_tile(DV, dv, keys, cols, HEAD_DIM, n_k, HEAD_DIM, BLOCK_D, ACCUMULATE)

    if PARTS & 2:
        # ---- dQ for query tile `tile` ----
        if tile < tl.cdiv(n_q, BLOCK_Q):
            rows = tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
            q = load_tile(Q, rows, cols, sq_n, n_q, HEAD_DIM, BLOCK_D)
            do = load_tile(DO, rows, cols, sdo_n, n_q, HEAD_DIM, BLOCK_D)
            lse2 = tl.load(LSE + rows, mask=rows < n_q, other=float("inf"))
            delta = tl.load(DELTA + rows, mask=rows < n_q, other=0.0)
            dq = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
            first, free_lo, free_hi, n_visit = _dense_key_range(tile, n_q, n_k, window, CAUSAL, WINDOWED, BLOCK_Q,
                                                                STEP_K)
            for k_tile in range(first, free_lo):
                dq = _dense_dq_step(dq, q, do, lse2, delta, rows, k_tile, K, V, sk_n, sv_n, n_k, qk_scale, window,
                                    True, CAUSAL, WINDOWED, HEAD_DIM, BLOCK_D, STEP_K, DOT_PRECISION)
                record_tile(REC_Q, tile, k_tile, n_k_tiles, RECORD)
            for k_tile in range(free_lo, free_hi):
                dq = _dense_dq_step(dq, q, do, lse2, delta, rows, k_tile, K, V, sk_n, sv_n, n_k, qk_scale, window,
                                    False, CAUSAL, WINDOWED, HEAD_DIM, BLOCK_D, STEP_K, DOT_PRECISION)
                record_tile(REC_Q, tile, k_tile, n_k_tiles, RECORD)
            for k_tile in range(free_hi, n_visit):
                dq = _dense_dq_step(dq, q, do, lse2, delta, rows, k_tile, K, V, sk_n, sv_n, n_k, qk_scale, window,
                                    True, CAUSAL, WINDOWED, HEAD_DIM, BLOCK_D, STEP_K, DOT_PRECISION)
                record_tile(REC_Q, tile, k_tile, n_k_tiles, RECORD)
            add_tile(DQ, dq * sm_scale, rows, cols, HEAD_DIM, n_q, HEAD_DIM, BLOCK_D, ACCUMULATE)


@triton.jit
def _dense_dkdv_head(dk, dv, k, v, keys, k_tile, Q, DO, LSE, DELTA, REC, sq_n, sdo_n, n_q, n_k, n_k_tiles, qk_scale,
                     window, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, RECORD: tl.constexpr):
    """Add one query head's terms to dK, dV of key tile ``k_tile`` (``Q``, ``DO``, ``LSE``,
    ``DELTA``, ``REC`` at that head): the query tiles that see it, those on the diagonal
    (and on the window's far edge) masked."""
    first, first_full, free_end, end = _dense_query_range(k_tile, n_q, n_k, window, CAUSAL, WINDOWED, BLOCK_M,
                                                          BLOCK_N)
    for q_tile in range(first, first_full):
        dk, dv = _dense_dkdv_step(dk, dv, k, v, keys, q_tile, Q, DO, LSE, DELTA, sq_n, sdo_n, n_q,
                                  qk_scale, window, True, WINDOWED, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION)
        record_tile(REC, q_tile, k_tile, n_k_tiles, RECORD)
    for q_tile in range(first_full, free_end):
        dk, dv = _dense_dkdv_step(dk, dv, k, v, keys, q_tile, Q, DO, LSE, DELTA, sq_n, sdo_n, n_q,
                                  qk_scale, window, False, WINDOWED, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION)
        record_tile(REC, q_tile, k_tile, n_k_tiles, RECORD)
    for q_tile in range(free_end, end):
        dk, dv = _dense_dkdv_step(dk, dv, k, v, keys, q_tile, Q, DO, LSE, DELTA, sq_n, sdo_n, n_q,
                                  qk_scale, window, True, WINDOWED, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION)
        record_tile(REC, q_tile, k_tile, n_k_tiles, RECORD)
    return dk, dv


@triton.jit
def _dense_dkdv_step(dk, dv, k, v, keys, q_tile, Q, DO, LSE, DELTA, sq_n, sdo_n, n_q, qk_scale, window,
                     MASKED: tl.constexpr, WINDOWED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    rows = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    q = load_tile(Q, rows, cols, sq_n, n_q, HEAD_DIM, BLOCK_D)
    do = load_tile(DO, rows, cols, sdo_n, n_q, HEAD_DIM, BLOCK_D)
    # Rows past n_q read lse = +inf, so their p is 0 without a mask.
    lse2 = tl.load(LSE + rows, mask=rows < n_q, other=float("inf"))
    delta = tl.load(DELTA + rows, mask=rows < n_q, other=0.0)
    allowed = keys[None, :] <= rows[:, None]
    if WINDOWED:
        allowed = allowed & (keys[None, :] > rows[:, None] - window)
    p, ds = attention_grads_step(q, k, v, do, lse2, delta, allowed, qk_scale, MASKED, DOT_PRECISION)
    dv += mma(tl.trans(p).to(do.dtype), do, DOT_PRECISION)
    dk += mma(tl.trans(ds).to(q.dtype), q, DOT_PRECISION)
    return dk, dv


@triton.jit
def _dense_dq_step(dq, q, do, lse2, delta, rows, k_tile, K, V, sk_n, sv_n, n_k, qk_scale, window,
                   MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    keys = k_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    k = load_tile(K, keys, cols, sk_n, n_k, HEAD_DIM, BLOCK_D)
    v = load_tile(V, keys, cols, sv_n, n_k, HEAD_DIM, BLOCK_D)
    allowed = _dense_allowed(keys, rows, n_k, window, CAUSAL, WINDOWED)
    p, ds = attention_grads_step(q, k, v, do, lse2, delta, allowed, qk_scale, MASKED, DOT_PRECISION)
    return dq + mma(ds.to(k.dtype), k, DOT_PRECISION)


# --------------------------------------------------------------------------------------
# Launch configuration and Python entry points
# --------------------------------------------------------------------------------------


def flash_forward(q, k, v, causal, sm_scale, cfg, record=None, *, window: int = 0, init=None,
                  record_prefix: str = ""):
    """Run the dense forward kernel on q ``(B, H, Nq, D)``, k and v ``(B, Hkv, Nk, D)`` (``Hkv``
    dividing ``H``); returns ``(o, lse2)`` with ``lse2`` (B, H, Nq) float32 base-2.

    ``window > 0``: a causal sliding window (key ``j`` for query ``i`` iff ``0 <= i - j < window``).
    ``init=(o, lse2)``: continue the softmax of a partial result over other keys (contiguous
    ``o``, ``lse2`` as returned here), updated in place and returned (see the kernel's ``INIT``).
    ``record_prefix`` names the tile record's maps (``prefix + "fwd"``).
    """
    B, H, n_q, D = q.shape
    n_k = k.shape[2]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if cfg.get("hopper", 1) and q.is_cuda and hopper.usable(q, k, v, window=window, init=init, record=record):
        return hopper.hopper_forward(q, k, v, causal, sm_scale)
    if init is None:
        o = _runtime.new_output((B, H, n_q, D), q.dtype, q.device)
        lse2 = _runtime.new_output((B, H, n_q), torch.float32, q.device)
    else:
        o, lse2 = init
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = (B * H, _runtime.cdiv(n_q, BM))
    (rec,) = record_buffers(record, [record_prefix + "fwd"], (B, H, grid[1], _runtime.cdiv(n_k, BN)), q.device, lse2)
    launch(_flash_fwd_kernel, grid,
        q, k, v, o, lse2, rec,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        H, n_q, n_k, sm_scale * LOG2E, window,
        CAUSAL=causal, WINDOWED=window > 0, INIT=init is not None, HEAD_DIM=D,
        BLOCK_D=max(16, _runtime.next_power_of_2(D)), BLOCK_M=BM, BLOCK_N=BN, DOT_PRECISION=dot_precision(q.dtype),
        RECORD=record is not None, GROUP=H // k.shape[1], **launch_params(cfg),
    )
    return o, lse2


def flash_backward(q, k, v, o, lse2, do, causal, sm_scale, cfg, record=None, *, window: int = 0, delta=None,
                   accumulate=None, record_prefix: str = "", parts: int = 3):
    """Run the dense backward kernel; returns contiguous ``(dq, dk, dv)``, dk and dv with k's
    ``Hkv`` heads (summed over each kv head's group of query heads).

    ``window`` as in :func:`flash_forward`; ``delta`` the softmax row term if already computed
    (:func:`softmax_delta` of ``o`` and ``do``); ``accumulate=(dq, dk, dv)``: contiguous
    gradients to add to, in place (returned).  ``parts`` (the kernel's ``PARTS``): 3 computes
    all three; 1 only dK, dV and 2 only dQ, leaving the others unwritten (for tools that time or
    tile the two parts apart, ``tools/dense_bwd_split_probe.py``).
    """
    if parts not in (1, 2, 3):
        raise ValueError(f"parts must be 1 (dK, dV), 2 (dQ) or 3 (both), got {parts!r}")
    B, H, n_q, D = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    q, k, v, do = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, do))
    if delta is None:
        delta = softmax_delta(o, do)
    if accumulate is None:
        dq = _runtime.new_output((B, H, n_q, D), q.dtype, q.device)
        dk = _runtime.new_output((B, h_kv, n_k, D), k.dtype, k.device)
        dv = _runtime.new_output((B, h_kv, n_k, D), v.dtype, v.device)
    else:
        dq, dk, dv = accumulate
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    if cfg.get("bwd_BLOCK") and record is None:
        block, step = cfg["bwd_BLOCK"], cfg["bwd_STEP"]
        tiles = dict(BLOCK_KV=block, STEP_Q=step, BLOCK_Q=block, STEP_K=step)
    else:  # the forward's tiles (always with a record: its maps are in the forward's tiles)
        tiles = dict(BLOCK_KV=BN, STEP_Q=BM, BLOCK_Q=BM, STEP_K=BN)
    rec_kv, rec_q = record_buffers(record, [record_prefix + "bwd_kv", record_prefix + "bwd_q"],
                                   (B, H, _runtime.cdiv(n_q, BM), _runtime.cdiv(n_k, BN)), q.device, delta)
    launch(_flash_bwd_kernel, (max(_runtime.cdiv(n_q, tiles["BLOCK_Q"]), _runtime.cdiv(n_k, tiles["BLOCK_KV"])), B * H),
        q, k, v, do, lse2, delta, dq, dk, dv, rec_kv, rec_q,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
        H, n_q, n_k, sm_scale * LOG2E, sm_scale, window,
        CAUSAL=causal, WINDOWED=window > 0, ACCUMULATE=accumulate is not None, HEAD_DIM=D,
        BLOCK_D=max(16, _runtime.next_power_of_2(D)), **tiles, DOT_PRECISION=dot_precision(q.dtype),
        RECORD=record is not None, GROUP=H // h_kv, PARTS=parts, **launch_params(cfg, backward=True),
    )
    return dq, dk, dv


# The registered op pair (see ops.py): what flash_attention calls, and what torch.compile traces.
_flash_op = attention_op(
    "flash", "bool causal, float sm_scale, int[] cfg, int window",
    lambda q, k, v, causal, sm_scale, cfg, window: flash_forward(q, k, v, causal, sm_scale, cfg_dict(cfg),
                                                                 window=window),
    lambda q, k, v, o, lse2, do, causal, sm_scale, cfg, window: flash_backward(q, k, v, o, lse2, do, causal, sm_scale,
                                                                               cfg_dict(cfg), window=window),
    lse_shape=lambda q, k, v, *_: q.shape[:3],
)


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = True,
    sm_scale: float | None = None,
    *,
    window: int = 0,
    kernel_options: dict | None = None,
    tile_record: "TileRecord | None" = None,
) -> Tensor:
    """FlashAttention: ``softmax(q kᵀ · sm_scale [+ causal mask]) v`` without the N×N matrix.

    Args:
        q: ``(B, H, N, D)`` queries; k, v: ``(B, Hkv, M, D)``, ``Hkv`` dividing ``H``:
            grouped-query attention (multi-query for ``Hkv = 1``), query head ``h`` using
            kv head ``h // (H / Hkv)`` as SDPA's ``enable_gqa=True``; k and v are not
            copied, and their gradients are ``(B, Hkv, M, D)``.  Any strides (the last
            dim is made contiguous if it is not); float16, bfloat16 or float32;
            ``16 <= D <= 128`` (any value, not only powers of two).
        causal: query ``i`` sees keys ``j <= i`` (positions counted from 0 in both,
            as ``scaled_dot_product_attention(is_causal=True)``).
        sm_scale: score scale, default ``1/sqrt(D)``.
        window: sliding-window attention: query ``i`` sees keys ``j`` with
            ``0 <= i - j < window`` (its own and the ``window - 1`` before it; causal only).
            ``0`` (default): no window.  Only the diagonal band of tiles is visited, so the
            work grows as ``N · window`` instead of ``N²``.
        kernel_options: override tile sizes / warps / stages (see :func:`kernel_config`);
            ``{"hopper": 0}`` keeps the forward on the Triton kernel on Hopper GPUs.
        tile_record: a :class:`sparseflash.tiles.TileRecord` to count which
            (query tile, key tile) pairs each pass computed.

    Returns:
        ``(B, H, N, D)`` in the dtype of ``q``; differentiable in q, k and v.
    """
    _runtime.check_qkv(q, k, v)
    window = _runtime.check_window(window)
    if window and not causal:
        raise ValueError(f"window={window} is a causal sliding window: use it with causal=True")
    sm_scale = _runtime.softmax_scale(sm_scale, q.shape[-1])
    cfg = kernel_config(q.shape[-1], q.device, kernel_options, dense=True, seq_len=q.shape[2], dtype=q.dtype,
                        window=window)
    if tile_record is not None:
        tile_record.start("flash", cfg)
    if tile_record is None:
        return _flash_op(q, k, v, bool(causal), sm_scale, cfg_args(cfg), window)
    # Recording is instrumentation for pictures and tests: eager only, not an op.
    settings = dict(causal=bool(causal), sm_scale=sm_scale, cfg=cfg, record=tile_record, window=window)
    return run_attention(q, k, v, partial(flash_forward, **settings), partial(flash_backward, **settings))
