"""The sliding-window band as a sweep: each program walks a run of query tiles in one loop.

Pairs: key ``j`` for query ``i`` iff ``0 <= i - j < window`` (causal, self-attention, ``N``
queries and ``N`` keys), the band beside the bucket layout in hash ∪ window
(:func:`sparseflash.permuted.union_forward`).  Math as in :mod:`sparseflash.flash`, base 2.

Why a kernel of its own.  With tiles of ``BLOCK`` rows a query tile ``t`` sees only the key
tiles ``t - SPAN + 1 .. t``, ``SPAN = cdiv(window - 1, BLOCK) + 1`` (3 at window 128 and 64-row
tiles).  The dense kernel gives each query tile a program, so every program loads its first
tiles with nothing to overlap them and finishes after ``SPAN`` steps: on an H200 that band ran
at about a third of the dense kernel's speed per tile.  Here a program owns ``RUN`` consecutive
query tiles of one head and walks all their ``(query tile, key tile)`` pairs in one flat loop of
``RUN · SPAN`` steps, so the compiler's software pipeline keeps loading the next pairs' tiles
while the current one computes, across query tiles; a query tile's softmax starts at its first
step (from the far part's finished rows with ``INIT``) and is written at its last.

Tile skipping: only the ``SPAN`` tiles of the diagonal band are visited (the same tiles as the
dense kernel's windowed loop); key tiles before the sequence (the first query tiles) are
masked out, and every step is masked (the band's two edges are in every tile at these widths).

Backward: dK, dV of key tile ``s`` from query tiles ``s .. s + SPAN - 1``, then dQ of query
tile ``t`` from key tiles ``t - SPAN + 1 .. t``, each a flat loop over a run of tiles, added to
the gradients already there with ``ACCUMULATE`` (the far part's).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _runtime
from .flash import _dense_allowed
from ._steps import (
    LOG2E,
    add_tile,
    attention_grads_step,
    dot_precision,
    finish_softmax,
    held_tile,
    launch_params,
    load_tile,
    mma,
    online_softmax_step,
    record_buffers,
    row_flag,
    record_tile,
    softmax_delta,
    store_tile,
)

#: Whether the union's band runs here (else in the dense kernel's windowed loop,
#: :mod:`sparseflash.flash`); read at every call, so tools can time both.  Off by default until
#: ``tools/band_sweep_ab.py`` has timed it against that loop on a GPU: the values are checked on the
#: CPU (``tests/test_band.py``) and the kernels compile for sm_90, but their speed is unmeasured.
ENABLED = False
#: Programs a launch aims for per streaming multiprocessor (CUDA): the run of query tiles a
#: program walks is the total tile count over this many programs, at most ``MAX_RUN``.
PROGRAMS_PER_SM = 4
MAX_RUN = 16
#: Whether a query tile (forward, dQ) or key and value tile (dK/dV) is read once, at the first of its
#: ``SPAN`` steps, rather than every step (see :func:`sparseflash._steps.held_tile`).
LOAD_ONCE = False


@triton.jit
def _key_tile(K, keys, cols, stride_row, n, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """:func:`load_tile` of keys that may lie before the sequence (negative: read as 0)."""
    mask = (keys[:, None] >= 0) & (keys[:, None] < n)
    if BLOCK_D != HEAD_DIM:
        mask = mask & (cols[None, :] < HEAD_DIM)
    return tl.load(K + keys[:, None] * stride_row + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _band_allowed(rows, keys, n, window):
    """Pairs of a band tile: the dense kernel's windowed mask, and keys not before the sequence
    (the first query tiles' band starts before key 0) and rows inside it."""
    return _dense_allowed(keys, rows, n, window, True, True) & (keys[None, :] >= 0) & (rows[:, None] < n)


@triton.jit
def _band_fwd_kernel(
    Q, K, V, O, LSE, REC,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
    H, n, qk_scale, window, SPAN, RUN,
    INIT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, RECORD: tl.constexpr, ONCE: tl.constexpr,
):
    """Program ``(b·H + h, r)``: query tiles ``r·RUN ..`` of head ``h``, ``SPAN`` key tiles each."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * sq_b + h * sq_h
    K += b * sk_b + h * sk_h
    V += b * sv_b + h * sv_h
    O += b * so_b + h * so_h
    LSE += bh.to(tl.int64) * n
    n_tiles = tl.cdiv(n, BLOCK)
    REC += bh.to(tl.int64) * n_tiles * n_tiles
    t0 = tl.program_id(1) * RUN
    steps = (tl.minimum(t0 + RUN, n_tiles) - t0) * SPAN
    cols = tl.arange(0, BLOCK_D)

    acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    q = tl.zeros([BLOCK, BLOCK_D], Q.dtype.element_ty)
    for step in range(0, steps):
        t = t0 + step // SPAN
        j = step % SPAN
        k_tile = t - SPAN + 1 + j
        rows = t * BLOCK + tl.arange(0, BLOCK)
        keys = k_tile * BLOCK + tl.arange(0, BLOCK)
        # A query tile's first step starts its softmax: empty, or the far part's finished rows.
        start = row_flag(rows, j == 0)
        if INIT:
            lse_in = tl.load(LSE + rows, mask=(rows < n) & start, other=float("inf"))
            seen = lse_in < float("inf")
            o_in = tl.load(O + rows[:, None] * so_n + cols[None, :],
                           mask=((rows < n) & start)[:, None] & (cols[None, :] < HEAD_DIM), other=0.0)
            acc = tl.where(start[:, None], o_in.to(tl.float32), acc)
            m_i = tl.where(start, tl.where(seen, lse_in, float("-inf")), m_i)
            l_i = tl.where(start, tl.where(seen, 1.0, 0.0), l_i)
        else:
            acc = tl.where(start[:, None], 0.0, acc)
            m_i = tl.where(start, float("-inf"), m_i)
            l_i = tl.where(start, 0.0, l_i)
        q = held_tile(Q, rows, cols, sq_n, n, j == 0, q, ONCE, HEAD_DIM, BLOCK_D)
        k = _key_tile(K, keys, cols, sk_n, n, HEAD_DIM, BLOCK_D)
        v = _key_tile(V, keys, cols, sv_n, n, HEAD_DIM, BLOCK_D)
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, q, k, v, _band_allowed(rows, keys, n, window), qk_scale,
                                            True, DOT_PRECISION)
        if RECORD:
            if k_tile >= 0:
                record_tile(REC, t, k_tile, n_tiles, RECORD)
        if j == SPAN - 1:
            out, lse2 = finish_softmax(acc, m_i, l_i)
            store_tile(O, out, rows, cols, so_n, n, HEAD_DIM, BLOCK_D)
            tl.store(LSE + rows, lse2, mask=rows < n)


@triton.jit
def _band_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, REC_KV, REC_Q,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sdo_b, sdo_h, sdo_n,
    H, n, qk_scale, sm_scale, window, SPAN, RUN,
    ACCUMULATE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, RECORD: tl.constexpr, ONCE: tl.constexpr,
):
    """Program ``(b·H + h, r)``: dK, dV of key tiles ``r·RUN ..``, then dQ of the same query tiles.
    Gradients are contiguous ``(B, H, N, D)``."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * sq_b + h * sq_h
    K += b * sk_b + h * sk_h
    V += b * sv_b + h * sv_h
    DO += b * sdo_b + h * sdo_h
    LSE += bh.to(tl.int64) * n
    DELTA += bh.to(tl.int64) * n
    DQ += bh.to(tl.int64) * n * HEAD_DIM
    DK += bh.to(tl.int64) * n * HEAD_DIM
    DV += bh.to(tl.int64) * n * HEAD_DIM
    n_tiles = tl.cdiv(n, BLOCK)
    REC_KV += bh.to(tl.int64) * n_tiles * n_tiles
    REC_Q += bh.to(tl.int64) * n_tiles * n_tiles
    t0 = tl.program_id(1) * RUN
    steps = (tl.minimum(t0 + RUN, n_tiles) - t0) * SPAN
    cols = tl.arange(0, BLOCK_D)

    # ---- dK, dV of key tile s from query tiles s .. s + SPAN - 1 ----
    dk = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    k = tl.zeros([BLOCK, BLOCK_D], K.dtype.element_ty)
    v = tl.zeros([BLOCK, BLOCK_D], V.dtype.element_ty)
    for step in range(0, steps):
        s = t0 + step // SPAN
        j = step % SPAN
        q_tile = s + j
        keys = s * BLOCK + tl.arange(0, BLOCK)
        rows = q_tile * BLOCK + tl.arange(0, BLOCK)
        start = row_flag(keys, j == 0)[:, None]
        dk = tl.where(start, 0.0, dk)
        dv = tl.where(start, 0.0, dv)
        k = held_tile(K, keys, cols, sk_n, n, j == 0, k, ONCE, HEAD_DIM, BLOCK_D)
        v = held_tile(V, keys, cols, sv_n, n, j == 0, v, ONCE, HEAD_DIM, BLOCK_D)
        q = load_tile(Q, rows, cols, sq_n, n, HEAD_DIM, BLOCK_D)
        do = load_tile(DO, rows, cols, sdo_n, n, HEAD_DIM, BLOCK_D)
        # Rows past n read lse = +inf: their p is 0.
        lse2 = tl.load(LSE + rows, mask=rows < n, other=float("inf"))
        delta = tl.load(DELTA + rows, mask=rows < n, other=0.0)
        p, ds = attention_grads_step(q, k, v, do, lse2, delta, _band_allowed(rows, keys, n, window), qk_scale,
                                     True, DOT_PRECISION)
        dv += mma(tl.trans(p).to(do.dtype), do, DOT_PRECISION)
        dk += mma(tl.trans(ds).to(q.dtype), q, DOT_PRECISION)
        if RECORD:
            if q_tile < n_tiles:
                record_tile(REC_KV, q_tile, s, n_tiles, RECORD)
        if j == SPAN - 1:
            add_tile(DK, dk * sm_scale, keys, cols, HEAD_DIM, n, HEAD_DIM, BLOCK_D, ACCUMULATE)
            add_tile(DV, dv, keys, cols, HEAD_DIM, n, HEAD_DIM, BLOCK_D, ACCUMULATE)

    # ---- dQ of query tile t from key tiles t - SPAN + 1 .. t ----
    dq = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    q = tl.zeros([BLOCK, BLOCK_D], Q.dtype.element_ty)
    do = tl.zeros([BLOCK, BLOCK_D], DO.dtype.element_ty)
    for step in range(0, steps):
        t = t0 + step // SPAN
        j = step % SPAN
        k_tile = t - SPAN + 1 + j
        rows = t * BLOCK + tl.arange(0, BLOCK)
        keys = k_tile * BLOCK + tl.arange(0, BLOCK)
        dq = tl.where(row_flag(rows, j == 0)[:, None], 0.0, dq)
        q = held_tile(Q, rows, cols, sq_n, n, j == 0, q, ONCE, HEAD_DIM, BLOCK_D)
        do = held_tile(DO, rows, cols, sdo_n, n, j == 0, do, ONCE, HEAD_DIM, BLOCK_D)
        lse2 = tl.load(LSE + rows, mask=rows < n, other=float("inf"))
        delta = tl.load(DELTA + rows, mask=rows < n, other=0.0)
        k = _key_tile(K, keys, cols, sk_n, n, HEAD_DIM, BLOCK_D)
        v = _key_tile(V, keys, cols, sv_n, n, HEAD_DIM, BLOCK_D)
        p, ds = attention_grads_step(q, k, v, do, lse2, delta, _band_allowed(rows, keys, n, window), qk_scale,
                                     True, DOT_PRECISION)
        dq += mma(ds.to(k.dtype), k, DOT_PRECISION)
        if RECORD:
            if k_tile >= 0:
                record_tile(REC_Q, t, k_tile, n_tiles, RECORD)
        if j == SPAN - 1:
            add_tile(DQ, dq * sm_scale, rows, cols, HEAD_DIM, n, HEAD_DIM, BLOCK_D, ACCUMULATE)


def band_applies(q, k, window: int, cfg: dict) -> bool:
    """Whether :func:`band_forward` / :func:`band_backward` take this call (else the dense kernel's
    windowed loop does): enabled, a window, as many keys as queries, one query head per kv head,
    square tiles."""
    return (ENABLED and window > 0 and q.shape[2] == k.shape[2] and q.shape[1] == k.shape[1]
            and cfg["BLOCK_M"] == cfg["BLOCK_N"])


def _span(window: int, block: int) -> int:
    """Key tiles a query tile's band covers: ``cdiv(window - 1, block) + 1``."""
    return _runtime.cdiv(window - 1, block) + 1


def _run(n_tile_rows: int, device: torch.device) -> int:
    """Query tiles a program walks (:func:`sparseflash._runtime.tiles_per_program`)."""
    return _runtime.tiles_per_program(n_tile_rows, device, PROGRAMS_PER_SM, MAX_RUN)


def band_forward(q, k, v, sm_scale, cfg, record=None, *, window: int, init=None, record_prefix: str = ""):
    """The band's ``(o, lse2)`` of q, k, v ``(B, H, N, D)``: ``init=(o, lse2)`` continues a partial
    result over other keys of the same rows in place (contiguous, as :func:`sparseflash.flash.
    flash_forward` returns them).  Requires :func:`band_applies`."""
    B, H, n, D = q.shape
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if init is None:
        o = _runtime.new_output((B, H, n, D), q.dtype, q.device)
        lse2 = _runtime.new_output((B, H, n), torch.float32, q.device)
    else:
        o, lse2 = init
    block = cfg["BLOCK_M"]
    n_tiles = _runtime.cdiv(n, block)
    run = _run(B * H * n_tiles, q.device)
    (rec,) = record_buffers(record, [record_prefix + "fwd"], (B, H, n_tiles, n_tiles), q.device, lse2)
    _band_fwd_kernel[(B * H, _runtime.cdiv(n_tiles, run))](
        q, k, v, o, lse2, rec,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        H, n, sm_scale * LOG2E, window, _span(window, block), run,
        INIT=init is not None, HEAD_DIM=D, BLOCK_D=max(16, _runtime.next_power_of_2(D)), BLOCK=block,
        DOT_PRECISION=dot_precision(q.dtype), RECORD=record is not None, ONCE=LOAD_ONCE,
        **launch_params(cfg),
    )
    return o, lse2


def band_backward(q, k, v, o, lse2, do, sm_scale, cfg, record=None, *, window: int, delta=None, accumulate=None,
                  record_prefix: str = ""):
    """The band's ``(dq, dk, dv)``, contiguous; ``accumulate=(dq, dk, dv)`` adds them in place to
    those (contiguous) gradients; ``delta`` as :func:`sparseflash.flash.flash_backward`'s.  The
    backward visits the forward's tiles.  Requires :func:`band_applies`."""
    B, H, n, D = q.shape
    q, k, v, do = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, do))
    if delta is None:
        delta = softmax_delta(o, do)
    if accumulate is None:
        dq, dk, dv = (_runtime.new_output((B, H, n, D), t.dtype, t.device) for t in (q, k, v))
    else:
        dq, dk, dv = accumulate
    block = cfg["BLOCK_M"]
    n_tiles = _runtime.cdiv(n, block)
    run = _run(B * H * n_tiles, q.device)
    rec_kv, rec_q = record_buffers(record, [record_prefix + "bwd_kv", record_prefix + "bwd_q"],
                                   (B, H, n_tiles, n_tiles), q.device, delta)
    _band_bwd_kernel[(B * H, _runtime.cdiv(n_tiles, run))](
        q, k, v, do, lse2, delta, dq, dk, dv, rec_kv, rec_q,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        H, n, sm_scale * LOG2E, sm_scale, window, _span(window, block), run,
        ACCUMULATE=accumulate is not None, HEAD_DIM=D, BLOCK_D=max(16, _runtime.next_power_of_2(D)), BLOCK=block,
        DOT_PRECISION=dot_precision(q.dtype), RECORD=record is not None, ONCE=LOAD_ONCE,
        **launch_params(cfg, backward=True),
    )
    return dq, dk, dv
