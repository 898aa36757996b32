"""Query/key dropping (sparseflash.qk_sparse) against the float64 reference.

Kernels run through Triton's interpreter on CPU tensors here (small sizes); the
``gpu``-marked tests at the end run long sequences on a CUDA device.
"""
from __future__ import annotations

import math

import pytest
import torch
from helpers import GRAD_TOL, TOL
from helpers import assert_close as _assert_close
from helpers import err as _err
from helpers import grads as _grads
from helpers import rounding_floor

from sparseflash import flash_attention, qk_sparse_attention, random_keep, topk_keep
from sparseflash import reference as ref

SMALL = dict(BLOCK_M=16, BLOCK_N=16)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _reference(q, k, v, do, q_keep, k_keep, sm_scale=None):
    mask = ref.qk_dropping_mask(q_keep, k_keep)
    return _grads(lambda q, k, v: ref.attention(q, k, v, mask, sm_scale), q.double(), k.double(), v.double(),
                  do.double())


def _kernel(q, k, v, do, q_keep, k_keep, sm_scale=None, **kw):
    return _grads(lambda q, k, v: qk_sparse_attention(q, k, v, q_keep, k_keep, sm_scale, **kw), q, k, v, do)


def _qkv(B, H, N, D, dtype=torch.float32):
    q, k, v, do = (torch.randn(B, H, N, D).to(dtype) for _ in range(4))
    return q, k, v, do


def _check(B, H, N, D, dtype, q_keep, k_keep, sm_scale=None, **kw):
    q, k, v, do = _qkv(B, H, N, D, dtype)
    got = _kernel(q, k, v, do, q_keep, k_keep, sm_scale, **kw)
    assert got[0].dtype == dtype and got[0].shape == (B, H, N, D)
    want = _reference(q, k, v, do, q_keep, k_keep, sm_scale)
    floor = rounding_floor(want, got[0], q, k, v, do, ref.qk_dropping_mask(q_keep, k_keep), sm_scale)
    _assert_close(got, want, TOL[dtype], GRAD_TOL[dtype], floor=floor)
    return got


def _exact_keep(B, H, N, counts):
    """Bool (B, H, N) keeping exactly ``counts[h]`` random tokens in head h."""
    keep = torch.zeros(B, H, N, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            keep[b, h, torch.randperm(N)[: counts[h]]] = True
    return keep


# ---------------------------------------------------------------------------
# Against the reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("N", [1, 7, 100, 257])
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5, 1.0])
def test_keep_rates_and_lengths(seed, N, rate):
    B, H, D = 1, 2, 64
    q_keep = torch.rand(B, H, N) < rate
    k_keep = torch.rand(B, H, N) < rate
    # N = 100 on 16x16 tiles; N = 257 on the CPU default 32x32 (one token past a tile edge
    # either way; 257 on 16x16 tiles: test_bf16_keep_rates)
    _check(B, H, N, D, torch.float32, q_keep, k_keep, kernel_options=SMALL if N == 100 else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [16, 64, 128, 72])
def test_head_dims_and_dtypes(seed, D, dtype):
    B, H, N = 1, 2, 100
    q_keep = torch.rand(B, H, N) < 0.5
    k_keep = torch.rand(B, H, N) < 0.5
    _check(B, H, N, D, dtype, q_keep, k_keep)


# bf16 at N=7 only with everything kept: with one to three keys per query the
# cancellation above makes dq/dk relative errors of a few percent (fp32 covers N=7).
@pytest.mark.parametrize("N,rate", [(7, 1.0), (100, 0.1), (257, 0.1), (257, 0.5), (257, 1.0)])
def test_bf16_keep_rates(seed, N, rate):
    B, H, D = 1, 2, 64
    q_keep = torch.rand(B, H, N) < rate
    k_keep = torch.rand(B, H, N) < rate
    # everything kept at N = 257: the CPU default 32x32 tiles (the causal triangle of 16x16
    # tiles is the suite's costliest qk case; sparse N = 257 keeps 16x16 here)
    kernel_options = None if (N, rate) == (257, 1.0) else SMALL
    _check(B, H, N, D, torch.bfloat16, q_keep, k_keep, kernel_options=kernel_options)


@pytest.mark.parametrize("blocks", [(16, 16), (16, 32), (32, 16), (32, 32)])
def test_tile_shapes_batch(seed, blocks):
    """B=2, tiles of mixed sizes."""
    B, H, N, D = 2, 2, 150, 32
    q_keep = torch.rand(B, H, N) < 0.6
    k_keep = torch.rand(B, H, N) < 0.4
    _check(B, H, N, D, torch.float32, q_keep, k_keep, kernel_options=dict(BLOCK_M=blocks[0], BLOCK_N=blocks[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_head_counts(seed, dtype):
    """Heads keep very different numbers of queries and keys (90% vs 5%)."""
    B, H, N, D = 1, 2, 160, 32  # (two batches: test_tile_shapes_batch, test_non_contiguous, ...)
    q_keep = _exact_keep(B, H, N, [144, 8])
    k_keep = _exact_keep(B, H, N, [8, 144])
    q_keep2 = _exact_keep(B, H, N, [144, 8])
    assert q_keep.sum(-1).tolist() == [[144, 8]] * B
    _check(B, H, N, D, dtype, q_keep, k_keep, kernel_options=SMALL)
    _check(B, H, N, D, dtype, q_keep, q_keep2, kernel_options=SMALL)


def test_sm_scale(seed):
    B, H, N, D = 1, 2, 70, 32
    q_keep = torch.rand(B, H, N) < 0.5
    k_keep = torch.rand(B, H, N) < 0.5
    _check(B, H, N, D, torch.float32, q_keep, k_keep, sm_scale=0.9, kernel_options=SMALL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous(seed, dtype):
    """q, k, v as views of one packed (B, N, 3, H, D) tensor, and a non-contiguous upstream gradient."""
    B, H, N, D = 2, 2, 90, 32
    packed = torch.randn(B, N, 3, H, D).to(dtype).requires_grad_()
    q, k, v = (packed[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    q_keep = torch.rand(B, H, N) < 0.5
    k_keep = torch.rand(B, H, N) < 0.5
    do_bnhd = torch.randn(B, N, H, D).to(dtype)  # o.transpose(1, 2) gets this, o a non-contiguous one
    out = qk_sparse_attention(q, k, v, q_keep, k_keep, kernel_options=SMALL)
    out.transpose(1, 2).backward(do_bnhd)

    packed64 = packed.detach().double().requires_grad_()
    q64, k64, v64 = (packed64[:, :, i].transpose(1, 2) for i in range(3))
    want = ref.attention(q64, k64, v64, ref.qk_dropping_mask(q_keep, k_keep))
    want.transpose(1, 2).backward(do_bnhd.double())
    assert _err(out, want) <= TOL[dtype]
    for i, name in enumerate(("dq", "dk", "dv")):
        err = _err(packed.grad[:, :, i], packed64.grad[:, :, i])
        assert err <= GRAD_TOL[dtype], f"{name}: {err:.3g}"


def test_strided_last_dim(seed):
    """Inputs whose last dimension is not contiguous (stride(-1) != 1)."""
    B, H, N, D = 1, 2, 50, 32
    bases = [torch.randn(B, H, D, N, requires_grad=True) for _ in range(3)]
    q, k, v = (t.transpose(-1, -2) for t in bases)
    assert q.stride(-1) != 1
    do = torch.randn(B, H, N, D)
    q_keep = torch.rand(B, H, N) < 0.5
    k_keep = torch.rand(B, H, N) < 0.5
    out = qk_sparse_attention(q, k, v, q_keep, k_keep)
    out.backward(do)
    want = _reference(q, k, v, do, q_keep, k_keep)
    got = (out, *(t.grad.transpose(-1, -2) for t in bases))
    _assert_close(got, want, TOL[torch.float32])


# ---------------------------------------------------------------------------
# Special masks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [1, 45, 100])
def test_all_kept_equals_flash(seed, N, dtype):
    B, H, D = 1, 2, 32  # (two batches: test_tile_shapes_batch, test_non_contiguous, ...)
    q, k, v, do = _qkv(B, H, N, D, dtype)
    keep = torch.ones(B, H, N, dtype=torch.bool)
    got = _kernel(q, k, v, do, keep, keep, kernel_options=SMALL)
    dense = _grads(lambda q, k, v: flash_attention(q, k, v, causal=True, kernel_options=SMALL), q, k, v, do)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    _assert_close(got, dense, tol, what="vs flash_attention: ")
    want = _reference(q, k, v, do, keep, keep)
    _assert_close(got, want, TOL[dtype], grad_tol=GRAD_TOL[dtype])


@pytest.mark.parametrize("case", ["none", "no_queries", "no_keys"])
def test_nothing_kept_gives_exact_zeros(seed, case):
    B, H, N, D = 2, 2, 40, 16
    q, k, v, do = _qkv(B, H, N, D)
    some = torch.rand(B, H, N) < 0.5
    none = torch.zeros(B, H, N, dtype=torch.bool)
    q_keep, k_keep = {"none": (none, none), "no_queries": (none, some), "no_keys": (some, none)}[case]
    out, dq, dk, dv = _kernel(q, k, v, do, q_keep, k_keep)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.equal(t, torch.zeros_like(t)), f"{name} not exactly zero"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropped_tokens_get_exact_zeros(seed, dtype):
    """Dropped queries: 0 output, 0 dq; dropped keys: 0 dk, dv; kept queries with no kept key before: 0."""
    B, H, N, D = 2, 2, 120, 32
    q, k, v, do = _qkv(B, H, N, D, dtype)
    q_keep = torch.rand(B, H, N) < 0.5
    k_keep = torch.rand(B, H, N) < 0.3
    k_keep[..., :20] = False  # kept queries among the first 20 have no key
    q_keep[..., :20] = True
    out, dq, dk, dv = _kernel(q, k, v, do, q_keep, k_keep, kernel_options=SMALL)
    no_key = ~ref.qk_dropping_mask(q_keep, k_keep).any(-1)  # dropped queries included
    assert no_key[..., :20].all()
    assert (out[no_key] == 0).all() and (dq[no_key] == 0).all()
    assert (out[~no_key].abs().sum(-1) > 0).all()
    # a key no kept query sees: dropped, or kept but after every kept query
    unseen = ~ref.qk_dropping_mask(q_keep, k_keep).any(-2)
    assert (dk[unseen] == 0).all() and (dv[unseen] == 0).all()
    assert (dk[~k_keep] == 0).all() and (dv[~k_keep] == 0).all()


@pytest.mark.parametrize("case", ["q_all", "k_all", "complement"])
def test_q_keep_differs_from_k_keep(seed, case):
    B, H, N, D = 1, 2, 96, 32
    half = torch.rand(B, H, N) < 0.5
    all_ = torch.ones(B, H, N, dtype=torch.bool)
    q_keep, k_keep = {"q_all": (all_, half), "k_all": (half, all_), "complement": (half, ~half)}[case]
    _check(B, H, N, D, torch.float32, q_keep, k_keep, kernel_options=SMALL)


def test_keep_masks_from_helpers(seed):
    B, H, N, D = 1, 2, 80, 32
    q_keep = random_keep((B, H, N), 0.4)
    k_keep = topk_keep(torch.randn(B, H, N), 0.3)
    _check(B, H, N, D, torch.float32, q_keep, k_keep, kernel_options=SMALL)


# ---------------------------------------------------------------------------
# random_keep / topk_keep
# ---------------------------------------------------------------------------


def test_random_keep_rate_and_shape(seed):
    keep = random_keep((2, 3, 20000), 0.3)
    assert keep.dtype == torch.bool and keep.shape == (2, 3, 20000)
    rates = keep.float().mean(-1)
    assert (rates - 0.3).abs().max() < 0.02, rates
    assert not random_keep((2, 3, 100), 0.0).any()
    assert random_keep((2, 3, 100), 1.0).all()


def test_random_keep_generator_reproducible(seed):
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = random_keep((2, 2, 500), 0.5, generator=g1)
    b = random_keep((2, 2, 500), 0.5, generator=g2)
    assert torch.equal(a, b)
    assert not torch.equal(a, random_keep((2, 2, 500), 0.5, generator=g1))  # generator advanced
    c = random_keep((2, 2, 500), 0.5, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(a, c)
    d = random_keep((2, 2, 500), 0.5, generator=torch.Generator().manual_seed(7), device="cpu")
    assert torch.equal(a, d) and d.device.type == "cpu"


@pytest.mark.parametrize("rate", [-0.1, 1.01, float("nan")])
def test_random_keep_bad_rate(rate):
    with pytest.raises(ValueError):
        random_keep((1, 1, 10), rate)


def test_random_keep_bad_shape():
    with pytest.raises(ValueError):
        random_keep((1, 10), 0.5)
    with pytest.raises(ValueError):
        random_keep((1, 1, 1, 10), 0.5)


@pytest.mark.parametrize("N,rate,k", [(100, 0.3, 30), (100, 0.101, 11), (7, 0.5, 4), (50, 0.0, 0), (50, 1.0, 50),
                                     (100, 0.07, 7), (100, 0.29, 29)])  # 0.07 * 100 = 7.000000000000001
def test_topk_keep_rate(seed, N, rate, k):
    scores = torch.randn(2, 3, N)
    keep = topk_keep(scores, rate)
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    assert (keep.sum(-1) == k).all()
    if 0 < k < N:
        # exactly the k highest scores of each head (scores are distinct)
        kth = scores.topk(k, dim=-1).values[..., -1:]
        assert torch.equal(keep, scores >= kth)


def test_topk_keep_k(seed):
    scores = torch.randn(2, 4, 64)
    keep = topk_keep(scores, k=9)
    assert (keep.sum(-1) == 9).all()
    assert torch.equal(keep, scores >= scores.topk(9, dim=-1).values[..., -1:])
    assert torch.equal(topk_keep(scores, k=9), keep)  # deterministic
    assert not topk_keep(scores, k=0).any()
    assert topk_keep(scores, k=64).all()


@pytest.mark.parametrize(
    "scores,kwargs",
    [
        (torch.randn(2, 3, 10), dict()),  # neither
        (torch.randn(2, 3, 10), dict(keep_rate=0.5, k=5)),  # both
        (torch.randn(2, 3, 10), dict(keep_rate=1.5)),
        (torch.randn(2, 3, 10), dict(keep_rate=-0.5)),
        (torch.randn(2, 3, 10), dict(k=11)),
        (torch.randn(2, 3, 10), dict(k=-1)),
        (torch.randn(3, 10), dict(k=2)),
        (torch.randn(1, 2, 3, 10), dict(k=2)),
        (torch.randint(0, 5, (2, 3, 10)), dict(k=2)),
        (torch.zeros(2, 3, 10, dtype=torch.bool), dict(k=2)),
    ],
)
def test_topk_keep_bad_input(scores, kwargs):
    with pytest.raises(ValueError):
        topk_keep(scores, **kwargs)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def _bad_cases():
    B, H, N = 2, 2, 24
    ok = torch.ones(B, H, N, dtype=torch.bool)
    return [
        ("mask (B, N)", ok[:, 0], ok),
        ("mask (H, N)", ok, ok[0]),
        ("mask (B, H, N+1)", torch.ones(B, H, N + 1, dtype=torch.bool), ok),
        ("mask (B, H, N-1)", ok, torch.ones(B, H, N - 1, dtype=torch.bool)),
        ("mask (B, H, 1)", torch.ones(B, H, 1, dtype=torch.bool), ok),
        ("mask (B, H, N, 1)", ok[..., None], ok),
        ("mask (1, H, N)", ok[:1], ok),
        ("uint8 mask", ok.to(torch.uint8), ok),
        ("int64 mask", ok, ok.long()),
        ("float mask", ok.float(), ok),
        ("meta q mask", torch.ones(B, H, N, dtype=torch.bool, device="meta"), ok),
        ("meta k mask", ok, torch.ones(B, H, N, dtype=torch.bool, device="meta")),
        ("list mask", ok.tolist(), ok),
    ]


@pytest.mark.parametrize("name,q_keep,k_keep", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_masks_raise(name, q_keep, k_keep):
    q, k, v, _ = _qkv(2, 2, 24, 16)
    with pytest.raises(ValueError):
        qk_sparse_attention(q, k, v, q_keep, k_keep)


def test_q_and_k_lengths_differ_raise():
    q = torch.randn(1, 2, 24, 16)
    k = v = torch.randn(1, 2, 30, 16)
    for n in (24, 30):
        keep = torch.ones(1, 2, n, dtype=torch.bool)
        with pytest.raises(ValueError):
            qk_sparse_attention(q, k, v, keep, keep)
    with pytest.raises(ValueError):
        qk_sparse_attention(q, k, v, torch.ones(1, 2, 24, dtype=torch.bool), torch.ones(1, 2, 30, dtype=torch.bool))


@pytest.mark.parametrize(
    "shapes",
    [((1, 2, 24, 16), (1, 2, 24, 32), (1, 2, 24, 16)),  # head_dim
     ((1, 2, 24, 16), (1, 3, 24, 16), (1, 3, 24, 16)),  # heads
     ((1, 2, 24, 16), (1, 2, 24, 16), (1, 2, 23, 16)),  # v length
     ((2, 24, 16), (2, 24, 16), (2, 24, 16))],  # 3-d
)
def test_bad_qkv_raise(shapes):
    q, k, v = (torch.randn(s) for s in shapes)
    keep = torch.ones(*q.shape[:-1], dtype=torch.bool)
    with pytest.raises(ValueError):
        qk_sparse_attention(q, k, v, keep, keep)


def test_bad_dtype_and_kernel_options_raise():
    q = k = v = torch.randn(1, 1, 8, 16, dtype=torch.float64)
    keep = torch.ones(1, 1, 8, dtype=torch.bool)
    with pytest.raises(ValueError):
        qk_sparse_attention(q, k, v, keep, keep)
    q = k = v = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError):
        qk_sparse_attention(q, k, v, keep, keep, kernel_options=dict(BLOCK_M=24))
    with pytest.raises(ValueError):
        qk_sparse_attention(q, k, v, keep, keep, kernel_options=dict(BLOCK=16))


# ---------------------------------------------------------------------------
# GPU (long sequences)
# ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("N", [4096, 8191])
def test_gpu_long_sequences(seed, N, D):
    B, H, dtype = 1, 2, torch.bfloat16
    dev = "cuda"
    q, k, v, do = (torch.randn(B, H, N, D, device=dev).to(dtype) for _ in range(4))
    q_keep = torch.rand(B, H, N, device=dev) < 0.3
    k_keep = torch.rand(B, H, N, device=dev) < 0.3
    got = _kernel(q, k, v, do, q_keep, k_keep)
    want = _reference(q, k, v, do, q_keep, k_keep)
    _assert_close(got, want, TOL[dtype], GRAD_TOL[dtype], f"N={N} D={D}: ")
    del want
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("N", [4096, 8191])
def test_gpu_all_kept_equals_flash(seed, N, D):
    B, H, dtype = 1, 2, torch.bfloat16
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda").to(dtype) for _ in range(4))
    keep = torch.ones(B, H, N, dtype=torch.bool, device="cuda")
    got = _kernel(q, k, v, do, keep, keep)
    dense = _grads(lambda q, k, v: flash_attention(q, k, v, causal=True), q, k, v, do)
    _assert_close(got, dense, 1e-2, what=f"N={N} D={D} vs flash_attention: ")
