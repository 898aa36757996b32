"""The window band's sweep kernels (``sparseflash/band.py``) against the float64 reference, and
against the dense kernel's windowed loop that they replace in hash ∪ window: values, gradients,
continuing a partial result (``init``), adding to gradients (``accumulate``), the tiles visited,
and which calls they take.
"""
from __future__ import annotations

import pytest
import torch
from helpers import GRAD_TOL, TOL, assert_close, grads, rounding_floor

import sparseflash as sf
from sparseflash import band
from sparseflash import reference as ref
from sparseflash._steps import kernel_config, softmax_delta
from sparseflash.flash import flash_backward, flash_forward
from sparseflash.tiles import TileRecord


def _band_attention(q, k, v, W, cfg):
    """The band alone through the sweep kernels, as an autograd function."""
    scale = q.shape[-1] ** -0.5
    return sf._steps.KernelAttention.apply(
        q, k, v, lambda q, k, v: band.band_forward(q, k, v, scale, cfg, window=W),
        lambda q, k, v, o, lse2, do: band.band_backward(q, k, v, o, lse2, do, scale, cfg, window=W))


@pytest.mark.parametrize("N, W, block", [(1, 1, 16), (7, 3, 16), (100, 1, 16), (100, 17, 16), (100, 33, 32),
                                         (257, 40, 16), (257, 64, 32), (70, 70, 16), (50, 500, 32)])
def test_matches_reference(seed, N, W, block):
    B, H, D = 2, 2, 16
    q, k, v, do = (torch.randn(B, H, N, D) for _ in range(4))
    cfg = dict(kernel_config(D, q.device), BLOCK_M=block, BLOCK_N=block)
    got = grads(lambda q, k, v: _band_attention(q, k, v, W, cfg), q, k, v, do)
    mask = ref.window_mask(N, window=W)
    want = grads(lambda q, k, v: ref.attention(q, k, v, mask), q.double(), k.double(), v.double(), do.double())
    floor = rounding_floor(want, got[0], q, k, v, do, mask)
    assert_close(got, want, TOL[torch.float32], GRAD_TOL[torch.float32], f"band N={N} W={W}: ", floor=floor)


@pytest.mark.parametrize("dtype, D", [(torch.bfloat16, 64), (torch.float16, 24)])
def test_half_precision(seed, dtype, D):
    B, H, N, W = 1, 2, 100, 20
    q, k, v, do = (torch.randn(B, H, N, D).to(dtype) for _ in range(4))
    got = grads(lambda q, k, v: _band_attention(q, k, v, W, kernel_config(D, q.device)), q, k, v, do)
    assert got[0].dtype == dtype and all(torch.isfinite(g.float()).all() for g in got)
    mask = ref.window_mask(N, window=W)
    want = grads(lambda q, k, v: ref.attention(q, k, v, mask), q.double(), k.double(), v.double(), do.double())
    floor = rounding_floor(want, got[0], q, k, v, do, mask)
    assert_close(got, want, TOL.get(dtype, 1e-2), GRAD_TOL.get(dtype, 2e-2), f"band {dtype}: ", floor=floor)


@pytest.mark.parametrize("N, W, once", [(100, 17, False), (129, 64, False), (64, 1, False), (129, 64, True)])
def test_init_and_accumulate_match_the_dense_kernel(seed, monkeypatch, N, W, once):
    """Continuing a partial result and adding to gradients, as hash ∪ window uses them, give the
    dense kernel's windowed loop's values (same steps in the same order: equal to rounding), with
    the held tiles read every step or once (``LOAD_ONCE``)."""
    monkeypatch.setattr(band, "LOAD_ONCE", once)
    B, H, D = 1, 3, 32
    q, k, v, do = (torch.randn(B, H, N, D) for _ in range(4))
    scale = D ** -0.5
    cfg = kernel_config(D, q.device, dense=True, seq_len=N, dtype=q.dtype, window=W)
    # a partial result over other keys: a dense pass over the first half, rows past it untouched (+inf)
    o0, l0 = flash_forward(q, k[:, :, : N // 2], v[:, :, : N // 2], False, scale, kernel_config(D, q.device))
    l0[..., : N // 3] = float("inf")
    o0[..., : N // 3, :] = 0
    want_o, want_l = o0.clone(), l0.clone()
    flash_forward(q, k, v, True, scale, cfg, window=W, init=(want_o, want_l))
    got_o, got_l = o0.clone(), l0.clone()
    band.band_forward(q, k, v, scale, cfg, window=W, init=(got_o, got_l))
    torch.testing.assert_close(got_o, want_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_l, want_l, atol=1e-5, rtol=1e-5)
    delta = softmax_delta(want_o, do)
    start = tuple(torch.randn_like(t) for t in (q, k, v))
    want = flash_backward(q, k, v, want_o, want_l, do, True, scale, cfg, window=W, delta=delta,
                          accumulate=tuple(t.clone() for t in start))
    got = band.band_backward(q, k, v, want_o, want_l, do, scale, cfg, window=W, delta=delta,
                             accumulate=tuple(t.clone() for t in start))
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("N, W", [(100, 17), (257, 64), (96, 200)])
def test_visits_the_dense_kernels_tiles(seed, monkeypatch, N, W):
    """The union's band visits the tiles the dense kernel's windowed loop visited, each once per pass."""
    q, k, v = (torch.randn(1, 2, N, 16, requires_grad=True) for _ in range(3))
    qb = kb = torch.randint(0, 4, (1, 2, N))
    recs = {}
    for enabled in (False, True):
        monkeypatch.setattr(band, "ENABLED", enabled)
        rec = TileRecord()
        sf.hash_sparse_attention(q, k, v, qb, kb, n_buckets=4, window=W, tile_record=rec).sum().backward()
        recs[enabled] = {name: m.clone() for name, m in rec.maps.items() if name.startswith("window_")}
    assert set(recs[True]) == set(recs[False]) == {"window_fwd", "window_bwd_kv", "window_bwd_q"}
    for name in recs[True]:
        assert recs[True][name].max() == 1, name
        assert torch.equal(recs[True][name], recs[False][name]), name


def test_which_calls(seed, monkeypatch):
    q = torch.randn(1, 4, 64, 16)
    k = torch.randn(1, 2, 64, 16)
    cfg = kernel_config(16, q.device)
    monkeypatch.setattr(band, "ENABLED", True)
    assert band.band_applies(q, q, 8, cfg)
    assert not band.band_applies(q, q, 0, cfg)                                 # no window
    assert not band.band_applies(q, k, 8, cfg)                                 # grouped heads
    assert not band.band_applies(q, q[:, :, :32], 8, cfg)                      # fewer keys than queries
    assert not band.band_applies(q, q, 8, dict(cfg, BLOCK_M=64, BLOCK_N=32))   # tiles not square
    monkeypatch.setattr(band, "ENABLED", False)
    assert not band.band_applies(q, q, 8, cfg)


@pytest.mark.parametrize("N, W", [(100, 17), (257, 64)])
def test_union_through_the_sweep_matches_reference(seed, monkeypatch, N, W):
    """hash ∪ window with the band in the sweep kernels, against the float64 reference."""
    B, H, D = 1, 2, 16
    q, k, v, do = (torch.randn(B, H, N, D) for _ in range(4))
    qb, kb = torch.randint(0, 4, (B, H, N)), torch.randint(0, 4, (B, H, N))
    monkeypatch.setattr(band, "ENABLED", True)
    got = grads(lambda q, k, v: sf.hash_sparse_attention(q, k, v, qb, kb, n_buckets=4, window=W), q, k, v, do)
    mask = ref.hash_mask(qb, kb, window=W)
    want = grads(lambda q, k, v: ref.attention(q, k, v, mask), q.double(), k.double(), v.double(), do.double())
    floor = rounding_floor(want, got[0], q, k, v, do, mask)
    assert_close(got, want, TOL[torch.float32], GRAD_TOL[torch.float32], f"union N={N} W={W}: ", floor=floor)


def test_run_and_span():
    assert band._span(128, 64) == 3 and band._span(1, 64) == 1 and band._span(65, 64) == 2
    assert band._span(100, 64) == 3 and band._span(256, 64) == 5
    assert band._run(10 ** 6, torch.device("cpu")) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("N, D, W, once", [(4096, 64, 128, False), (4096, 64, 128, True), (8191, 128, 256, False)])
def test_gpu_union_through_the_sweep(seed, monkeypatch, N, D, W, once):
    """hash ∪ window with the band in the sweep kernels on the GPU (bf16, the launch defaults)."""
    B, H, dtype = 1, 2, torch.bfloat16
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda").to(dtype) for _ in range(4))
    qb, kb = sf.lsh_buckets(q, 16, seed=seed), sf.lsh_buckets(k, 16, seed=seed)
    monkeypatch.setattr(band, "ENABLED", True)
    monkeypatch.setattr(band, "LOAD_ONCE", once)
    got = grads(lambda q, k, v: sf.hash_sparse_attention(q, k, v, qb, kb, n_buckets=16, window=W), q, k, v, do)
    mask = ref.hash_mask(qb, kb, window=W)
    want = grads(lambda q, k, v: ref.attention(q, k, v, mask), q.double(), k.double(), v.double(), do.double())
    assert_close(got, want, TOL[dtype], GRAD_TOL[dtype], f"union N={N} D={D}: ")
    del want
    torch.cuda.empty_cache()
