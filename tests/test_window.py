"""Sliding windows: ``flash_attention(window=W)`` and the union of a window with hash buckets
or query/key dropping, against the float64 reference with the union mask.

The union is computed in two parts that share one softmax (``permuted.union_forward``): the
sparse pattern's pairs with ``i - j >= W`` over the layout, then the band ``0 <= i - j < W``
by the dense kernel continuing the same rows.  These tests check values and gradients on
awkward lengths, windows of 1, small, and at least ``N``, GQA, half precision, tiles of
several shapes; which tiles each part visits; and that bad windows raise.
"""
from __future__ import annotations

import pytest
import torch
from helpers import GRAD_TOL, TOL, assert_close, grads, rounding_floor

import sparseflash as sf
from sparseflash import reference as ref
from sparseflash.tiles import TileRecord

SMALL = dict(BLOCK_M=16, BLOCK_N=16)


def _qkv(B, H, N, D, dtype, Hkv=None):
    Hkv = H if Hkv is None else Hkv
    q, do = (torch.randn(B, H, N, D).to(dtype) for _ in range(2))
    k, v = (torch.randn(B, Hkv, N, D).to(dtype) for _ in range(2))
    return q, k, v, do


def _check(kind, B, H, N, D, W, dtype=torch.float32, Hkv=None, n_buckets=4, **kw):
    """Kernel against the float64 reference on fresh random inputs; returns the kernel's grads."""
    Hkv = H if Hkv is None else Hkv
    q, k, v, do = _qkv(B, H, N, D, dtype, Hkv)
    if kind == "flash":
        mask = ref.window_mask(N, window=W)
        fn = lambda q, k, v: sf.flash_attention(q, k, v, window=W, **kw)  # noqa: E731
    elif kind == "hash":
        qb, kb = torch.randint(0, n_buckets, (B, H, N)), torch.randint(0, n_buckets, (B, Hkv, N))
        mask = ref.hash_mask(qb, kb, window=W)
        fn = lambda q, k, v: sf.hash_sparse_attention(q, k, v, qb, kb, n_buckets=n_buckets, window=W, **kw)  # noqa
    else:
        qk, kk = torch.rand(B, H, N) < 0.4, torch.rand(B, Hkv, N) < 0.4
        mask = ref.qk_dropping_mask(qk, kk, window=W)
        fn = lambda q, k, v: sf.qk_sparse_attention(q, k, v, qk, kk, window=W, **kw)  # noqa: E731
    got = grads(fn, q, k, v, do)
    assert got[0].dtype == dtype and got[0].shape == (B, H, N, D)
    want = grads(lambda q, k, v: ref.attention(q, k, v, mask), q.double(), k.double(), v.double(), do.double())
    floor = rounding_floor(want, got[0], q, k, v, do, mask)
    assert_close(got, want, TOL.get(dtype, 1e-2), GRAD_TOL.get(dtype, 2e-2), f"{kind} N={N} W={W}: ", floor=floor)
    return got


# ---------------------------------------------------------------------------
# Values and gradients against the reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flash", "hash", "qk"])
@pytest.mark.parametrize("N, W", [(1, 1), (7, 3), (100, 1), (100, 17), (257, 40), (257, 64), (70, 70), (50, 500)])
def test_matches_reference(seed, kind, N, W):
    """Awkward lengths; W = 1 (the diagonal), small, a tile multiple, and W >= N (all of the past)."""
    _check(kind, 1, 2, N, 32, W)


@pytest.mark.parametrize("kind", ["flash", "hash", "qk"])
@pytest.mark.parametrize("blocks", [(16, 32), (32, 16)])
def test_tile_shapes(seed, kind, blocks):
    """Windows that are not a multiple of either tile size, two batches (one head each: several
    heads are in test_matches_reference and test_gqa)."""
    _check(kind, 2, 1, 150, 16, 21, kernel_options=dict(BLOCK_M=blocks[0], BLOCK_N=blocks[1]))


def test_dense_backward_tiles(seed):
    """The dense backward's own tiles (bwd_BLOCK, bwd_STEP) with a window."""
    _check("flash", 1, 2, 130, 32, 37, kernel_options=dict(BLOCK_M=16, BLOCK_N=16, bwd_BLOCK=32, bwd_STEP=16))


@pytest.mark.parametrize("kind", ["flash", "hash", "qk"])
@pytest.mark.parametrize("Hkv", [1, 2])
def test_gqa(seed, kind, Hkv):
    """4 query heads on 1 or 2 kv heads; N = 50: 4 tiles of 16, the window of 13 crossing tile edges."""
    _check(kind, 1, 4, 50, 32, 13, Hkv=Hkv, kernel_options=SMALL)


# A covering set of (kind, dtype, head dim) rather than their product: every pair of values
# of any two of them appears once (each kind in both dtypes and both head dims, each dtype
# at both head dims).
HALF_CASES = [("flash", torch.bfloat16, 40), ("flash", torch.float16, 128), ("hash", torch.bfloat16, 128),
              ("hash", torch.float16, 40)]


@pytest.mark.parametrize("kind,dtype,D", HALF_CASES, ids=[f"{k}-{str(t)[6:]}-D{d}" for k, t, d in HALF_CASES])
def test_half_precision(seed, kind, dtype, D):
    _check(kind, 1, 2, 100, D, 24, dtype=dtype, kernel_options=SMALL)


def test_window_at_least_n_is_causal(seed):
    """W >= N: the window holds every earlier key, so every variant is dense causal attention."""
    B, H, N, D = 1, 2, 77, 32
    q, k, v, do = _qkv(B, H, N, D, torch.float32)
    dense = grads(lambda q, k, v: sf.flash_attention(q, k, v), q, k, v, do)
    qb = torch.randint(0, 4, (B, H, N))
    keep = torch.rand(B, H, N) < 0.3
    for fn in (lambda q, k, v: sf.flash_attention(q, k, v, window=N),
               lambda q, k, v: sf.hash_sparse_attention(q, k, v, qb, qb, n_buckets=4, window=N),
               lambda q, k, v: sf.qk_sparse_attention(q, k, v, keep, keep, window=N + 5)):
        assert_close(grads(fn, q, k, v, do), dense, 1e-5)


def test_window_zero_is_unchanged(seed):
    """window=0 is the pattern alone, bit for bit the call without the argument."""
    B, H, N, D = 1, 2, 60, 32
    q, k, v, do = _qkv(B, H, N, D, torch.float32)
    qb, kb = torch.randint(0, 3, (B, H, N)), torch.randint(0, 3, (B, H, N))
    keep = torch.rand(B, H, N) < 0.5
    pairs = [(lambda q, k, v: sf.hash_sparse_attention(q, k, v, qb, kb, n_buckets=3),
              lambda q, k, v: sf.hash_sparse_attention(q, k, v, qb, kb, n_buckets=3, window=0)),
             (lambda q, k, v: sf.qk_sparse_attention(q, k, v, keep, keep),
              lambda q, k, v: sf.qk_sparse_attention(q, k, v, keep, keep, window=0)),
             (lambda q, k, v: sf.flash_attention(q, k, v), lambda q, k, v: sf.flash_attention(q, k, v, window=0))]
    for a, b in pairs:
        for x, y in zip(grads(a, q, k, v, do), grads(b, q, k, v, do)):
            assert torch.equal(x, y)


def test_lonely_queries_see_their_window(seed):
    """A query alone in its bucket gets 0 from pure hashing and its window's attention with one."""
    B, H, N, D, W = 1, 1, 40, 16, 4
    q, k, v, _ = _qkv(B, H, N, D, torch.float32)
    qb = torch.zeros(B, H, N, dtype=torch.long)
    kb = torch.ones(B, H, N, dtype=torch.long)  # no key shares a query's bucket
    assert sf.hash_sparse_attention(q, k, v, qb, kb, n_buckets=2).abs().max() == 0
    got = sf.hash_sparse_attention(q, k, v, qb, kb, n_buckets=2, window=W)
    assert_close((got,), (sf.flash_attention(q, k, v, window=W),), 1e-5)


# ---------------------------------------------------------------------------
# Tiles: the band in natural order, the far part in the layout
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("N, W", [(200, 1), (200, 40), (256, 64), (100, 300)])
def test_dense_window_visits_the_band(seed, N, W):
    """Each query tile visits exactly the key tiles that hold a pair of its window, in every pass."""
    B, H, D, bm, bn = 1, 1, 16, 16, 32
    q, k, v, do = _qkv(B, H, N, D, torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    rec = TileRecord()
    sf.flash_attention(q, k, v, window=W, kernel_options=dict(BLOCK_M=bm, BLOCK_N=bn), tile_record=rec).backward(do)
    mask = ref.window_mask(N, window=W)
    n_qt, n_kt = -(-N // bm), -(-N // bn)
    padded = torch.zeros(n_qt * bm, n_kt * bn, dtype=torch.bool)
    padded[:N, :N] = mask
    want = padded.unflatten(1, (n_kt, bn)).unflatten(0, (n_qt, bm)).any(-1).any(1).int()
    for name in ("fwd", "bwd_kv", "bwd_q"):
        assert torch.equal(getattr(rec, name)[0, 0], want), name


def test_union_far_part_tiles(seed):
    """The layout part visits exactly the tiles holding a pair with ``i - j >= W``: none whose
    pairs all lie inside the band (the values tests show each pair is counted once)."""
    B, H, N, D, W = 1, 1, 256, 16, 64  # one head: the maps of head 0 are the ones checked
    q, k, v, do = _qkv(B, H, N, D, torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    buckets = torch.zeros(B, H, N, dtype=torch.long)  # one bucket: the far part is causal minus the band
    rec = TileRecord()
    sf.hash_sparse_attention(q, k, v, buckets, buckets, n_buckets=1, window=W, kernel_options=SMALL,
                             tile_record=rec).backward(do)
    assert rec.window == W and set(rec.maps) == {"fwd", "bwd_kv", "bwd_q", "window_fwd", "window_bwd_kv",
                                                  "window_bwd_q"}
    # One bucket, all kept: slot a of the query layout is query W + a (position a), key slot b is key b.
    n_far = N - W
    far_pairs = torch.zeros(N, N, dtype=torch.bool)
    far_pairs[:n_far] = torch.arange(N)[None, :] <= torch.arange(n_far)[:, None]
    n_qt, n_kt = rec.fwd.shape[-2:]
    pad = torch.zeros(n_qt * 16, n_kt * 16, dtype=torch.bool)
    pad[:N, :N] = far_pairs
    want = pad.unflatten(1, (n_kt, 16)).unflatten(0, (n_qt, 16)).any(-1).any(1).int()
    for name in ("fwd", "bwd_kv", "bwd_q"):
        assert torch.equal(getattr(rec, name)[0, 0], want), name


@pytest.mark.parametrize("kind", ["hash", "qk"])
def test_schedules_predict_both_parts(seed, kind):
    """``hash_schedule`` / ``qk_schedule`` with a window predict the far part's tiles and
    ``flash_schedule(window=)`` the band's, as the kernels record them; no tile is wrongly skipped."""
    from sparseflash.tiles import flash_schedule, hash_schedule, qk_schedule

    B, H, N, D, W = 1, 2, 200, 16, 37
    q, k, v, _ = _qkv(B, H, N, D, torch.float32)
    rec = TileRecord()
    if kind == "hash":
        qb, kb = torch.randint(0, 5, (B, H, N)), torch.randint(0, 5, (B, H, N))
        sf.hash_sparse_attention(q, k, v, qb, kb, n_buckets=5, window=W, kernel_options=SMALL, tile_record=rec)
        far = hash_schedule(qb, kb, 16, 16, window=W)
    else:
        qk, kk = torch.rand(B, H, N) < 0.5, torch.rand(B, H, N) < 0.5
        sf.qk_sparse_attention(q, k, v, qk, kk, window=W, kernel_options=SMALL, tile_record=rec)
        far = qk_schedule(qk, kk, 16, 16, window=W)
    band = flash_schedule(N, block_m=16, window=W, heads=H)
    assert torch.equal(far.computed, rec.fwd > 0) and torch.equal(band.computed, rec.window_fwd > 0)
    assert not far.wrongly_skipped.any() and not band.wrongly_skipped.any()
    # together the two parts hold every pair of the union exactly once
    union = far.allowed_count.sum() + band.allowed_count.sum()
    mask = ref.hash_mask(qb, kb, window=W) if kind == "hash" else ref.qk_dropping_mask(qk, kk, window=W)
    assert int(union) == int(mask.sum())


# ---------------------------------------------------------------------------
# The layout of the far part
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1, 5, 40])
def test_shifted_layout_matches_reference(seed, shift):
    from sparseflash.layout import K_PAD, Q_PAD, bucket_layouts, reference_layout

    B, H, N, nb = 2, 3, 90, 5
    # Ids outside [0, nb) too, as hash attention lays them out (the overflow run): queries
    # before the shift are dropped whatever their id.
    qb, kb = torch.randint(-1, nb + 1, (B, H, N)), torch.randint(-1, nb + 1, (B, H, N))
    ql, kl = bucket_layouts((B, H, N), q_buckets=qb, k_buckets=kb, n_buckets=nb, block_m=16, block_n=32,
                            q_shift=shift, overflow=True)
    rq = reference_layout((B, H, N), buckets=qb, n_buckets=nb, block=16, pad=Q_PAD, shift=shift, overflow=True)
    rk = reference_layout((B, H, N), buckets=kb, n_buckets=nb, block=32, pad=K_PAD, overflow=True)
    for got, want in ((ql, rq), (kl, rk)):
        for name in ("index", "pos", "bucket", "start", "count"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
    real = rq.bucket >= 0
    assert (rq.pos[real] >= 0).all() and int(real.sum()) == B * H * (N - shift)


def test_shift_with_positions_raises():
    from sparseflash.layout import bucket_layouts

    pos = torch.arange(10).expand(1, 1, 10)
    with pytest.raises(ValueError, match="q_shift"):
        bucket_layouts((1, 1, 10), q_pos=pos, k_pos=pos, block_m=16, block_n=16, q_shift=2)


# ---------------------------------------------------------------------------
# Bad windows
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("window", [-1, 2.5, True, "4", None])
def test_bad_window_raises(window):
    q, k, v, _ = _qkv(1, 1, 8, 16, torch.float32)
    b = torch.zeros(1, 1, 8, dtype=torch.long)
    keep = torch.ones(1, 1, 8, dtype=torch.bool)
    for call in (lambda: sf.flash_attention(q, k, v, window=window),
                 lambda: sf.hash_sparse_attention(q, k, v, b, b, n_buckets=1, window=window),
                 lambda: sf.qk_sparse_attention(q, k, v, keep, keep, window=window)):
        with pytest.raises(ValueError, match="window"):
            call()


def test_numpy_window(seed):
    import numpy as np

    q, k, v, _ = _qkv(1, 1, 20, 16, torch.float32)
    assert torch.equal(sf.flash_attention(q, k, v, window=np.int64(5)), sf.flash_attention(q, k, v, window=5))


def test_window_needs_causal():
    q, k, v, _ = _qkv(1, 1, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="causal"):
        sf.flash_attention(q, k, v, causal=False, window=4)


def test_model_config_window():
    from sparseflash.train.model import GPTConfig

    assert GPTConfig(attention="hash").effective_window == 128
    assert GPTConfig(attention="hash", window=0).effective_window == 0
    assert GPTConfig(attention="dense", window=128).effective_window == 128
    assert GPTConfig(attention="sdpa").effective_window == 0
    with pytest.raises(ValueError, match="window"):
        GPTConfig(attention="sdpa", window=64)
    with pytest.raises(ValueError, match="window"):
        GPTConfig(attention="hash", window=-3)


# ---------------------------------------------------------------------------
# GPU (long sequences)
# ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["flash", "hash", "qk"])
@pytest.mark.parametrize("N, D", [(4096, 64), (8191, 128)])
def test_gpu_long_sequences(seed, kind, N, D):
    B, H, W, dtype = 1, 2, 256, torch.bfloat16
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda").to(dtype) for _ in range(4))
    if kind == "flash":
        mask = ref.window_mask(N, window=W, device="cuda")
        fn = lambda q, k, v: sf.flash_attention(q, k, v, window=W)  # noqa: E731
    elif kind == "hash":
        qb, kb = sf.lsh_buckets(q, 16, seed=seed), sf.lsh_buckets(k, 16, seed=seed)
        mask = ref.hash_mask(qb, kb, window=W)
        fn = lambda q, k, v: sf.hash_sparse_attention(q, k, v, qb, kb, n_buckets=16, window=W)  # noqa: E731
    else:
        qk, kk = (torch.rand(B, H, N, device="cuda") < 0.3 for _ in range(2))
        mask = ref.qk_dropping_mask(qk, kk, window=W)
        fn = lambda q, k, v: sf.qk_sparse_attention(q, k, v, qk, kk, window=W)  # noqa: E731
    got = grads(fn, q, k, v, do)
    want = grads(lambda q, k, v: ref.attention(q, k, v, mask), q.double(), k.double(), v.double(), do.double())
    assert_close(got, want, TOL[dtype], GRAD_TOL[dtype], f"{kind} N={N} D={D}: ")
    del want
    torch.cuda.empty_cache()
