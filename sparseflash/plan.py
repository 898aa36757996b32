"""The tile plan: which (query tile, key tile) pairs each sparse kernel loop visits.

Built from a query and a key :class:`~sparseflash.layout.Layout` (tokens placed by bucket in
tile-aligned runs, positions ascending through each run), so the pairs a query tile needs are
one run of key tiles of its own bucket: ``[lo, full)`` with no mask, then ``[full, hi)``
masked; and the query tiles a key tile meets, for the backward, likewise.  The rule:

    key tile ``S`` is visited by query tile ``T``  iff  ``kmin(S) <= qmax(T)`` (same run);
    it needs no mask                               iff  ``kmax(S) <= qmin(T)`` (and, in the
    forward and dQ passes, ``S`` has no padding slot).

:func:`tile_plan` finds the runs by binary search in one kernel launch;
:func:`reference_tile_plan` checks every slot pair (quadratic: tests and pictures).  The
per-tile summaries of :class:`TileStats` and :func:`tile_tables` are the same rule for any
permuted layout, in plain PyTorch (the notebooks' first idea, and a test's).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import _runtime  # (first: may turn on Triton's interpreter)
from .launch import launch
from ._steps import kv_head
from .layout import INT32_MAX, PAD, Layout, _group, field_row


# --------------------------------------------------------------------------------------
# Tile tables
# --------------------------------------------------------------------------------------


def _per_tile(x: Tensor, block: int, fill: int, reduce: str) -> Tensor:
    pad = (-x.shape[-1]) % block
    x = F.pad(x, (0, pad), value=fill).unflatten(-1, (-1, block))
    return x.amax(-1) if reduce == "max" else x.amin(-1)


@dataclass
class TileStats:
    """Per-tile summaries of a permuted layout, ``(B, H, n_tiles)`` int32 each.

    ``qmax`` largest query position of a query tile (-1: only padding);
    ``kmin`` smallest key position of a key tile (INT32_MAX: only padding);
    ``qb_lo, qb_hi, kb_lo, kb_hi`` bucket ranges over real tokens (None without buckets).
    """

    qmax: Tensor
    kmin: Tensor
    qb_lo: Tensor | None = None
    qb_hi: Tensor | None = None
    kb_lo: Tensor | None = None
    kb_hi: Tensor | None = None

    @classmethod
    def of(cls, q_pos, k_pos, q_buckets, k_buckets, block_m: int, block_n: int) -> "TileStats":
        qmax = _per_tile(q_pos, block_m, PAD, "max")
        kmin = _per_tile(torch.where(k_pos < 0, INT32_MAX, k_pos), block_n, INT32_MAX, "min")
        if q_buckets is None:
            return cls(qmax.int(), kmin.int())
        # Bucket ranges over real tokens; a tile of padding gets an empty range
        # placed at +inf, which keeps the ranges sorted for the binary searches.
        qb_lo = _per_tile(torch.where(q_pos >= 0, q_buckets, INT32_MAX), block_m, INT32_MAX, "min")
        qb_hi = _per_tile(torch.where(q_pos >= 0, q_buckets, -1), block_m, -1, "max")
        kb_lo = _per_tile(torch.where(k_pos >= 0, k_buckets, INT32_MAX), block_n, INT32_MAX, "min")
        kb_hi = _per_tile(torch.where(k_pos >= 0, k_buckets, -1), block_n, -1, "max")
        qb_hi = torch.where(qmax >= 0, qb_hi, INT32_MAX)
        kb_hi = torch.where(kmin < INT32_MAX, kb_hi, INT32_MAX)
        return cls(qmax.int(), kmin.int(), qb_lo.int(), qb_hi.int(), kb_lo.int(), kb_hi.int())

    def visited(self) -> Tensor:
        """``(B, H, n_q_tiles, n_k_tiles)`` bool: the tile-skipping rule, pair by pair.

        Quadratic in tiles: for pictures and tests, never used by the kernels.
        """
        ok = self.kmin[..., None, :] <= self.qmax[..., :, None]
        if self.qb_lo is not None:
            ok &= (self.kb_lo[..., None, :] <= self.qb_hi[..., :, None]) & (
                self.kb_hi[..., None, :] >= self.qb_lo[..., :, None]
            )
        return ok


def tile_tables(stats: TileStats) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Runs of tiles each kernel loop walks, by binary search over the sorted layout.

    Returns int32 ``(B, H, ·)`` tensors ``k_lo, k_hi`` (per query tile: key tiles
    ``[k_lo, k_hi)`` may hold allowed pairs) and ``q_lo, q_hi`` (per key tile, for the
    backward).  Inside a run the kernels still test ``kmin <= qmax`` per tile.
    """
    search = torch.searchsorted
    n_qt, n_kt = stats.qmax.shape[-1], stats.kmin.shape[-1]
    q_real = stats.qmax >= 0
    k_real = stats.kmin < INT32_MAX
    if stats.qb_lo is None:
        # Positions ascend through the layout, so the key tiles a query tile sees
        # are a prefix, and the query tiles a key tile meets run to the last real one.
        k_lo = torch.zeros_like(stats.qmax)
        k_hi = search(stats.kmin, stats.qmax, right=True)
        q_lo = search(torch.where(q_real, stats.qmax, INT32_MAX), stats.kmin)
        q_hi = q_real.sum(-1, keepdim=True, dtype=torch.int32).expand(*stats.kmin.shape)
    else:
        # Buckets ascend through the layout: overlapping tiles form one run.
        k_lo = search(stats.kb_hi, stats.qb_lo)
        k_hi = search(stats.kb_lo, stats.qb_hi, right=True)
        q_lo = search(stats.qb_hi, stats.kb_lo)
        q_hi = search(stats.qb_lo, stats.kb_hi, right=True)
    k_hi = torch.where(q_real, torch.maximum(k_hi, k_lo), k_lo).clamp(max=n_kt)
    q_hi = torch.where(k_real, torch.maximum(q_hi, q_lo), q_lo).clamp(max=n_qt)
    return (k_lo.int().contiguous(), k_hi.int().contiguous(), q_lo.int().contiguous(), q_hi.int().contiguous())


# --------------------------------------------------------------------------------------
# The tile plan: which key tiles each query tile visits, and the reverse
# --------------------------------------------------------------------------------------


@dataclass
class TilePlan:
    """Tiles each kernel loop visits, from a query and a key :class:`Layout`.

    ``q_runs``: int32 ``(B, H, n_q_tiles, 3)``: query tile ``T`` (forward and dQ) visits
    key tiles ``[lo, full)`` with no mask, then ``[full, hi)`` masked.
    ``k_runs``: int32 ``(B, H, n_k_tiles, 3)``: key tile ``S`` (dK/dV) visits query
    tiles ``[lo, full)`` masked, then ``[full, hi)`` with no mask.

    Both are per query head ``h``.  With grouped-query attention (a key layout of ``Hkv``
    heads, ``G = H / Hkv``), query head ``h`` meets the key layout of kv head ``h // G``:
    ``q_runs`` index its key tiles, and ``k_runs[b, h, S]`` is the run, in head ``h``'s
    query layout, of that kv head's key tile ``S``.

    The rule, for tiles of one bucket (tiles of different buckets never meet):
    ``S`` is visited by ``T`` iff ``kmin(S) <= qmax(T)``, the first key at or before the
    last query, which is exactly "the tile holds an allowed pair"; it needs no mask
    iff ``kmax(S) <= qmin(T)`` over its real slots and, in the forward and dQ passes,
    ``S`` has no padding slot (a padding key would join the softmax).  Positions
    ascend through a bucket's run, so both sets are runs of tiles.

    The overflow run (layouts built with ``overflow``) holds many ids, which the kernels
    compare in its masked tiles: there ``S`` is visited by ``T`` iff ``kmin(S) <= qmax(T)``
    as in any run, but no tile is mask-free (query tile: ``full = lo``; key tile:
    ``full = hi``).  So "visited" there means "holds a causal pair", not "holds an allowed
    pair": ids outside the fast range cost about dense attention among themselves.

    Stored as one flat int32 buffer ``runs``, the query tiles' runs then the key tiles', so that
    a kernel takes the plan in one argument; ``q_runs`` and ``k_runs`` are views of it.
    """

    runs: Tensor
    shape: tuple[int, int, int, int]  #: ``(B, H, n_q_tiles, n_k_tiles)``
    block_m: int
    block_n: int

    @classmethod
    def of(cls, q_runs: Tensor, k_runs: Tensor, block_m: int, block_n: int) -> "TilePlan":
        """The plan holding ``q_runs`` ``(B, H, n_q_tiles, 3)`` and ``k_runs`` ``(B, H, n_k_tiles, 3)``."""
        B, H, n_qt, _ = q_runs.shape
        runs = torch.cat([q_runs.reshape(-1), k_runs.reshape(-1)]).int()
        return cls(runs, (B, H, n_qt, k_runs.shape[-2]), block_m, block_n)

    @property
    def q_runs(self) -> Tensor:
        B, H, n_qt, _ = self.shape
        return self.runs[: B * H * n_qt * 3].view(B, H, n_qt, 3)

    @property
    def k_runs(self) -> Tensor:
        B, H, n_qt, n_kt = self.shape
        return self.runs[B * H * n_qt * 3:].view(B, H, n_kt, 3)

    def visited(self) -> Tensor:
        """bool ``(B, H, n_q_tiles, n_k_tiles)``: the pairs the forward computes."""
        s = torch.arange(self.k_runs.shape[-2], device=self.q_runs.device)
        return (s >= self.q_runs[..., 0:1]) & (s < self.q_runs[..., 2:3])


@triton.jit
def _first_true(lo, hi, PRED_ARR, stride, offset, x, cap, GREATER_EQ: tl.constexpr, STEPS: tl.constexpr):
    """Vectorised binary search: for each lane, the first ``t`` in ``[lo, hi)`` with
    ``ARR[min(t·stride + offset, cap) ] > x`` (or ``>= x``); ``hi`` if none.  The
    predicate must be monotone in ``t``."""
    for _ in tl.static_range(STEPS):
        mid = (lo + hi) // 2
        active = lo < hi
        val = tl.load(PRED_ARR + tl.minimum(mid * stride + offset, cap), mask=active, other=0)
        if GREATER_EQ:
            yes = val >= x
        else:
            yes = val > x
        hi = tl.where(active & yes, mid, hi)
        lo = tl.where(active & ~yes, mid + 1, lo)
    return lo


@triton.jit
def _tile_span(SB, POS, START, COUNT, t, n_tiles, BLOCK: tl.constexpr):
    """For tiles ``t`` of one side: live, real (in a bucket), bucket, and the positions of
    the first slot and the last real slot (tiles of a bucket's run start with a real slot)."""
    live = t < n_tiles
    s0 = t * BLOCK
    b = tl.load(SB + s0, mask=live, other=-1)
    real = b >= 0
    bb = tl.where(real, b, 0)
    end = tl.load(START + bb, mask=real, other=0) + tl.load(COUNT + bb, mask=real, other=0)
    first = tl.load(POS + s0, mask=real, other=0)
    last = tl.load(POS + tl.minimum(s0 + BLOCK, end) - 1, mask=real, other=0)
    return live, real, bb, first, last


@triton.jit
def _bucket_tiles(START, COUNT, bb, real, BLOCK: tl.constexpr):
    """The other side's run of tiles for buckets ``bb``: first tile, end tile, first slot, tokens."""
    start = tl.load(START + bb, mask=real, other=0)
    count = tl.load(COUNT + bb, mask=real, other=0)
    first = start // BLOCK
    return first, first + tl.where(real, (count + BLOCK - 1) // BLOCK, 0), start, count


@triton.jit
def _store_run(OUT, lo, full, hi, live):
    tl.store(OUT, lo, mask=live)
    tl.store(OUT + 1, full, mask=live)
    tl.store(OUT + 2, hi, mask=live)


@triton.jit
def _plan_kernel(QSLOTS, QTAB, KSLOTS, KTAB, RUNS, n_q_slots, n_k_slots, n_q_tiles, n_k_tiles, n_buckets, overflow_run,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, STEPS: tl.constexpr,
                 GROUP: tl.constexpr):
    """Grid ``(tile chunks, B·Hq, 2)``: axis 2 picks the query tiles' runs (0) or the key
    tiles' runs (1); each lane finds its tile's bucket run and searches it twice.  Query
    head ``h`` meets the key layout of kv head ``h // GROUP``.  ``n_buckets`` runs per head;
    ``overflow_run``: the overflow run's index (-1: none), whose tiles are all masked.
    Each side's ``SLOTS`` and ``TAB`` are a :class:`~sparseflash.layout.Layout`'s buffers,
    ``RUNS`` the :class:`TilePlan`'s (the query tiles' runs, then the key tiles')."""
    bh = tl.program_id(1).to(tl.int64)
    bhk = kv_head(bh, GROUP)
    heads = tl.num_programs(1).to(tl.int64)
    t = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    QPOS = field_row(QSLOTS, 1, heads, bh, n_q_slots)
    QSB = field_row(QSLOTS, 2, heads, bh, n_q_slots)
    KPOS = field_row(KSLOTS, 1, heads // GROUP, bhk, n_k_slots)
    KSB = field_row(KSLOTS, 2, heads // GROUP, bhk, n_k_slots)
    QSTART = field_row(QTAB, 0, heads, bh, n_buckets)
    QCOUNT = field_row(QTAB, 1, heads, bh, n_buckets)
    KSTART = field_row(KTAB, 0, heads // GROUP, bhk, n_buckets)
    KCOUNT = field_row(KTAB, 1, heads // GROUP, bhk, n_buckets)
    if tl.program_id(2) == 0:
        live, real, bb, qmin, qmax = _tile_span(QSB, QPOS, QSTART, QCOUNT, t, n_q_tiles, BLOCK_M)
        ks, ke, _, _ = _bucket_tiles(KSTART, KCOUNT, bb, real, BLOCK_N)
        # Tiles whose first key comes after the last query hold no allowed pair.
        hi = _first_true(ks, ke, KPOS, BLOCK_N, 0, qmax, n_k_slots - 1, False, STEPS)
        # Mask-free while the tile's last slot (padding reads +inf) is at or before the first query.
        full = _first_true(ks, hi, KPOS, BLOCK_N, BLOCK_N - 1, qmin, n_k_slots - 1, False, STEPS)
        # The overflow run mixes ids: every tile there needs the id test of the mask.
        full = tl.where(real & (bb == overflow_run), ks, full)
        _store_run(RUNS + (bh * n_q_tiles + t) * 3, ks, full, hi, live)
    else:
        live, real, bb, kmin, kmax = _tile_span(KSB, KPOS, KSTART, KCOUNT, t, n_k_tiles, BLOCK_N)
        qs, qe, q_start, q_count = _bucket_tiles(QSTART, QCOUNT, bb, real, BLOCK_M)
        # qmax of a query tile is its last real slot: the tile's last slot, or the run's.
        lo = _first_true(qs, qe, QPOS, BLOCK_M, BLOCK_M - 1, kmin, q_start + q_count - 1, True, STEPS)
        full = _first_true(lo, qe, QPOS, BLOCK_M, 0, kmax, n_q_slots - 1, True, STEPS)
        full = tl.where(real & (bb == overflow_run), qe, full)
        _store_run(RUNS + (heads * n_q_tiles + bh * n_k_tiles + t) * 3, lo, full, qe, live)


def _check_same_runs(q_layout: Layout, k_layout: Layout) -> None:
    if (q_layout.n_buckets, q_layout.overflow) != (k_layout.n_buckets, k_layout.overflow):
        raise ValueError(f"the query and key layouts must have the same runs, got {q_layout.n_buckets} runs "
                         f"(overflow={q_layout.overflow}) and {k_layout.n_buckets} (overflow={k_layout.overflow})")


def tile_plan(q_layout: Layout, k_layout: Layout) -> TilePlan:
    """The :class:`TilePlan` of two layouts, in one kernel launch (no host synchronisation).

    ``q_layout`` is per query head ``(B, H, ·)``, ``k_layout`` per kv head ``(B, Hkv, ·)``
    (``Hkv`` dividing ``H``); the plan is per query head.  Both are built alike (the same
    runs, both with or both without the overflow run).
    """
    _check_same_runs(q_layout, k_layout)
    for side, lay in (("query", q_layout), ("key", k_layout)):
        # The kernel reads each buffer whole, by offsets: a view of a larger one would be misread.
        if lay.tables is None or not all(t.is_contiguous() and t.dtype == torch.int32 for t in (lay.slots, lay.tables)):
            raise ValueError(f"the {side} layout's slots and tables must be contiguous int32 tensors (as "
                             f"bucket_layouts and reference_layout build them); got a layout with "
                             f"{'no tables' if lay.tables is None else 'a strided view or another dtype'}")
    _, B, H, Lq = q_layout.slots.shape
    Lk = k_layout.n_slots
    group = _group(H, k_layout.slots.shape[2])
    bm, bn = q_layout.block, k_layout.block
    n_qt, n_kt = Lq // bm, Lk // bn
    runs = torch.empty(B * H * 3 * (n_qt + n_kt), dtype=torch.int32, device=q_layout.slots.device)
    chunk = 256 if _runtime.INTERPRET else 64  # tiles per program (the interpreter: fewer, wider programs)
    launch(_plan_kernel, (_runtime.cdiv(max(n_qt, n_kt), chunk), B * H, 2),
        q_layout.slots, q_layout.tables, k_layout.slots, k_layout.tables, runs,
        Lq, Lk, n_qt, n_kt, q_layout.n_buckets, q_layout.overflow_run,
        BLOCK_M=bm, BLOCK_N=bn, CHUNK=chunk, STEPS=max(n_qt, n_kt).bit_length() + 1, GROUP=group, num_warps=2,
    )
    return TilePlan(runs, (B, H, n_qt, n_kt), bm, bn)


def reference_tile_plan(q_layout: Layout, k_layout: Layout) -> TilePlan:
    """:class:`TilePlan` by brute force over slot pairs (quadratic: for tests and pictures).

    A pair of tiles is visited iff some slot pair in it is allowed (same run,
    ``0 <= kpos <= qpos``, both real); mask-free iff every pair of a real query slot
    with any key slot is allowed (forward) or every pair of a real query slot with a
    real key slot is (dK/dV), and the tiles are not in the overflow run (whose ids differ).
    Raises if a set is not the run the kernels assume.  A key layout of fewer (kv) heads is
    repeated to the query heads, as in :func:`tile_plan`.
    """
    _check_same_runs(q_layout, k_layout)
    bm, bn = q_layout.block, k_layout.block
    group = _group(q_layout.pos.shape[1], k_layout.pos.shape[1])
    qp, kp = q_layout.pos.long(), k_layout.pos.long().repeat_interleave(group, dim=1)
    qb, kb = q_layout.bucket, k_layout.bucket.repeat_interleave(group, dim=1)
    q_real, k_real = qb >= 0, kb >= 0
    allowed = (kp[..., None, :] <= qp[..., :, None]) & (kb[..., None, :] == qb[..., :, None])
    allowed &= q_real[..., :, None] & k_real[..., None, :]

    def tiles(x, reduce):  # (B, H, Lq, Lk) -> (B, H, n_qt, n_kt)
        x = x.unflatten(-1, (-1, bn)).unflatten(-3, (-1, bm))
        return x.any(-1).any(-2) if reduce == "any" else x.all(-1).all(-2)

    visited = tiles(allowed, "any")
    rows_real = q_real[..., :, None].expand_as(allowed)
    free_fwd = tiles(allowed | ~rows_real, "all") & visited
    free_kv = tiles(allowed | ~rows_real | ~k_real[..., None, :], "all") & visited
    if q_layout.overflow:  # tiles never straddle runs: the query tile's run is the pair's
        over = (qb == q_layout.overflow_run).unflatten(-1, (-1, bm)).any(-1)[..., :, None]
        free_fwd, free_kv = free_fwd & ~over, free_kv & ~over

    def runs(vis, free, free_first):
        n = vis.shape[-1]
        idx = torch.arange(n, device=vis.device)
        any_ = vis.any(-1)
        lo = torch.where(any_, torch.where(vis, idx, n).amin(-1), 0)
        hi = torch.where(any_, torch.where(vis, idx + 1, 0).amax(-1), 0)
        if free_first:
            mid = torch.where(vis & ~free, idx, hi[..., None]).amin(-1)
            mid = torch.minimum(mid, hi)
        else:
            mid = torch.where(free, idx, hi[..., None]).amin(-1)
        contiguous = (vis.sum(-1) == hi - lo)
        first, second = (free, vis & ~free) if free_first else (vis & ~free, free)
        assert contiguous.all() and (first.sum(-1) == mid - lo).all() and (second.sum(-1) == hi - mid).all(), \
            "visited or mask-free tiles are not runs"
        return torch.stack([lo, mid, hi], -1).int()

    # Tiles of a bucket with no allowed pair at all get an empty run at its start in the
    # kernel's plan; compare runs only where they are non-empty.
    q_runs = runs(visited, free_fwd, True)
    k_runs = runs(visited.transpose(-1, -2), free_kv.transpose(-1, -2), False)
    return TilePlan.of(q_runs, k_runs, bm, bn)
