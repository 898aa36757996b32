"""Decode attention: one new query per sequence against a KV cache (split-KV, "flash-decoding").

At each generation step every sequence ``b`` and query head ``h`` has one query ``q``
and a cache of keys ``k_j`` and values ``v_j``, ``j < n`` (``n = cache_len[b]``, the new
token's own key already appended).  The output is::

    s_j = (q · k_j) · scale
    o   = Σ_j 2^(s'_j - m) v_j / Σ_j 2^(s'_j - m),   s'_j = s_j · log2 e,  m = max_j s'_j

over the allowed keys ``j``; a query with no allowed key gets ``o = 0``.

**Split-KV.**  One query per (sequence, head) gives only ``B · H`` rows of work: far too
few programs to fill a GPU if each walked the whole cache alone.  So the key list is cut
into ``num_splits`` contiguous ranges of key blocks (``cdiv(blocks, num_splits)`` each), and
program ``(b·H + h, s)`` runs the online softmax over its range only, writing a partial
``(m_s, l_s, acc_s)``: its running max, its sum ``Σ 2^(s'_j - m_s)`` and its unnormalised
output ``Σ 2^(s'_j - m_s) v_j``, in float32.  A second small kernel merges the splits by log-sum-exp::

    m = max_s m_s,   w_s = 2^(m_s - m),   o = Σ_s w_s acc_s / Σ_s w_s l_s

which is exactly the softmax over all keys.  A split with no allowed key has
``m_s = -inf, l_s = 0, acc_s = 0`` and weight 0; with no key anywhere ``o = 0``, never
NaN.  With ``num_splits = 1`` the one program normalises and writes ``o`` itself.

**Index lists.**  For sparse decoding (for example the keys that share the query's hash
bucket, together with a recent window) the caller passes ``key_index`` ``(B, H, L)``: the
cache rows each query may attend to, of which the first ``n_keys[b, h]`` are used.  The
kernel walks that list block by block and gathers the listed K and V rows by index; it
never touches the rest of the cache.  Decoding is memory-bound (every key is read once
and used for one query), so the time is the bytes read: ``~n_keys · D`` per query instead
of ``cache_len · D``, falling in proportion to the sparsity.  The splits cut the index
list, so a short list also needs fewer programs.

**Lists per kv head.**  With ``key_index`` of shape ``(B, Hkv, G, L)`` and ``list_id``
``(B, H)``, query head ``h`` walks list ``list_id[b, h]`` of its kv head: one list per hash
bucket, say, each holding the cache rows of that bucket in the order they were appended.
Nothing per query is gathered or copied on the host side: the kernel reads the chosen
list in place, and ``n_keys`` ``(B, Hkv, G)`` (the lists' fill counts, on the device)
bounds the walk.

**Window.**  ``window = W > 0`` adds the ``W`` most recent rows ``[cache_len - W,
cache_len)``, read as a contiguous range (no index), in front of the list: the program's
keys are that range, then the list entries *older* than it (``row < cache_len - W``), so a
listed row of the window is not counted twice.  Without a list, ``W > 0`` is sliding-window
decoding.  Hash ∪ window decoding is then ``key_index = rows per bucket``, ``list_id = the
query's bucket``, ``window = W``: ``O(W + n_bucket)`` work per query and no ``O(S)`` mask.

Grouped-query attention: the cache has ``Hkv`` heads for ``H`` query heads; query head
``h`` reads kv head ``h // (H / Hkv)``, as SDPA's ``enable_gqa=True``.  Nothing is copied.

Loads: a split walks its contiguous blocks (the window, or the whole cache) in one loop and its
list blocks in a second, so neither pays for the other's test.  Dense and window-only calls
on a Hopper (or newer) GPU that read many blocks fetch each ``(BLOCK_N, D)`` block of K
and V whole through a tensor descriptor (the copy engine, TMA); other blocks are loaded through
pointers (list blocks gathered row by row), with the hint that the rows are read once and may
leave L2 first.  Cache rows past ``cache_len`` may be read by a whole block but never reach
the sums: their scores are -inf and their values are replaced by 0, so even NaN there is
harmless.

Nothing here reads a value back to the host: ``cache_len`` and ``n_keys`` tensors are read
by the kernels, so a call can be captured in a CUDA graph and never waits for the GPU.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _runtime
from .launch import launch
from ._steps import LOG2E, dot_precision, kv_head, online_softmax_step

try:  # host-side tensor descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except ImportError:  # pragma: no cover
    _TensorDescriptor = None

#: Largest ``num_splits``; the default aims at ``KEYS_PER_SPLIT`` keys per split.  256, not 64:
#: at batch 1 (8 heads) 64 splits gave only 512 programs, about four per streaming multiprocessor,
#: too few loads in flight for a memory-bound kernel.
MAX_SPLITS = 256
#: The default's cap.  H200, bf16, B=1, H=8, D=64, 65536 keys, CUDA-graph replay: dense 55.4 us with
#: 64 splits against 57.2 with 256; hash16 ∪ w256 15.3 us with 64 against 16.5 with 256 and 204 with
#: one (a bucket list's gathered rows are latency-bound: one program walks ~6 us per block).
DEFAULT_MAX_SPLITS = 64
KEYS_PER_SPLIT = 256
#: Programs per streaming multiprocessor the default splits aim at (decoding is memory-bound:
#: more programs, more loads in flight).  H200, bf16, D=64, 131072 keys, B=8, H=8: 16 instead
#: of 4 took the dense call from 1.00 to 0.66 ms (with 128-key blocks).
PROGRAMS_PER_SM = 16
#: Dense and sliding-window decoding (no index list) read their blocks through tensor
#: descriptors where the hardware has a copy engine (Hopper and newer) and the cache is aligned
#: for it.  H100, bf16, H=8, D=64, CUDA-graph replays, same run (results/logs/decode_h100_*.json):
#: dense at 65536 keys 0.0623 -> 0.0630 ms at batch 1 (1% slower) but 0.382 -> 0.358 at batch 8, and
#: 0.743 -> 0.691 ms at 131072 keys, batch 8.  Lists keep pointer loads: with descriptors for their
#: window tail, hash16 ∪ w256 was 4-13% slower (0.0144 -> 0.0149 ms at 65536, batch 1).
TMA = True
#: ... but only for calls that read at least this many blocks in all (``B·H`` rows, or ``B·Hkv``
#: grouped, times the blocks of the cache's capacity ``S``, the one length the host knows without
#: reading ``cache_len`` back): smaller reads do better with pointer loads and the evict-first hint.
#: H100, bf16, H=8, D=64, 128-key blocks, CUDA-graph replays (``results/logs/decode_tma*_evict*_h100.json``,
#: ``decode_h100_stage15_flex.json`` against ``decode_h100_walk16.json``), descriptors against
#: pointers: 4096 blocks (65536 keys, batch 1; 8192 keys, batch 8) 63.1 against 58.3 us and 62.2
#: against 59.3; 8192 (131072 keys, batch 1) 105.6 against 104.6; 16384 (32768 keys, batch 8) 190
#: against 205; 32768 (65536 keys, batch 8) 358 against 403.
DESC_MIN_BLOCKS = 8192
#: Fold each block in as two matrix products (:func:`_decode_fold_block`) instead of elementwise
#: sums, so that Triton's pipeliner keeps the next blocks' loads in flight (compiled for sm_90 the
#: sums' loop has no asynchronous copies; the products' loop multi-buffers the list entries, K and
#: V: ``tools/decode_ir.py``).  With grouped-query attention and no list, the rows of the products
#: are then the query heads of one kv head, which reads the cache once for the whole group.
#: ``None`` (default): products exactly there, where they pay.  H100, bf16, 8 query heads on 2 kv
#: heads, D=64, CUDA-graph replays, SDPA in the same run (``results/logs/decode_gqa_mma*_h100.json``):
#: 65536 keys 0.0405 -> 0.0251 ms at batch 1 (0.64x -> 1.03x SDPA), 0.225 -> 0.107 ms at batch 8.
#: Without groups the products bought nothing (dense, 65536 keys: 62.4 against 63.2 us at batch 1,
#: 357.6 against 358.0 at batch 8) and cost 4-5% with lists (hash16 ∪ w256: 15.4 against 14.6 us,
#: 46.5 against 45.2): ``results/logs/decode_sweep_mma_h100.json``.  ``True``/``False``: always/never.
MMA_FOLD: bool | None = None
#: Load the cache's rows with the hint that they are read once (``eviction_policy="evict_first"``
#: on the pointer loads of K and V), so that they do not push other data out of L2.  H100, bf16,
#: H=8, D=64, same run (``results/logs/decode_tma*_evict*_h100.json``): hash16 ∪ w256 0.0457 ->
#: 0.0396 ms at 65536 keys, batch 8, and 0.0699 -> 0.0649 at 131072; dense with pointer loads
#: 62.3 -> 58.3 us at 65536 keys, batch 1; no change elsewhere beyond 1%.
EVICT_FIRST = True
#: Keys per block on CUDA: ``KEY_TILE // BLOCK_D`` (128 at D=64, 64 at D=128: the K and V tiles
#: stay in registers), at most ``MAX_BLOCK_N``.  128 instead of 64 at D=64: dense 0.144 -> 0.114 ms,
#: hash16 ∪ w256 0.17 -> 0.067 ms (H200, B=1, H=8, 131072 keys).  Warps per program:
#: ``NUM_WARPS``; software-pipelining stages of the key loop: ``NUM_STAGES`` (3, Triton's default, which
#: the kernel had before it was a setting).
KEY_TILE = 8192
MAX_BLOCK_N = 128
NUM_WARPS = 4
NUM_STAGES = 3


@triton.jit
def _decode_fold(acc, m_i, l_i, q, k, v, valid, qk_scale):
    """Fold one block of keys into a query's running softmax ``(acc, m, l)`` (``valid``: the
    block's allowed keys; the others may hold anything, even NaN: their scores are replaced
    by -inf and their values by 0)."""
    s = tl.sum(k.to(tl.float32) * q[None, :], 1) * qk_scale
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 0))
    # A split that has seen no allowed key keeps m = -inf: shift by 0, so it stays at 0, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_shift)
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 0)
    v = tl.where(valid[:, None], v.to(tl.float32), 0.0)
    acc = acc * alpha + tl.sum(p[:, None] * v, 0)
    return acc, m_new, l_i


@triton.jit
def _decode_fold_block(acc, m_i, l_i, q, q16, k, v, valid, qk_scale, ZERO_V: tl.constexpr, MMA: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """Fold one block of keys in: as elementwise sums (:func:`_decode_fold`), or with ``MMA`` as
    the two matrix products of the shared :func:`~sparseflash._steps.online_softmax_step`, the
    query being row 0 of ``q16`` ``(QROWS, D)`` (or the rows its group's query heads) and
    ``(acc, m, l)`` having a row each.  The arithmetic is wasted on the padding rows, but decoding
    is bound by memory, and loads that feed ``tl.dot`` are what Triton's software pipeliner
    multi-buffers (with ``num_stages``): the next blocks' index entries and rows are in flight
    while this one is folded.  ``ZERO_V``: zero the values of keys that are not ``valid`` first
    (a whole-box load may read rows past the cache length; masked pointer loads read them as 0;
    the sums zero them always)."""
    if MMA:
        if ZERO_V:
            v = tl.where(valid[:, None], v, 0.0)
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, q16, k, v, valid[None, :], qk_scale, True, DOT_PRECISION)
    else:
        acc, m_i, l_i = _decode_fold(acc, m_i, l_i, q, k, v, valid, qk_scale)
    return acc, m_i, l_i


@triton.jit
def _gather_rows(K, V, keys, mask, cols, sk_n, sv_n, EVICT: tl.constexpr):
    """The K and V rows ``keys`` of a block (where ``mask``, else 0), both loads issued before
    any arithmetic so that the two reads are in flight at once (``EVICT``: as rows read once,
    :data:`EVICT_FIRST`)."""
    if EVICT:
        k = tl.load(K + keys[:, None] * sk_n + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
        v = tl.load(V + keys[:, None] * sv_n + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
    else:
        k = tl.load(K + keys[:, None] * sk_n + cols[None, :], mask=mask, other=0.0)
        v = tl.load(V + keys[:, None] * sv_n + cols[None, :], mask=mask, other=0.0)
    return k, v


@triton.jit
def _decode_split_kernel(
    Q, K, V, KD, VD, LENS, IDX, NK, LIST, O, PM, PL, PACC,
    sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, s_len,
    si_b, si_h, si_g, si_l, snk_b, snk_h, snk_g, sl_b, sl_h, so_b, so_h,
    H, S, L, G, len_value, window, qk_scale,
    SPARSE: tl.constexpr, LISTS: tl.constexpr, LEN_TENSOR: tl.constexpr, SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
    DESC: tl.constexpr, MMA: tl.constexpr, DOT_PRECISION: tl.constexpr, GROUPED: tl.constexpr,
    QROWS: tl.constexpr, EVICT: tl.constexpr,
):
    """Program ``(b·H + h, s)``: the online softmax of query head ``h`` over split ``s`` of
    its keys, cut into ``SPLITS`` contiguous ranges of ``BLOCK_N``-key blocks.  ``GROUPED``
    (the products fold without a list, ``GROUP > 1``): program ``(b·Hkv + j, s)`` does the
    ``GROUP`` query heads of kv head ``j`` at once, rows of one ``(QROWS, D)`` product, so the
    cache is read once per kv head instead of once per query head.

    The keys are one virtual list: first the contiguous rows ``[win_start, cache_len)`` (the
    whole cache when dense without a window, the window tail with one, nothing when sparse
    without one), then the index-list entries below ``win_start``, so a row of the window that
    is listed too counts once.  A split's blocks of the first part are walked by one loop
    (with ``DESC``, each block's K and V come whole through the tensor descriptors ``KD``,
    ``VD`` of the cache: the copy engine fetches them; only without a list), those of the list
    by a second (its own rows gathered by index)."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    if GROUPED:  # bh = b·Hkv + hk; h is the group's first query head
        b = (bh // (H // GROUP)).to(tl.int64)
        hk = (bh % (H // GROUP)).to(tl.int64)
        h = hk * GROUP
    else:
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        hk = kv_head(h, GROUP)
    K += b * sk_b + hk * sk_h
    V += b * sv_b + hk * sv_h
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < HEAD_DIM

    if LEN_TENSOR:
        n_valid = tl.load(LENS + b * s_len).to(tl.int32)
        n_valid = tl.minimum(tl.maximum(n_valid, 0), S)
    else:  # an int, checked on the host to lie in [0, S]
        n_valid = len_value
    # Start of the contiguous part: window > 0: the tail; else the whole cache (dense) or none (sparse).
    if SPARSE:
        win_start = tl.where(window > 0, tl.maximum(n_valid - window, 0), n_valid)
        if LISTS:  # the list of kv head hk chosen by this query head
            lst = tl.load(LIST + b * sl_b + h * sl_h).to(tl.int64)
            lst_ok = (lst >= 0) & (lst < G)
            lst = tl.where(lst_ok, lst, 0)
            IDX += b * si_b + hk * si_h + lst * si_g
            n = tl.load(NK + b * snk_b + hk * snk_h + lst * snk_g).to(tl.int32)
            n = tl.where(lst_ok, n, 0)  # an unknown list id selects no list
        else:
            IDX += b * si_b + h * si_h
            n = tl.load(NK + b * snk_b + h * snk_h).to(tl.int32)
        n = tl.minimum(tl.maximum(n, 0), L)
    else:
        win_start = tl.where(window > 0, tl.maximum(n_valid - window, 0), 0)
        n = 0
    n_win = n_valid - win_start
    n_win_blocks = tl.cdiv(n_win, BLOCK_N)
    n_blocks = n_win_blocks + tl.cdiv(n, BLOCK_N)
    # Split s walks cdiv(n, SPLITS) blocks from s·cdiv(n, SPLITS); the last splits may get fewer or
    # none.  Spreading the blocks evenly instead (floor or one more each) keeps the longest split as
    # long, and in an A/B on an H100 it made the hash ∪ window rows 3-8% slower (14.9 against 14.4 µs
    # at 64k keys, batch 1; 44.0 against 40.5 at batch 8): the idle splits end at once.
    per_split = tl.cdiv(n_blocks, SPLITS)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n_blocks)

    q = tl.load(Q + b * sq_b + h * sq_h + cols, mask=col_ok, other=0.0).to(tl.float32)
    if MMA:  # the query as row 0 of QROWS (see _decode_fold_block), or the group's queries; the cache's dtype
        rows = tl.arange(0, QROWS)
        r0 = rows == 0
        if GROUPED:
            in_group = rows < GROUP
            q16 = tl.load(Q + b * sq_b + (h + rows)[:, None] * sq_h + cols[None, :],
                          mask=in_group[:, None] & col_ok[None, :], other=0.0).to(K.dtype.element_ty)
        else:
            q16 = tl.where(r0[:, None], q[None, :], 0.0).to(K.dtype.element_ty)
        m_i = tl.full([QROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([QROWS], tl.float32)
        acc = tl.zeros([QROWS, BLOCK_D], tl.float32)
    else:
        q16 = q  # (unused: the sums fold reads q)
        # Running max, sum and output; m and l as scalar tensors (so that the loop carries tensors).
        m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)
        l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
        acc = tl.zeros([BLOCK_D], tl.float32)
    # Contiguous part: blocks [lo, min(hi, n_win_blocks)), rows win_start + offs.
    for block in range(lo, tl.minimum(hi, n_win_blocks)):
        offs = block * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = offs < n_win
        if DESC:  # rows past the cache read 0; rows in [cache_len, S) are masked by valid
            start = (win_start + block * BLOCK_N).to(tl.int32)
            k = KD.load([b.to(tl.int32), hk.to(tl.int32), start, 0]).reshape(BLOCK_N, BLOCK_D)
            v = VD.load([b.to(tl.int32), hk.to(tl.int32), start, 0]).reshape(BLOCK_N, BLOCK_D)
        else:
            k, v = _gather_rows(K, V, (win_start + offs).to(tl.int64), valid[:, None] & col_ok[None, :], cols,
                                sk_n, sv_n, EVICT)
        acc, m_i, l_i = _decode_fold_block(acc, m_i, l_i, q, q16, k, v, valid, qk_scale, DESC, MMA, DOT_PRECISION)
    if SPARSE:
        # List part: blocks [max(lo, n_win_blocks), hi), entries (block - n_win_blocks)·BLOCK_N + ...
        for block in range(tl.maximum(lo, n_win_blocks), hi):
            loffs = (block - n_win_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
            in_list = loffs < n
            keys = tl.load(IDX + loffs * si_l, mask=in_list, other=0).to(tl.int64)
            # out-of-range entries, and rows of the contiguous part, are never read
            valid = in_list & (keys >= 0) & (keys < win_start)
            k, v = _gather_rows(K, V, keys, valid[:, None] & col_ok[None, :], cols, sk_n, sv_n, EVICT)
            acc, m_i, l_i = _decode_fold_block(acc, m_i, l_i, q, q16, k, v, valid, qk_scale, False, MMA,
                                               DOT_PRECISION)

    if GROUPED:  # row r is query head h + r: write each of the group's rows
        heads = h + rows
        out_ok = in_group[:, None] & col_ok[None, :]
        if SPLITS == 1:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(O + b * so_b + heads[:, None] * so_h + cols[None, :], out.to(O.dtype.element_ty), mask=out_ok)
        else:
            part = (b * H + heads) * SPLITS + split
            tl.store(PM + part, m_i, mask=in_group)
            tl.store(PL + part, l_i, mask=in_group)
            tl.store(PACC + part[:, None] * HEAD_DIM + cols[None, :], acc, mask=out_ok)
        return
    if MMA:  # row 0 holds the query's softmax state
        m_i = tl.max(tl.where(r0, m_i, float("-inf")), 0)
        l_i = tl.sum(tl.where(r0, l_i, 0.0), 0)
        acc = tl.sum(tl.where(r0[:, None], acc, 0.0), 0)
    if SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)
        tl.store(O + b * so_b + h * so_h + cols, out.to(O.dtype.element_ty), mask=col_ok)
    else:
        part = bh.to(tl.int64) * SPLITS + split
        tl.store(PM + part, m_i)
        tl.store(PL + part, l_i)
        tl.store(PACC + part * HEAD_DIM + cols, acc, mask=col_ok)


@triton.jit
def _decode_merge_kernel(PM, PL, PACC, O, H, so_b, so_h,
                         SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_S: tl.constexpr):
    """Program ``b·H + h``: merge the ``SPLITS`` partial softmaxes of one query by log-sum-exp."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    splits = tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    split_ok = splits < SPLITS
    col_ok = cols < HEAD_DIM
    part = bh.to(tl.int64) * SPLITS + splits
    m = tl.load(PM + part, mask=split_ok, other=float("-inf"))
    l = tl.load(PL + part, mask=split_ok, other=0.0)
    acc = tl.load(PACC + part[:, None] * HEAD_DIM + cols[None, :], mask=split_ok[:, None] & col_ok[None, :],
                  other=0.0)
    m_max = tl.max(m, 0)
    w = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # 0 for empty splits
    l_sum = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(l_sum == 0.0, 1.0, l_sum)
    tl.store(O + b * so_b + h * so_h + cols, out.to(O.dtype.element_ty), mask=col_ok)


# --------------------------------------------------------------------------------------
# Checks and the Python entry point
# --------------------------------------------------------------------------------------


def _check_int_tensor(name: str, t, shape: tuple, device) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be an integer torch.Tensor of shape {shape}, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, (bool, str)) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a number (default 1/sqrt(head_dim)), got {scale!r}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite number (default 1/sqrt(head_dim)), got {scale}")
    return float(scale)


def _use_descriptors(k_cache: Tensor, v_cache: Tensor) -> bool:
    """Whether the contiguous blocks are read through tensor descriptors (:data:`TMA`): the
    copy engine of a Hopper or newer GPU (or the interpreter, which emulates it), 2-byte
    elements, and what the engine requires of the cache: a 16-byte aligned start and strides."""
    if not TMA or _TensorDescriptor is None or k_cache.element_size() != 2:
        return False
    if k_cache.device.type == "cuda":
        if torch.cuda.get_device_capability(k_cache.device)[0] < 9:
            return False
    elif not _runtime.INTERPRET:
        return False
    return all(t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1])
               for t in (k_cache, v_cache))


def _descriptor(t: Tensor, block_n: int, block_d: int):
    """A tensor descriptor of the ``(B, Hkv, S, D)`` cache ``t`` that loads ``(1, 1, block_n,
    block_d)`` boxes (rows past ``S`` and columns past ``D`` read as 0)."""
    return _TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_n, block_d])


def default_num_splits(n_keys_max: int, n_queries: int, device: torch.device) -> int:
    """Splits per query: enough that each handles about ``KEYS_PER_SPLIT`` keys of the
    ``n_keys_max`` a query may have (the cache length, or the index lists' length), at most
    ``MAX_SPLITS``, and no more than needed to give every streaming multiprocessor about four
    programs (:data:`PROGRAMS_PER_SM`) when there are ``n_queries`` (B·H) queries.  1 on the
    CPU interpreter."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    splits = min(DEFAULT_MAX_SPLITS, _runtime.cdiv(n_keys_max, KEYS_PER_SPLIT),
                 _runtime.cdiv(PROGRAMS_PER_SM * sms, max(n_queries, 1)))
    return max(1, splits)


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_len,
    *,
    key_index: Tensor | None = None,
    n_keys: Tensor | None = None,
    list_id: Tensor | None = None,
    window: int = 0,
    scale: float | None = None,
    num_splits: int | None = None,
) -> Tensor:
    """Attention of one new query per sequence to a KV cache: dense, a sliding window, an
    index list, or the union of a window and an index list.

    Args:
        q: ``(B, H, 1, D)`` the new queries; float16, bfloat16 or float32; ``16 <= D <= 128``.
        k_cache, v_cache: ``(B, Hkv, S, D)`` in q's dtype, ``Hkv`` dividing ``H``
            (grouped-query attention: query head ``h`` reads kv head ``h // (H / Hkv)``).
            Any strides (the last dim is made contiguous if it is not); never copied
            otherwise, so views into a larger preallocated cache are fine.
        cache_len: the number of valid cache rows, an int in ``[0, S]`` or an integer
            tensor ``(B,)`` (one per sequence, on q's device; values are clamped to
            ``[0, S]`` on the device, never read back).  The query attends to rows
            ``[0, cache_len)``, its own key (already appended) included.
        key_index: optional integer tensor of cache rows; the query attends only to the rows
            listed (and the window, below).  Either ``(B, H, L)``: one list per query head; or
            ``(B, Hkv, G, L)``: ``G`` lists per kv head, of which query head ``h`` reads list
            ``list_id[b, h]`` of its kv head (e.g. one list per hash bucket, so that no
            per-head list is ever copied out).  Entries past ``n_keys`` are ignored, and so
            are rows outside ``[0, cache_len)`` (so ``-1`` may pad); a row listed twice counts
            twice.  The work is proportional to ``n_keys``, not to ``S``.
        n_keys: optional integer tensor, the number of valid leading entries of each list
            (clamped to ``[0, L]``): ``(B, H)`` or ``(B, Hkv, G)``; default ``L``.  Only with
            ``key_index``.
        list_id: ``(B, H)`` integer tensor, required with a 4-D ``key_index`` (and only then):
            the list each query head reads; an id outside ``[0, G)`` selects no list.
        window: ``W >= 0``.  ``W > 0``: the query also attends to the ``W`` most recent rows
            ``[cache_len - W, cache_len)`` (read as a contiguous range, no index needed);
            without ``key_index`` only to those (sliding-window attention); with it, listed
            rows inside that range are skipped, so the union "window ∪ list" counts each
            row once when the list holds distinct rows.  ``0`` (default): no window (every
            valid row without ``key_index``, the listed rows with it).
        scale: score scale, default ``1/sqrt(D)``.
        num_splits: key ranges per query, computed in parallel and merged by log-sum-exp
            (see the module docstring); default :func:`default_num_splits`.

    Returns:
        ``(B, H, 1, D)`` in q's dtype (accumulated in float32); 0 for a query with no
        allowed key.  Forward only (no gradient).
    """
    _runtime.check_qkv(q, k_cache, v_cache)
    B, H, n_q, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    if n_q != 1:
        raise ValueError(f"q must hold one query per sequence, shape (batch, heads, 1, head_dim), got {tuple(q.shape)}")
    scale = _check_scale(scale, D)
    window = _runtime.check_window(window)

    if isinstance(cache_len, Tensor):  # (checked before as_int, which would read a tensor back)
        if cache_len.dim() == 0:
            cache_len = cache_len.reshape(1).expand(B)
        _check_int_tensor("cache_len", cache_len, (B,), q.device)
        len_value = 0
    else:
        len_value = _runtime.as_int(cache_len)
        if len_value is None:
            raise ValueError(f"cache_len must be an int or an integer tensor of shape ({B},), got {cache_len!r}")
        if not 0 <= len_value <= S:
            raise ValueError(f"cache_len must be in [0, S] = [0, {S}] (S: the cache's rows), got {len_value}")

    sparse = key_index is not None
    lists = sparse and isinstance(key_index, Tensor) and key_index.dim() == 4
    G = 1
    if sparse:
        if not isinstance(key_index, Tensor) or key_index.dim() not in (3, 4):
            got = tuple(key_index.shape) if isinstance(key_index, Tensor) else type(key_index).__name__
            raise ValueError(f"key_index must be an integer tensor of shape (B, H, L) = ({B}, {H}, L) or "
                             f"(B, Hkv, G, L) = ({B}, {Hkv}, G, L), got {got}")
        L = key_index.shape[-1]
        if lists:
            G = key_index.shape[2]
            _check_int_tensor("key_index", key_index, (B, Hkv, G, L), q.device)
            if list_id is None:
                raise ValueError(f"a 4-D key_index (B, Hkv, G, L) needs list_id, a ({B}, {H}) integer tensor "
                                 "naming the list each query head reads")
            _check_int_tensor("list_id", list_id, (B, H), q.device)
            count_shape = (B, Hkv, G)
        else:
            _check_int_tensor("key_index", key_index, (B, H, L), q.device)
            if list_id is not None:
                raise ValueError("list_id picks one of G lists per kv head: pass it with a 4-D key_index "
                                 "(B, Hkv, G, L), not with a (B, H, L) one")
            count_shape = (B, H)
        if n_keys is None:
            n_keys = torch.full(count_shape, L, dtype=torch.int32, device=q.device)
        _check_int_tensor("n_keys", n_keys, count_shape, q.device)
        n_max = L + window
    elif n_keys is not None or list_id is not None:
        raise ValueError("n_keys and list_id describe key_index: pass them with key_index")
    else:
        L, n_max = 0, (min(S, window) if window else S)

    # The products fold reads a kv head's cache once for its whole group of query heads (not with
    # lists: each query head walks its own).
    mma = (not sparse and H > Hkv) if MMA_FOLD is None else MMA_FOLD
    grouped = mma and not sparse and H > Hkv
    programs = B * (Hkv if grouped else H)  # (one per query head, or per kv head when grouped)
    if num_splits is None:
        num_splits = default_num_splits(n_max, programs, q.device)
    else:
        value = _runtime.as_int(num_splits)
        if value is None or not 1 <= value <= MAX_SPLITS:
            raise ValueError(f"num_splits must be an int in [1, {MAX_SPLITS}], got {num_splits!r}")
        num_splits = value

    k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (k_cache, v_cache))
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = _runtime.new_output((B, H, 1, D), q.dtype, q.device)
    if num_splits > 1:
        part_m = _runtime.new_output((B * H, num_splits), torch.float32, q.device)
        part_l = _runtime.new_output((B * H, num_splits), torch.float32, q.device)
        part_acc = _runtime.new_output((B * H, num_splits, D), torch.float32, q.device)
    else:  # never touched: the kernel writes the output itself
        part_m = part_l = part_acc = out
    lens = cache_len if isinstance(cache_len, Tensor) else q
    idx = key_index if sparse else q
    nk = n_keys if sparse else q
    lid = list_id if lists else q
    if sparse:  # strides of (batch, head, list, entry); a 3-D list has no list dim
        si = (idx.stride(0), idx.stride(1), idx.stride(2) if lists else 0, idx.stride(-1))
        snk = (nk.stride(0), nk.stride(1), nk.stride(2) if lists else 0)
    else:
        si, snk = (0, 0, 0, 0), (0, 0, 0)
    sl = (lid.stride(0), lid.stride(1)) if lists else (0, 0)
    block_d = max(16, _runtime.next_power_of_2(D))
    block_n = max(16, min(MAX_BLOCK_N, KEY_TILE // block_d)) if q.device.type == "cuda" else 16
    n_blocks = programs * _runtime.cdiv(n_max, block_n)  # at most, all rows together
    desc = not sparse and n_blocks >= DESC_MIN_BLOCKS and _use_descriptors(k_cache, v_cache)
    kd, vd = ((_descriptor(k_cache, block_n, block_d), _descriptor(v_cache, block_n, block_d)) if desc
              else (k_cache, v_cache))
    launch(_decode_split_kernel, (programs, num_splits),
        q, k_cache, v_cache, kd, vd, lens, idx, nk, lid, out, part_m, part_l, part_acc,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        lens.stride(0) if isinstance(cache_len, Tensor) else 0,
        *si, *snk, *sl,
        out.stride(0), out.stride(1),
        H, S, L, G, len_value, window, scale * LOG2E,
        SPARSE=sparse, LISTS=lists, LEN_TENSOR=isinstance(cache_len, Tensor), SPLITS=num_splits, HEAD_DIM=D,
        BLOCK_D=block_d, BLOCK_N=block_n, GROUP=H // Hkv, DESC=desc, MMA=mma, EVICT=EVICT_FIRST,
        DOT_PRECISION=dot_precision(q.dtype), GROUPED=grouped, QROWS=max(16, _runtime.next_power_of_2(H // Hkv)),
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    if num_splits > 1:
        launch(_decode_merge_kernel, (B * H,),
            part_m, part_l, part_acc, out, H, out.stride(0), out.stride(1),
            SPLITS=num_splits, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_S=_runtime.next_power_of_2(num_splits),
            num_warps=4 if num_splits <= 64 else 8,
        )
    return out
