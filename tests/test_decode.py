"""Decode attention (:func:`sparseflash.decode.decode_attention`) against the float64 reference.

* dense and index-list modes, GQA, ragged head dims, per-sequence cache lengths, against
  :func:`sparseflash.reference.decode_attention`;
* 1 and 3 splits (and more splits than key blocks) give the same result;
* an index list of every row equals the dense call, and the reference's index-list mode
  equals its dense one (so the two references check each other);
* empty queries (``cache_len = 0``, ``n_keys = 0``, only out-of-range indices) give 0, never NaN;
* float16 / bfloat16 within a relative bound, fixed seeds;
* a sliding window, per-kv-head lists chosen by ``list_id`` (one per hash bucket) and their
  union with the window (each row once), against the reference on the explicit union list;
* bad inputs raise ``ValueError``.

Everything runs on the CPU interpreter at small sizes; the ``gpu`` tests check S = 65536
and that a call with tensor lengths never synchronises with the host.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from sparseflash import reference as ref
from sparseflash.decode import decode_attention

f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
TOL = {f32: 1e-5, f16: 2e-2, bf16: 2e-2}
B, H = 2, 4


def _inputs(S, D, h_kv, dtype=f32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=g)
    k = torch.randn(B, h_kv, S, D, generator=g)
    v = torch.randn(B, h_kv, S, D, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def _index_list(S, L, seed=0):
    """``(B, H, L)`` int32 lists of distinct rows (random subsets of ``[0, S)``), ``n_keys``
    ``(B, H)`` in ``[0, min(S, L)]`` with a 0 and a full list among them; entries past
    ``n_keys`` hold -1 or real rows, which must both be ignored."""
    g = torch.Generator().manual_seed(seed)
    n = min(S, L)
    idx = torch.stack([torch.randperm(S, generator=g)[:n] for _ in range(B * H)]).view(B, H, n)
    idx = torch.cat([idx, torch.full((B, H, L - n), -1)], dim=-1)
    n_keys = torch.randint(0, n + 1, (B, H), generator=g)
    n_keys[0, 0], n_keys[1, -1] = 0, n
    for b in range(B):  # garbage past n_keys: a real row (would change the result if read)
        for h in range(H):
            if n_keys[b, h] < L:
                idx[b, h, n_keys[b, h]] = 0
    return idx.int(), n_keys.int()


def _err(got, want):
    """Relative Frobenius error (absolute where ``want`` is all zero); no NaN or inf allowed."""
    assert got.shape == want.shape
    assert torch.isfinite(got).all(), "NaN or inf in the kernel's output"
    got, want = got.double().cpu(), want.double().cpu()
    norm = want.norm()
    diff = (got - want).norm()
    return (diff / norm).item() if norm > 0 else diff.item()


def _check(got, want, dtype):
    e = _err(got, want)
    assert e <= TOL[dtype], f"relative error {e:.3g} > {TOL[dtype]}"


# ---------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("h_kv", [4, 2])
@pytest.mark.parametrize("D", [16, 64])
@pytest.mark.parametrize("S", [1, 7, 100, 257])
def test_dense_matches_reference(S, D, h_kv):
    q, k, v = _inputs(S, D, h_kv, seed=S + D)
    lens = torch.tensor([S, max(S // 2, 1)])
    want = ref.decode_attention(q, k, v, lens)
    one = decode_attention(q, k, v, lens, num_splits=1)
    three = decode_attention(q, k, v, lens, num_splits=3)
    assert one.dtype == f32 and one.shape == (B, H, 1, D)
    _check(one, want, f32)
    _check(three, want, f32)
    torch.testing.assert_close(one, three, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("h_kv", [4, 2])
@pytest.mark.parametrize("D", [16, 64])
@pytest.mark.parametrize("S", [7, 100, 257])
def test_index_list_matches_reference(S, D, h_kv):
    q, k, v = _inputs(S, D, h_kv, seed=S * D)
    idx, n_keys = _index_list(S, L=min(S, 40) + 3, seed=S)
    lens = torch.tensor([S, S])
    want = ref.decode_attention(q, k, v, lens, idx, n_keys)
    assert (want[0, 0] == 0).all()  # n_keys = 0 there
    one = decode_attention(q, k, v, lens, key_index=idx, n_keys=n_keys, num_splits=1)
    three = decode_attention(q, k, v, lens, key_index=idx, n_keys=n_keys, num_splits=3)
    _check(one, want, f32)
    _check(three, want, f32)
    torch.testing.assert_close(one, three, rtol=1e-5, atol=1e-6)
    assert (one[0, 0] == 0).all() and (three[0, 0] == 0).all()


def test_index_list_respects_cache_len():
    """Indices at or past the sequence's ``cache_len`` (or negative) are ignored."""
    S, D = 100, 16
    q, k, v = _inputs(S, D, 2, seed=1)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(-5, S + 5, (B, H, 60), generator=g).int()  # some negative, some >= S
    lens = torch.tensor([30, 0])  # sequence 1: nothing valid
    want = ref.decode_attention(q, k, v, lens, idx)
    for splits in (1, 3):
        got = decode_attention(q, k, v, lens, key_index=idx, num_splits=splits)
        _check(got, want, f32)
        assert (got[1] == 0).all()


def test_full_index_list_equals_dense():
    S, D = 100, 64
    q, k, v = _inputs(S, D, 2, seed=2)
    lens = torch.tensor([100, 41])
    idx = torch.arange(S, dtype=torch.int32).expand(B, H, S)
    want = ref.decode_attention(q, k, v, lens)
    torch.testing.assert_close(ref.decode_attention(q, k, v, lens, idx), want, rtol=1e-12, atol=1e-12)
    dense = decode_attention(q, k, v, lens, num_splits=3)
    sparse = decode_attention(q, k, v, lens, key_index=idx, num_splits=3)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    # The same with the lengths as n_keys of a list that holds each sequence's valid rows.
    sparse2 = decode_attention(q, k, v, S, key_index=idx, n_keys=lens[:, None].expand(B, H).int())
    torch.testing.assert_close(sparse2, dense, rtol=1e-5, atol=1e-6)


def test_int_cache_len_and_many_splits():
    """A Python-int ``cache_len``; more splits than key blocks (empty splits merge to nothing),
    and more than 64 (the merge's wider, 8-warp form)."""
    S, D = 7, 16
    q, k, v = _inputs(S, D, 4, seed=3)
    for n in (0, 1, 5, 7):
        want = ref.decode_attention(q, k, v, n)
        for splits in (1, 2, 5) if n != 7 else (1, 2, 5, 65):
            got = decode_attention(q, k, v, n, num_splits=splits)
            _check(got, want, f32)
        if n == 0:
            assert (got == 0).all()


def test_uneven_splits():
    """Block counts that the splits do not divide (a block past a multiple, as at 65537 keys):
    each block is walked by exactly one split, dense and with a window ∪ list."""
    D = 16
    for S in (65, 129):  # 5 and 9 blocks of 16 on the interpreter
        q, k, v = _inputs(S, D, 2, seed=S)
        rows, count = _index_list(S, 40, seed=S)
        want = ref.decode_attention(q, k, v, S)
        for splits in (2, 4, 16):
            _check(decode_attention(q, k, v, S, num_splits=splits), want, f32)
        lens = torch.tensor([S, S - 100])
        union = torch.full((B, H, 20 + 40), -1)
        for b, h in itertools.product(range(B), range(H)):
            n = int(lens[b])
            listed = rows[b, h, :count[b, h]].long()
            keys = torch.cat([torch.arange(n - 20, n), listed[listed < n - 20]])
            union[b, h, :len(keys)] = keys
        want = ref.decode_attention(q, k, v, lens, union)
        for splits in (3, 8):
            _check(decode_attention(q, k, v, lens, key_index=rows, n_keys=count, window=20, num_splits=splits),
                   want, f32)


def test_scale_and_strided_cache():
    """A given scale; a cache that is a view into a longer buffer (as a preallocated cache)."""
    S, D = 100, 64
    q, k_buf, v_buf = _inputs(2 * S, D, 2, seed=4)
    k, v = k_buf[:, :, :S], v_buf[:, :, :S]
    want = ref.decode_attention(q, k, v, 77, scale=0.3)
    _check(decode_attention(q, k, v, 77, scale=0.3, num_splits=3), want, f32)


@pytest.mark.parametrize("dtype", [f16, bf16])
def test_half_precision(dtype):
    S, D = 257, 64
    q, k, v = _inputs(S, D, 2, dtype=dtype, seed=5)
    lens = torch.tensor([257, 130])
    idx, n_keys = _index_list(S, L=50, seed=5)
    for kw in ({}, dict(key_index=idx, n_keys=n_keys)):
        want = ref.decode_attention(q, k, v, lens, kw.get("key_index"), kw.get("n_keys"))
        for splits in (1, 3):
            got = decode_attention(q, k, v, lens, num_splits=splits, **kw)
            assert got.dtype == dtype
            _check(got, want, dtype)


def test_no_nan_when_empty():
    S, D = 7, 16
    q, k, v = _inputs(S, D, 2, seed=6)
    idx = torch.zeros(B, H, 4, dtype=torch.int32)
    for splits in (1, 3):
        assert (decode_attention(q, k, v, torch.zeros(B, dtype=torch.long), num_splits=splits) == 0).all()
        none = torch.zeros(B, H, dtype=torch.int32)
        assert (decode_attention(q, k, v, S, key_index=idx, n_keys=none, num_splits=splits) == 0).all()


def _bucket_lists(S, G, h_kv, seed):
    """Rows ``[0, S)`` of each (sequence, kv head) dealt to ``G`` buckets at random: ``rows``
    ``(B, h_kv, G, S)`` int32 (each bucket's rows ascending, then garbage), ``count`` ``(B, h_kv, G)``,
    and the bucket of every row ``(B, h_kv, S)``."""
    g = torch.Generator().manual_seed(seed)
    kb = torch.randint(0, G, (B, h_kv, S), generator=g)
    rows = torch.randint(0, S, (B, h_kv, G, S), generator=g).int()  # garbage past the counts
    count = torch.zeros(B, h_kv, G, dtype=torch.int32)
    for b in range(B):
        for j in range(h_kv):
            for u in range(G):
                mine = (kb[b, j] == u).nonzero().flatten()
                rows[b, j, u, :len(mine)] = mine.int()
                count[b, j, u] = len(mine)
    return rows, count, kb


def _union_list(lens, window, rows, count, list_id):
    """The explicit per-head ``(B, H, window + L)`` list of "window tail ∪ listed rows older
    than it" and its counts, for the reference."""
    h_kv, S = rows.shape[1], rows.shape[-1]
    out = torch.full((B, H, window + S), -1, dtype=torch.int64)
    for b in range(B):
        n = int(lens[b])
        start = max(n - window, 0) if window else n
        for h in range(H):
            u = int(list_id[b, h])
            listed = rows[b, h // (H // h_kv), u, :count[b, h // (H // h_kv), u]].long() if 0 <= u < rows.shape[2] \
                else torch.zeros(0, dtype=torch.int64)
            keys = torch.cat([torch.arange(start, n), listed[listed < start]])
            out[b, h, :len(keys)] = keys
    return out, torch.full((B, H), window + S)


@pytest.mark.parametrize("window", [0, 8, 200])
def test_window_and_bucket_lists_match_reference(window):
    """window alone (sliding window), per-kv-head lists picked by list_id, and their union: each row
    once (listed rows of the window tail are not counted twice); an unknown list id reads no list."""
    S, D, h_kv, G = 100, 16, 2, 3
    q, k, v = _inputs(S, D, h_kv, seed=window)
    lens = torch.tensor([S, 37])
    rows, count, _ = _bucket_lists(S, G, h_kv, seed=window)
    list_id = torch.randint(0, G, (B, H), generator=torch.Generator().manual_seed(1))
    list_id[0, 1], list_id[1, 2] = G, -1  # no such list: the window only
    idx, n = _union_list(lens, window, rows, count, list_id)
    want = ref.decode_attention(q, k, v, lens, idx, n)
    for splits in (1, 3):
        got = decode_attention(q, k, v, lens, key_index=rows, n_keys=count, list_id=list_id, window=window,
                               num_splits=splits)
        _check(got, want, f32)
    if window:  # the window alone, and a (B, H, L) list with it
        tail = torch.arange(S).expand(B, H, S)
        start = (lens - window).clamp_min(0)[:, None, None]
        want = ref.decode_attention(q, k, v, lens, torch.where(tail >= start, tail, -1))
        _check(decode_attention(q, k, v, lens, window=window, num_splits=3), want, f32)
        per_head, n_per_head = _index_list(S, L=30, seed=window)
        union = torch.cat([torch.where(tail >= start, tail, -1),
                           torch.where(per_head < start, per_head, -1)], dim=-1)
        valid = torch.arange(30) < n_per_head[..., None]
        union[..., S:] = torch.where(valid, union[..., S:], -1)
        want = ref.decode_attention(q, k, v, lens, union)
        got = decode_attention(q, k, v, lens, key_index=per_head, n_keys=n_per_head, window=window)
        _check(got, want, f32)


def _nan_tail_cases(D, dtype, seed, list_seed, id_seed):
    """Inputs whose cache is a view into a longer buffer with NaN in every row past ``cache_len``
    (a whole-box load reads them; they must never reach the sums), and ``(kwargs, want)`` for
    dense, window and window ∪ per-kv-head lists, the reference run on a NaN-free copy (its
    masked p·v would read the NaN)."""
    S, h_kv, G, window = 100, 2, 3, 8
    q, k_buf, v_buf = _inputs(S + 28, D, h_kv, dtype=dtype, seed=seed)
    lens = torch.tensor([S, 37])
    k_ref, v_ref = k_buf[:, :, :S].clone(), v_buf[:, :, :S].clone()
    for t in (k_buf, v_buf):
        t[0, :, S:] = float("nan")
        t[1, :, 37:] = float("nan")
    rows, count, _ = _bucket_lists(S, G, h_kv, seed=list_seed)
    list_id = torch.randint(0, G, (B, H), generator=torch.Generator().manual_seed(id_seed))
    idx, n = _union_list(lens, window, rows, count, list_id)
    tail = torch.arange(S).expand(B, H, S)
    start = (lens - window).clamp_min(0)[:, None, None]
    cases = [(dict(), ref.decode_attention(q, k_ref, v_ref, lens)),
             (dict(window=window), ref.decode_attention(q, k_ref, v_ref, lens, torch.where(tail >= start, tail, -1))),
             (dict(key_index=rows, n_keys=count, list_id=list_id, window=window),
              ref.decode_attention(q, k_ref, v_ref, lens, idx, n))]
    return q, k_buf[:, :, :S], v_buf[:, :, :S], lens, cases


@pytest.mark.parametrize("D", [64, 20])
def test_descriptor_path(D, monkeypatch):
    """Dense and window decoding of 2-byte caches aligned for the copy engine read their blocks
    through tensor descriptors (whole boxes, rows past the cache as 0); the rest (an odd head
    dim, window ∪ lists) through pointers.  Both give the reference's values on a view into a
    longer buffer whose rows past ``cache_len`` hold NaN (read by a box, never used)."""
    import sparseflash.decode as dec

    q, k, v, lens, cases = _nan_tail_cases(D, bf16, seed=D, list_seed=3, id_seed=2)
    assert dec._use_descriptors(k, v) == (D % 8 == 0)  # D = 20: a 40-byte row stride, pointers
    monkeypatch.setattr(dec, "DESC_MIN_BLOCKS", 0)  # (splits of these short caches walk few blocks)
    for kw, want in cases:
        for tma, evict in ((True, False), (False, True), (False, False)):
            monkeypatch.setattr(dec, "TMA", tma)
            monkeypatch.setattr(dec, "EVICT_FIRST", evict)
            for splits in (1, 3):
                _check(decode_attention(q, k, v, lens, num_splits=splits, **kw), want, bf16)


def test_descriptors_only_for_large_reads(monkeypatch):
    """Descriptors are used by calls that read at least ``DESC_MIN_BLOCKS`` blocks of the
    cache's capacity over all their rows (smaller ones load through pointers), never with a list."""
    import sparseflash.decode as dec

    seen = []

    class Spy:  # records whether the split kernel was launched with descriptor loads
        def __getitem__(self, grid):
            return lambda *a, **kw: (seen.append(kw["DESC"]), kernel[grid](*a, **kw))

    kernel = dec._decode_split_kernel
    monkeypatch.setattr(dec, "_decode_split_kernel", Spy())
    q, k, v = _inputs(100, 64, 2, dtype=bf16)  # B·H = 8 rows of 7 blocks of 16 on the interpreter
    rows, count = _index_list(100, 20)
    for min_blocks, want in ((0, True), (56, True), (57, False)):
        monkeypatch.setattr(dec, "DESC_MIN_BLOCKS", min_blocks)
        for mma in (False, True):  # grouped (products): B·Hkv = 4 rows, 28 blocks
            monkeypatch.setattr(dec, "MMA_FOLD", mma)
            seen.clear()
            decode_attention(q, k, v, 90, num_splits=2)
            decode_attention(q, k, v, 90, num_splits=2, key_index=rows, n_keys=count)
            assert seen == [want and (not mma or min_blocks <= 28), False]


@pytest.mark.parametrize("D", [16, 20, 64])
def test_mma_fold(D, monkeypatch):
    """The fold as matrix products (``MMA_FOLD``, the query as row 0 of 16) gives the reference's
    values: dense with GQA and ragged lengths, a window, window ∪ lists, an empty query, float32
    and bfloat16 (whose descriptor path reads NaN rows past cache_len: they must not reach the sums)."""
    import sparseflash.decode as dec

    monkeypatch.setattr(dec, "MMA_FOLD", True)
    monkeypatch.setattr(dec, "DESC_MIN_BLOCKS", 0)
    for dtype in (f32, bf16):
        q, k, v, lens, cases = _nan_tail_cases(D, dtype, seed=D + 1, list_seed=D, id_seed=D)
        for kw, want in cases:
            for splits in (1, 3):
                _check(decode_attention(q, k, v, lens, num_splits=splits, **kw), want, dtype)
    q, k, v = _inputs(7, D, 2)
    empty = decode_attention(q, k, v, torch.tensor([0, 0]), num_splits=3)
    assert torch.isfinite(empty).all() and not empty.any()


@pytest.mark.parametrize("h_kv", [1, 2, 8])
def test_mma_fold_groups_query_heads(h_kv, monkeypatch):
    """With the products fold (forced, or by default where there are groups), the query heads of a
    kv head are rows of one product: one program
    per (sequence, kv head, split) reads the cache once for all of them.  Values equal the
    reference for dense and window decoding, int and tensor lengths, 1 and 3 splits."""
    import sparseflash.decode as dec

    grids = []

    class Spy:  # records the launch grid of the split kernel
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    kernel = dec._decode_split_kernel
    monkeypatch.setattr(dec, "_decode_split_kernel", Spy())
    nq, S, D = 8, 37, 16
    g = torch.Generator().manual_seed(h_kv)
    q = torch.randn(2, nq, 1, D, generator=g).to(bf16)
    k, v = (torch.randn(2, h_kv, S, D, generator=g).to(bf16) for _ in range(2))
    lens = torch.tensor([S, 20])
    tail = torch.arange(S).expand(2, nq, S)
    for mma, window in itertools.product((True, None), (0, 5)):  # None: the default, products where grouped
        monkeypatch.setattr(dec, "MMA_FOLD", mma)
        start = (lens - window).clamp_min(0)[:, None, None] if window else torch.zeros(2, 1, 1, dtype=torch.long)
        want = ref.decode_attention(q, k, v, lens, torch.where(tail >= start, tail, -1))
        for splits in (1, 3):
            grids.clear()
            _check(decode_attention(q, k, v, lens, window=window, num_splits=splits), want, bf16)
            assert grids == [(2 * h_kv, splits)]
    want = ref.decode_attention(q, k, v, 20)
    _check(decode_attention(q, k, v, 20, num_splits=3), want, bf16)


# ---------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------


def _bad_calls():
    q, k, v = _inputs(7, 16, 2)
    idx = torch.zeros(B, H, 3, dtype=torch.int32)
    return {
        "two queries": (lambda: decode_attention(torch.cat([q, q], 2), k, v, 7), "one query"),
        "gqa": (lambda: decode_attention(q, k[:, :1].expand(B, 3, 7, 16), v[:, :1].expand(B, 3, 7, 16), 7),
                "divide"),
        "dtype": (lambda: decode_attention(q, k.half(), v.half(), 7), "dtype"),
        "shape": (lambda: decode_attention(q[0], k, v, 7), "shape"),
        "len too long": (lambda: decode_attention(q, k, v, 8), r"cache_len must be in \[0, S\]"),
        "len negative": (lambda: decode_attention(q, k, v, -1), r"cache_len must be in \[0, S\]"),
        "len float": (lambda: decode_attention(q, k, v, 3.0), "cache_len must be an int"),
        "len shape": (lambda: decode_attention(q, k, v, torch.tensor([7, 7, 7])), r"cache_len must have shape"),
        "len dtype": (lambda: decode_attention(q, k, v, torch.tensor([7.0, 7.0])), "integer"),
        "index shape": (lambda: decode_attention(q, k, v, 7, key_index=idx[:, :2]), "key_index must have shape"),
        "index dtype": (lambda: decode_attention(q, k, v, 7, key_index=idx.float()), "integer"),
        "n_keys shape": (lambda: decode_attention(q, k, v, 7, key_index=idx, n_keys=idx[..., 0, None]), "n_keys"),
        "n_keys alone": (lambda: decode_attention(q, k, v, 7, n_keys=idx[..., 0]), "with key_index"),
        "splits": (lambda: decode_attention(q, k, v, 7, num_splits=0), "num_splits"),
        "lists without id": (lambda: decode_attention(q, k, v, 7, key_index=idx[:, :2, None]), "needs list_id"),
        "lists id shape": (lambda: decode_attention(q, k, v, 7, key_index=idx[:, :2, None], list_id=idx[..., 0, None]),
                           r"list_id must have shape \(2, 4\)"),
        "lists n_keys shape": (lambda: decode_attention(q, k, v, 7, key_index=idx[:, :2, None], list_id=idx[..., 0],
                                                        n_keys=idx[..., 0]), r"n_keys must have shape \(2, 2, 1\)"),
        "id with 3-D list": (lambda: decode_attention(q, k, v, 7, key_index=idx, list_id=idx[..., 0]), "4-D"),
        "id alone": (lambda: decode_attention(q, k, v, 7, list_id=idx[..., 0]), "with key_index"),
        "window": (lambda: decode_attention(q, k, v, 7, window=-1), "window must be an int >= 0"),
        "scale": (lambda: decode_attention(q, k, v, 7, scale=float("nan")), "scale"),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_inputs_raise(case):
    call, match = _bad_calls()[case]
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("mma", [False, True])
@pytest.mark.parametrize("dtype", [bf16, f16, f32])
def test_gpu_long_cache(dtype, mma, monkeypatch):
    """A 64k cache with GQA and ragged lengths, dense and with lists, for both folds
    (elementwise, and as products with the query heads of a kv head as rows)."""
    import sparseflash.decode as dec

    monkeypatch.setattr(dec, "MMA_FOLD", mma)
    S, D = 65536, 128
    q, k, v = _inputs(S, D, 2, dtype=dtype, seed=7, device="cuda")
    lens = torch.tensor([S, 40000], device="cuda")
    want = ref.decode_attention(q, k, v, lens)
    _check(decode_attention(q, k, v, lens), want, dtype)  # default splits: 64
    _check(decode_attention(q, k, v, lens, num_splits=1), want, dtype)
    g = torch.Generator().manual_seed(7)
    idx = torch.stack([torch.randperm(S, generator=g)[:4096] for _ in range(B * H)]).view(B, H, -1)
    idx, n_keys = idx.int().cuda(), torch.randint(0, 4097, (B, H), generator=g).int().cuda()
    want = ref.decode_attention(q, k, v, lens, idx, n_keys)
    _check(decode_attention(q, k, v, lens, key_index=idx, n_keys=n_keys), want, dtype)


@pytest.mark.gpu
def test_gpu_no_host_sync():
    q, k, v = _inputs(4096, 64, 2, dtype=bf16, seed=8, device="cuda")
    lens = torch.tensor([4096, 1000], device="cuda")
    idx = torch.arange(512, dtype=torch.int32, device="cuda").expand(B, H, 512)
    n_keys = torch.full((B, H), 300, dtype=torch.int32, device="cuda")
    decode_attention(q, k, v, lens)  # compile first
    decode_attention(q, k, v, lens, key_index=idx, n_keys=n_keys)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        decode_attention(q, k, v, lens)
        decode_attention(q, k, v, lens, key_index=idx, n_keys=n_keys)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------------------
# The decode benchmark
# ---------------------------------------------------------------------------


def test_decode_bench_quick(tmp_path):
    """``python -m sparseflash.bench.decode --quick``: every row checked and timed (Flex skipped
    on the CPU), speedups against SDPA, JSON and CSV; an existing file is kept as a backup."""
    import json

    from sparseflash.bench import decode as bench

    out = tmp_path / "decode.json"
    out.write_text("{}")
    assert bench.main(["--quick", "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    data = json.loads(out.read_text())
    rows, meta = data["rows"], data["meta"]
    assert meta["complete"] and meta["schema"] == bench.SCHEMA and meta["heads"] == 2 and meta["head_dim"] == 16
    assert {(r["scope"], r["attention"]) for r in rows} == (
        {("layer", a) for a in bench.ATTENTIONS} | {("model", a) for a in bench.MODEL_ATTENTIONS})
    for r in rows:
        assert set(bench.ROW_FIELDS) <= set(r) and r["context"] == 40 and r["batch"] == 1
        if r["attention"].startswith("flex"):
            assert r["status"] == "skipped"
        else:
            assert r["status"] == "ok" and r["ms_per_token"] > 0 and r["speedup_vs_sdpa"] > 0, r
        if r["scope"] == "layer" and r["status"] == "ok":
            assert r["check_rel_err"] < 2e-2
    hash_row = next(r for r in rows if r["scope"] == "layer" and r["attention"] == "hash")
    assert hash_row["n_buckets"] == 4 and hash_row["window"] == 8 and hash_row["keys_read"] < 40
    assert out.with_suffix(".csv").exists() and list(tmp_path.glob("decode.json.bak-*"))

