"""Predicted tile schedules (sparseflash.tiles) against the tiles the kernels record.

Every kernel (dense causal and not, query/key dropping, hash buckets) runs forward and
backward through Triton's interpreter on random patterns with a ``TileRecord``; each of
the three passes must compute exactly the predicted tiles, each once.
"""
from __future__ import annotations

import math

import pytest
import torch

import sparseflash
from sparseflash.layout import DEFAULT_BUCKETS, layout_length
from sparseflash import reference, tiles
from sparseflash.tiles import EMPTY, FULL, PARTIAL, SKIPPED, TileRecord

PASSES = ("fwd", "bwd_kv", "bwd_q")
D = 16


def _qkv(B, H, N, M=None):
    M = N if M is None else M
    q = torch.randn(B, H, N, D, requires_grad=True)
    k = torch.randn(B, H, M, D, requires_grad=True)
    v = torch.randn(B, H, M, D, requires_grad=True)
    return q, k, v


def _run(fn, q, k, v, **kw):
    rec = TileRecord()
    out = fn(q, k, v, tile_record=rec, **kw)
    out.backward(torch.randn_like(out))
    return rec


def _assert_record_matches(rec: TileRecord, sched: tiles.TileSchedule, kind: str, bm: int, bn: int):
    assert rec.kind == kind
    assert (rec.config["BLOCK_M"], rec.config["BLOCK_N"]) == (sched.block_m, sched.block_n) == (bm, bn)
    expected = sched.computed.int()
    for name in PASSES:
        got = rec.maps[name]
        assert got.shape == expected.shape, (name, got.shape, expected.shape)
        diff = (got != expected).nonzero().tolist()
        assert not diff, f"{kind} pass {name}: recorded != predicted at (b, h, q_tile, k_tile) {diff[:10]}"


# ---- the kernels compute exactly the predicted tiles, each pass each tile once ----

@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_q, n_k, bm, bn", [(200, 200, 32, 16), (77, 77, 16, 32), (64, 150, 16, 16)])
def test_flash_record_matches_schedule(seed, causal, n_q, n_k, bm, bn):
    if causal and n_q != n_k:
        n_k = n_q  # keep the causal case square, as in language models; rectangular below
    q, k, v = _qkv(1, 2, n_q, n_k)
    rec = _run(sparseflash.flash_attention, q, k, v, causal=causal, kernel_options=dict(BLOCK_M=bm, BLOCK_N=bn))
    sched = tiles.flash_schedule(n_q, n_k, causal, bm, bn, batch=1, heads=2)
    _assert_record_matches(rec, sched, "flash", bm, bn)


def test_flash_rectangular_causal_record_matches_schedule(seed):
    # More keys than queries (queries at positions 0..n_q-1, as in the kernel).
    q, k, v = _qkv(1, 1, 48, 100)
    rec = _run(sparseflash.flash_attention, q, k, v, causal=True, kernel_options=dict(BLOCK_M=16, BLOCK_N=32))
    _assert_record_matches(rec, tiles.flash_schedule(48, 100, True, 16, 32), "flash", 16, 32)


@pytest.mark.parametrize("N, bm, bn, rate", [(200, 32, 16, 0.5), (130, 16, 32, 0.3), (96, 16, 16, 0.9)])
def test_qk_record_matches_schedule(seed, N, bm, bn, rate):
    B, H = 2, 2
    q_keep = torch.rand(B, H, N) < rate
    k_keep = torch.rand(B, H, N) < rate
    q_keep[0, 1] = False          # a head that keeps no query
    k_keep[1, 0, : N // 2] = False  # a head whose keys start late
    q, k, v = _qkv(B, H, N)
    rec = _run(sparseflash.qk_sparse_attention, q, k, v, q_keep=q_keep, k_keep=k_keep,
               kernel_options=dict(BLOCK_M=bm, BLOCK_N=bn))
    sched = tiles.qk_schedule(q_keep, k_keep, bm, bn)
    _assert_record_matches(rec, sched, "qk", bm, bn)
    # The kernels' layout is the schedule's (built there in plain PyTorch).
    assert torch.equal(rec.layouts[0].pos, sched.q_pos) and torch.equal(rec.layouts[0].index.long(), sched.q_index)


@pytest.mark.parametrize("N, bm, bn, n_buckets", [(200, 16, 16, 4), (150, 32, 16, 3), (100, 16, 32, None)])
def test_hash_record_matches_schedule(seed, N, bm, bn, n_buckets):
    """``n_buckets=None``: the default call (fast ids ``[0, 64)``), with ids beyond that range
    mixed in, which share the overflow run (all its causal tiles computed, masked)."""
    B, H = 1, 3
    q_buckets = torch.randint(0, n_buckets or 8, (B, H, N))
    k_buckets = torch.randint(0, n_buckets or 8, (B, H, N))
    if n_buckets is None:
        q_buckets[0, :2, ::3], k_buckets[0, :2, ::4], k_buckets[0, 1, 1::5] = 10**12, 10**12, -1
    k_buckets[0, 2] = q_buckets[0, 2]  # a head where queries and keys share buckets
    q, k, v = _qkv(B, H, N)
    rec = _run(sparseflash.hash_sparse_attention, q, k, v, q_buckets=q_buckets, k_buckets=k_buckets,
               n_buckets=n_buckets, kernel_options=dict(BLOCK_M=bm, BLOCK_N=bn))
    sched = tiles.hash_schedule(q_buckets, k_buckets, bm, bn, n_buckets=n_buckets or DEFAULT_BUCKETS)
    _assert_record_matches(rec, sched, "hash", bm, bn)
    ql = rec.layouts[0]  # the overflow run holds exactly the queries outside the fast range
    assert ql.overflow and torch.equal(ql.count[..., -1], ((q_buckets < 0) | (q_buckets >= ql.n_buckets - 1)).sum(-1))


# ---- no tile holding an allowed pair is skipped; states agree with the mask ----

def _random_schedules(seed_value):
    g = torch.Generator().manual_seed(seed_value)
    out = []
    for N, bm, bn in [(200, 16, 16), (97, 32, 16), (64, 16, 32)]:
        out.append(tiles.flash_schedule(N, N, True, bm, bn))
        out.append(tiles.flash_schedule(N, N + 13, False, bm, bn))
        for rate in (0.1, 0.5, 1.0):
            out.append(tiles.qk_schedule(torch.rand(2, 2, N, generator=g) < rate,
                                         torch.rand(2, 2, N, generator=g) < rate, bm, bn))
        for nb in (1, 2, 5, 16):
            out.append(tiles.hash_schedule(torch.randint(0, nb, (2, 2, N), generator=g),
                                           torch.randint(0, nb, (2, 2, N), generator=g), bm, bn))
    return out


def test_no_tile_with_an_allowed_pair_is_skipped(seed):
    for sched in _random_schedules(seed):
        has_pair = sched.allowed_count > 0
        assert bool(torch.isin(sched.state[has_pair], torch.tensor([PARTIAL, FULL], dtype=torch.int8)).all())
        assert not bool(sched.wrongly_skipped.any())
        # allowed pairs per tile: as counted from the token-level mask in layout order
        assert torch.equal(sched.allowed_count.expand_as(sched.state),
                           tiles._tile_counts(sched.layout_mask(), sched.block_m, sched.block_n))
        assert torch.equal(sched.allowed_count.sum((-2, -1)), sched.mask.sum((-2, -1)).int())


def test_states_match_the_mask_tile_by_tile(seed):
    for sched in _random_schedules(seed):
        lay = sched.layout_mask()
        n_qt, n_kt = sched.n_tiles
        bm, bn = sched.block_m, sched.block_n
        for t in range(n_qt):  # a loop here on purpose: an independent check of the vectorised code
            for s in range(n_kt):
                block = lay[..., t * bm:(t + 1) * bm, s * bn:(s + 1) * bn]
                n_allowed = block.sum((-2, -1))
                state = sched.state[..., t, s]
                computed = state != SKIPPED
                assert torch.equal(state == EMPTY, computed & (n_allowed == 0))
                assert torch.equal(state == FULL, computed & (n_allowed == bm * bn))
                assert torch.equal(state == PARTIAL, computed & (n_allowed > 0) & (n_allowed < bm * bn))


def test_layout_maps_back_to_original_coordinates(seed):
    for sched in _random_schedules(seed)[:8]:
        b = h = 0
        lay = sched.layout_mask()[b, h]
        qi, ki = sched.q_index[b, h], sched.k_index[b, h]
        real_q, real_k = sched.q_pos[b, h] >= 0, sched.k_pos[b, h] >= 0
        # padding slots hold no token (index n); they never hold an allowed pair
        qi_, ki_ = qi.clamp(max=sched.n_q - 1), ki.clamp(max=sched.n_k - 1)
        assert torch.equal(lay, sched.mask[b, h][qi_][:, ki_] & real_q[:, None] & real_k[None, :])
        assert torch.equal(sched.q_pos[b, h][real_q].long(), qi[real_q])
        # every allowed original pair falls in a computed tile
        pair_state = sched.state_of_pairs(b, h)
        assert pair_state.shape == sched.mask.shape[-2:]
        assert bool((pair_state[sched.mask[b, h]] != SKIPPED).all())


# ---- numbers ----

def test_dense_fractions():
    s = tiles.flash_schedule(256, block_m=32)
    assert s.state.dtype == torch.int8 and s.state.shape == (1, 1, 8, 8)
    assert s.computed_fraction == 1.0 and s.ideal_speedup == 1.0
    assert s.grid_fraction == pytest.approx(36 / 64)
    assert s.counts() == {"skipped": 28, "computed, partly masked": 8, "computed, no pair masked": 28,
                          "computed, every pair masked": 0}
    assert tiles.flash_schedule(4096, block_m=64).grid_fraction == pytest.approx(0.5, abs=0.01)
    nc = tiles.flash_schedule(256, causal=False, block_m=32)
    assert nc.computed_fraction == pytest.approx(64 / 36) and bool(nc.computed.all())
    assert tiles.dense_causal_tile_count(100, 100, 32, 16) == int(tiles.flash_schedule(100, 100, True, 32, 16)
                                                                  .computed.sum())


def test_sparse_fractions_follow_the_sparsity():
    g = torch.Generator().manual_seed(0)
    N = 2048
    for r in (0.25, 0.5):
        s = tiles.qk_schedule(torch.rand(1, 2, N, generator=g) < r, torch.rand(1, 2, N, generator=g) < r, 64, 64)
        assert 0.9 * r * r <= s.computed_fraction <= 1.5 * r * r  # r² plus the tiles on the diagonal
        assert s.ideal_speedup == pytest.approx(1 / s.computed_fraction)
    s = tiles.hash_schedule(torch.randint(0, 8, (1, 2, N), generator=g), torch.randint(0, 8, (1, 2, N), generator=g),
                            64, 64)
    assert 1 / 8 <= s.computed_fraction < 0.25  # 1/8 plus each bucket's diagonal tiles
    assert s.counts()["computed, every pair masked"] == 0  # buckets start on tile boundaries: no tile straddles two
    empty = tiles.qk_schedule(torch.zeros(1, 1, 64, dtype=torch.bool), torch.ones(1, 1, 64, dtype=torch.bool), 16, 16)
    assert empty.computed_fraction == 0 and math.isinf(empty.ideal_speedup)


def test_input_shapes_and_examples():
    s = tiles.qk_schedule(torch.rand(50) < 0.5, torch.rand(50) < 0.5, 16)
    assert s.state.shape == (1, 1, 5, 5) and s.block_n == 16  # 50 tokens + up to 15 padding slots
    qb, kb = torch.randint(0, 3, (2, 50)), torch.randint(0, 3, (2, 50))
    s = tiles.hash_schedule(qb, kb, 16, 32)
    nb = int(max(qb.max(), kb.max())) + 1  # e.g. layout_length(50, 3, 16) = 96 slots, (50, 3, 32) = 128
    assert s.state.shape == (1, 2, layout_length(50, nb, 16) // 16, layout_length(50, nb, 32) // 32)
    # sorted buckets, unsorted through the layout, give back the mask in original order
    # (padding slots hold token index 50 and sort last)
    q_b = s.q_buckets.gather(-1, torch.argsort(s.q_index, dim=-1, stable=True)[..., :50])
    k_b = s.k_buckets.gather(-1, torch.argsort(s.k_index, dim=-1, stable=True)[..., :50])
    assert torch.equal(s.mask, reference.hash_mask(q_b, k_b))
    for kind in tiles.KINDS:
        a = tiles.schedule_for(kind, 96, 16, seed=3)
        b = tiles.schedule_for(kind, 96, 16, seed=3)
        assert torch.equal(a.state, b.state)
    lsh = tiles.example_inputs("hash", 64, n_buckets=4, buckets="lsh")
    assert lsh["q_buckets"].shape == (1, 1, 64) and int(lsh["q_buckets"].max()) < 4
    with pytest.raises(ValueError):
        tiles.schedule_for("nope", 64)
    with pytest.raises(ValueError):
        tiles.qk_schedule(torch.zeros(1, 1, 1, 8, dtype=torch.bool), torch.zeros(1, 1, 1, 8, dtype=torch.bool))
