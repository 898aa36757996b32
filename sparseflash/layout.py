"""Layouts: where each token sits when a sparse kernel runs.

Query/key dropping and hash buckets both reorder tokens before attention.  This
module holds those permutations (and the kernels that build them); it imports no
attention kernel, so the tile plan (:mod:`sparseflash.plan`), the kernels
(:mod:`sparseflash.permuted`) and the pictures (:mod:`sparseflash.tiles`) build on it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _runtime  # (first: may turn on Triton's interpreter)
from .launch import launch

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
# contiguous run, the mask-free ones a prefix of it (see plan.TilePlan).  Dropped tokens
# (not kept, or without ``overflow`` a bucket id outside [0, n_buckets)) sit after the
# runs with the padding position, so the kernels still write their output (0) and
# gradients (0): ``index`` holds every token exactly once.  Alignment costs at most
# ``block - 1`` slots per non-empty bucket, so the length is static: ``layout_length``.
#
# Hash attention's ids are labels of any integer value, and ``n_buckets`` is only a
# budget: with ``overflow`` every token whose id lies outside [0, n_buckets) goes to one
# more run, the *overflow run* (index n_buckets, after the others, positions ascending
# through it like any run).  Its tiles mix ids, so the kernels test the original ids
# there (plan.TilePlan: none of its tiles is mask-free); ids in range never meet it.  It is
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

    Stored as two int32 buffers, so that a kernel takes each side in one argument:
    ``slots`` ``(3, B, H, L)`` holds ``index``, ``pos``, ``bucket`` (``L = layout_length(N,
    ids, block)`` slots, ``ids`` the id range ``[0, ids)`` it was built for) and ``tables``
    ``(2, B, H, n_buckets)`` holds ``start``, ``count`` (None where only the slots were kept).
    The fields, views of them:

        index: int32 ``(B, H, L)``: the token in each slot; ``N`` for a padding slot.
        pos: int32 ``(B, H, L)``: that token's position (the causal coordinate);
            :data:`Q_PAD` or :data:`K_PAD` (the side's padding) for padding and dropped tokens.
        bucket: int32 ``(B, H, L)``: its run: the bucket id, ``ids`` in the overflow run;
            -1 for padding and dropped tokens.
        start: int32 ``(B, H, n_buckets)``: first slot of each run (a multiple of
            ``block``); count: int32 ``(B, H, n_buckets)``: tokens in it.  Runs of buckets
            are padded to whole tiles; the overflow run is not.

    Attributes:
        n_buckets: the runs, ``ids + 1`` with ``overflow`` (the last is the overflow run).
        block: as built.
        overflow: whether the last run is the overflow run (ids outside ``[0, ids)``).
    """

    slots: Tensor
    tables: Tensor | None
    n_buckets: int
    block: int
    overflow: bool = False

    @property
    def index(self) -> Tensor:
        return self.slots[0]

    @property
    def pos(self) -> Tensor:
        return self.slots[1]

    @property
    def bucket(self) -> Tensor:
        return self.slots[2]

    @property
    def start(self) -> Tensor | None:
        return None if self.tables is None else self.tables[0]

    @property
    def count(self) -> Tensor | None:
        return None if self.tables is None else self.tables[1]

    @property
    def n_slots(self) -> int:
        return self.slots.shape[-1]

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
    tables = torch.stack([run_start[..., :runs], counts[..., :runs]])
    return Layout(torch.stack([index, spos, sbucket]).int(), tables.int(), runs, block, bool(overflow))


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
def _step_buckets(BUCKET, KEEP, side, start, n, n_buckets, q_shift, HAS_BUCKET: tl.constexpr, HAS_KEEP: tl.constexpr,
                  OVERFLOW: tl.constexpr, SUB: tl.constexpr):
    """Tokens ``start ... start + SUB - 1`` of one side of one head (``BUCKET``, ``KEEP``: that head's
    ids and keep flags), and their buckets (-1: dropped, -2: overflow; queries before ``q_shift``
    are dropped too)."""
    t = start + tl.arange(0, SUB)
    b = _token_bucket(BUCKET, KEEP, t, n, n_buckets, HAS_BUCKET, HAS_KEEP, OVERFLOW)
    return t, tl.where((side == 0) & (t < q_shift), -1, b)


@triton.jit
def field_row(BUF, field, n_rows, row, length):
    """Row ``row`` of field ``field`` in a buffer ``(fields, n_rows, length)``: how the kernels
    read a :class:`Layout`'s ``slots`` (index, pos, bucket) and ``tables`` (start, count) and
    a :class:`~sparseflash.plan.TilePlan`'s runs, each passed as one pointer."""
    return BUF + (field * n_rows + row) * length


@triton.jit
def _side_field(QBUF, KBUF, side, field, bh, q_length, k_length, GROUP: tl.constexpr):
    """Head ``bh``'s row of field ``field`` of the query side's buffer (axis 2 = 0; ``B·Hq``
    heads, the grid's axis 1) or the key side's (``B·Hq / GROUP`` heads); field 0 of a per-token
    input ``(B, H, N)`` (ids, keep flags, positions) is that head's row of it."""
    heads = tl.num_programs(1).to(tl.int64)
    if side == 0:
        return field_row(QBUF, field, heads, bh, q_length)
    else:
        return field_row(KBUF, field, heads // GROUP, bh, k_length)


@triton.jit
def _tallies(COUNTS, n_chunks, NB: tl.constexpr):
    """The counting sort's scratch ``COUNTS``: per (head, side, chunk) a count per bucket lane
    ``(B·Hq, 2, chunks, NB)``, then the dropped tokens ``(B·Hq, 2, chunks)``, then the overflow
    run's; returns the pointers to the last two."""
    rows = tl.num_programs(1).to(tl.int64) * 2 * n_chunks
    DROPS = COUNTS + rows * NB
    return DROPS, DROPS + rows


@triton.jit
def _idle_key_program(bh, side, GROUP: tl.constexpr):
    """Whether a program of the layout kernels has no head: the grid spans the ``B·Hq``
    query heads, and the key side (axis 2 = 1) has only ``B·Hq / GROUP``."""
    return (side == 1) & (bh >= tl.num_programs(1) // GROUP)


@triton.jit
def _count_kernel(QB, QKEEP, KB, KKEEP, QSLOTS, KSLOTS, COUNTS, n_q, n_k, n_q_slots, n_k_slots, n_buckets, n_chunks,
                  fill, q_shift,
                  HAS_BUCKET: tl.constexpr, HAS_KEEP: tl.constexpr, OVERFLOW: tl.constexpr, NB: tl.constexpr,
                  CHUNK: tl.constexpr, SUB: tl.constexpr, GROUP: tl.constexpr):
    """Grid ``(chunks, B·Hq, 2)``, axis 2 the side: pad this chunk's share of the slots,
    and count this chunk's ``CHUNK`` tokens per bucket, dropped and (``OVERFLOW``) in the
    overflow run (the first pass of a counting sort), ``SUB`` tokens a step (the one-hot
    tile is ``(SUB, NB)``).  The key side has ``Hkv = Hq / GROUP`` heads.
    ``COUNTS``: see :func:`_tallies`."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    side = tl.program_id(2)
    if GROUP > 1:
        if _idle_key_program(bh, side, GROUP):
            return
    n = tl.where(side == 0, n_q, n_k)
    n_slots = tl.where(side == 0, n_q_slots, n_k_slots)
    pad = tl.where(side == 0, -1, 2147483647)
    INDEX = _side_field(QSLOTS, KSLOTS, side, 0, bh, n_q_slots, n_k_slots, GROUP)
    SPOS = _side_field(QSLOTS, KSLOTS, side, 1, bh, n_q_slots, n_k_slots, GROUP)
    SB = _side_field(QSLOTS, KSLOTS, side, 2, bh, n_q_slots, n_k_slots, GROUP)
    for s0 in range(c * fill, (c + 1) * fill, SUB):
        s = s0 + tl.arange(0, SUB)
        live = (s < n_slots) & (s < (c + 1) * fill)
        tl.store(INDEX + s, tl.zeros_like(s) + n, mask=live)
        tl.store(SPOS + s, tl.zeros_like(s) + pad, mask=live)
        tl.store(SB + s, tl.zeros_like(s) - 1, mask=live)
    ids = tl.arange(0, NB)
    per_bucket = tl.zeros([NB], tl.int32)
    n_drop = 0
    n_over = 0
    BUCKET = _side_field(QB, KB, side, 0, bh, n_q, n_k, GROUP)
    KEEP = _side_field(QKEEP, KKEEP, side, 0, bh, n_q, n_k, GROUP)
    for step in tl.static_range(CHUNK // SUB):  # unrolled (one step, no loop, on a GPU up to 16 buckets)
        t, b = _step_buckets(BUCKET, KEEP, side, c * CHUNK + step * SUB, n, n_buckets, q_shift, HAS_BUCKET,
                             HAS_KEEP, OVERFLOW, SUB)
        per_bucket += tl.sum((b[:, None] == ids[None, :]).to(tl.int32), 0)
        n_drop += tl.sum(((b == -1) & (t < n)).to(tl.int32), 0)
        if OVERFLOW:
            n_over += tl.sum((b == -2).to(tl.int32), 0)
    row = (bh * 2 + side) * n_chunks + c
    DROPS, OVERS = _tallies(COUNTS, n_chunks, NB)
    tl.store(COUNTS + row * NB + ids, per_bucket)
    tl.store(DROPS + row, n_drop)
    if OVERFLOW:
        tl.store(OVERS + row, n_over)


@triton.jit
def _place_kernel(QB, QKEEP, QPOS_IN, KB, KKEEP, KPOS_IN, QSLOTS, KSLOTS, QTAB, KTAB, COUNTS,
                  n_q, n_k, n_q_slots, n_k_slots, n_buckets, n_chunks, q_shift,
                  HAS_BUCKET: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_POS: tl.constexpr, OVERFLOW: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, CHUNK: tl.constexpr,
                  SUB: tl.constexpr, N_CHUNKS: tl.constexpr, GROUP: tl.constexpr):
    """Grid ``(chunks, B·Hq, 2)``: the second pass.  Each program adds up the counts of
    the chunks before its own, lays the buckets' runs out on tile boundaries (then the
    overflow run, with ``OVERFLOW``, then the dropped tokens, both unpadded), and writes its
    ``CHUNK`` tokens to their slots, in order inside a run, ``SUB`` a step (each step's slots
    continue from the last's)."""
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
    DROPS, OVERS = _tallies(COUNTS, n_chunks, NB)
    counts = tl.load(COUNTS + rows[:, None] * NB + ids[None, :], mask=chunks[:, None] < n_chunks, other=0)
    total = tl.sum(counts, 0)
    seen = tl.sum(tl.where(chunks[:, None] < c, counts, 0), 0)
    drops = tl.load(DROPS + rows, mask=chunks < n_chunks, other=0)
    n_dropped = tl.sum(tl.where(chunks < c, drops, 0), 0)
    aligned = (total + block - 1) // block * block
    starts = tl.cumsum(aligned, 0) - aligned
    n_aligned = tl.sum(aligned, 0)
    START = _side_field(QTAB, KTAB, side, 0, bh, n_runs, n_runs, GROUP)
    COUNT = _side_field(QTAB, KTAB, side, 1, bh, n_runs, n_runs, GROUP)
    if c == 0:
        tl.store(START + ids, starts, mask=ids < n_buckets)
        tl.store(COUNT + ids, total, mask=ids < n_buckets)
    # Where this chunk's tokens go: each bucket's run from where the chunks before it ended; the
    # overflow run starts where the buckets' runs end (on a tile boundary), the dropped tokens
    # directly after it.
    base = starts + seen
    drop_base = n_aligned + n_dropped
    if OVERFLOW:
        overs = tl.load(OVERS + rows, mask=chunks < n_chunks, other=0)
        n_over = tl.sum(overs, 0)
        if c == 0:
            tl.store(START + n_buckets, n_aligned)
            tl.store(COUNT + n_buckets, n_over)
        over_base = n_aligned + tl.sum(tl.where(chunks < c, overs, 0), 0)
        drop_base += n_over
    INDEX = _side_field(QSLOTS, KSLOTS, side, 0, bh, n_q_slots, n_k_slots, GROUP)
    SPOS = _side_field(QSLOTS, KSLOTS, side, 1, bh, n_q_slots, n_k_slots, GROUP)
    SB = _side_field(QSLOTS, KSLOTS, side, 2, bh, n_q_slots, n_k_slots, GROUP)
    BUCKET = _side_field(QB, KB, side, 0, bh, n_q, n_k, GROUP)
    KEEP = _side_field(QKEEP, KKEEP, side, 0, bh, n_q, n_k, GROUP)
    POS_IN = _side_field(QPOS_IN, KPOS_IN, side, 0, bh, n_q, n_k, GROUP)
    for step in tl.static_range(CHUNK // SUB):  # unrolled (one step, no loop, on a GPU up to 16 buckets)
        t, b = _step_buckets(BUCKET, KEEP, side, c * CHUNK + step * SUB, n, n_buckets, q_shift, HAS_BUCKET,
                             HAS_KEEP, OVERFLOW, SUB)
        onehot = (b[:, None] == ids[None, :]).to(tl.int32)
        before = tl.cumsum(onehot, 0) - onehot  # same-bucket tokens earlier in this step
        slot = tl.sum(onehot * (base[None, :] + before), 1)
        base += tl.sum(onehot, 0)
        dropped = ((b == -1) & (t < n)).to(tl.int32)
        if OVERFLOW:
            over = (b == -2).to(tl.int32)
            slot = tl.where(b == -2, over_base + tl.cumsum(over, 0) - over, slot)
            over_base += tl.sum(over, 0)
        slot = tl.where(b != -1, slot, drop_base + tl.cumsum(dropped, 0) - dropped)
        drop_base += tl.sum(dropped, 0)
        if HAS_POS:
            p = tl.load(POS_IN + t, mask=t < n, other=0)
        else:
            p = tl.where(side == 0, t - q_shift, t)
        tl.store(INDEX + slot, t, mask=t < n)
        tl.store(SPOS + slot, tl.where(b != -1, p, pad), mask=t < n)
        tl.store(SB + slot, tl.where(b == -2, n_buckets, b), mask=t < n)


#: Largest bucket count the counting-sort kernels take; more buckets use the sort.
MAX_KERNEL_BUCKETS = 256


def _chunking(n: int, n_buckets: int) -> tuple[int, int, int, int] | None:
    """``(NB, SUB, CHUNK, n_chunks)`` of the counting-sort kernels, or None where the sort is better.

    A program takes ``CHUNK`` tokens, ``SUB`` a step: its one-hot tile is ``(SUB, NB)``, about 8192
    elements, so that it stays in registers.  Each program of the second pass reads the counts of
    every chunk (``n_chunks × NB``), so one step a program, ``8192 / NB`` tokens, would make that
    work grow as ``NB³`` at a given length.  So with 32 and 64 buckets a program takes two or four
    steps (512 tokens on a GPU: 64 buckets, hash attention's default, then read 16 times fewer
    counts).  Up to 16 buckets one step already covers 512 tokens or more; above 64 buckets more
    unrolled steps spill registers in the sm_90 compile, so those stay at one step.  The
    interpreter runs programs one after another: fewer, wider ones are cheaper there.
    """
    nb = max(2, _runtime.next_power_of_2(n_buckets))
    sub = max(16, min(1024, 8192 // nb))
    steps = 1 if nb > 64 else max(1, min(4, (2048 if _runtime.INTERPRET else 512) // sub))
    n_chunks = max(1, -(-n // (sub * steps)))
    if n_buckets > MAX_KERNEL_BUCKETS or n_chunks * nb > 32768:
        return None
    return nb, sub, sub * steps, n_chunks


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
    nb, sub, chunk, n_chunks = chunking
    n_runs = n_buckets + overflow
    Lq, Lk = layout_length(N, n_buckets, block_m), layout_length(n_k, n_buckets, block_n)
    # One buffer per side and per table, each passed whole: the kernels find the fields (index,
    # pos, bucket; start, count) themselves, since every view made here would cost the host
    # about what a small launch's arguments do (an eager call's host time is mostly such
    # steps: tools/host_stub.py).
    i32 = torch.int32
    q_slots = torch.empty((3, B, H, Lq), dtype=i32, device=device)
    k_slots = torch.empty((3, B, k_heads, Lk), dtype=i32, device=device)
    q_tab = torch.empty((2, B, H, n_runs), dtype=i32, device=device)
    k_tab = torch.empty((2, B, k_heads, n_runs), dtype=i32, device=device)
    # The kernels' scratch (layout._tallies): per (head, side, chunk) NB counts, the dropped, the overflow's.
    counts = torch.empty((B * H * 2 * n_chunks * (nb + 2),), dtype=i32, device=device)

    def arg(t):  # absent inputs pass a stand-in the kernels never read
        return counts if t is None else t.contiguous()

    # One program per (chunk, batch and query head, side); with fewer kv heads the key
    # side's surplus programs return at once.
    flags = dict(HAS_BUCKET=q_buckets is not None, HAS_KEEP=q_keep is not None, OVERFLOW=overflow, NB=nb, CHUNK=chunk,
                 SUB=sub, GROUP=group)
    grid = (n_chunks, B * H, 2)
    qb, kb, qk, kk = arg(q_buckets), arg(k_buckets), arg(q_keep), arg(k_keep)
    launch(_count_kernel, grid, qb, qk, kb, kk, q_slots, k_slots, counts, N, n_k, Lq, Lk, n_buckets, n_chunks,
           -(-max(Lq, Lk) // n_chunks), q_shift, **flags, num_warps=4)
    launch(_place_kernel, grid, qb, qk, arg(q_pos), kb, kk, arg(k_pos), q_slots, k_slots, q_tab, k_tab, counts, N,
           n_k, Lq, Lk, n_buckets, n_chunks, q_shift, HAS_POS=q_pos is not None, BLOCK_M=block_m, BLOCK_N=block_n,
           N_CHUNKS=_runtime.next_power_of_2(n_chunks), **flags, num_warps=4)
    return (Layout(q_slots, q_tab, n_runs, block_m, overflow),
            Layout(k_slots, k_tab, n_runs, block_n, overflow))


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
