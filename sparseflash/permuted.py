"""Position-causal FlashAttention over a layout: the engine of both sparse variants.

Query/key dropping and hash buckets both reorder tokens before attention: each
(batch, head) places its tokens by bucket in tile-aligned runs (dropping is the
case of one bucket with the dropped tokens set aside; :mod:`sparseflash.layout`).
Every slot carries its token's original position, and the kernels compute, for query
slot ``a`` and key slot ``b`` of one bucket::

    s_ab = q_a · k_b · sm_scale        allowed iff kpos[b] <= qpos[a]
    o_a  = Σ_b softmax_b(s_ab) v_b     (0 for a slot with no allowed key)

which is exact causal attention on the original positions.  Padding and dropped
slots have a position that no pair allows (queries -1, keys +inf).  Hash attention's
layouts end with an overflow run that holds every id outside ``[0, n_buckets)``; there
the kernels (``LABELS``) also require ``qb[a] == kb[b]`` on the original ids, read
through the layout's index, in every masked tile (the tile plan makes all of that run's
tiles masked).  Inside a bucket's run the ids are all equal, so the test changes nothing.

Tile skipping follows the :class:`~sparseflash.plan.TilePlan`: query tile ``T``
visits the key tiles ``[lo, full)`` of its bucket with no mask (every key at or
before every query, no padding) and ``[full, hi)`` with the position mask; no other
tile holds an allowed pair, and none is loaded.  The loops have bounds and no
per-tile test, as in the dense kernel, so Triton pipelines their loads.  The
backward walks the same pairs: key tile ``S`` over query tiles ``[lo, full)`` masked
and ``[full, hi)`` mask-free, then the forward's pairs for dQ.

q, k, v, the output and the gradients stay in token order: the kernels read and
write rows through the layout's ``index``, so no permuted copy is ever made.

Grouped-query attention: with ``Hkv`` kv heads for ``H`` query heads, the query layout
is per query head and the key layout per kv head; query head ``h`` meets kv head
``h // G`` (``G = H / Hkv``), and dK, dV sum over the group, as in :mod:`sparseflash.flash`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _runtime
from .launch import launch
from .flash import flash_backward, flash_forward
from .ops import LIB, attention_op, cfg_args, cfg_dict, define_op
from ._steps import (
    LOG2E,
    attention_grads_step,
    dot_precision,
    finish_softmax,
    kernel_config,
    launch_params,
    kv_head,
    layout_tile,
    load_labels,
    load_tile,
    mma,
    online_softmax_step,
    owns_kv_tile,
    record_buffers,
    record_tile,
    run_attention,
    softmax_delta,
    store_tile,
)
from .layout import (  # noqa: F401  (re-exported for existing imports)
    INT32_MAX,
    MAX_DIRECT_BUCKETS,
    PAD,
    Layout,
    layout_length,
    bucket_layouts,
    bucket_sort_layout,
    compact_layout,
    dense_bucket_ids,
    field_row,
    gather_tokens,
    scatter_tokens,
)
from .plan import TilePlan, TileStats, tile_plan, tile_tables  # noqa: F401  (re-exported likewise)

if TYPE_CHECKING:  # pragma: no cover
    from .tiles import TileRecord


# --------------------------------------------------------------------------------------
# One tile of each pass, over the layout
# --------------------------------------------------------------------------------------


@triton.jit
def _key_tile(k_tile, K, V, KIDX, KPOS, KLAB, qpos, qlab, sk_n, sv_n, n_k, MASKED: tl.constexpr,
              LABELS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys and values of layout tile ``k_tile`` (read through the index), and the
    position mask against queries at ``qpos`` where the tile needs one; with ``LABELS``
    also equal ids (``qlab``: the queries')."""
    slots = k_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    rows = tl.load(KIDX + slots)
    k = load_tile(K, rows, cols, sk_n, n_k, HEAD_DIM, BLOCK_D)
    v = load_tile(V, rows, cols, sv_n, n_k, HEAD_DIM, BLOCK_D)
    if MASKED:
        allowed = tl.load(KPOS + slots)[None, :] <= qpos[:, None]
        if LABELS:
            # A bucket's run holds one id, so this is a no-op there; the overflow run mixes ids.
            klab = load_labels(KLAB, rows, n_k, LABELS, qlab)
            allowed = allowed & (klab[None, :] == qlab[:, None])
    else:
        allowed = qpos[:, None] >= 0  # unused: MASKED is off
    return k, v, allowed


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, qpos, qlab, k_tile, K, V, KIDX, KPOS, KLAB, sk_n, sv_n, n_k, qk_scale,
              MASKED: tl.constexpr, LABELS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    k, v, allowed = _key_tile(k_tile, K, V, KIDX, KPOS, KLAB, qpos, qlab, sk_n, sv_n, n_k, MASKED, LABELS, HEAD_DIM,
                              BLOCK_D, BLOCK_N)
    return online_softmax_step(acc, m_i, l_i, q, k, v, allowed, qk_scale, MASKED, DOT_PRECISION)


@triton.jit
def _dkdv_tile(dk, dv, k, v, kpos, klab, q_tile, Q, DO, LSE, DELTA, QIDX, QPOS, QLAB, sq_n, sdo_n, n_q, qk_scale,
               MASKED: tl.constexpr, LABELS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    slots = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rows = tl.load(QIDX + slots)
    q = load_tile(Q, rows, cols, sq_n, n_q, HEAD_DIM, BLOCK_D)
    do = load_tile(DO, rows, cols, sdo_n, n_q, HEAD_DIM, BLOCK_D)
    # Padding query slots read q = do = 0 and lse = +inf: they add nothing, mask or not.
    lse2 = tl.load(LSE + rows, mask=rows < n_q, other=float("inf"))
    delta = tl.load(DELTA + rows, mask=rows < n_q, other=0.0)
    if MASKED:
        allowed = kpos[None, :] <= tl.load(QPOS + slots)[:, None]
        if LABELS:
            qlab = load_labels(QLAB, rows, n_q, LABELS, klab)
            allowed = allowed & (klab[None, :] == qlab[:, None])
    else:
        allowed = kpos[None, :] >= 0  # unused: MASKED is off
    p, ds = attention_grads_step(q, k, v, do, lse2, delta, allowed, qk_scale, MASKED, DOT_PRECISION)
    dv += mma(tl.trans(p).to(do.dtype), do, DOT_PRECISION)
    dk += mma(tl.trans(ds).to(q.dtype), q, DOT_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_head(dk, dv, k, v, kpos, klab, k_tile, RUN, Q, DO, LSE, DELTA, QIDX, QPOS, QLAB, REC, sq_n, sdo_n, n_q,
               n_k_tiles, qk_scale, LABELS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr, RECORD: tl.constexpr):
    """Add one query head's terms to dK, dV of key tile ``k_tile``: its run ``RUN`` of query
    tiles, ``[lo, full)`` masked, ``[full, hi)`` mask-free (pointers at that query head)."""
    lo = tl.load(RUN)
    full = tl.load(RUN + 1)
    hi = tl.load(RUN + 2)
    for q_tile in range(lo, full):
        dk, dv = _dkdv_tile(dk, dv, k, v, kpos, klab, q_tile, Q, DO, LSE, DELTA, QIDX, QPOS, QLAB, sq_n, sdo_n, n_q,
                            qk_scale, True, LABELS, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION)
        record_tile(REC, q_tile, k_tile, n_k_tiles, RECORD)
    for q_tile in range(full, hi):
        dk, dv = _dkdv_tile(dk, dv, k, v, kpos, klab, q_tile, Q, DO, LSE, DELTA, QIDX, QPOS, QLAB, sq_n, sdo_n, n_q,
                            qk_scale, False, LABELS, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION)
        record_tile(REC, q_tile, k_tile, n_k_tiles, RECORD)
    return dk, dv


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, qpos, qlab, k_tile, K, V, KIDX, KPOS, KLAB, sk_n, sv_n, n_k, qk_scale,
             MASKED: tl.constexpr, LABELS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    k, v, allowed = _key_tile(k_tile, K, V, KIDX, KPOS, KLAB, qpos, qlab, sk_n, sv_n, n_k, MASKED, LABELS, HEAD_DIM,
                              BLOCK_D, BLOCK_N)
    p, ds = attention_grads_step(q, k, v, do, lse2, delta, allowed, qk_scale, MASKED, DOT_PRECISION)
    return dq + mma(ds.to(k.dtype), k, DOT_PRECISION)


@triton.jit
def _slot_rows(QSLOTS, KSLOTS, bh, n_q_slots, n_k_slots, GROUP: tl.constexpr):
    """Index and position rows of query head ``bh``'s layout and of its kv head's key layout
    (``QSLOTS``, ``KSLOTS``: the layouts' slots, ``(3, heads, ·)``; the grid's axis 1 is ``B·H``)."""
    heads = tl.num_programs(1).to(tl.int64)
    bhk = kv_head(bh, GROUP)
    return (field_row(QSLOTS, 0, heads, bh, n_q_slots), field_row(QSLOTS, 1, heads, bh, n_q_slots),
            field_row(KSLOTS, 0, heads // GROUP, bhk, n_k_slots), field_row(KSLOTS, 1, heads // GROUP, bhk, n_k_slots))


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _layout_fwd_kernel(
    Q, K, V, O, LSE, QSLOTS, KSLOTS, QLAB, KLAB, RUNS, REC,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
    H, n_q, n_k, n_q_slots, n_k_slots, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, RECORD: tl.constexpr, GROUP: tl.constexpr, LABELS: tl.constexpr,
):
    """Program ``(q_tile, b·H + h)``: query tile ``q_tile`` of query head ``h``'s layout,
    over the key tiles of its run in kv head ``h // GROUP``'s key layout.  ``LABELS``: the
    masked tiles also require equal ids, read from ``QLAB`` ``(B, H, n_q)`` and ``KLAB``
    ``(B, Hkv, n_k)`` (contiguous, any integer dtype) in token order.  ``QSLOTS``, ``KSLOTS``:
    the layouts' slots ``(3, B·H, ·)``; ``RUNS``: the tile plan's runs."""
    q_tile = tl.program_id(0)
    bh = tl.program_id(1)
    bh64 = bh.to(tl.int64)
    QIDX, QPOS, KIDX, KPOS = _slot_rows(QSLOTS, KSLOTS, bh64, n_q_slots, n_k_slots, GROUP)
    # A tile that starts with padding is padding throughout (every run's tiles start with a
    # token): nothing to compute or store.  The layout's static length leaves many such
    # tiles where most runs are empty (hash attention's default budget of ids, say).
    if tl.load(QIDX + q_tile * BLOCK_M) >= n_q:
        return
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = kv_head(h, GROUP)
    Q += b * sq_b + h * sq_h
    K += b * sk_b + hk * sk_h
    V += b * sv_b + hk * sv_h
    O += b * so_b + h * so_h
    QLAB += bh64 * n_q
    KLAB += kv_head(bh64, GROUP) * n_k
    n_q_tiles = n_q_slots // BLOCK_M
    n_k_tiles = n_k_slots // BLOCK_N
    REC += bh64 * n_q_tiles * n_k_tiles

    cols = tl.arange(0, BLOCK_D)
    rows, qpos, qlab = layout_tile(QIDX, QPOS, QLAB, q_tile, n_q, LABELS, BLOCK_M)
    q = load_tile(Q, rows, cols, sq_n, n_q, HEAD_DIM, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    run = RUNS + (bh64 * n_q_tiles + q_tile) * 3
    lo = tl.load(run)
    full = tl.load(run + 1)
    hi = tl.load(run + 2)
    for k_tile in range(lo, full):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, qpos, qlab, k_tile, K, V, KIDX, KPOS, KLAB, sk_n, sv_n, n_k,
                                  qk_scale, False, LABELS, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
        record_tile(REC, q_tile, k_tile, n_k_tiles, RECORD)
    for k_tile in range(full, hi):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, qpos, qlab, k_tile, K, V, KIDX, KPOS, KLAB, sk_n, sv_n, n_k,
                                  qk_scale, True, LABELS, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
        record_tile(REC, q_tile, k_tile, n_k_tiles, RECORD)

    out, lse2 = finish_softmax(acc, m_i, l_i)
    # Padding slots (row n_q) are not stored: every token's row is written once, by its slot.
    store_tile(O, out, rows, cols, so_n, n_q, HEAD_DIM, BLOCK_D)
    tl.store(LSE + bh64 * n_q + rows, lse2, mask=rows < n_q)


@triton.jit
def _layout_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, QSLOTS, KSLOTS, QLAB, KLAB, RUNS, REC_KV, REC_Q,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sdo_b, sdo_h, sdo_n,
    H, n_q, n_k, n_q_slots, n_k_slots, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, RECORD: tl.constexpr, GROUP: tl.constexpr, LABELS: tl.constexpr,
):
    """Program ``(t, b·H + h)``: dK, dV of key tile ``t`` of kv head ``h // GROUP`` over
    the query tiles that see it, then dQ of query tile ``t`` of query head ``h`` over the key
    tiles it sees; the same pairs as the forward.  ``LSE``, ``DELTA`` and the gradients are
    in token order.

    With ``GROUP > 1``, dK and dV sum over the group's query heads, as in the dense
    backward: the owning program (:func:`owns_kv_tile`) walks each head's run of query
    tiles (``KRUNS`` of that head), accumulating in float32.  ``LABELS``, ``QSLOTS``, ``KSLOTS``:
    as in the forward; ``RUNS``: the tile plan's runs (``QRUNS``, then ``KRUNS``).
    """
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    bh64 = bh.to(tl.int64)
    heads = tl.num_programs(1).to(tl.int64)
    n_q_tiles = n_q_slots // BLOCK_M
    n_k_tiles = n_k_slots // BLOCK_N
    QIDX, QPOS, KIDX, KPOS = _slot_rows(QSLOTS, KSLOTS, bh64, n_q_slots, n_k_slots, GROUP)
    QRUNS = RUNS
    KRUNS = RUNS + heads * n_q_tiles * 3
    # Tiles of padding only (the first slot says: see the forward) have no gradient rows.
    k_first = tl.load(KIDX + tile * BLOCK_N, mask=tile < n_k_tiles, other=n_k)
    q_first = tl.load(QIDX + tile * BLOCK_M, mask=tile < n_q_tiles, other=n_q)
    if (k_first >= n_k) & (q_first >= n_q):
        return
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = kv_head(h, GROUP)
    Q += b * sq_b + h * sq_h
    K += b * sk_b + hk * sk_h
    V += b * sv_b + hk * sv_h
    DO += b * sdo_b + h * sdo_h
    LSE += bh64 * n_q
    DELTA += bh64 * n_q
    QLAB += bh64 * n_q
    KLAB += kv_head(bh64, GROUP) * n_k
    DQ += bh64 * n_q * HEAD_DIM
    DK += kv_head(bh64, GROUP) * n_k * HEAD_DIM
    DV += kv_head(bh64, GROUP) * n_k * HEAD_DIM
    REC_KV += bh64 * n_q_tiles * n_k_tiles
    REC_Q += bh64 * n_q_tiles * n_k_tiles
    cols = tl.arange(0, BLOCK_D)

    # ---- dK, dV for key tile `tile` of kv head h // GROUP ----
    if owns_kv_tile(tile, n_k_tiles, h, GROUP) & (k_first < n_k):
        rows, kpos, klab = layout_tile(KIDX, KPOS, KLAB, tile, n_k, LABELS, BLOCK_N)
        k = load_tile(K, rows, cols, sk_n, n_k, HEAD_DIM, BLOCK_D)
        v = load_tile(V, rows, cols, sv_n, n_k, HEAD_DIM, BLOCK_D)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        if GROUP == 1:
            dk, dv = _dkdv_head(dk, dv, k, v, kpos, klab, tile, KRUNS + (bh64 * n_k_tiles + tile) * 3, Q, DO, LSE,
                                DELTA, QIDX, QPOS, QLAB, REC_KV, sq_n, sdo_n, n_q, n_k_tiles, qk_scale, LABELS,
                                HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION, RECORD)
        else:
            # The group's query heads are h - h % GROUP + g; the pointers are at head h.
            for g in range(GROUP):
                d = g - h % GROUP
                dk, dv = _dkdv_head(dk, dv, k, v, kpos, klab, tile, KRUNS + ((bh64 + d) * n_k_tiles + tile) * 3,
                                    Q + d * sq_h, DO + d * sdo_h, LSE + d * n_q, DELTA + d * n_q,
                                    QIDX + d * n_q_slots, QPOS + d * n_q_slots, QLAB + d * n_q,
                                    REC_KV + d * n_q_tiles * n_k_tiles, sq_n, sdo_n, n_q, n_k_tiles, qk_scale,
                                    LABELS, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION, RECORD)
        store_tile(DK, dk * sm_scale, rows, cols, HEAD_DIM, n_k, HEAD_DIM, BLOCK_D)
        store_tile(DV, dv, rows, cols, HEAD_DIM, n_k, HEAD_DIM, BLOCK_D)

    # ---- dQ for query tile `tile` ----
    if q_first < n_q:
        rows, qpos, qlab = layout_tile(QIDX, QPOS, QLAB, tile, n_q, LABELS, BLOCK_M)
        q = load_tile(Q, rows, cols, sq_n, n_q, HEAD_DIM, BLOCK_D)
        do = load_tile(DO, rows, cols, sdo_n, n_q, HEAD_DIM, BLOCK_D)
        lse2 = tl.load(LSE + rows, mask=rows < n_q, other=float("inf"))
        delta = tl.load(DELTA + rows, mask=rows < n_q, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        run = QRUNS + (bh64 * n_q_tiles + tile) * 3
        lo = tl.load(run)
        full = tl.load(run + 1)
        hi = tl.load(run + 2)
        for k_tile in range(lo, full):
            dq = _dq_tile(dq, q, do, lse2, delta, qpos, qlab, k_tile, K, V, KIDX, KPOS, KLAB, sk_n, sv_n, n_k,
                          qk_scale, False, LABELS, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
            record_tile(REC_Q, tile, k_tile, n_k_tiles, RECORD)
        for k_tile in range(full, hi):
            dq = _dq_tile(dq, q, do, lse2, delta, qpos, qlab, k_tile, K, V, KIDX, KPOS, KLAB, sk_n, sv_n, n_k,
                          qk_scale, True, LABELS, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
            record_tile(REC_Q, tile, k_tile, n_k_tiles, RECORD)
        store_tile(DQ, dq * sm_scale, rows, cols, HEAD_DIM, n_q, HEAD_DIM, BLOCK_D)


# --------------------------------------------------------------------------------------
# Python side
# --------------------------------------------------------------------------------------


@dataclass
class LayoutPlan:
    """Everything a pass needs besides q, k, v: both layouts and the tile plan, and with
    an overflow run the original ids (``q_labels`` ``(B, H, Nq)``, ``k_labels``
    ``(B, Hkv, Nk)``, contiguous, any integer dtype) that its masked tiles compare."""

    q: Layout
    k: Layout
    tiles: TilePlan
    q_labels: Tensor | None = None
    k_labels: Tensor | None = None

    def label_args(self) -> tuple:
        """The kernels' ``QLAB, KLAB`` pointers and ``LABELS`` flag (stand-ins without labels)."""
        if self.q_labels is None:
            return self.q.slots, self.k.slots, False
        return self.q_labels, self.k_labels, True


def _dims(q, k, plan: LayoutPlan):
    B, H, n_q, D = q.shape
    return B, H, n_q, k.shape[2], D, plan.q.n_slots, plan.k.n_slots


def layout_forward(q, k, v, plan: LayoutPlan, sm_scale, cfg, record=None):
    """Forward kernel on q ``(B, H, Nq, D)``, k and v ``(B, Hkv, Nk, D)`` (``Hkv`` dividing ``H``;
    ``plan.q`` per query head, ``plan.k`` per kv head); ``o`` and ``lse2`` ``(B, H, Nq)``
    float32 in token order."""
    B, H, n_q, n_k, D, Lq, Lk = _dims(q, k, plan)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    o = _runtime.new_output((B, H, n_q, D), q.dtype, q.device)
    lse2 = _runtime.new_output((B, H, n_q), torch.float32, q.device)
    n_qt, n_kt = plan.q.n_tiles, plan.k.n_tiles
    (rec,) = record_buffers(record, ["fwd"], (B, H, n_qt, n_kt), q.device, lse2)
    q_lab, k_lab, labels = plan.label_args()
    launch(_layout_fwd_kernel, (n_qt, B * H),
        q, k, v, o, lse2, plan.q.slots, plan.k.slots, q_lab, k_lab, plan.tiles.runs, rec,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        H, n_q, n_k, Lq, Lk, sm_scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=max(16, _runtime.next_power_of_2(D)), BLOCK_M=plan.q.block, BLOCK_N=plan.k.block,
        DOT_PRECISION=dot_precision(q.dtype), RECORD=record is not None, GROUP=H // k.shape[1], LABELS=labels,
        **launch_params(cfg),
    )
    return o, lse2


def layout_backward(q, k, v, o, lse2, do, plan: LayoutPlan, sm_scale, cfg, record=None, *, delta=None):
    """Backward kernel; returns contiguous ``(dq, dk, dv)`` in token order, dk and dv with k's
    ``Hkv`` heads (summed over each kv head's group of query heads).  ``delta``: the softmax
    row term if already computed (:func:`~sparseflash._steps.softmax_delta`)."""
    B, H, n_q, n_k, D, Lq, Lk = _dims(q, k, plan)
    h_kv = k.shape[1]
    q, k, v, do = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, do))
    if delta is None:
        delta = softmax_delta(o, do)
    dq = _runtime.new_output((B, H, n_q, D), q.dtype, q.device)
    dk = _runtime.new_output((B, h_kv, n_k, D), k.dtype, k.device)
    dv = _runtime.new_output((B, h_kv, n_k, D), v.dtype, v.device)
    n_qt, n_kt = plan.q.n_tiles, plan.k.n_tiles
    rec_kv, rec_q = record_buffers(record, ["bwd_kv", "bwd_q"], (B, H, n_qt, n_kt), q.device, delta)
    q_lab, k_lab, labels = plan.label_args()
    launch(_layout_bwd_kernel, (max(n_qt, n_kt), B * H),
        q, k, v, do, lse2, delta, dq, dk, dv, plan.q.slots, plan.k.slots, q_lab, k_lab, plan.tiles.runs, rec_kv, rec_q,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
        H, n_q, n_k, Lq, Lk, sm_scale * LOG2E, sm_scale,
        HEAD_DIM=D, BLOCK_D=max(16, _runtime.next_power_of_2(D)), BLOCK_M=plan.q.block, BLOCK_N=plan.k.block,
        DOT_PRECISION=dot_precision(q.dtype), RECORD=record is not None, GROUP=H // h_kv, LABELS=labels,
        **launch_params(cfg, backward=True),
    )
    return dq, dk, dv


# --------------------------------------------------------------------------------------
# Registered ops (see ops.py): the layout-and-plan op, and the attention op pair
# --------------------------------------------------------------------------------------
# The layout-and-plan op returns each side's slots and the tile plan's runs flat (three
# buffers, as the kernels take them); the attention op's side views them again.


def _plan_sizes(B, Hq, n_q, Hkv, n_k, n_buckets, block_m, block_n):
    Lq, Lk = layout_length(n_q, n_buckets, block_m), layout_length(n_k, n_buckets, block_n)
    runs = 3 * B * Hq * (Lq // block_m + Lk // block_n)
    return 3 * B * Hq * Lq, 3 * B * Hkv * Lk, runs


def _bucket_plan(q_buckets, k_buckets, q_keep, k_keep, q_pos, k_pos, B, Hq, n_q, Hkv, n_k, n_buckets,
                 block_m, block_n, q_shift, overflow):
    """Both layouts and the tile plan, flat: ``(q_slots, k_slots, runs)`` (see :func:`_unpack_plan`)."""
    given = [t for t in (q_buckets, k_buckets, q_keep, k_keep, q_pos, k_pos) if t is not None]
    ql, kl = bucket_layouts((B, Hq, n_q), q_buckets=q_buckets, k_buckets=k_buckets, q_keep=q_keep, k_keep=k_keep,
                            q_pos=q_pos, k_pos=k_pos, n_buckets=n_buckets, block_m=block_m, block_n=block_n,
                            n_k=n_k, k_heads=Hkv, q_shift=q_shift, overflow=overflow, device=given[0].device)
    return ql.slots.view(-1), kl.slots.view(-1), tile_plan(ql, kl).runs


_bucket_plan_op = define_op("bucket_plan", (
    "(Tensor? q_buckets, Tensor? k_buckets, Tensor? q_keep, Tensor? k_keep, Tensor? q_pos, Tensor? k_pos, "
    "int B, int Hq, int n_q, int Hkv, int n_k, int n_buckets, int block_m, int block_n, int q_shift, "
    "bool overflow) -> (Tensor, Tensor, Tensor)"),
    _bucket_plan)


@torch.library.register_fake("sparseflash::bucket_plan", lib=LIB)
def _(q_buckets, k_buckets, q_keep, k_keep, q_pos, k_pos, B, Hq, n_q, Hkv, n_k, n_buckets, block_m, block_n,
      q_shift, overflow):
    given = [t for t in (q_buckets, k_buckets, q_keep, k_keep, q_pos, k_pos) if t is not None]
    sizes = _plan_sizes(B, Hq, n_q, Hkv, n_k, n_buckets, block_m, block_n)
    return tuple(given[0].new_empty((n,), dtype=torch.int32) for n in sizes)


def _unpack_plan(q: Tensor, k: Tensor, q_slots: Tensor, k_slots: Tensor, runs: Tensor, q_labels: Tensor | None,
                 k_labels: Tensor | None, n_buckets: int, block_m: int, block_n: int) -> LayoutPlan:
    """A :class:`LayoutPlan` viewing the flat buffers of :func:`_bucket_plan_op`
    (only the fields the attention kernels read; ``n_buckets``: the layouts' runs)."""
    B, Hq, Hkv = q.shape[0], q.shape[1], k.shape[1]
    q_slots, k_slots = q_slots.view(3, B, Hq, -1), k_slots.view(3, B, Hkv, -1)
    shape = (B, Hq, q_slots.shape[-1] // block_m, k_slots.shape[-1] // block_n)
    overflow = q_labels is not None
    return LayoutPlan(Layout(q_slots, None, n_buckets, block_m, overflow),
                      Layout(k_slots, None, n_buckets, block_n, overflow),
                      TilePlan(runs, shape, block_m, block_n), q_labels, k_labels)


def _layout_forward_op(q, k, v, q_slots, k_slots, runs, q_labels, k_labels, n_buckets, sm_scale, cfg, window,
                       window_cfg):
    cfg = cfg_dict(cfg)
    plan = _unpack_plan(q, k, q_slots, k_slots, runs, q_labels, k_labels, n_buckets, cfg["BLOCK_M"], cfg["BLOCK_N"])
    return union_forward(q, k, v, plan, sm_scale, cfg, window=window, window_cfg=cfg_dict(window_cfg))


def _layout_backward_op(q, k, v, o, lse2, do, q_slots, k_slots, runs, q_labels, k_labels, n_buckets, sm_scale, cfg,
                        window, window_cfg):
    cfg = cfg_dict(cfg)
    plan = _unpack_plan(q, k, q_slots, k_slots, runs, q_labels, k_labels, n_buckets, cfg["BLOCK_M"], cfg["BLOCK_N"])
    return union_backward(q, k, v, o, lse2, do, plan, sm_scale, cfg, window=window, window_cfg=cfg_dict(window_cfg))


# q_labels, k_labels: the original ids (contiguous) where the layouts have an overflow run, else None.
_layout_op = attention_op(
    "layout", ("Tensor q_slots, Tensor k_slots, Tensor runs, Tensor? q_labels, Tensor? k_labels, int n_buckets, "
               "float sm_scale, int[] cfg, int window, int[] window_cfg"),
    _layout_forward_op, _layout_backward_op,
    lse_shape=lambda q, k, v, *_: q.shape[:3],
)


# --------------------------------------------------------------------------------------
# A sliding window beside the layout: two kernels, one softmax
# --------------------------------------------------------------------------------------
# With a window W the allowed pairs are the layout's pattern (same bucket, or both kept)
# united with the band 0 <= i - j < W.  They split exactly, each pair counted once:
#
#     far part:  the layout's pattern with i - j >= W: the layout of query positions
#                i - W (queries before W dropped), so the same kernels and tile plan
#                skip every pair inside the band;
#     band:      0 <= i - j < W, in natural order: the dense kernel's diagonal band.
#
# The far part runs first; the dense kernel then continues the same online softmax from
# its finished rows (INIT) and leaves the union's output and log-sum-exp.  The backward
# shares delta = do·o of the union and its log-sum-exp: the layout backward writes the far
# part's gradients, the dense backward adds the band's (ACCUMULATE).


def union_forward(q, k, v, plan: LayoutPlan, sm_scale, cfg, record=None, *, window: int = 0, window_cfg=None):
    """:func:`layout_forward` over ``plan`` (built with ``q_shift = window``), then the window
    band by the dense kernel into the same rows; ``(o, lse2)`` of the union, token order."""
    o, lse2 = layout_forward(q, k, v, plan, sm_scale, cfg, record)
    if window:
        flash_forward(q, k, v, True, sm_scale, window_cfg, record, window=window, init=(o, lse2),
                      record_prefix="window_")
    return o, lse2


def union_backward(q, k, v, o, lse2, do, plan: LayoutPlan, sm_scale, cfg, record=None, *, window: int = 0,
                   window_cfg=None):
    """The union's ``(dq, dk, dv)``: :func:`layout_backward`, then the band's terms added."""
    if not window:
        return layout_backward(q, k, v, o, lse2, do, plan, sm_scale, cfg, record)
    delta = softmax_delta(o, do)
    grads = layout_backward(q, k, v, o, lse2, do, plan, sm_scale, cfg, record, delta=delta)
    return flash_backward(q, k, v, o, lse2, do, True, sm_scale, window_cfg, record, window=window, delta=delta,
                          accumulate=grads, record_prefix="window_")


def run_layout(q, k, v, *, q_buckets=None, k_buckets=None, q_keep=None, k_keep=None, q_pos=None, k_pos=None,
               n_buckets=1, overflow=False, window=0, sm_scale=None, kernel_options=None, tile_record=None,
               kind="permuted"):
    """Shared tail of every sparse entry point (inputs already checked): layouts and tile
    plan in two launches, then the kernels, all without a host synchronisation.  ``window``
    (default positions only): the union with a causal sliding window (see
    :func:`union_forward`).  ``overflow`` (with buckets): ids outside ``[0, n_buckets)``
    share the overflow run, where the kernels compare the ids themselves, so any ids are
    exact labels (hash attention)."""
    sm_scale = _runtime.softmax_scale(sm_scale, q.shape[-1])
    D = q.shape[-1]
    cfg = kernel_config(D, q.device, kernel_options)
    # The band runs on the dense kernel, with its own launch defaults for this shape.
    window_cfg = kernel_config(D, q.device, kernel_options, dense=True, seq_len=q.shape[2], dtype=q.dtype,
                               window=window) if window else cfg
    B, H, n_q, _ = q.shape
    overflow = bool(overflow) and q_buckets is not None
    labels = (q_buckets.contiguous(), k_buckets.contiguous()) if overflow else (None, None)
    if overflow:
        q_buckets, k_buckets = labels
    if torch.compiler.is_compiling():
        if tile_record is not None:
            raise ValueError("tile_record is eager-only instrumentation: call without torch.compile to record")
        plan = _bucket_plan_op(q_buckets, k_buckets, q_keep, k_keep, q_pos, k_pos, B, H, n_q, k.shape[1], k.shape[2],
                               int(n_buckets), cfg["BLOCK_M"], cfg["BLOCK_N"], int(window), overflow)
        return _layout_op(q, k, v, *plan, *labels, int(n_buckets) + int(overflow), sm_scale, cfg_args(cfg), int(window),
                          cfg_args(window_cfg))
    # Eager: the same layouts, plan and kernels without the ops' packing and dispatch
    # (each costs host time: NOTES.md, issue 11).
    ql, kl = bucket_layouts((B, H, n_q), q_buckets=q_buckets, k_buckets=k_buckets, q_keep=q_keep, k_keep=k_keep,
                            q_pos=q_pos, k_pos=k_pos, n_buckets=n_buckets, block_m=cfg["BLOCK_M"],
                            block_n=cfg["BLOCK_N"], n_k=k.shape[2], k_heads=k.shape[1], q_shift=window,
                            overflow=overflow, device=q.device)
    plan = LayoutPlan(ql, kl, tile_plan(ql, kl), *labels)
    if tile_record is not None:
        tile_record.start(kind, cfg)
        tile_record.layouts, tile_record.plan = (ql, kl), plan.tiles
        tile_record.window, tile_record.window_config = window, dict(window_cfg)
    settings = dict(plan=plan, sm_scale=sm_scale, cfg=cfg, record=tile_record, window=window, window_cfg=window_cfg)
    return run_attention(q, k, v, partial(union_forward, **settings), partial(union_backward, **settings))


def _check_ascending(name: str, pos: Tensor, buckets: Tensor | None) -> None:
    """Real positions are below ``2**31 - 1`` and ascend inside each bucket, in slot order
    (host synchronisations)."""
    real = pos >= 0
    top = int(pos.max()) if pos.numel() else -1
    if top >= 2**31 - 1:
        raise ValueError(f"{name}: positions must be below 2**31 - 1 (they are compared as int32), got {top}")
    p = torch.where(real, pos.long(), -1)
    if buckets is None:
        prev = torch.cummax(p, -1).values[..., :-1]
        bad = real[..., 1:] & (p[..., 1:] < prev)
    else:
        # Sort stably by bucket: slot order survives inside a bucket, so each bucket's
        # positions must ascend along the sorted sequence.
        b = torch.where(real, buckets.long(), -1)
        order = torch.sort(b, dim=-1, stable=True).indices
        bs, ps = b.gather(-1, order), p.gather(-1, order)
        bad = (bs[..., 1:] == bs[..., :-1]) & (bs[..., 1:] >= 0) & (ps[..., 1:] < ps[..., :-1])
    if bool(bad.any()):
        within = " within each bucket" if buckets is not None else ""
        raise ValueError(f"{name}: real positions must ascend along the slots{within} "
                         f"(see permuted_attention's docstring)")


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
    n_buckets: int | None = None,
    validate: bool = False,
    kernel_options: dict | None = None,
    tile_record: "TileRecord | None" = None,
) -> Tensor:
    """Position-causal attention with explicit positions (and buckets) per slot.

    For researchers who keep their tokens in their own order (compacted, sorted, or
    a pattern of their own) between layers and want the sparse kernels on it.

    Args:
        q: ``(B, H, Nq, D)``; k, v: ``(B, Hkv, Nk, D)``, in your slot order; ``Hkv``
            divides ``H`` (grouped-query attention: query head ``h`` uses kv head
            ``h // (H / Hkv)``, whose slot order the key-side tensors below follow).
        q_pos, k_pos: integer ``(B, H, Nq)`` / ``(B, Hkv, Nk)``: each slot's position
            (the causal coordinate), in ``[0, 2**31 - 1)`` (the kernels compare them as
            int32); ``-1`` (any negative) marks a padding slot, anywhere.  Real
            positions must ascend along the slots (inside each bucket, with buckets).
        q_buckets, k_buckets: optional integer ``(B, H, Nq)`` / ``(B, Hkv, Nk)`` ids.
        n_buckets: ids are in ``[0, n_buckets)``; a slot with another id is treated as
            padding.  Without it, with buckets, it is read off the ids (one host
            synchronisation; a negative id is then padding).  At most 65536 under
            ``torch.compile``.
        validate: check on the host (``ValueError``) that positions are below
            ``2**31 - 1`` and ascend, and that ids are in ``[0, n_buckets)`` (``>= 0``
            without ``n_buckets``); off by default, so a call never waits for the GPU.

    Slot a attends to slot b iff ``0 <= k_pos[b] <= q_pos[a]`` (and buckets equal).
    A slot with nothing to attend to (padding included) outputs 0 and passes no gradient.

    Returns:
        ``(B, H, Nq, D)`` in your slot order.
    """
    _runtime.check_qkv(q, k, v)
    _runtime.check_per_token("q_pos", q_pos, q, "int")
    _runtime.check_per_token("k_pos", k_pos, k, "int")
    if (q_buckets is None) != (k_buckets is None):
        raise ValueError("give both q_buckets and k_buckets, or neither")
    if q_buckets is not None:
        _runtime.check_per_token("q_buckets", q_buckets, q, "int")
        _runtime.check_per_token("k_buckets", k_buckets, k, "int")
    n_buckets = _runtime.check_n_buckets(n_buckets)
    if torch.compiler.is_compiling():
        if q_buckets is not None:
            _runtime.check_compilable_buckets("permuted_attention", n_buckets, validate, MAX_DIRECT_BUCKETS)
        elif validate:
            raise ValueError("under torch.compile, permuted_attention needs validate=False (it reads positions "
                             "back to the host)")
    if validate:
        _check_ascending("q_pos", q_pos, q_buckets)
        _check_ascending("k_pos", k_pos, k_buckets)
    if q_buckets is not None:
        top = _runtime.check_bucket_range(q_buckets, k_buckets, n_buckets) if validate else None
        if n_buckets is None or n_buckets > MAX_DIRECT_BUCKETS:
            q_buckets, k_buckets, n_buckets = dense_bucket_ids(q_buckets, k_buckets, n_buckets, top=top)
    n_buckets = 1 if q_buckets is None else n_buckets
    return run_layout(q, k, v, q_buckets=q_buckets, k_buckets=k_buckets, q_keep=q_pos >= 0, k_keep=k_pos >= 0,
                      q_pos=q_pos, k_pos=k_pos, n_buckets=n_buckets, sm_scale=sm_scale,
                      kernel_options=kernel_options, tile_record=tile_record, kind="permuted")
