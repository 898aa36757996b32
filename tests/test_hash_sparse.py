"""Hash-bucket attention (sparseflash.hash_sparse) against the float64 reference.

Kernels run through Triton's interpreter on CPU tensors here (small sizes); the
``gpu``-marked tests at the end run long sequences on a CUDA device.
"""
from __future__ import annotations

import pytest
import torch
from helpers import GRAD_TOL, TOL
from helpers import assert_close as _assert_close
from helpers import err as _err
from helpers import grads as _grads
from helpers import rounding_floor

from sparseflash import flash_attention, hash_sparse_attention, lsh_buckets
from sparseflash import reference as ref

SMALL = dict(BLOCK_M=16, BLOCK_N=16)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _reference(q, k, v, do, qb, kb, sm_scale=None, window=0):
    mask = ref.hash_mask(qb, kb, window=window)
    return _grads(lambda q, k, v: ref.attention(q, k, v, mask, sm_scale), q.double(), k.double(), v.double(),
                  do.double())


def _kernel(q, k, v, do, qb, kb, sm_scale=None, **kw):
    return _grads(lambda q, k, v: hash_sparse_attention(q, k, v, qb, kb, sm_scale, **kw), q, k, v, do)


def _qkv(B, H, N, D, dtype=torch.float32):
    return tuple(torch.randn(B, H, N, D).to(dtype) for _ in range(4))


def _check(B, H, N, D, dtype, qb, kb, sm_scale=None, Hkv=None, **kw):
    q, k, v, do = _qkv(B, H, N, D, dtype)
    if Hkv is not None:  # grouped-query attention: k, v (and kb) with Hkv heads
        k, v = k[:, :Hkv].contiguous(), v[:, :Hkv].contiguous()
    got = _kernel(q, k, v, do, qb, kb, sm_scale, **kw)
    assert got[0].dtype == dtype and got[0].shape == (B, H, N, D)
    window = kw.get("window", 0)
    want = _reference(q, k, v, do, qb, kb, sm_scale, window)
    floor = rounding_floor(want, got[0], q, k, v, do, ref.hash_mask(qb, kb, window=window), sm_scale)
    _assert_close(got, want, TOL[dtype], GRAD_TOL[dtype], floor=floor)
    return got


# ---------------------------------------------------------------------------
# Against the reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("N", [1, 7, 100, 257])
@pytest.mark.parametrize("n_buckets", [1, 3, 16])
def test_buckets_and_lengths(seed, n_buckets, N):
    """Queries and keys bucketed independently (random ids), some outside ``[0, n_buckets)``
    (negative or too large, mixed with ids in range in every head): those share the
    overflow run and are attended exactly all the same."""
    B, H, D = 1, 2, 64
    qb = torch.randint(-2, n_buckets + 2, (B, H, N))
    kb = torch.randint(-2, n_buckets + 2, (B, H, N))
    # N = 100 on 16x16 tiles; N = 257 on the CPU default 32x32 (one token past a tile edge
    # either way; 257 on 16x16 tiles: test_same_buckets_for_q_and_k)
    _check(B, H, N, D, torch.float32, qb, kb, n_buckets=n_buckets, kernel_options=SMALL if N == 100 else None)


@pytest.mark.parametrize("N", [7, 100, 257])
@pytest.mark.parametrize("n_buckets", [1, 3, 16])
def test_same_buckets_for_q_and_k(seed, n_buckets, N):
    """``q_buckets is k_buckets``: every query sees at least itself."""
    B, H, D = 1, 2, 32
    buckets = torch.randint(0, n_buckets, (B, H, N))
    out = _check(B, H, N, D, torch.float32, buckets, buckets, n_buckets=n_buckets, kernel_options=SMALL)[0]
    assert (out.abs().sum(-1) > 0).all()


@pytest.mark.parametrize("same", [False, True])
def test_more_buckets_than_tokens(seed, same):
    B, H, N, D = 1, 1, 100, 32  # one head: a head's layout is its own (several heads: the tests above)
    qb = torch.randint(0, 300, (B, H, N))
    kb = qb if same else torch.randint(0, 300, (B, H, N))
    _check(B, H, N, D, torch.float32, qb, kb, n_buckets=300, kernel_options=SMALL)


def test_singleton_buckets(seed):
    """Every token alone in its bucket: the output is v itself."""
    B, H, N, D = 1, 2, 40, 16
    buckets = torch.randperm(N).repeat(B, H, 1)
    _check(B, H, N, D, torch.float32, buckets, buckets, kernel_options=SMALL)
    q, k, v, _ = _qkv(B, H, N, D)
    out = hash_sparse_attention(q, k, v, buckets, buckets)
    torch.testing.assert_close(out, v, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [16, 64, 128, 72])
def test_head_dims_and_dtypes(seed, D, dtype):
    B, H, N = 1, 2, 100
    qb = torch.randint(0, 3, (B, H, N))
    kb = torch.randint(0, 3, (B, H, N))
    _check(B, H, N, D, dtype, qb, kb)


@pytest.mark.parametrize("N,n_buckets", [(7, 1), (100, 3), (257, 16), (257, 1)])
def test_bf16(seed, N, n_buckets):
    B, H, D = 1, 2, 64
    buckets = torch.randint(0, n_buckets, (B, H, N))
    # N = 257 on the CPU default 32x32 tiles (one token past a tile edge), the others on 16x16
    _check(B, H, N, D, torch.bfloat16, buckets, buckets, kernel_options=None if N == 257 else SMALL)


@pytest.mark.parametrize("blocks", [(16, 16), (16, 32), (32, 16), (32, 32)])
def test_tile_shapes_batch(seed, blocks):
    """B=2, different buckets per (batch, head), tiles of mixed sizes."""
    B, H, N, D = 2, 2, 150, 32
    qb = torch.randint(0, 5, (B, H, N))
    kb = torch.randint(0, 5, (B, H, N))
    _check(B, H, N, D, torch.float32, qb, kb, n_buckets=5, kernel_options=dict(BLOCK_M=blocks[0], BLOCK_N=blocks[1]))


@pytest.mark.parametrize("n_buckets", [4, 16])
def test_lsh_buckets(seed, n_buckets):
    """Buckets from LSH with shared rotations, as in the README, plus uneven bucket sizes."""
    B, H, N, D = 1, 2, 128, 32
    q, k, v, do = _qkv(B, H, N, D)
    qb = lsh_buckets(q, n_buckets, seed=seed)
    kb = lsh_buckets(k, n_buckets, seed=seed)
    got = _kernel(q, k, v, do, qb, kb, n_buckets=n_buckets, kernel_options=SMALL)
    _assert_close(got, _reference(q, k, v, do, qb, kb), 1e-3, 1e-3)


def test_int32_buckets_and_sm_scale(seed):
    B, H, N, D = 1, 2, 70, 32
    qb = torch.randint(0, 4, (B, H, N), dtype=torch.int32)
    kb = torch.randint(0, 4, (B, H, N), dtype=torch.int32)
    _check(B, H, N, D, torch.float32, qb, kb, sm_scale=1.3, kernel_options=SMALL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous(seed, dtype):
    """q, k, v as views of one packed (B, N, 3, H, D) tensor, and a non-contiguous upstream gradient."""
    B, H, N, D = 2, 2, 90, 32
    packed = torch.randn(B, N, 3, H, D).to(dtype).requires_grad_()
    q, k, v = (packed[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    qb = torch.randint(0, 3, (B, H, N))
    kb = torch.randint(0, 3, (B, H, N)).transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous ids
    assert not kb.is_contiguous()
    do_bnhd = torch.randn(B, N, H, D).to(dtype)
    out = hash_sparse_attention(q, k, v, qb, kb, kernel_options=SMALL)
    out.transpose(1, 2).backward(do_bnhd)

    packed64 = packed.detach().double().requires_grad_()
    q64, k64, v64 = (packed64[:, :, i].transpose(1, 2) for i in range(3))
    want = ref.attention(q64, k64, v64, ref.hash_mask(qb, kb))
    want.transpose(1, 2).backward(do_bnhd.double())
    assert _err(out, want) <= TOL[dtype]
    for i, name in enumerate(("dq", "dk", "dv")):
        err = _err(packed.grad[:, :, i], packed64.grad[:, :, i])
        assert err <= GRAD_TOL[dtype], f"{name}: {err:.3g}"


def test_strided_last_dim(seed):
    B, H, N, D = 1, 2, 50, 32
    bases = [torch.randn(B, H, D, N, requires_grad=True) for _ in range(3)]
    q, k, v = (t.transpose(-1, -2) for t in bases)
    assert q.stride(-1) != 1
    do = torch.randn(B, H, N, D)
    qb = torch.randint(0, 3, (B, H, N))
    kb = torch.randint(0, 3, (B, H, N))
    out = hash_sparse_attention(q, k, v, qb, kb)
    out.backward(do)
    got = (out, *(t.grad.transpose(-1, -2) for t in bases))
    _assert_close(got, _reference(q, k, v, do, qb, kb), 1e-3, 1e-3)


# ---------------------------------------------------------------------------
# Special buckets
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [1, 45, 100])
def test_one_bucket_equals_flash(seed, N, dtype):
    B, H, D = 1, 2, 32  # (two batches: test_tile_shapes_batch, test_non_contiguous, test_lonely_queries...)
    q, k, v, do = _qkv(B, H, N, D, dtype)
    bucket = torch.full((B, H, N), 5)
    got = _kernel(q, k, v, do, bucket, bucket, kernel_options=SMALL)
    dense = _grads(lambda q, k, v: flash_attention(q, k, v, causal=True, kernel_options=SMALL), q, k, v, do)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    _assert_close(got, dense, tol, tol, "vs flash_attention: ")


def test_disjoint_buckets_give_exact_zeros(seed):
    """Queries in buckets no key uses: exact zeros everywhere."""
    B, H, N, D = 1, 2, 50, 16
    q, k, v, do = _qkv(B, H, N, D)
    out, dq, dk, dv = _kernel(q, k, v, do, torch.zeros(B, H, N, dtype=torch.long),
                              torch.ones(B, H, N, dtype=torch.long))
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.equal(t, torch.zeros_like(t)), f"{name} not exactly zero"


def test_lonely_queries_get_exact_zeros(seed):
    """A query with no earlier key in its bucket: 0 output and 0 dq; an unseen key: 0 dk, dv."""
    B, H, N, D = 2, 2, 80, 32
    q, k, v, do = _qkv(B, H, N, D)
    qb = torch.randint(0, 6, (B, H, N))
    kb = torch.randint(0, 6, (B, H, N))
    out, dq, dk, dv = _kernel(q, k, v, do, qb, kb, kernel_options=SMALL)
    mask = ref.hash_mask(qb, kb)
    lonely, unseen = ~mask.any(-1), ~mask.any(-2)
    assert lonely.any() and unseen.any()
    assert (out[lonely] == 0).all() and (dq[lonely] == 0).all()
    assert (dk[unseen] == 0).all() and (dv[unseen] == 0).all()


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def _bad_cases():
    B, H, N = 2, 2, 24
    ok = torch.zeros(B, H, N, dtype=torch.long)
    neg = ok.clone()
    neg[1, 1, 5] = -1
    return [
        ("ids (B, N)", ok[:, 0], ok, None),
        ("ids (H, N)", ok, ok[0], None),
        ("ids (B, H, N+1)", torch.zeros(B, H, N + 1, dtype=torch.long), ok, None),
        ("ids (B, H, N-1)", ok, torch.zeros(B, H, N - 1, dtype=torch.long), None),
        ("ids (B, H, N, 1)", ok[..., None], ok, None),
        ("ids (1, H, N)", ok[:1], ok, None),
        ("negative q ids", neg, ok, None),
        ("negative k ids", ok, neg, None),
        ("float ids", ok.float(), ok, None),
        ("half ids", ok, ok.half(), None),
        ("bool ids", ok.bool(), ok, None),
        ("complex ids", ok, ok.to(torch.complex64), None),
        ("ids too large for int32", ok, torch.full((B, H, N), 2**31 - 1), None),
        ("meta q ids", torch.zeros(B, H, N, dtype=torch.long, device="meta"), ok, None),
        ("meta k ids", ok, torch.zeros(B, H, N, dtype=torch.long, device="meta"), None),
        ("q id >= n_buckets", ok + 4, ok, 4),
        ("k id >= n_buckets", ok, ok + 3, 3),
        ("list ids", ok.tolist(), ok, None),
    ]


@pytest.mark.parametrize("name,qb,kb,n_buckets", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_buckets_raise(name, qb, kb, n_buckets):
    q, k, v, _ = _qkv(2, 2, 24, 16)
    with pytest.raises(ValueError):
        hash_sparse_attention(q, k, v, qb, kb, n_buckets=n_buckets, validate=True)


#: Ids that are labels, not bucket numbers: (name, ids to draw from, n_buckets).
LABEL_CASES = [
    # int64 ids equal in their low 32 bits to ids in range: different labels
    ("low 32 bits equal", [0, 1, 2, 2**32, 2**32 + 1, -2**32 + 2], 4),
    # ids need not be dense: huge and negative ones, gaps, beside small ones; no n_buckets
    # (the default fast range, [0, 64))
    ("huge and negative", [0, 7, 63, 64, 1_000_000, 2**31 - 2, 10**12, -10**12, -1], None),
]


@pytest.mark.parametrize("N,Hkv,window", [(1, 2, 0), (40, 1, 0), (60, 2, 5)])
@pytest.mark.parametrize("name,ids,n_buckets", LABEL_CASES, ids=[c[0] for c in LABEL_CASES])
def test_ids_are_labels(seed, name, ids, n_buckets, N, Hkv, window):
    """Any integer ids, with or without ``n_buckets``: pair ``(i, j)`` is allowed iff the ids are
    equal as integers (or within the window), exactly as ``reference.hash_mask``; ids outside
    ``[0, n_buckets)`` share the overflow run, whose tiles compare the ids themselves.
    Grouped-query attention (``Hkv = 1``) and a window > 0 included."""
    B, H = 1, 2
    ids = torch.tensor(ids)
    qb, kb = ids[torch.randint(0, len(ids), (B, H, N))], ids[torch.randint(0, len(ids), (B, Hkv, N))]
    _check(B, H, N, 16, torch.float32, qb, kb, Hkv=Hkv, n_buckets=n_buckets, window=window, kernel_options=SMALL)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_id_dtypes_are_labels(seed, dtype):
    """Ids of any integer dtype, those outside ``[0, n_buckets)`` (negative ones for the signed
    dtypes) included, compared as the integers they are."""
    q, k, v, _ = _qkv(1, 1, 20, 16)
    low = 0 if dtype == torch.uint8 else -3
    qb, kb = torch.randint(low, 6, (1, 1, 20)), torch.randint(low, 6, (1, 1, 20))
    out = hash_sparse_attention(q, k, v, qb.to(dtype), kb.to(dtype), n_buckets=4, kernel_options=SMALL)
    assert _err(out, ref.attention(q, k, v, ref.hash_mask(qb, kb))) <= TOL[torch.float32]


def test_validate_is_a_fast_path_check(seed):
    """``validate=True`` raises on an id outside ``[0, n_buckets)`` (default ``[0, 64)``): not
    because the result would be wrong (it is exact without ``validate``) but because that
    token leaves the tile-skipping path."""
    q, k, v, _ = _qkv(1, 1, 20, 16)
    ids = torch.randint(0, 4, (1, 1, 20))
    hash_sparse_attention(q, k, v, ids, ids + 60, validate=True)  # all in [0, 64)
    for qb, kb, n, match in ((ids, ids + 61, None, r"\[0, 64\).*default"), (ids - 1, ids, 4, r"\[0, 4\)"),
                             (ids, (ids + 1) * 2**40, 2**40, r"\[0, 65536\)")):
        with pytest.raises(ValueError, match=match):
            hash_sparse_attention(q, k, v, qb, kb, n_buckets=n, validate=True)


@pytest.mark.parametrize("n_buckets", [2.5, 4.0, True, 0, "4"])
def test_n_buckets_must_be_a_positive_int(n_buckets):
    q, k, v, _ = _qkv(1, 1, 8, 16)
    ids = torch.zeros(1, 1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="n_buckets must be a positive int"):
        hash_sparse_attention(q, k, v, ids, ids, n_buckets=n_buckets)


def test_numpy_n_buckets(seed):
    np = pytest.importorskip("numpy")
    q, k, v, _ = _qkv(1, 1, 8, 16)
    ids = torch.randint(0, 4, (1, 1, 8))
    assert torch.equal(hash_sparse_attention(q, k, v, ids, ids, n_buckets=np.int64(4)),
                       hash_sparse_attention(q, k, v, ids, ids, n_buckets=4))


def test_n_buckets_check(seed):
    B, H, N, D = 1, 2, 30, 16
    q, k, v, _ = _qkv(B, H, N, D)
    buckets = torch.randint(0, 8, (B, H, N))
    buckets[0, 0, 0] = 7
    out = hash_sparse_attention(q, k, v, buckets, buckets, n_buckets=8)
    assert not torch.isnan(out).any()
    with pytest.raises(ValueError, match="n_buckets"):
        hash_sparse_attention(q, k, v, buckets, buckets, n_buckets=7, validate=True)
    other = torch.randint(0, 8, (B, H, N))
    other[0, 1, 3] = 8
    with pytest.raises(ValueError, match="n_buckets"):  # k ids are checked too
        hash_sparse_attention(q, k, v, buckets, other, n_buckets=8, validate=True)
    out = hash_sparse_attention(q, k, v, buckets, other, n_buckets=9)
    assert not torch.isnan(out).any()


def test_q_and_k_lengths_differ_raise():
    q = torch.randn(1, 2, 24, 16)
    k = v = torch.randn(1, 2, 30, 16)
    for n in (24, 30):
        ids = torch.zeros(1, 2, n, dtype=torch.long)
        with pytest.raises(ValueError):
            hash_sparse_attention(q, k, v, ids, ids)
    with pytest.raises(ValueError):
        hash_sparse_attention(q, k, v, torch.zeros(1, 2, 24, dtype=torch.long),
                              torch.zeros(1, 2, 30, dtype=torch.long))


@pytest.mark.parametrize(
    "shapes",
    [((1, 2, 24, 16), (1, 2, 24, 32), (1, 2, 24, 16)),
     ((1, 2, 24, 16), (1, 3, 24, 16), (1, 3, 24, 16)),
     ((1, 2, 24, 16), (1, 2, 24, 16), (1, 2, 23, 16)),
     ((2, 24, 16), (2, 24, 16), (2, 24, 16)),
     ((1, 2, 24, 8), (1, 2, 24, 8), (1, 2, 24, 8))],
)
def test_bad_qkv_raise(shapes):
    q, k, v = (torch.randn(s) for s in shapes)
    ids = torch.zeros(*q.shape[:-1], dtype=torch.long)
    with pytest.raises(ValueError):
        hash_sparse_attention(q, k, v, ids, ids)


# ---------------------------------------------------------------------------
# GPU (long sequences)
# ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("N", [4096, 8191])
def test_gpu_long_sequences(seed, N, D):
    B, H, dtype = 1, 2, torch.bfloat16
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda").to(dtype) for _ in range(4))
    qb = lsh_buckets(q, 16, seed=seed)
    kb = lsh_buckets(k, 16, seed=seed)
    got = _kernel(q, k, v, do, qb, kb, n_buckets=16)
    want = _reference(q, k, v, do, qb, kb)
    _assert_close(got, want, TOL[dtype], GRAD_TOL[dtype], f"N={N} D={D}: ")
    del want
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("N", [4096, 8191])
def test_gpu_random_buckets(seed, N, D):
    """The default call, with a tenth of the ids outside its fast range (huge or negative
    labels, in the overflow run)."""
    B, H, dtype = 1, 2, torch.bfloat16
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda").to(dtype) for _ in range(4))
    qb = torch.randint(0, 16, (B, H, N), device="cuda")
    kb = torch.randint(0, 16, (B, H, N), device="cuda")
    labels = torch.tensor([10**12, 10**12 + 1, -1, -2**40], device="cuda")
    for ids in (qb, kb):
        far = torch.rand(B, H, N, device="cuda") < 0.1
        ids[far] = labels[torch.randint(0, 4, (int(far.sum()),), device="cuda")]
    got = _kernel(q, k, v, do, qb, kb)
    want = _reference(q, k, v, do, qb, kb)
    _assert_close(got, want, TOL[dtype], GRAD_TOL[dtype], f"N={N} D={D}: ")
    del want
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("N", [4096, 8191])
def test_gpu_one_bucket_equals_flash(seed, N, D):
    B, H, dtype = 1, 2, torch.bfloat16
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda").to(dtype) for _ in range(4))
    bucket = torch.zeros(B, H, N, dtype=torch.long, device="cuda")
    got = _kernel(q, k, v, do, bucket, bucket)
    dense = _grads(lambda q, k, v: flash_attention(q, k, v, causal=True), q, k, v, do)
    _assert_close(got, dense, 1e-2, 1e-2, f"N={N} D={D} vs flash_attention: ")
