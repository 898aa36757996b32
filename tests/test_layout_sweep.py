"""The bucket layout's sweep kernels (``sparseflash/layout_sweep.py``): the values, gradients and
tiles of permuted.py's one-tile kernels that they replace (same steps in the same order), the float64
reference through hash attention, query/key dropping and hash ∪ window, and which calls they take.
"""
from __future__ import annotations

import pytest
import torch
from helpers import GRAD_TOL, TOL, assert_close, grads, rounding_floor

import sparseflash as sf
from sparseflash import layout_sweep
from sparseflash import reference as ref
from sparseflash.tiles import TileRecord


def _both(monkeypatch, fn, q, k, v, do):
    """``fn``'s output, gradients and tile maps with the sweep off and on."""
    out = {}
    for enabled in (False, True):
        monkeypatch.setattr(layout_sweep, "ENABLED", enabled)
        rec = TileRecord()
        got = grads(lambda q, k, v: fn(q, k, v, rec), q, k, v, do)
        out[enabled] = got, {name: m.clone() for name, m in rec.maps.items()}
    return out[False], out[True]


@pytest.mark.parametrize("N, n_buckets, ids, W", [(1, 2, 2, 0), (7, 2, 2, 0), (257, 4, 4, 17), (100, 4, 9, 0),
                                                   (64, 3, 3, 64)])
def test_hash_equals_the_one_tile_kernels(seed, monkeypatch, N, n_buckets, ids, W):
    """Same values and the same tiles as permuted.py's kernels: ids past ``n_buckets`` (the overflow
    run's id test), query buckets with no keys and far parts emptied by the window included."""
    q, k, v, do = (torch.randn(1, 2, N, 16) for _ in range(4))
    qb, kb = torch.randint(0, ids, (1, 2, N)), torch.randint(0, ids, (1, 2, N))
    (want, want_maps), (got, got_maps) = _both(
        monkeypatch, lambda q, k, v, rec: sf.hash_sparse_attention(q, k, v, qb, kb, n_buckets=n_buckets, window=W,
                                                                   tile_record=rec), q, k, v, do)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
    assert set(got_maps) == set(want_maps) and got_maps
    for name in got_maps:
        assert torch.equal(got_maps[name], want_maps[name]), name


@pytest.mark.parametrize("N, n_buckets, ids, W", [(130, 8, 8, 40), (100, 4, 9, 0)])
def test_load_once_equals_the_one_tile_kernels(seed, monkeypatch, N, n_buckets, ids, W):
    """Reading the held tiles once per tile (``LOAD_ONCE``) changes no value (the first case is the
    main test's eight-bucket case, with a window)."""
    q, k, v, do = (torch.randn(1, 2, N, 16) for _ in range(4))
    qb, kb = torch.randint(0, ids, (1, 2, N)), torch.randint(0, ids, (1, 2, N))
    monkeypatch.setattr(layout_sweep, "LOAD_ONCE", True)
    (want, _), (got, _) = _both(
        monkeypatch, lambda q, k, v, rec: sf.hash_sparse_attention(q, k, v, qb, kb, n_buckets=n_buckets, window=W),
        q, k, v, do)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


def test_qk_dropping_equals_the_one_tile_kernels(seed, monkeypatch):
    N = 100
    q, k, v, do = (torch.randn(2, 2, N, 16) for _ in range(4))
    qk, kk = torch.rand(2, 2, N) < 0.4, torch.rand(2, 2, N) < 0.6
    (want, _), (got, _) = _both(monkeypatch, lambda q, k, v, rec: sf.qk_sparse_attention(q, k, v, qk, kk), q, k, v, do)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype, D", [(torch.float32, 16), (torch.bfloat16, 64), (torch.float16, 24)])
def test_hash_through_the_sweep_matches_reference(seed, monkeypatch, dtype, D):
    B, H, N, W = 1, 2, 100, 20
    q, k, v, do = (torch.randn(B, H, N, D).to(dtype) for _ in range(4))
    qb, kb = torch.randint(0, 4, (B, H, N)), torch.randint(0, 4, (B, H, N))
    monkeypatch.setattr(layout_sweep, "ENABLED", True)
    got = grads(lambda q, k, v: sf.hash_sparse_attention(q, k, v, qb, kb, n_buckets=4, window=W), q, k, v, do)
    assert got[0].dtype == dtype and all(torch.isfinite(g.float()).all() for g in got)
    mask = ref.hash_mask(qb, kb, window=W)
    want = grads(lambda q, k, v: ref.attention(q, k, v, mask), q.double(), k.double(), v.double(), do.double())
    floor = rounding_floor(want, got[0], q, k, v, do, mask)
    assert_close(got, want, TOL.get(dtype, 1e-2), GRAD_TOL.get(dtype, 2e-2), f"sweep {dtype}: ", floor=floor)


def test_which_calls(seed, monkeypatch):
    q = torch.randn(1, 4, 64, 16)
    k = torch.randn(1, 2, 64, 16)
    monkeypatch.setattr(layout_sweep, "ENABLED", True)
    assert layout_sweep.sweep_applies(q, q)
    assert not layout_sweep.sweep_applies(q, k)                                # grouped heads
    monkeypatch.setattr(layout_sweep, "ENABLED", False)
    assert not layout_sweep.sweep_applies(q, q)
    assert layout_sweep._run(10 ** 6, torch.device("cpu")) == 2


def test_grouped_heads_stay_on_the_one_tile_kernels(seed, monkeypatch):
    """Grouped-query calls with the sweep on: permuted.py's kernels, against the reference."""
    B, H, Hkv, N, D = 1, 4, 2, 70, 16
    q, do = torch.randn(B, H, N, D), torch.randn(B, H, N, D)
    k, v = torch.randn(B, Hkv, N, D), torch.randn(B, Hkv, N, D)
    qb, kb = torch.randint(0, 3, (B, H, N)), torch.randint(0, 3, (B, Hkv, N))
    monkeypatch.setattr(layout_sweep, "ENABLED", True)
    got = grads(lambda q, k, v: sf.hash_sparse_attention(q, k, v, qb, kb, n_buckets=3), q, k, v, do)
    mask = ref.hash_mask(qb, kb)
    want = grads(lambda q, k, v: ref.attention(q, k, v, mask), q.double(), k.double(), v.double(), do.double())
    floor = rounding_floor(want, got[0], q, k, v, do, mask)
    assert_close(got, want, TOL[torch.float32], GRAD_TOL[torch.float32], "sweep GQA: ", floor=floor)


@pytest.mark.gpu
@pytest.mark.parametrize("N, D, W, once", [(4096, 64, 128, False), (4096, 64, 128, True), (8191, 128, 0, False)])
def test_gpu_hash_through_the_sweep(seed, monkeypatch, N, D, W, once):
    """Hash attention (and ∪ window) with the layout's passes in the sweep kernels on the GPU (bf16, the
    launch defaults)."""
    B, H, dtype = 1, 2, torch.bfloat16
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda").to(dtype) for _ in range(4))
    qb, kb = sf.lsh_buckets(q, 16, seed=seed), sf.lsh_buckets(k, 16, seed=seed)
    monkeypatch.setattr(layout_sweep, "ENABLED", True)
    monkeypatch.setattr(layout_sweep, "LOAD_ONCE", once)
    got = grads(lambda q, k, v: sf.hash_sparse_attention(q, k, v, qb, kb, n_buckets=16, window=W), q, k, v, do)
    mask = ref.hash_mask(qb, kb, window=W)
    want = grads(lambda q, k, v: ref.attention(q, k, v, mask), q.double(), k.double(), v.double(), do.double())
    assert_close(got, want, TOL[dtype], GRAD_TOL[dtype], f"sweep N={N} D={D}: ")
    del want
    torch.cuda.empty_cache()
