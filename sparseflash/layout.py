"""Layouts: where each token sits when a sparse kernel runs, and which tiles it visits.

Query/key dropping and hash buckets both reorder tokens before attention.  This
module holds those permutations and the per-tile summaries built from them; it
imports no kernel, so the kernels (:mod:`sparseflash.permuted`) and the pictures
(:mod:`sparseflash.tiles`) both build on it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import _runtime  # (first: may turn on Triton's interpreter)
from ._steps import kv_head

INT32_MAX = 2**31 - 1
PAD = -1  #: position of a padding slot


# --------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------


def compact_layout(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Kept tokens first, in their original order, then padding.

    Args:
        keep: bool ``(B, H, N)``.
    Returns:
        ``(index, pos)``, both ``(B, H, N)``: slot ``a`` holds token ``index[a]``;
        ``pos[a]`` is that original position (int32) for kept tokens and ``-1`` for
        the padding slots after them.  ``index`` is a full permutation, so the
        padding slots hold the dropped tokens (ignored by the kernel) and a scatter
        through ``index`` writes every position once.  The length stays ``N`` for
        every head (no host synchronisation, one shape whatever the keep rate);
        tiles made only of padding are never visited.
    """
    # A stable partition by counting, not sorting: kept token i goes to slot
    # (kept before it), dropped token i to n_kept + (dropped before it).
    kept_upto = keep.cumsum(-1, dtype=torch.int32)
    n_kept = kept_upto[..., -1:]
    i = torch.arange(keep.shape[-1], device=keep.device, dtype=torch.int32)
    slot = torch.where(keep, kept_upto - 1, n_kept + i - kept_upto)
    order = torch.empty_like(slot).scatter_(-1, slot.long(), i.expand_as(slot))
    pos = torch.where(i < n_kept, order, PAD)
    return order.long(), pos


def bucket_sort_layout(buckets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens sorted by bucket, stably (so by position inside a bucket).

    Returns ``(index, pos, sorted_buckets)``, each ``(B, H, N)``; ``pos`` is int32.
    """
    sorted_buckets, order = torch.sort(buckets, dim=-1, stable=True)
    return order, order.to(torch.int32), sorted_buckets.to(torch.int32)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, h, index[b, h, a], :]`` for ``x`` ``(B, H, N, D)``: into the layout."""
    return x.gather(2, index[..., None].expand(*index.shape, x.shape[-1]))


def scatter_tokens(x: Tensor, index: Tensor) -> Tensor:
    """Inverse of :func:`gather_tokens` for a full permutation ``index``: back to positions."""
    return torch.zeros_like(x).scatter(2, index[..., None].expand_as(x), x)


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
# The kernels' layout: buckets in tile-aligned runs
# --------------------------------------------------------------------------------------
#
# Both sparse variants use one layout.  Each (batch, head) places its tokens by bucket
# (query/key dropping is the case of one bucket), in original order inside a bucket,
# and every bucket's run starts on a tile boundary:
#
#     slots:  | bucket 0 ......pad | bucket 1 ...pad | ... | overflow | dropped tokens | pad |
#              ^ start[0]           ^ start[1]               ^ start[n_buckets] (with ``overflow``)
#
# So no tile holds two buckets, a query tile meets key tiles of its own bucket only,
# and positions ascend through each run: the key tiles a query tile needs are a
# contiguous run, the mask-free ones a prefix of it (see TilePlan).  Dropped tokens
# (not kept, or without ``overflow`` a bucket id outside [0, n_buckets)) sit after the
# runs with the padding position, so the kernels still write their output (0) and
# gradients (0): ``index`` holds every token exactly once.  Alignment costs at most
# ``block - 1`` slots per non-empty bucket, so the length is static: ``layout_length``.
#
# Hash attention's ids are labels of any integer value, and ``n_buckets`` is only a
# budget: with ``overflow`` every token whose id lies outside [0, n_buckets) goes to one
# more run, the *overflow run* (index n_buckets, after the others, positions ascending
# through it like any run).  Its tiles mix ids, so the kernels test the original ids
# there (TilePlan: none of its tiles is mask-free); ids in range never meet it.  It is
# not padded at its end, like the dropped tokens after it (which no pair allows, so they
# may share its last tile): the length stays ``layout_length(N, n_buckets, block)``, and
# a layout whose ids are all in range is the very layout built without ``overflow``.

Q_PAD = PAD        #: position of a padding query slot: it sees no key
K_PAD = INT32_MAX  #: position of a padding key slot: no query sees it

#: Above this many buckets the per-bucket tables would be large: hash attention's ids
#: from here up share the overflow run, and ``dense_bucket_ids`` renumbers ids for
#: ``permuted_attention``.
MAX_DIRECT_BUCKETS = 65536

#: Hash attention's ids in ``[0, DEFAULT_BUCKETS)`` get runs of their own when no
#: ``n_buckets`` is given (:func:`bucket_budget`).
DEFAULT_BUCKETS = 64


def bucket_budget(n_buckets: int | None) -> int:
    """Ids ``[0, budget)`` that get a run of their own in hash attention's layout (the others
    share the overflow run): ``n_buckets``, at most :data:`MAX_DIRECT_BUCKETS` so that the
    per-run tables stay small, or :data:`DEFAULT_BUCKETS` when it is None."""
    return DEFAULT_BUCKETS if n_buckets is None else min(int(n_buckets), MAX_DIRECT_BUCKETS)


def layout_length(n: int, n_buckets: int, block: int) -> int:
    """Slots of an aligned layout of ``n`` tokens: every token once plus at most
    ``block - 1`` padding slots per non-empty bucket, rounded up to a whole tile (the
    overflow run and the dropped tokens are not padded)."""
    slots = n + min(n_buckets, n) * (block - 1)
    return -(-slots // block) * block


@dataclass
class Layout:
    """Where each token of one side (queries or keys) sits, per (batch, head): ``H`` is the
    query heads for the query side, the kv heads for the key side (grouped-query attention).

    Attributes (``L = layout_length(N, ids, block)`` slots, ``ids`` the id range
    ``[0, ids)`` it was built for):
        index: int32 ``(B, H, L)``: the token in each slot; ``N`` for a padding slot.
        pos: int32 ``(B, H, L)``: that token's position (the causal coordinate);
            :data:`Q_PAD` or :data:`K_PAD` (the side's padding) for padding and dropped tokens.
        bucket: int32 ``(B, H, L)``: its run: the bucket id, ``ids`` in the overflow run;
            -1 for padding and dropped tokens.
        start: int32 ``(B, H, n_buckets)``: first slot of each run (a multiple of
            ``block``); count: int32 ``(B, H, n_buckets)``: tokens in it.  Runs of buckets
            are padded to whole tiles; the overflow run is not.
        n_buckets: the runs, ``ids + 1`` with ``overflow`` (the last is the overflow run).
        block: as built.
        overflow: whether the last run is the overflow run (ids outside ``[0, ids)``).
    """

    index: Tensor
    pos: Tensor
    bucket: Tensor
    start: Tensor
    count: Tensor
    n_buckets: int
    block: int
    overflow: bool = False

    @property
    def n_slots(self) -> int:
        return self.index.shape[-1]

    @property
    def n_tiles(self) -> int:
        return self.n_slots // self.block

    @property
    def overflow_run(self) -> int:
        """Index of the overflow run (``bucket`` of its slots), -1 without one."""
        return self.n_buckets - 1 if self.overflow else -1


def _group(n_q_heads: int, n_k_heads: int) -> int:
    """Query heads per kv head (grouped-query attention); raise if the kv heads do not divide them."""
    if n_k_heads < 1 or n_q_heads % n_k_heads:
        raise ValueError(f"the key side's {n_k_heads} heads must divide the query side's {n_q_heads}")
    return n_q_heads // n_k_heads


def _check_layout_args(n_buckets, block):
    if n_buckets < 1:
        raise ValueError(f"n_buckets must be >= 1, got {n_buckets}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")


def reference_layout(shape, *, buckets: Tensor | None = None, keep: Tensor | None = None,
                     pos: Tensor | None = None, n_buckets: int = 1, block: int, pad: int,
                     shift: int = 0, overflow: bool = False, device=None) -> Layout:
    """:class:`Layout` in plain PyTorch: a stable sort by bucket, then the aligned placement.

    ``shape`` is ``(B, H, N)``; ``buckets`` integer ids (absent: one bucket), ``keep``
    bool (absent: all kept), ``pos`` each token's position (absent: ``arange(N) - shift``,
    the tokens before ``shift`` dropped: the far part of a sliding window's union, whose
    queries see only keys at least ``shift`` before them).  A token is dropped if not kept
    or its id is outside ``[0, n_buckets)``; with ``overflow`` such a kept token goes to the
    overflow run instead (run ``n_buckets``; ids compared in their own dtype, so an int64
    ``2**32 + 1`` is not 1).  No host synchronisation.  :func:`bucket_layouts` builds the
    same with two launches.
    """
    B, H, N = shape
    _check_layout_args(n_buckets, block)
    device = device if buckets is None else buckets.device
    runs = n_buckets + bool(overflow)
    tok = torch.arange(N, device=device).expand(B, H, N)
    ids = torch.zeros(B, H, N, dtype=torch.long, device=device) if buckets is None else buckets
    in_range = (ids >= 0) & (ids < n_buckets)                  # in the ids' own dtype: no wrap
    key = torch.where(in_range, ids.long(), n_buckets)         # run n_buckets: the overflow run
    valid = torch.ones_like(in_range) if overflow else in_range.clone()
    if keep is not None:
        valid &= keep.bool()
    if pos is None and shift:
        valid &= tok >= shift
    key = torch.where(valid, key, runs)                        # dropped tokens last
    order = torch.sort(key, dim=-1, stable=True).indices
    key_sorted = key.gather(-1, order)
    counts = torch.zeros(B, H, runs + 1, dtype=torch.long, device=device).scatter_add_(
        -1, key, torch.ones_like(key))
    aligned = (counts + block - 1) // block * block
    aligned[..., n_buckets:] = counts[..., n_buckets:]         # nor are the overflow run and dropped tokens
    run_start = aligned.cumsum(-1) - aligned                  # slot where each run starts
    sorted_start = counts.cumsum(-1) - counts                 # where it starts in the sort
    rank = torch.arange(N, device=device) - sorted_start.gather(-1, key_sorted)
    slot = run_start.gather(-1, key_sorted) + rank
    L = layout_length(N, n_buckets, block)
    index = torch.full((B, H, L), N, dtype=torch.long, device=device).scatter_(-1, slot, order)
    p = tok - shift if pos is None else pos.long()
    p_sorted = torch.where(key_sorted < runs, p.gather(-1, order), pad)
    b_sorted = torch.where(key_sorted < runs, key_sorted, -1)
    spos = torch.full((B, H, L), pad, dtype=torch.long, device=device).scatter_(-1, slot, p_sorted)
    sbucket = torch.full((B, H, L), -1, dtype=torch.long, device=device).scatter_(-1, slot, b_sorted)
    return Layout(index.int(), spos.int(), sbucket.int(), run_start[..., :runs].int().contiguous(),
                  counts[..., :runs].int().contiguous(), runs, block, bool(overflow))


@triton.jit
def _token_bucket(BUCKET, KEEP, t, n, n_buckets, HAS_BUCKET: tl.constexpr, HAS_KEEP: tl.constexpr,
                  OVERFLOW: tl.constexpr):
    """Bucket of tokens ``t`` in ``[0, n_buckets)``, or -1 if dropped (not kept, past ``n``,
    or without ``OVERFLOW`` an id out of range); with ``OVERFLOW`` a kept token whose id is
    out of range gets -2: it goes to the overflow run."""
    if HAS_BUCKET:
        b = tl.load(BUCKET + t, mask=t < n, other=-1)  # range-checked in its own dtype: 2**32 + 1 is not 1
    else:
        b = tl.zeros_like(t)
    ok = t < n
    if HAS_KEEP:
        ok = ok & (tl.load(KEEP + t, mask=t < n, other=0) != 0)
    in_range = (b >= 0) & (b < n_buckets)
    # Narrowed after the range check, so no id wraps into a bucket.
    if OVERFLOW:
        return tl.where(ok, tl.where(in_range, b.to(tl.int32), -2), -1)
    else:
        return tl.where(ok & in_range, b.to(tl.int32), -1)


@triton.jit
def _chunk_buckets(QB, QKEEP, KB, KKEEP, side, bh, c, n, n_q, n_k, n_buckets, q_shift,
                   HAS_BUCKET: tl.constexpr, HAS_KEEP: tl.constexpr, OVERFLOW: tl.constexpr, CHUNK: tl.constexpr):
    """Tokens of chunk ``c`` of one side of one head, and their buckets (-1: dropped, -2:
    overflow; queries before ``q_shift`` are dropped too)."""
    t = c * CHUNK + tl.arange(0, CHUNK)
    b = _token_bucket(_side_args(QB, KB, side, bh * n_q, bh * n_k), _side_args(QKEEP, KKEEP, side, bh * n_q, bh * n_k),
                      t, n, n_buckets, HAS_BUCKET, HAS_KEEP, OVERFLOW)
    return t, tl.where((side == 0) & (t < q_shift), -1, b)


@triton.jit
def _side_args(QX, KX, side, q_off, k_off):
    """The query side's pointer (axis 2 = 0) or the key side's, offset to this head."""
    if side == 0:
        return QX + q_off
    else:
        return KX + k_off


@triton.jit
def _idle_key_program(bh, side, GROUP: tl.constexpr):
    """Whether a program of the layout kernels has no head: the grid spans the ``B·Hq``
    query heads, and the key side (axis 2 = 1) has only ``B·Hq / GROUP``."""
    return (side == 1) & (bh >= tl.num_programs(1) // GROUP)


@triton.jit
def _count_kernel(QB, QKEEP, KB, KKEEP, QINDEX, QSPOS, QSB, KINDEX, KSPOS, KSB, COUNTS, DROPS, OVERS,
                  n_q, n_k, n_q_slots, n_k_slots, n_buckets, n_chunks, fill, q_shift,
                  HAS_BUCKET: tl.constexpr, HAS_KEEP: tl.constexpr, OVERFLOW: tl.constexpr, NB: tl.constexpr,
                  CHUNK: tl.constexpr, GROUP: tl.constexpr):
    """Grid ``(chunks, B·Hq, 2)``, axis 2 the side: pad this chunk's share of the slots,
    and count this chunk's tokens per bucket, dropped and (``OVERFLOW``) in the overflow
    run (the first pass of a counting sort).  The key side has ``Hkv = Hq / GROUP`` heads."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    side = tl.program_id(2)
    if GROUP > 1:
        if _idle_key_program(bh, side, GROUP):
            return
    n = tl.where(side == 0, n_q, n_k)
    n_slots = tl.where(side == 0, n_q_slots, n_k_slots)
    pad = tl.where(side == 0, -1, 2147483647)
    INDEX = _side_args(QINDEX, KINDEX, side, bh * n_q_slots, bh * n_k_slots)
    SPOS = _side_args(QSPOS, KSPOS, side, bh * n_q_slots, bh * n_k_slots)
    SB = _side_args(QSB, KSB, side, bh * n_q_slots, bh * n_k_slots)
    for s0 in range(c * fill, (c + 1) * fill, CHUNK):
        s = s0 + tl.arange(0, CHUNK)
        live = (s < n_slots) & (s < (c + 1) * fill)
        tl.store(INDEX + s, tl.zeros_like(s) + n, mask=live)
        tl.store(SPOS + s, tl.zeros_like(s) + pad, mask=live)
        tl.store(SB + s, tl.zeros_like(s) - 1, mask=live)
    t, b = _chunk_buckets(QB, QKEEP, KB, KKEEP, side, bh, c, n, n_q, n_k, n_buckets, q_shift, HAS_BUCKET, HAS_KEEP,
                          OVERFLOW, CHUNK)
    ids = tl.arange(0, NB)
    row = (bh * 2 + side) * n_chunks + c
    tl.store(COUNTS + row * NB + ids, tl.sum((b[:, None] == ids[None, :]).to(tl.int32), 0))
    tl.store(DROPS + row, tl.sum(((b == -1) & (t < n)).to(tl.int32), 0))
    if OVERFLOW:
        tl.store(OVERS + row, tl.sum((b == -2).to(tl.int32), 0))


@triton.jit
def _place_kernel(QB, QKEEP, QPOS_IN, KB, KKEEP, KPOS_IN, QINDEX, QSPOS, QSB, KINDEX, KSPOS, KSB,
                  QSTART, QCOUNT, KSTART, KCOUNT, COUNTS, DROPS, OVERS,
                  n_q, n_k, n_q_slots, n_k_slots, n_buckets, n_chunks, q_shift,
                  HAS_BUCKET: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_POS: tl.constexpr, OVERFLOW: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, CHUNK: tl.constexpr,
                  N_CHUNKS: tl.constexpr, GROUP: tl.constexpr):
    """Grid ``(chunks, B·Hq, 2)``: the second pass.  Each program adds up the counts of
    the chunks before its own, lays the buckets' runs out on tile boundaries (then the
    overflow run, with ``OVERFLOW``, then the dropped tokens, both unpadded), and writes its
    tokens to their slots, in order inside a run."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    side = tl.program_id(2)
    if GROUP > 1:
        if _idle_key_program(bh, side, GROUP):
            return
    n = tl.where(side == 0, n_q, n_k)
    pad = tl.where(side == 0, -1, 2147483647)
    block = tl.where(side == 0, BLOCK_M, BLOCK_N)
    if OVERFLOW:  # the per-run tables' length
        n_runs = n_buckets + 1
    else:
        n_runs = n_buckets
    ids = tl.arange(0, NB)
    chunks = tl.arange(0, N_CHUNKS)
    rows = (bh * 2 + side) * n_chunks + chunks
    counts = tl.load(COUNTS + rows[:, None] * NB + ids[None, :], mask=chunks[:, None] < n_chunks, other=0)
    total = tl.sum(counts, 0)
    seen = tl.sum(tl.where(chunks[:, None] < c, counts, 0), 0)
    drops = tl.load(DROPS + rows, mask=chunks < n_chunks, other=0)
    n_dropped = tl.sum(tl.where(chunks < c, drops, 0), 0)
    aligned = (total + block - 1) // block * block
    starts = tl.cumsum(aligned, 0) - aligned
    n_aligned = tl.sum(aligned, 0)
    if c == 0:
        tl.store(_side_args(QSTART, KSTART, side, bh * n_runs, bh * n_runs) + ids, starts, mask=ids < n_buckets)
        tl.store(_side_args(QCOUNT, KCOUNT, side, bh * n_runs, bh * n_runs) + ids, total, mask=ids < n_buckets)
    t, b = _chunk_buckets(QB, QKEEP, KB, KKEEP, side, bh, c, n, n_q, n_k, n_buckets, q_shift, HAS_BUCKET, HAS_KEEP,
                          OVERFLOW, CHUNK)
    onehot = (b[:, None] == ids[None, :]).to(tl.int32)
    before = tl.cumsum(onehot, 0) - onehot  # same-bucket tokens earlier in this chunk
    slot = tl.sum(onehot * ((starts + seen)[None, :] + before), 1)
    dropped = ((b == -1) & (t < n)).to(tl.int32)
    if OVERFLOW:
        # The overflow run starts where the buckets' runs end (on a tile boundary); the dropped
        # tokens follow it directly.
        overs = tl.load(OVERS + rows, mask=chunks < n_chunks, other=0)
        n_over = tl.sum(overs, 0)
        over = (b == -2).to(tl.int32)
        if c == 0:
            tl.store(_side_args(QSTART, KSTART, side, bh * n_runs, bh * n_runs) + n_buckets, n_aligned)
            tl.store(_side_args(QCOUNT, KCOUNT, side, bh * n_runs, bh * n_runs) + n_buckets, n_over)
        over_slot = n_aligned + tl.sum(tl.where(chunks < c, overs, 0), 0) + tl.cumsum(over, 0) - over
        slot = tl.where(b == -2, over_slot, slot)
        n_aligned += n_over
    slot = tl.where(b != -1, slot, n_aligned + n_dropped + tl.cumsum(dropped, 0) - dropped)
    if HAS_POS:
        p = tl.load(_side_args(QPOS_IN, KPOS_IN, side, bh * n_q, bh * n_k) + t, mask=t < n, other=0)
    else:
        p = tl.where(side == 0, t - q_shift, t)
    slot_off = tl.where(side == 0, bh * n_q_slots, bh * n_k_slots)
    tl.store(_side_args(QINDEX, KINDEX, side, slot_off, slot_off) + slot, t, mask=t < n)
    tl.store(_side_args(QSPOS, KSPOS, side, slot_off, slot_off) + slot, tl.where(b != -1, p, pad), mask=t < n)
    tl.store(_side_args(QSB, KSB, side, slot_off, slot_off) + slot, tl.where(b == -2, n_buckets, b), mask=t < n)


#: Largest bucket count the counting-sort kernels take; more buckets use the sort.
MAX_KERNEL_BUCKETS = 256


def _chunking(n: int, n_buckets: int) -> tuple[int, int, int] | None:
    """``(NB, CHUNK, n_chunks)`` of the counting-sort kernels, or None where the sort is better."""
    nb = max(2, _runtime.next_power_of_2(n_buckets))
    # A chunk's one-hot tile is (CHUNK, NB); the interpreter runs programs one after another,
    # so fewer, wider ones are cheaper there (a GPU wants them in registers).
    chunk = max(16, min(1024, (32768 if _runtime.INTERPRET else 8192) // nb))
    n_chunks = max(1, -(-n // chunk))
    if n_buckets > MAX_KERNEL_BUCKETS or n_chunks * nb > 32768:
        return None
    return nb, chunk, n_chunks


def bucket_layouts(shape, *, q_buckets=None, k_buckets=None, q_keep=None, k_keep=None, q_pos=None,
                   k_pos=None, n_buckets: int = 1, block_m: int, block_n: int, n_k: int | None = None,
                   k_heads: int | None = None, q_shift: int = 0, overflow: bool = False,
                   device=None) -> tuple[Layout, Layout]:
    """The query and key :class:`Layout` of one attention call: a counting sort in two
    launches (count per chunk of tokens, then place), both sides at once.

    Same arguments as :func:`reference_layout`, per side (give both sides' ``buckets``,
    ``keep``, ``pos``, or neither); the result is identical to it.  ``shape`` is the
    queries' ``(B, H, N)``; ``n_k`` the keys' length (default ``N``); ``k_heads`` the
    keys' heads ``Hkv`` (grouped-query attention: ``Hkv`` divides ``H``; default: the
    heads of the key-side tensors, else ``H``), so the key-side tensors are
    ``(B, Hkv, n_k)`` and the key layout is per kv head.  ``q_shift`` (without positions
    given): query ``i`` takes position ``i - q_shift`` and queries before ``q_shift`` are
    dropped, so a query meets only keys at least ``q_shift`` before it (the far part of
    a sliding window's union).  ``overflow``: ids outside ``[0, n_buckets)`` go to the
    overflow run instead of being dropped (hash attention).  No host synchronisation.  With
    many buckets on long sequences it falls back to :func:`reference_layout` (a sort).
    """
    B, H, N = shape
    n_k = N if n_k is None else n_k
    overflow = bool(overflow)
    if q_shift and q_pos is not None:
        raise ValueError("q_shift applies to default positions only: give q_pos already shifted")
    if k_heads is None:
        k_heads = next((t.shape[1] for t in (k_buckets, k_keep, k_pos) if t is not None), H)
    group = _group(H, k_heads)
    _check_layout_args(n_buckets, min(block_m, block_n))
    given = [t for t in (q_buckets, k_buckets, q_keep, k_keep, q_pos, k_pos) if t is not None]
    device = given[0].device if given else device
    # The overflow run is counted apart from the buckets' one-hot lanes: it costs no lane.
    chunking = _chunking(max(N, n_k), n_buckets)
    if chunking is None:
        return (reference_layout(shape, buckets=q_buckets, keep=q_keep, pos=q_pos, n_buckets=n_buckets,
                                 block=block_m, pad=Q_PAD, shift=q_shift, overflow=overflow, device=device),
                reference_layout((B, k_heads, n_k), buckets=k_buckets, keep=k_keep, pos=k_pos, n_buckets=n_buckets,
                                 block=block_n, pad=K_PAD, overflow=overflow, device=device))
    nb, chunk, n_chunks = chunking
    n_runs = n_buckets + overflow
    Lq, Lk = layout_length(N, n_buckets, block_m), layout_length(n_k, n_buckets, block_n)
    i32 = dict(dtype=torch.int32, device=device)
    # Each side's (index, pos, bucket) and (start, count) are views of one buffer, split once
    # here: an eager call's host time is mostly such Python steps (tools/launch_cost.py).
    q_side = torch.empty((3, B, H, Lq), **i32).unbind(0)
    k_side = torch.empty((3, B, k_heads, Lk), **i32).unbind(0)
    runs = torch.empty((2 * B * (H + k_heads) * n_runs,), **i32)  # each side's start and count
    q_runs = runs[: 2 * B * H * n_runs].view(2, B, H, n_runs).unbind(0)
    k_runs = runs[2 * B * H * n_runs:].view(2, B, k_heads, n_runs).unbind(0)
    rows = B * H * 2 * n_chunks
    counts = torch.empty((rows * (nb + 1 + overflow),), **i32)
    per_chunk, drops, overs = counts[: rows * nb], counts[rows * nb: rows * (nb + 1)], counts[rows * (nb + 1):]

    def arg(t):  # absent inputs pass a stand-in the kernels never read
        return runs if t is None else t.contiguous()

    # One program per (chunk, batch and query head, side); with fewer kv heads the key
    # side's surplus programs return at once.
    flags = dict(HAS_BUCKET=q_buckets is not None, HAS_KEEP=q_keep is not None, OVERFLOW=overflow, NB=nb, CHUNK=chunk,
                 GROUP=group)
    grid = (n_chunks, B * H, 2)
    overs = overs if overflow else drops  # a stand-in without the overflow run
    _count_kernel[grid](arg(q_buckets), arg(q_keep), arg(k_buckets), arg(k_keep), *q_side, *k_side, per_chunk, drops,
                        overs, N, n_k, Lq, Lk, n_buckets, n_chunks, -(-max(Lq, Lk) // n_chunks), q_shift, **flags,
                        num_warps=4)
    _place_kernel[grid](arg(q_buckets), arg(q_keep), arg(q_pos), arg(k_buckets), arg(k_keep), arg(k_pos),
                        *q_side, *k_side, *q_runs, *k_runs, per_chunk, drops, overs, N, n_k, Lq, Lk, n_buckets,
                        n_chunks, q_shift, HAS_POS=q_pos is not None, BLOCK_M=block_m, BLOCK_N=block_n,
                        N_CHUNKS=_runtime.next_power_of_2(n_chunks), **flags, num_warps=4)
    return (Layout(*q_side, *q_runs, n_runs, block_m, overflow),
            Layout(*k_side, *k_runs, n_runs, block_n, overflow))


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
    """

    q_runs: Tensor
    k_runs: Tensor
    block_m: int
    block_n: int

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
def _plan_kernel(QPOS, QSB, QSTART, QCOUNT, KPOS, KSB, KSTART, KCOUNT, QRUNS, KRUNS,
                 n_q_slots, n_k_slots, n_q_tiles, n_k_tiles, n_buckets, overflow_run,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, STEPS: tl.constexpr,
                 GROUP: tl.constexpr):
    """Grid ``(tile chunks, B·Hq, 2)``: axis 2 picks the query tiles' runs (0) or the key
    tiles' runs (1); each lane finds its tile's bucket run and searches it twice.  Query
    head ``h`` meets the key layout of kv head ``h // GROUP``.  ``n_buckets`` runs per head;
    ``overflow_run``: the overflow run's index (-1: none), whose tiles are all masked."""
    bh = tl.program_id(1).to(tl.int64)
    bhk = kv_head(bh, GROUP)
    t = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    QPOS += bh * n_q_slots
    QSB += bh * n_q_slots
    KPOS += bhk * n_k_slots
    KSB += bhk * n_k_slots
    QSTART += bh * n_buckets
    QCOUNT += bh * n_buckets
    KSTART += bhk * n_buckets
    KCOUNT += bhk * n_buckets
    if tl.program_id(2) == 0:
        live, real, bb, qmin, qmax = _tile_span(QSB, QPOS, QSTART, QCOUNT, t, n_q_tiles, BLOCK_M)
        ks, ke, _, _ = _bucket_tiles(KSTART, KCOUNT, bb, real, BLOCK_N)
        # Tiles whose first key comes after the last query hold no allowed pair.
        hi = _first_true(ks, ke, KPOS, BLOCK_N, 0, qmax, n_k_slots - 1, False, STEPS)
        # Mask-free while the tile's last slot (padding reads +inf) is at or before the first query.
        full = _first_true(ks, hi, KPOS, BLOCK_N, BLOCK_N - 1, qmin, n_k_slots - 1, False, STEPS)
        # The overflow run mixes ids: every tile there needs the id test of the mask.
        full = tl.where(real & (bb == overflow_run), ks, full)
        _store_run(QRUNS + (bh * n_q_tiles + t) * 3, ks, full, hi, live)
    else:
        live, real, bb, kmin, kmax = _tile_span(KSB, KPOS, KSTART, KCOUNT, t, n_k_tiles, BLOCK_N)
        qs, qe, q_start, q_count = _bucket_tiles(QSTART, QCOUNT, bb, real, BLOCK_M)
        # qmax of a query tile is its last real slot: the tile's last slot, or the run's.
        lo = _first_true(qs, qe, QPOS, BLOCK_M, BLOCK_M - 1, kmin, q_start + q_count - 1, True, STEPS)
        full = _first_true(lo, qe, QPOS, BLOCK_M, 0, kmax, n_q_slots - 1, True, STEPS)
        full = tl.where(real & (bb == overflow_run), qe, full)
        _store_run(KRUNS + (bh * n_k_tiles + t) * 3, lo, full, qe, live)


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
    B, H, Lq = q_layout.index.shape
    Lk = k_layout.n_slots
    group = _group(H, k_layout.index.shape[1])
    bm, bn = q_layout.block, k_layout.block
    n_qt, n_kt = Lq // bm, Lk // bn
    runs = torch.empty(B * H * 3 * (n_qt + n_kt), dtype=torch.int32, device=q_layout.index.device)
    q_runs = runs[: B * H * n_qt * 3].view(B, H, n_qt, 3)
    k_runs = runs[B * H * n_qt * 3:].view(B, H, n_kt, 3)
    chunk = 256 if _runtime.INTERPRET else 64  # tiles per program (the interpreter: fewer, wider programs)
    _plan_kernel[(_runtime.cdiv(max(n_qt, n_kt), chunk), B * H, 2)](
        q_layout.pos, q_layout.bucket, q_layout.start, q_layout.count,
        k_layout.pos, k_layout.bucket, k_layout.start, k_layout.count, q_runs, k_runs,
        Lq, Lk, n_qt, n_kt, q_layout.n_buckets, q_layout.overflow_run,
        BLOCK_M=bm, BLOCK_N=bn, CHUNK=chunk, STEPS=max(n_qt, n_kt).bit_length() + 1, GROUP=group, num_warps=2,
    )
    return TilePlan(q_runs, k_runs, bm, bn)


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
    return TilePlan(q_runs, k_runs, bm, bn)


def dense_bucket_ids(q_buckets: Tensor, k_buckets: Tensor, n_buckets: int | None = None, *,
                     top: int | None = None) -> tuple[Tensor, Tensor, int]:
    """Ids and their count when ``n_buckets`` is not given or huge (one host synchronisation,
    none more if the largest id ``top`` is passed in).

    Small ids are used as they are; large or sparse ones (hash values, say) are
    renumbered ``0..n-1`` in order, which keeps "same bucket" unchanged.  With
    ``n_buckets`` given, ids outside ``[0, n_buckets)`` stay outside (dropped).
    """
    if q_buckets.numel() == 0:
        return q_buckets, k_buckets, 1
    if top is None:
        top = int(torch.maximum(q_buckets.max(), k_buckets.max()))
    if n_buckets is None and top < 4 * q_buckets.shape[-1] + 64:
        return q_buckets, k_buckets, max(top, 0) + 1
    both = torch.cat([q_buckets.flatten(), k_buckets.flatten()]).long()
    valid = both >= 0 if n_buckets is None else (both >= 0) & (both < n_buckets)
    ids, inverse = torch.unique(torch.where(valid, both, -1), return_inverse=True)
    has_invalid = bool((~valid).any())
    inverse = torch.where(valid, inverse - int(has_invalid), -1)
    q_new, k_new = inverse.split(q_buckets.numel())
    return q_new.view_as(q_buckets), k_new.view_as(k_buckets), max(1, int(ids.numel()) - int(has_invalid))
