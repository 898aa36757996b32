"""The permuted-layout engine (sparseflash.permuted): layouts, tile tables, the
low-level ``permuted_attention`` entry, and the tiles the kernels really visit."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import GRAD_TOL, TOL, assert_close, rounding_floor
from helpers import err as _err

from sparseflash import hash_sparse_attention, permuted_attention, qk_sparse_attention, topk_keep
from sparseflash import reference as ref
from sparseflash.permuted import (
    INT32_MAX,
    TileStats,
    bucket_sort_layout,
    compact_layout,
    gather_tokens,
    scatter_tokens,
    tile_tables,
)
from sparseflash.tiles import TileRecord

SMALL = dict(BLOCK_M=16, BLOCK_N=16)
BLOCKS = [(16, 16), (16, 32), (32, 16), (32, 32)]


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _slot_mask(q_pos, k_pos, q_buckets=None, k_buckets=None):
    """(B, H, Nq, Nk) allowed pairs of a layout, straight from permuted_attention's docstring."""
    qp, kp = q_pos.long()[..., :, None], k_pos.long()[..., None, :]
    ok = (kp >= 0) & (qp >= 0) & (kp <= qp)
    if q_buckets is not None:
        ok &= q_buckets.long()[..., :, None] == k_buckets.long()[..., None, :]
    return ok


def _random_positions(B, H, n, n_real, spread):
    """Ascending positions (gaps, sometimes repeats) for the first ``n_real[b][h]`` slots, then -1."""
    pos = torch.full((B, H, n), -1, dtype=torch.long)
    for b in range(B):
        for h in range(H):
            r = n_real[b][h]
            pos[b, h, :r] = torch.randint(0, spread, (r,)).sort().values
    return pos


def _random_bucket_layout(B, H, n, n_real, n_buckets, spread):
    """Slots sorted by bucket, then position; the first ``n_real[b][h]`` real, then padding."""
    pos = torch.full((B, H, n), -1, dtype=torch.long)
    buckets = torch.randint(0, n_buckets, (B, H, n))  # padding slots get arbitrary ids
    for b in range(B):
        for h in range(H):
            r = n_real[b][h]
            p = torch.randint(0, spread, (r,))
            bk = torch.randint(0, n_buckets, (r,))
            order = torch.argsort(bk * (spread + 1) + p)
            pos[b, h, :r], buckets[b, h, :r] = p[order], bk[order]
    return pos, buckets


def _check_attention(q_pos, k_pos, q_buckets=None, k_buckets=None, D=32, dtype=torch.float32, **kw):
    B, H, n_q = q_pos.shape
    n_k = k_pos.shape[-1]
    q = torch.randn(B, H, n_q, D).to(dtype).requires_grad_()
    k = torch.randn(B, H, n_k, D).to(dtype).requires_grad_()
    v = torch.randn(B, H, n_k, D).to(dtype).requires_grad_()
    do = torch.randn(B, H, n_q, D).to(dtype)
    out = permuted_attention(q, k, v, q_pos, k_pos, q_buckets, k_buckets, **kw)
    out.backward(do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    mask = _slot_mask(q_pos, k_pos, q_buckets, k_buckets)
    want = ref.attention(q64, k64, v64, mask, kw.get("sm_scale"))
    want.backward(do.double())
    got, want_all = (out, q.grad, k.grad, v.grad), (want, q64.grad, k64.grad, v64.grad)
    floor = rounding_floor(want_all, out, q, k, v, do, mask, kw.get("sm_scale"))
    assert_close(got, want_all, TOL[dtype], GRAD_TOL[dtype], floor=floor)
    # slots with nothing to attend to (padding included) give exact zeros
    empty = ~mask.any(-1)
    assert (out[empty] == 0).all() and (q.grad[empty] == 0).all()
    unseen = ~mask.any(-2)
    assert (k.grad[unseen] == 0).all() and (v.grad[unseen] == 0).all()
    return out


# ---------------------------------------------------------------------------
# permuted_attention on hand-built layouts
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("blocks", BLOCKS)
def test_compacted_layout(seed, blocks):
    """Compacted layouts: different real counts per (batch, head), Nq != Nk, positions with gaps."""
    B, H, n_q, n_k = 2, 2, 70, 45
    q_pos = _random_positions(B, H, n_q, [[70, 33], [5, 0]], spread=300)
    k_pos = _random_positions(B, H, n_k, [[40, 45], [1, 20]], spread=300)
    _check_attention(q_pos, k_pos, kernel_options=dict(BLOCK_M=blocks[0], BLOCK_N=blocks[1]))


def test_compacted_layout_from_compact_layout(seed):
    """The layout qk_sparse_attention builds, handed to permuted_attention directly."""
    B, H, N, D = 1, 2, 90, 32
    q_keep, k_keep = torch.rand(B, H, N) < 0.4, torch.rand(B, H, N) < 0.6
    q_index, q_pos = compact_layout(q_keep)
    k_index, k_pos = compact_layout(k_keep)
    assert q_pos.dtype == torch.int32
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    slots = permuted_attention(gather_tokens(q, q_index), gather_tokens(k, k_index), gather_tokens(v, k_index),
                               q_pos, k_pos, kernel_options=SMALL)
    out = scatter_tokens(slots, q_index)
    assert _err(out, ref.attention(q, k, v, ref.qk_dropping_mask(q_keep, k_keep))) <= 1e-3
    assert _err(out, qk_sparse_attention(q, k, v, q_keep, k_keep, kernel_options=SMALL)) <= 1e-6


def test_repeated_positions(seed):
    """Positions need only be non-decreasing: equal positions see each other."""
    q_pos = torch.tensor([[[0, 0, 0, 3, 3, 7, 7, 7, 9, -1, -1]]])
    k_pos = torch.tensor([[[0, 0, 2, 3, 3, 3, 8, 9, 9, 9, 9, 9, -1]]], dtype=torch.int32)
    _check_attention(q_pos, k_pos, D=16)


def test_all_padding(seed):
    q_pos = torch.full((1, 2, 20), -1)
    k_pos = _random_positions(1, 2, 30, [[30, 10]], spread=50)
    out = _check_attention(q_pos, k_pos, D=16)
    assert (out == 0).all()
    _check_attention(k_pos[..., :20], torch.full((1, 2, 30), -1), D=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocks", [(16, 16), (32, 16)])
def test_bucket_layout(seed, blocks, dtype):
    """Bucket-sorted layouts with padding at the end, Nq != Nk."""
    B, H, n_q, n_k = 2, 2, 80, 50
    q_pos, q_b = _random_bucket_layout(B, H, n_q, [[80, 60], [13, 0]], n_buckets=4, spread=80)
    k_pos, k_b = _random_bucket_layout(B, H, n_k, [[50, 25], [50, 9]], n_buckets=4, spread=80)
    _check_attention(q_pos, k_pos, q_b, k_b, dtype=dtype, kernel_options=dict(BLOCK_M=blocks[0], BLOCK_N=blocks[1]))


def test_bucket_layout_from_bucket_sort_layout(seed):
    B, H, N, D = 1, 2, 90, 32
    qb, kb = torch.randint(0, 5, (B, H, N)), torch.randint(0, 5, (B, H, N))
    q_index, q_pos, q_sorted = bucket_sort_layout(qb)
    k_index, k_pos, k_sorted = bucket_sort_layout(kb)
    assert torch.equal(q_sorted.long(), qb.gather(-1, q_index))
    assert torch.equal(q_pos.long(), q_index)
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    slots = permuted_attention(gather_tokens(q, q_index), gather_tokens(k, k_index), gather_tokens(v, k_index),
                               q_pos, k_pos, q_sorted, k_sorted, kernel_options=SMALL)
    out = scatter_tokens(slots, q_index)
    assert _err(out, ref.attention(q, k, v, ref.hash_mask(qb, kb))) <= 1e-3
    assert _err(out, hash_sparse_attention(q, k, v, qb, kb, kernel_options=SMALL)) <= 1e-6


def test_sm_scale(seed):
    q_pos = _random_positions(1, 2, 40, [[40, 30]], spread=60)
    k_pos = _random_positions(1, 2, 40, [[35, 40]], spread=60)
    _check_attention(q_pos, k_pos, sm_scale=0.3, kernel_options=SMALL)


def test_bucket_layout_positions_beyond_length(seed):
    """Positions are original positions: they may exceed the number of slots (as without buckets)."""
    q_pos = torch.tensor([[[5, 1000, 2, 40]]])
    buckets = torch.tensor([[[0, 0, 1, 1]]])
    _check_attention(q_pos, q_pos, buckets, buckets, D=16)


def test_positions_beyond_length_without_buckets(seed):
    q_pos = torch.tensor([[[5, 40, 1000, -1]]])
    k_pos = torch.tensor([[[2, 40, 41, 999, 5000]]])
    _check_attention(q_pos, k_pos, D=16)


# ---------------------------------------------------------------------------
# permuted_attention: bad input
# ---------------------------------------------------------------------------


def _qkv(n_q=8, n_k=8, D=16):
    return torch.randn(1, 1, n_q, D), torch.randn(1, 1, n_k, D), torch.randn(1, 1, n_k, D)


@pytest.mark.parametrize(
    "q_pos,k_pos",
    [
        ([0, 1, 2, 3, 5, 4, 6, 7], list(range(8))),  # unsorted q
        (list(range(8)), [0, 1, 2, 3, 4, 5, 7, 6]),  # unsorted k
        ([0, 5, 2, -1, 4, 5, 6, 7], list(range(8))),  # unsorted around padding
    ],
)
def test_unsorted_positions_raise_when_validated(q_pos, k_pos):
    """Unsorted positions break the tile plan; ``validate=True`` says so (one host sync)."""
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="ascend"):
        permuted_attention(q, k, v, torch.tensor(q_pos).view(1, 1, 8), torch.tensor(k_pos).view(1, 1, 8),
                           validate=True)


@pytest.mark.parametrize("side", ["q", "k"])
def test_positions_beyond_int32_raise_when_validated(side):
    """Positions are compared as int32 (2**31 - 1 marks key padding): larger ones are refused."""
    q, k, v = _qkv()
    big = (torch.arange(8) + 2**31 - 5).view(1, 1, 8)
    pos = {"q": torch.arange(8).view(1, 1, 8), "k": torch.arange(8).view(1, 1, 8)}
    pos[side] = big
    with pytest.raises(ValueError, match=r"below 2\*\*31 - 1"):
        permuted_attention(q, k, v, pos["q"], pos["k"], validate=True)


def test_bucket_ids_checked_like_hash_sparse_attention():
    """``n_buckets`` must be a positive int; with ``validate``, ids must be in range (>= 0
    without ``n_buckets``), as in ``hash_sparse_attention``."""
    q, k, v = _qkv()
    pos = torch.arange(8).view(1, 1, 8)
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2]).view(1, 1, 8)
    with pytest.raises(ValueError, match="n_buckets must be a positive int"):
        permuted_attention(q, k, v, pos, pos, ids, ids, n_buckets=2.5)
    with pytest.raises(ValueError, match=">= 0"):
        permuted_attention(q, k, v, pos, pos, ids - 1, ids, validate=True)
    with pytest.raises(ValueError, match="n_buckets=2"):
        permuted_attention(q, k, v, pos, pos, ids, ids, n_buckets=2, validate=True)


@pytest.mark.parametrize(
    "q_pos,k_pos",
    [
        ([0, 1, 2, -1, 4, 5, 6, 7], list(range(8))),  # padding in the middle
        (list(range(8)), [-1, 1, 2, 3, 4, 5, 6, 7]),  # padding first
        ([0, 1, 2, -1, -1, 5, -1, -1], list(range(8))),
    ],
)
def test_padding_anywhere(seed, q_pos, k_pos):
    """Padding slots (position -1) may sit anywhere: the layout sets them aside."""
    _check_attention(torch.tensor(q_pos).view(1, 1, 8), torch.tensor(k_pos).view(1, 1, 8), D=16)


@pytest.mark.parametrize(
    "q_b,k_b,pos",
    [
        ([0, 0, 0, 0, 1, 1, 1, 1], [0] * 8, [0, 2, 1, 3, 0, 1, 2, 3]),  # positions unsorted inside a bucket
        ([1, 0, 1, 0, 1, 0, 1, 0], [0] * 8, [3, 0, 1, 2, 2, 1, 0, 3]),  # interleaved, unsorted inside
    ],
)
def test_unsorted_buckets_raise(q_b, k_b, pos):
    q, k, v = _qkv()
    pos = torch.tensor(pos).view(1, 1, 8)
    k_pos = torch.arange(8).view(1, 1, 8)
    with pytest.raises(ValueError, match="ascend"):
        permuted_attention(q, k, v, pos, k_pos, torch.tensor(q_b).view(1, 1, 8), torch.tensor(k_b).view(1, 1, 8),
                           validate=True)


@pytest.mark.parametrize(
    "q_b,k_b,pos",
    [
        ([0, 0, 1, 1, 0, 2, 2, 2], [0] * 8, [0, 1, 0, 1, 2, 0, 1, 2]),  # buckets interleaved, sorted inside each
        ([0] * 8, [1, 1, 1, 1, 0, 0, 0, 0], list(range(8))),  # k buckets descending
    ],
)
def test_buckets_need_not_be_sorted(seed, q_b, k_b, pos):
    """Only positions must ascend inside each bucket; the buckets may come in any order."""
    _check_attention(torch.tensor(pos).view(1, 1, 8), torch.arange(8).view(1, 1, 8),
                     torch.tensor(q_b).view(1, 1, 8), torch.tensor(k_b).view(1, 1, 8), D=16)


def test_bad_metadata_raise():
    q, k, v = _qkv(8, 10)
    qp, kp = torch.arange(8).view(1, 1, 8), torch.arange(10).view(1, 1, 10)
    qb, kb = torch.zeros_like(qp), torch.zeros_like(kp)
    cases = [
        dict(q_pos=qp.float(), k_pos=kp),
        dict(q_pos=qp, k_pos=kp.bool()),
        dict(q_pos=kp, k_pos=kp),  # length of q_pos != Nq
        dict(q_pos=qp, k_pos=qp),  # length of k_pos != Nk
        dict(q_pos=qp.view(1, 8), k_pos=kp),
        dict(q_pos=qp, k_pos=kp, q_buckets=qb),  # only one of the buckets
        dict(q_pos=qp, k_pos=kp, k_buckets=kb),
        dict(q_pos=qp, k_pos=kp, q_buckets=qb.float(), k_buckets=kb),
        dict(q_pos=qp, k_pos=kp, q_buckets=qb, k_buckets=qb),  # wrong length
        dict(q_pos=qp.to("meta"), k_pos=kp),
        dict(q_pos=qp, k_pos=kp, q_buckets=qb, k_buckets=kb.to("meta")),
    ]
    for kw in cases:
        with pytest.raises(ValueError):
            permuted_attention(q, k, v, **kw)


# ---------------------------------------------------------------------------
# TileStats and tile_tables (no kernels)
# ---------------------------------------------------------------------------


def _layouts():
    """(name, q_pos, k_pos, q_buckets, k_buckets) for a spread of layouts, B=2, H=2."""
    out = []
    for N in (1, 15, 16, 17, 100, 257):
        for rate in (0.0, 0.05, 0.3, 0.7, 1.0):
            qi, qp = compact_layout(torch.rand(2, 2, N) < rate)
            ki, kp = compact_layout(torch.rand(2, 2, N) < rate)
            out.append((f"qk N={N} rate={rate}", qp, kp, None, None))
        for nb in (1, 3, 8, 300):
            _, qp, qs = bucket_sort_layout(torch.randint(0, nb, (2, 2, N)))
            _, kp, ks = bucket_sort_layout(torch.randint(0, nb, (2, 2, N)))
            out.append((f"hash N={N} n_buckets={nb}", qp, kp, qs, ks))
        b = torch.randint(0, 4, (2, 2, N))
        _, p, s = bucket_sort_layout(b)
        out.append((f"hash N={N} same", p, p, s, s))
    # hand-built, with padding and Nq != Nk
    qp = _random_positions(2, 2, 90, [[90, 41], [3, 0]], spread=200)
    kp = _random_positions(2, 2, 60, [[60, 17], [0, 33]], spread=200)
    out.append(("compacted Nq!=Nk", qp, kp, None, None))
    qp, qb = _random_bucket_layout(2, 2, 90, [[90, 41], [3, 0]], 5, 200)
    kp, kb = _random_bucket_layout(2, 2, 60, [[60, 17], [0, 33]], 5, 200)
    out.append(("bucketed Nq!=Nk with padding", qp, kp, qb, kb))
    return out


def _tile_allowed(q_pos, k_pos, q_buckets, k_buckets, bm, bn):
    """bool (B, H, n_qt, n_kt): tiles holding at least one allowed pair."""
    mask = _slot_mask(q_pos, k_pos, q_buckets, k_buckets)
    n_q, n_k = mask.shape[-2:]
    m = torch.nn.functional.pad(mask, (0, (-n_k) % bn, 0, (-n_q) % bm))
    return m.unflatten(-1, (-1, bn)).unflatten(-3, (-1, bm)).any(-1).any(-2)


@pytest.mark.parametrize("bm,bn", [(16, 16), (16, 32), (32, 16), (64, 16)])
def test_tile_tables_agree_with_visited(seed, bm, bn):
    for name, qp, kp, qb, kb in _layouts():
        stats = TileStats.of(qp, kp, qb, kb, bm, bn)
        visited = stats.visited()
        n_qt, n_kt = math.ceil(qp.shape[-1] / bm), math.ceil(kp.shape[-1] / bn)
        assert visited.shape == (*qp.shape[:2], n_qt, n_kt), name
        k_lo, k_hi, q_lo, q_hi = tile_tables(stats)
        for t in (k_lo, k_hi, q_lo, q_hi):
            assert t.dtype == torch.int32
        kt = torch.arange(n_kt)
        qt = torch.arange(n_qt)
        # query side: the run [k_lo, k_hi), filtered by kmin <= qmax, is the visited row
        in_run = (kt >= k_lo[..., :, None]) & (kt < k_hi[..., :, None])
        from_q = in_run & (stats.kmin[..., None, :] <= stats.qmax[..., :, None])
        assert torch.equal(from_q, visited), f"{name}: query-side runs disagree with visited()"
        # key side: the run [q_lo, q_hi), filtered by qmax >= kmin, is the visited column
        in_run = (qt[:, None] >= q_lo[..., None, :]) & (qt[:, None] < q_hi[..., None, :])
        from_k = in_run & (stats.qmax[..., :, None] >= stats.kmin[..., None, :])
        assert torch.equal(from_k, visited), f"{name}: key-side runs disagree with visited()"
        assert (k_lo <= k_hi).all() and (k_hi <= n_kt).all() and (k_lo >= 0).all()
        assert (q_lo <= q_hi).all() and (q_hi <= n_qt).all() and (q_lo >= 0).all()
        if qb is None:
            # without buckets positions ascend, so a run holds only visited tiles
            in_run_q = (kt >= k_lo[..., :, None]) & (kt < k_hi[..., :, None])
            in_run_k = (qt[:, None] >= q_lo[..., None, :]) & (qt[:, None] < q_hi[..., None, :])
            assert torch.equal(in_run_q, visited), f"{name}: query run holds unvisited tiles"
            assert torch.equal(in_run_k, visited), f"{name}: key run holds unvisited tiles"
        # sound: every tile holding an allowed pair is visited
        allowed = _tile_allowed(qp, kp, qb, kb, bm, bn)
        assert not (allowed & ~visited).any(), f"{name}: a tile with allowed pairs is skipped"


def test_tile_stats_values():
    q_pos = torch.tensor([[[0, 3, 5, 9, 12, -1, -1, -1, -1, -1]]])
    k_pos = torch.tensor([[[1, 2, 8, 20, -1, -1, -1]]])
    s = TileStats.of(q_pos, k_pos, None, None, 4, 2)
    assert s.qmax.tolist() == [[[9, 12, -1]]]
    assert s.kmin.tolist() == [[[1, 8, INT32_MAX, INT32_MAX]]]
    assert s.visited().tolist() == [[[[True, True, False, False], [True, True, False, False],
                                       [False, False, False, False]]]]


# ---------------------------------------------------------------------------
# What the kernels really visit (TileRecord)
# ---------------------------------------------------------------------------


def _assert_record(rec, kind):
    assert rec.kind == kind
    want = rec.plan.visited().int()
    for name in ("fwd", "bwd_kv", "bwd_q"):
        got = rec.maps[name]
        assert got.shape == want.shape, name
        assert int(got.max()) <= 1, f"{name}: a tile pair computed more than once"
        assert torch.equal(got, want), (f"{name}: {int((got > want).sum())} extra, "
                                        f"{int((got < want).sum())} missing tile pairs")


@pytest.mark.parametrize("blocks", [(16, 16), (16, 32), (32, 16)])
@pytest.mark.parametrize("rate", [0.05, 0.5, 1.0])
def test_record_qk(seed, blocks, rate):
    B, H, N, D = 2, 1, 130, 16  # two (batch, head) layouts: two batches here, two heads in test_record_hash
    q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
    q_keep, k_keep = torch.rand(B, H, N) < rate, torch.rand(B, H, N) < rate
    rec = TileRecord()
    qk_sparse_attention(q, k, v, q_keep, k_keep, kernel_options=dict(BLOCK_M=blocks[0], BLOCK_N=blocks[1]),
                        tile_record=rec).sum().backward()
    _assert_record(rec, "qk")
    assert rec.config["BLOCK_M"] == blocks[0] and rec.config["BLOCK_N"] == blocks[1]


@pytest.mark.parametrize("blocks", [(16, 16), (16, 32), (32, 16)])
@pytest.mark.parametrize("n_buckets", [1, 3, 16])
def test_record_hash(seed, blocks, n_buckets):
    B, H, N, D = 1, 2, 130, 16  # two (batch, head) layouts: two heads here, two batches in test_record_qk
    q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
    qb, kb = torch.randint(0, n_buckets, (B, H, N)), torch.randint(0, n_buckets, (B, H, N))
    rec = TileRecord()
    hash_sparse_attention(q, k, v, qb, kb, n_buckets=n_buckets, kernel_options=dict(BLOCK_M=blocks[0],
                          BLOCK_N=blocks[1]), tile_record=rec).sum().backward()
    _assert_record(rec, "hash")


def test_record_permuted(seed):
    qp, qb = _random_bucket_layout(1, 2, 70, [[70, 23]], 3, 70)
    kp, kb = _random_bucket_layout(1, 2, 50, [[41, 50]], 3, 70)
    q = torch.randn(1, 2, 70, 16, requires_grad=True)
    k, v = (torch.randn(1, 2, 50, 16, requires_grad=True) for _ in range(2))
    rec = TileRecord()
    permuted_attention(q, k, v, qp, kp, qb, kb, kernel_options=SMALL, tile_record=rec).sum().backward()
    _assert_record(rec, "permuted")
    rec = TileRecord()
    qp = _random_positions(1, 2, 70, [[70, 9]], 100)
    kp = _random_positions(1, 2, 50, [[50, 31]], 100)
    permuted_attention(q, k, v, qp, kp, kernel_options=dict(BLOCK_M=32, BLOCK_N=16),
                       tile_record=rec).sum().backward()
    _assert_record(rec, "permuted")


def _causal_tiles(N, block):
    n = math.ceil(N / block)
    return n * (n + 1) // 2


@pytest.mark.parametrize("same", [False, True])
def test_hash_skips_tiles(seed, same):
    """8 balanced buckets, N=256, 16×16 tiles: well under half the causal tiles are visited."""
    B, H, N, D = 1, 2, 256, 16
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    qb = torch.randint(0, 8, (B, H, N))
    kb = qb if same else torch.randint(0, 8, (B, H, N))
    rec = TileRecord()
    hash_sparse_attention(q, k, v, qb, kb, kernel_options=SMALL, tile_record=rec)
    fraction = rec.fwd.sum().item() / (B * H * _causal_tiles(N, 16))
    assert torch.equal(rec.fwd, rec.plan.visited().int())
    assert fraction < 0.5, f"visited {fraction:.3f} of the causal tiles"


def test_qk_skips_tiles(seed):
    """Keep 30% of queries and keys: visited tiles <= (0.3 + slack)² of the causal tiles."""
    B, H, N, D, rate = 1, 2, 256, 16, 0.3
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    q_keep = topk_keep(torch.randn(B, H, N), rate)
    k_keep = topk_keep(torch.randn(B, H, N), rate)
    rec = TileRecord()
    qk_sparse_attention(q, k, v, q_keep, k_keep, kernel_options=SMALL, tile_record=rec)
    fraction = rec.fwd.sum().item() / (B * H * _causal_tiles(N, 16))
    assert torch.equal(rec.fwd, rec.plan.visited().int())
    assert fraction <= (rate + 0.1) ** 2, f"visited {fraction:.3f} of the causal tiles"
