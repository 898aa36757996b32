"""The bucket layout's tiles as a sweep: each program walks a run of tiles in one loop.

Pairs and math as in :mod:`sparseflash.permuted` (position-causal attention over a layout, ids
compared in the overflow run with ``LABELS``), base 2.

Why a kernel of its own.  In :mod:`sparseflash.permuted` a program takes one query tile and
visits its bucket's key tiles ``[lo, hi)`` of the :class:`~sparseflash.plan.TilePlan`: with 16
buckets at 8k tokens and 64-row tiles that is about four tiles, so each program's first loads
have nothing to overlap them and it ends soon after (on an H200 those kernels ran at about a
third of the dense kernel's speed per tile).  Here a program owns ``RUN`` consecutive tiles of one
head and walks all their pairs in one flat loop, so the compiler's software pipeline loads the
next pairs' tiles while the current one computes, across tiles and buckets::

    step -> (tile i of the run, its kk-th pair)    with ends = cumsum(count) over the run

``count`` is a tile's run length, or 1 for a real tile whose run is empty (a query bucket with
no earlier keys, or every key inside the window of the union's far part): that one step is
fully masked, so the tile's rows are still written (output 0, ``lse2 = +inf``; dK, dV 0).
Tiles of padding only (the layout's tail) have no steps.

Tile skipping: the plan's tiles and no others.  Every step applies the position mask (and the
id test with ``LABELS``): in the plan's mask-free tiles it allows every pair, so the values are
those of :mod:`sparseflash.permuted` and only the mask's arithmetic is extra.

Backward: dK, dV of a run of key tiles (``k_runs``: the query tiles that see each), then dQ of
the same run of query tiles (``q_runs``), each a flat loop.  One query head per kv head
(:func:`sweep_applies`); grouped-query calls stay in :mod:`sparseflash.permuted`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _runtime
from ._steps import (
    LOG2E,
    attention_grads_step,
    dot_precision,
    finish_softmax,
    held_tile,
    launch_params,
    layout_tile,
    load_tile,
    mma,
    online_softmax_step,
    record_buffers,
    record_tile,
    row_flag,
    softmax_delta,
    store_tile,
)

#: Whether the layout's passes run here (else in :mod:`sparseflash.permuted`'s one-tile
#: programs); read at every call, so tools can time both.
ENABLED = False
#: Programs a launch aims for per streaming multiprocessor (CUDA); each walks the rest.
PROGRAMS_PER_SM = 4
MAX_RUN = 16
#: Whether the tile that stays through a tile's steps (the query tile in the forward and dQ, the
#: key and value tiles in dK/dV) is read once, at its first step, rather than every step (L2
#: hits, but at the dense kernel's pace they would be half again the loads of the streamed tiles).
LOAD_ONCE = False


@triton.jit
def _pick(vec, i, lanes):
    """``vec[i]`` of a small vector, as a scalar."""
    return tl.sum(tl.where(lanes == i, vec, 0), 0)


@triton.jit
def _run_steps(RUNS, IDX, r, n_tiles, n_rows, BLOCK: tl.constexpr, RUN: tl.constexpr):
    """A program's run of tiles ``r·RUN + lanes``: their first pair ``lo``, one past their last
    ``hi``, their step counts and the counts' running sums (``ends``)."""
    lanes = tl.arange(0, RUN)
    tiles = r * RUN + lanes
    live = tiles < n_tiles
    # A tile that starts with padding is padding throughout (the layout's tail).
    real = tl.load(IDX + tiles * BLOCK, mask=live, other=n_rows) < n_rows
    lo = tl.load(RUNS + tiles * 3, mask=real, other=0)
    hi = tl.load(RUNS + tiles * 3 + 2, mask=real, other=0)
    count = tl.where(real, tl.maximum(hi - lo, 1), 0)
    return lanes, lo, hi, count, tl.cumsum(count, 0)


@triton.jit
def _step(step, r, lanes, lo, hi, count, ends, n_other, RUN: tl.constexpr):
    """Step ``step`` of a run: ``(tile, other tile, live, first, last)``; ``live`` is off only in
    an empty tile's one step, whose other tile is then any tile of the other side (``n_other``
    of them), loaded and masked out."""
    i = tl.sum((ends <= step).to(tl.int32), 0)
    n_i = _pick(count, i, lanes)
    kk = step - (_pick(ends, i, lanes) - n_i)
    other = _pick(lo, i, lanes) + kk
    live = other < _pick(hi, i, lanes)
    return r * RUN + i, tl.where(live, other, tl.minimum(other, n_other - 1)), live, kk == 0, kk == n_i - 1


@triton.jit
def _pair_mask(qpos, kpos, qlab, klab, live, LABELS: tl.constexpr):
    """Allowed pairs of a step: keys at or before the query (padding reads +inf / -1), equal ids
    with ``LABELS``, nothing in an empty tile's step (``live`` off)."""
    allowed = (kpos[None, :] <= qpos[:, None]) & live
    if LABELS:
        allowed = allowed & (klab[None, :] == qlab[:, None])
    return allowed


@triton.jit
def _sweep_fwd_kernel(
    Q, K, V, O, LSE, QIDX, QPOS, KIDX, KPOS, QLAB, KLAB, QRUNS, REC,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
    H, n_q, n_k, n_q_slots, n_k_slots, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, RECORD: tl.constexpr, LABELS: tl.constexpr, RUN: tl.constexpr,
    ONCE: tl.constexpr,
):
    """Program ``(b·H + h, r)``: query tiles ``r·RUN ..`` of head ``h``'s layout, each over its
    run of key tiles."""
    bh = tl.program_id(0)
    r = tl.program_id(1)
    bh64 = bh.to(tl.int64)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * sq_b + h * sq_h
    K += b * sk_b + h * sk_h
    V += b * sv_b + h * sv_h
    O += b * so_b + h * so_h
    LSE += bh64 * n_q
    QIDX += bh64 * n_q_slots
    QPOS += bh64 * n_q_slots
    KIDX += bh64 * n_k_slots
    KPOS += bh64 * n_k_slots
    QLAB += bh64 * n_q
    KLAB += bh64 * n_k
    n_q_tiles = n_q_slots // BLOCK_M
    n_k_tiles = n_k_slots // BLOCK_N
    REC += bh64 * n_q_tiles * n_k_tiles
    QRUNS += bh64 * n_q_tiles * 3
    cols = tl.arange(0, BLOCK_D)
    lanes, lo, hi, count, ends = _run_steps(QRUNS, QIDX, r, n_q_tiles, n_q, BLOCK_M, RUN)

    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    q = tl.zeros([BLOCK_M, BLOCK_D], Q.dtype.element_ty)
    for step in range(0, tl.sum(count, 0)):
        q_tile, k_tile, live, first, last = _step(step, r, lanes, lo, hi, count, ends, n_k_tiles, RUN)
        rows, qpos, qlab = layout_tile(QIDX, QPOS, QLAB, q_tile, n_q, LABELS, BLOCK_M)
        q = held_tile(Q, rows, cols, sq_n, n_q, first, q, ONCE, HEAD_DIM, BLOCK_D)
        k_rows, kpos, klab = layout_tile(KIDX, KPOS, KLAB, k_tile, n_k, LABELS, BLOCK_N)
        k = load_tile(K, k_rows, cols, sk_n, n_k, HEAD_DIM, BLOCK_D)
        v = load_tile(V, k_rows, cols, sv_n, n_k, HEAD_DIM, BLOCK_D)
        # A query tile's first step starts its softmax.
        start = row_flag(qpos, first)
        acc = tl.where(start[:, None], 0.0, acc)
        m_i = tl.where(start, float("-inf"), m_i)
        l_i = tl.where(start, 0.0, l_i)
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, q, k, v, _pair_mask(qpos, kpos, qlab, klab, live, LABELS),
                                            qk_scale, True, DOT_PRECISION)
        if RECORD:
            if live:
                record_tile(REC, q_tile, k_tile, n_k_tiles, RECORD)
        if last:
            out, lse2 = finish_softmax(acc, m_i, l_i)
            # Padding slots (row n_q) are not stored: every token's row is written once, by its slot.
            store_tile(O, out, rows, cols, so_n, n_q, HEAD_DIM, BLOCK_D)
            tl.store(LSE + rows, lse2, mask=rows < n_q)


@triton.jit
def _sweep_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, QIDX, QPOS, KIDX, KPOS, QLAB, KLAB, QRUNS, KRUNS, REC_KV, REC_Q,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sdo_b, sdo_h, sdo_n,
    H, n_q, n_k, n_q_slots, n_k_slots, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, RECORD: tl.constexpr, LABELS: tl.constexpr, RUN: tl.constexpr,
    ONCE: tl.constexpr,
):
    """Program ``(b·H + h, r)``: dK, dV of key tiles ``r·RUN ..`` over the query tiles that see
    each, then dQ of query tiles ``r·RUN ..`` over their key tiles.  ``LSE``, ``DELTA`` and the
    gradients are in token order, the gradients contiguous ``(B, H, N, D)``."""
    bh = tl.program_id(0)
    r = tl.program_id(1)
    bh64 = bh.to(tl.int64)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * sq_b + h * sq_h
    K += b * sk_b + h * sk_h
    V += b * sv_b + h * sv_h
    DO += b * sdo_b + h * sdo_h
    LSE += bh64 * n_q
    DELTA += bh64 * n_q
    QIDX += bh64 * n_q_slots
    QPOS += bh64 * n_q_slots
    KIDX += bh64 * n_k_slots
    KPOS += bh64 * n_k_slots
    QLAB += bh64 * n_q
    KLAB += bh64 * n_k
    DQ += bh64 * n_q * HEAD_DIM
    DK += bh64 * n_k * HEAD_DIM
    DV += bh64 * n_k * HEAD_DIM
    n_q_tiles = n_q_slots // BLOCK_M
    n_k_tiles = n_k_slots // BLOCK_N
    REC_KV += bh64 * n_q_tiles * n_k_tiles
    REC_Q += bh64 * n_q_tiles * n_k_tiles
    QRUNS += bh64 * n_q_tiles * 3
    KRUNS += bh64 * n_k_tiles * 3
    cols = tl.arange(0, BLOCK_D)

    # ---- dK, dV of key tiles r·RUN .. over the query tiles that see each ----
    lanes, lo, hi, count, ends = _run_steps(KRUNS, KIDX, r, n_k_tiles, n_k, BLOCK_N, RUN)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    k = tl.zeros([BLOCK_N, BLOCK_D], K.dtype.element_ty)
    v = tl.zeros([BLOCK_N, BLOCK_D], V.dtype.element_ty)
    for step in range(0, tl.sum(count, 0)):
        k_tile, q_tile, live, first, last = _step(step, r, lanes, lo, hi, count, ends, n_q_tiles, RUN)
        k_rows, kpos, klab = layout_tile(KIDX, KPOS, KLAB, k_tile, n_k, LABELS, BLOCK_N)
        k = held_tile(K, k_rows, cols, sk_n, n_k, first, k, ONCE, HEAD_DIM, BLOCK_D)
        v = held_tile(V, k_rows, cols, sv_n, n_k, first, v, ONCE, HEAD_DIM, BLOCK_D)
        rows, qpos, qlab = layout_tile(QIDX, QPOS, QLAB, q_tile, n_q, LABELS, BLOCK_M)
        q = load_tile(Q, rows, cols, sq_n, n_q, HEAD_DIM, BLOCK_D)
        do = load_tile(DO, rows, cols, sdo_n, n_q, HEAD_DIM, BLOCK_D)
        # Padding query slots read q = do = 0 and lse = +inf: they add nothing.
        lse2 = tl.load(LSE + rows, mask=rows < n_q, other=float("inf"))
        delta = tl.load(DELTA + rows, mask=rows < n_q, other=0.0)
        start = row_flag(kpos, first)[:, None]
        dk = tl.where(start, 0.0, dk)
        dv = tl.where(start, 0.0, dv)
        p, ds = attention_grads_step(q, k, v, do, lse2, delta, _pair_mask(qpos, kpos, qlab, klab, live, LABELS),
                                     qk_scale, True, DOT_PRECISION)
        dv += mma(tl.trans(p).to(do.dtype), do, DOT_PRECISION)
        dk += mma(tl.trans(ds).to(q.dtype), q, DOT_PRECISION)
        if RECORD:
            if live:
                record_tile(REC_KV, q_tile, k_tile, n_k_tiles, RECORD)
        if last:
            store_tile(DK, dk * sm_scale, k_rows, cols, HEAD_DIM, n_k, HEAD_DIM, BLOCK_D)
            store_tile(DV, dv, k_rows, cols, HEAD_DIM, n_k, HEAD_DIM, BLOCK_D)

    # ---- dQ of query tiles r·RUN .. over their key tiles ----
    lanes, lo, hi, count, ends = _run_steps(QRUNS, QIDX, r, n_q_tiles, n_q, BLOCK_M, RUN)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    q = tl.zeros([BLOCK_M, BLOCK_D], Q.dtype.element_ty)
    do = tl.zeros([BLOCK_M, BLOCK_D], DO.dtype.element_ty)
    for step in range(0, tl.sum(count, 0)):
        q_tile, k_tile, live, first, last = _step(step, r, lanes, lo, hi, count, ends, n_k_tiles, RUN)
        rows, qpos, qlab = layout_tile(QIDX, QPOS, QLAB, q_tile, n_q, LABELS, BLOCK_M)
        q = held_tile(Q, rows, cols, sq_n, n_q, first, q, ONCE, HEAD_DIM, BLOCK_D)
        do = held_tile(DO, rows, cols, sdo_n, n_q, first, do, ONCE, HEAD_DIM, BLOCK_D)
        lse2 = tl.load(LSE + rows, mask=rows < n_q, other=float("inf"))
        delta = tl.load(DELTA + rows, mask=rows < n_q, other=0.0)
        k_rows, kpos, klab = layout_tile(KIDX, KPOS, KLAB, k_tile, n_k, LABELS, BLOCK_N)
        k = load_tile(K, k_rows, cols, sk_n, n_k, HEAD_DIM, BLOCK_D)
        v = load_tile(V, k_rows, cols, sv_n, n_k, HEAD_DIM, BLOCK_D)
        dq = tl.where(row_flag(qpos, first)[:, None], 0.0, dq)
        p, ds = attention_grads_step(q, k, v, do, lse2, delta, _pair_mask(qpos, kpos, qlab, klab, live, LABELS),
                                     qk_scale, True, DOT_PRECISION)
        dq += mma(ds.to(k.dtype), k, DOT_PRECISION)
        if RECORD:
            if live:
                record_tile(REC_Q, q_tile, k_tile, n_k_tiles, RECORD)
        if last:
            store_tile(DQ, dq * sm_scale, rows, cols, HEAD_DIM, n_q, HEAD_DIM, BLOCK_D)


# --------------------------------------------------------------------------------------
# Python side
# --------------------------------------------------------------------------------------


def sweep_applies(q, k) -> bool:
    """Whether :func:`sweep_forward` / :func:`sweep_backward` take this call (else
    :mod:`sparseflash.permuted`'s kernels do): enabled, one query head per kv head."""
    return ENABLED and q.shape[1] == k.shape[1]


def _run(n_tiles: int, device: torch.device) -> int:
    """Tiles a program walks (:func:`sparseflash._runtime.tiles_per_program`), rounded down to a
    power of two: the kernel holds the run's plan in vectors of that length."""
    run = _runtime.tiles_per_program(n_tiles, device, PROGRAMS_PER_SM, MAX_RUN)
    return 1 << (run.bit_length() - 1)


def _dims(q, k, plan):
    B, H, n_q, D = q.shape
    return B, H, n_q, k.shape[2], D, plan.q.n_slots, plan.k.n_slots


def sweep_forward(q, k, v, plan, sm_scale, cfg, record=None):
    """:func:`sparseflash.permuted.layout_forward` as a sweep: ``(o, lse2)`` in token order of
    q, k, v ``(B, H, N, D)`` over ``plan`` (a :class:`~sparseflash.permuted.LayoutPlan`).
    Requires :func:`sweep_applies`."""
    B, H, n_q, n_k, D, Lq, Lk = _dims(q, k, plan)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    o = _runtime.new_output((B, H, n_q, D), q.dtype, q.device)
    lse2 = _runtime.new_output((B, H, n_q), torch.float32, q.device)
    n_qt, n_kt = plan.q.n_tiles, plan.k.n_tiles
    (rec,) = record_buffers(record, ["fwd"], (B, H, n_qt, n_kt), q.device, lse2)
    q_lab, k_lab, labels = plan.label_args()
    run = _run(B * H * n_qt, q.device)
    _sweep_fwd_kernel[(B * H, _runtime.cdiv(n_qt, run))](
        q, k, v, o, lse2, plan.q.index, plan.q.pos, plan.k.index, plan.k.pos, q_lab, k_lab, plan.tiles.q_runs, rec,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        H, n_q, n_k, Lq, Lk, sm_scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=max(16, _runtime.next_power_of_2(D)), BLOCK_M=plan.q.block, BLOCK_N=plan.k.block,
        DOT_PRECISION=dot_precision(q.dtype), RECORD=record is not None, LABELS=labels, RUN=run, ONCE=LOAD_ONCE,
        **launch_params(cfg),
    )
    return o, lse2


def sweep_backward(q, k, v, o, lse2, do, plan, sm_scale, cfg, record=None, *, delta=None):
    """:func:`sparseflash.permuted.layout_backward` as a sweep: contiguous ``(dq, dk, dv)`` in token
    order; ``delta`` as there.  Requires :func:`sweep_applies`."""
    B, H, n_q, n_k, D, Lq, Lk = _dims(q, k, plan)
    q, k, v, do = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, do))
    if delta is None:
        delta = softmax_delta(o, do)
    dq = _runtime.new_output((B, H, n_q, D), q.dtype, q.device)
    dk = _runtime.new_output((B, H, n_k, D), k.dtype, k.device)
    dv = _runtime.new_output((B, H, n_k, D), v.dtype, v.device)
    n_qt, n_kt = plan.q.n_tiles, plan.k.n_tiles
    rec_kv, rec_q = record_buffers(record, ["bwd_kv", "bwd_q"], (B, H, n_qt, n_kt), q.device, delta)
    q_lab, k_lab, labels = plan.label_args()
    run = _run(B * H * max(n_qt, n_kt), q.device)
    _sweep_bwd_kernel[(B * H, _runtime.cdiv(max(n_qt, n_kt), run))](
        q, k, v, do, lse2, delta, dq, dk, dv, plan.q.index, plan.q.pos, plan.k.index, plan.k.pos, q_lab, k_lab,
        plan.tiles.q_runs, plan.tiles.k_runs, rec_kv, rec_q,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        H, n_q, n_k, Lq, Lk, sm_scale * LOG2E, sm_scale,
        HEAD_DIM=D, BLOCK_D=max(16, _runtime.next_power_of_2(D)), BLOCK_M=plan.q.block, BLOCK_N=plan.k.block,
        DOT_PRECISION=dot_precision(q.dtype), RECORD=record is not None, LABELS=labels, RUN=run, ONCE=LOAD_ONCE,
        **launch_params(cfg, backward=True),
    )
    return dq, dk, dv
