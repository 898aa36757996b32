"""Grouped-query and multi-query attention (GQA/MQA) in all four attentions.

k and v have ``Hkv`` heads for ``Hq`` query heads (``Hkv`` divides ``Hq``); query head
``h`` reads kv head ``h // G``, ``G = Hq / Hkv``, as SDPA's ``enable_gqa=True``, and the
key-side sparsity inputs (``k_keep``, ``k_buckets``, ``k_pos``) have the kv heads too.
Checked here:

* values and gradients (dq, dk, dv) against the float64 reference, which repeats k, v
  and the key-side inputs to ``Hq`` heads, for G = 2, 4 and MQA (``Hkv = 1``), awkward
  lengths and head dims, float32 and bfloat16;
* the output and dq equal, bit for bit, those of the same call on k, v (and key-side
  inputs) repeated to ``Hq`` heads, and dk, dv the group sums of its gradients;
* which tiles each pass computes: every (query head, query tile, key tile) pair once,
  so each kv head's dK/dV work is done exactly once per query head of its group;
* the layout and tile-plan kernels against their PyTorch references, per kv head;
* bad head counts raise ``ValueError``.

CPU sizes stay small (Triton's interpreter); the ``gpu`` tests at the end use N = 1024.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import GRAD_TOL, TOL
from helpers import assert_close as _assert_close
from helpers import err as _err
from helpers import grads as _grads
from helpers import rounding_floor

from sparseflash import flash_attention, hash_sparse_attention, permuted_attention, qk_sparse_attention
from sparseflash import reference as ref
from sparseflash.layout import (
    K_PAD,
    Q_PAD,
    bucket_layouts,
    reference_layout,
)
from sparseflash.plan import reference_tile_plan, tile_plan
from sparseflash.tiles import TileRecord

f32, bf16 = torch.float32, torch.bfloat16
SMALL = dict(BLOCK_M=16, BLOCK_N=16)
KINDS = ("flash", "qk", "hash", "permuted")


# ---------------------------------------------------------------------------
# Inputs, the kernels and the reference
# ---------------------------------------------------------------------------


def _positions(B, H, n, spread=None):
    """Ascending positions with gaps (and repeats) in a random number of leading slots, then -1."""
    spread = 3 * n if spread is None else spread
    pos = torch.full((B, H, n), -1, dtype=torch.long)
    for b in range(B):
        for h in range(H):
            r = int(torch.randint(0, n + 1, ()))
            pos[b, h, :r] = torch.randint(0, spread, (r,)).sort().values
    return pos


def _sparsity(kind, B, Hq, Hkv, N, n_buckets=3, permuted_buckets=False):
    """The sparsity inputs of one attention: query side with ``Hq`` heads, key side ``Hkv``."""
    if kind == "flash":
        return {}
    if kind == "qk":
        return dict(q_keep=torch.rand(B, Hq, N) < 0.6, k_keep=torch.rand(B, Hkv, N) < 0.6)
    if kind == "hash":
        return dict(q_buckets=torch.randint(0, n_buckets, (B, Hq, N)),
                    k_buckets=torch.randint(0, n_buckets, (B, Hkv, N)))
    out = dict(q_pos=_positions(B, Hq, N), k_pos=_positions(B, Hkv, N))
    if permuted_buckets:  # slots sorted by bucket, positions ascending inside each
        for side, H in (("q", Hq), ("k", Hkv)):
            pos = out[side + "_pos"]
            buckets = torch.randint(0, n_buckets, (B, H, N))
            key = torch.where(pos >= 0, buckets * (10 * N) + pos, 10 * N * n_buckets)
            order = key.argsort(dim=-1, stable=True)
            out[side + "_pos"], out[side + "_buckets"] = pos.gather(-1, order), buckets.gather(-1, order)
    return out


def _call(kind, q, k, v, sparsity, causal=True, **kw):
    s = sparsity
    if kind == "flash":
        return flash_attention(q, k, v, causal=causal, **kw)
    if kind == "qk":
        return qk_sparse_attention(q, k, v, s["q_keep"], s["k_keep"], **kw)
    if kind == "hash":
        return hash_sparse_attention(q, k, v, s["q_buckets"], s["k_buckets"], **kw)
    return permuted_attention(q, k, v, s["q_pos"], s["k_pos"], s.get("q_buckets"), s.get("k_buckets"), **kw)


def _mask(kind, sparsity, n_q_heads, causal=True):
    """The float64 reference's mask, ``(B, Hq, N, N)`` (None: dense)."""
    s = {name: (ref.repeat_kv(t, n_q_heads) if name.startswith("k_") else t) for name, t in sparsity.items()}
    if kind == "flash":
        return None
    if kind == "qk":
        return ref.qk_dropping_mask(s["q_keep"], s["k_keep"])
    if kind == "hash":
        return ref.hash_mask(s["q_buckets"], s["k_buckets"])
    qp, kp = s["q_pos"][..., :, None], s["k_pos"][..., None, :]
    ok = (kp >= 0) & (qp >= 0) & (kp <= qp)
    if "q_buckets" in s:
        ok &= s["q_buckets"][..., :, None] == s["k_buckets"][..., None, :]
    return ok


def _qkv(B, Hq, Hkv, N, D, dtype):
    q, do = (torch.randn(B, Hq, N, D).to(dtype) for _ in range(2))
    k, v = (torch.randn(B, Hkv, N, D).to(dtype) for _ in range(2))
    return q, k, v, do


def _check(kind, B, Hq, Hkv, N, D, dtype, causal=True, device="cpu", sparsity_kw=None, **kw):
    q, k, v, do = (t.to(device) for t in _qkv(B, Hq, Hkv, N, D, dtype))
    sparsity = {n: t.to(device) for n, t in _sparsity(kind, B, Hq, Hkv, N, **(sparsity_kw or {})).items()}
    got = _grads(lambda q, k, v: _call(kind, q, k, v, sparsity, causal, **kw), q, k, v, do)
    assert got[0].shape == q.shape and got[0].dtype == dtype
    assert got[2].shape == k.shape and got[3].shape == v.shape  # dk, dv: kv heads, not repeated
    mask = _mask(kind, sparsity, Hq, causal)
    args = (mask, kw.get("sm_scale"))
    ref_causal = causal and kind == "flash"
    want = _grads(lambda q, k, v: ref.attention(q, k, v, *args, causal=ref_causal),
                  q.double(), k.double(), v.double(), do.double())
    floor = rounding_floor(want, got[0], q, k, v, do, *args, causal=ref_causal)
    _assert_close(got, want, TOL[dtype], GRAD_TOL[dtype], f"{kind} Hq={Hq} Hkv={Hkv} N={N} D={D} {dtype}: ", floor)


# ---------------------------------------------------------------------------
# Against the float64 reference
# ---------------------------------------------------------------------------

# (B, Hq, Hkv, N, D, dtype): a covering set of group sizes (2, 4, MQA), lengths, head dims
# and dtypes rather than their product (each case runs through the interpreter).
CASES = [
    (2, 4, 2, 100, 40, f32),     # G = 2, several tiles, D not a power of two
    (1, 4, 1, 100, 64, bf16),    # MQA
    (1, 8, 2, 33, 16, f32),      # G = 4 with several kv heads
    (2, 4, 1, 7, 16, f32),       # MQA, less than a tile
    (1, 4, 2, 7, 40, bf16),      # G = 2
    (1, 2, 1, 1, 64, bf16),      # MQA, one token
    (2, 4, 1, 1, 40, f32),       # one token
]
CASE_IDS = [f"B{b}-Hq{hq}-Hkv{hk}-N{n}-D{d}-{str(t)[6:]}" for b, hq, hk, n, d, t in CASES]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("B,Hq,Hkv,N,D,dtype", CASES, ids=CASE_IDS)
def test_matches_reference(seed, kind, B, Hq, Hkv, N, D, dtype):
    # N = 33 on 16x16 tiles (3, the last holding one token); N = 100 on the CPU default 32x32
    # (4 tiles, the last partial: several tiles at a third of the interpreted tile pairs of
    # 16x16, which test_equals_repeated_kv, test_tile_record and test_sparse_variants use).
    _check(kind, B, Hq, Hkv, N, D, dtype, kernel_options=SMALL if 16 < N < 64 else None)


@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (3, 1)])
def test_flash_not_causal_and_rectangular(seed, Hq, Hkv):
    _check("flash", 1, Hq, Hkv, 50, 32, f32, causal=False, kernel_options=dict(BLOCK_M=16, BLOCK_N=32))
    q, k, v, do = _qkv(1, Hq, Hkv, 37, 16, f32)
    k2, v2 = (torch.randn(1, Hkv, 70, 16) for _ in range(2))  # more keys than queries
    got = _grads(lambda q, k, v: flash_attention(q, k, v, kernel_options=SMALL), q, k2, v2, do)
    want = _grads(lambda q, k, v: ref.attention(q, k, v, causal=True), q.double(), k2.double(), v2.double(),
                  do.double())
    _assert_close(got, want, TOL[f32], GRAD_TOL[f32])


def test_sparse_variants(seed):
    """Hash buckets without n_buckets (the default fast range, q and k of different head counts),
    permuted slots sorted by bucket, validated."""
    _check("hash", 1, 4, 2, 60, 32, f32, kernel_options=SMALL)
    _check("hash", 1, 4, 1, 60, 32, f32, kernel_options=SMALL, n_buckets=3)
    _check("permuted", 1, 4, 2, 60, 32, f32, kernel_options=SMALL, validate=True,
           sparsity_kw=dict(permuted_buckets=True))
    _check("permuted", 2, 2, 1, 45, 16, f32, kernel_options=dict(BLOCK_M=16, BLOCK_N=32), n_buckets=3,
           sparsity_kw=dict(permuted_buckets=True))


def test_sdpa_enable_gqa(seed):
    """Dense causal GQA agrees with PyTorch's own (SDPA, ``enable_gqa=True``)."""
    if "enable_gqa" not in F.scaled_dot_product_attention.__doc__:
        pytest.skip("this PyTorch's SDPA has no enable_gqa")
    q, k, v, do = _qkv(2, 6, 2, 50, 32, f32)
    got = _grads(lambda q, k, v: flash_attention(q, k, v, kernel_options=SMALL), q, k, v, do)
    want = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                  q, k, v, do)
    _assert_close(got, want, 1e-5)


# ---------------------------------------------------------------------------
# GQA is attention on repeated k and v, without the copies
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (4, 1)])
def test_equals_repeated_kv(seed, kind, Hq, Hkv):
    """The output and dq equal those of the ungrouped call on k, v and the key-side inputs
    repeated to Hq heads, exactly: each query head runs the same arithmetic on the same
    key tiles.  dk, dv are that call's gradients summed over each group (float32
    accumulation in the kernel, so equal up to rounding).  N = 33: 3 tiles of 16, the last
    holding one token."""
    B, N, D = 2, 33, 32
    q, k, v, do = _qkv(B, Hq, Hkv, N, D, f32)
    sparsity = _sparsity(kind, B, Hq, Hkv, N)
    got = _grads(lambda q, k, v: _call(kind, q, k, v, sparsity, kernel_options=SMALL), q, k, v, do)
    wide = {name: (ref.repeat_kv(t, Hq) if name.startswith("k_") else t) for name, t in sparsity.items()}
    mha = _grads(lambda q, k, v: _call(kind, q, k, v, wide, kernel_options=SMALL), q, ref.repeat_kv(k, Hq),
                 ref.repeat_kv(v, Hq), do)
    assert torch.equal(got[0], mha[0]) and torch.equal(got[1], mha[1])
    for g, m in zip(got[2:], mha[2:]):
        assert _err(g, m.unflatten(1, (Hkv, Hq // Hkv)).sum(2)) <= 1e-6


# ---------------------------------------------------------------------------
# Tiles: each pass computes every visited pair once per query head
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("B,Hq,Hkv,N", [(1, 4, 2, 100), (2, 3, 1, 70)])
def test_tile_record(seed, kind, B, Hq, Hkv, N):
    """The dK/dV pass of query head h visits exactly the pairs its forward does, once: the
    group's programs share the kv head's key tiles without gaps or repeats.  Two batches in
    the MQA case (G = 3), one in the G = 2 case."""
    q, k, v, do = (t.requires_grad_() for t in _qkv(B, Hq, Hkv, N, 16, f32))
    rec = TileRecord()
    _call(kind, q, k, v, _sparsity(kind, B, Hq, Hkv, N), tile_record=rec, kernel_options=SMALL).backward(do)
    fwd = rec.maps["fwd"]
    assert fwd.shape[:2] == (B, Hq)
    if kind == "flash":
        t = torch.arange(fwd.shape[-2])[:, None]
        want = (torch.arange(fwd.shape[-1])[None, :] * 16 <= torch.clamp((t + 1) * 16, max=N) - 1).int()
        assert torch.equal(fwd, want.expand_as(fwd))
    else:
        assert torch.equal(fwd, rec.plan.visited().int())
    for name in ("bwd_kv", "bwd_q"):
        assert torch.equal(rec.maps[name], fwd), name


# ---------------------------------------------------------------------------
# Layouts and tile plans: kernels against PyTorch, key side per kv head
# ---------------------------------------------------------------------------


def _layout_inputs(kind, B, Hq, Hkv, N, n_k, n_buckets):
    def two(make):
        return make(Hq, N), make(Hkv, n_k)

    if kind == "keep":
        q, k = two(lambda H, n: torch.rand(B, H, n) < 0.5)
        return dict(q_keep=q, k_keep=k)
    if kind == "buckets":
        q, k = two(lambda H, n: torch.randint(0, n_buckets, (B, H, n)))
        return dict(q_buckets=q, k_buckets=k)
    if kind in ("out-of-range", "overflow"):  # dropped, or hash attention's overflow run
        q, k = two(lambda H, n: torch.randint(-2, n_buckets + 2, (B, H, n)))
        return dict(q_buckets=q, k_buckets=k)
    assert kind == "both"
    qb, kb = two(lambda H, n: torch.randint(0, n_buckets, (B, H, n)))
    qk, kk = two(lambda H, n: torch.rand(B, H, n) < 0.7)
    qp, kp = two(lambda H, n: torch.arange(n).expand(B, H, n) * 2)
    return dict(q_buckets=qb, k_buckets=kb, q_keep=qk, k_keep=kk, q_pos=qp, k_pos=kp)


LAYOUT_CASES = [  # (kind, Hq, Hkv, N, n_k, n_buckets, block_m, block_n)
    ("keep", 4, 2, 100, 100, 1, 16, 16),
    ("keep", 4, 1, 3000, 3000, 1, 64, 64),     # several chunks of the counting sort
    ("buckets", 6, 2, 257, 257, 5, 16, 32),    # G = 3
    ("overflow", 4, 1, 90, 130, 4, 32, 16),    # different query and key lengths, the overflow run
    ("buckets", 2, 1, 100, 100, 300, 16, 16),  # more buckets than tokens: the sort fallback
    ("out-of-range", 4, 2, 64, 64, 3, 16, 16),
    ("both", 8, 2, 150, 150, 4, 32, 16),
]


@pytest.mark.parametrize("kind,Hq,Hkv,N,n_k,n_buckets,bm,bn", LAYOUT_CASES)
def test_layout_and_plan_match_pytorch(seed, kind, Hq, Hkv, N, n_k, n_buckets, bm, bn):
    B = 2
    args = _layout_inputs(kind, B, Hq, Hkv, N, n_k, n_buckets)
    ov = kind == "overflow"
    ql, kl = bucket_layouts((B, Hq, N), n_buckets=n_buckets, block_m=bm, block_n=bn, n_k=n_k, overflow=ov, **args)
    side = {s: {n[2:]: t for n, t in args.items() if n.startswith(s + "_")} for s in "qk"}
    rq = reference_layout((B, Hq, N), n_buckets=n_buckets, block=bm, pad=Q_PAD, overflow=ov, **side["q"])
    rk = reference_layout((B, Hkv, n_k), n_buckets=n_buckets, block=bn, pad=K_PAD, overflow=ov, **side["k"])
    assert ql.index.shape[:2] == (B, Hq) and kl.index.shape[:2] == (B, Hkv)
    for got, want in ((ql, rq), (kl, rk)):
        for name in ("index", "pos", "bucket", "start", "count"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
    plan, ref_plan = tile_plan(ql, kl), reference_tile_plan(rq, rk)
    assert plan.q_runs.shape[:2] == plan.k_runs.shape[:2] == (B, Hq)
    for got, want in ((plan.q_runs, ref_plan.q_runs), (plan.k_runs, ref_plan.k_runs)):
        empty = got[..., 0] == got[..., 2]
        assert torch.equal(empty, want[..., 0] == want[..., 2])
        assert torch.equal(got[~empty], want[~empty])
    assert torch.equal(plan.visited(), ref_plan.visited())
    # Query head h's plan is the plan of its own layout against kv head h // G's.
    G = Hq // Hkv
    for h in (0, Hq - 1):
        one = reference_tile_plan(_head(rq, h), _head(rk, h // G))
        assert torch.equal(one.visited(), ref_plan.visited()[:, h:h + 1])


def _head(layout, h):
    """Head ``h`` of a layout, as a one-head layout."""
    return replace(layout, slots=layout.slots[:, :, h:h + 1], tables=layout.tables[:, :, h:h + 1])


def test_layout_bad_heads():
    with pytest.raises(ValueError, match="divide"):
        bucket_layouts((1, 4, 20), q_keep=torch.ones(1, 4, 20, dtype=torch.bool),
                       k_keep=torch.ones(1, 3, 20, dtype=torch.bool), block_m=16, block_n=16)
    ql = reference_layout((1, 4, 20), block=16, pad=Q_PAD)
    kl = reference_layout((1, 3, 20), block=16, pad=K_PAD)
    with pytest.raises(ValueError, match="divide"):
        tile_plan(ql, kl)
    with pytest.raises(ValueError, match="divide"):
        reference_tile_plan(ql, kl)


# ---------------------------------------------------------------------------
# Bad head counts
# ---------------------------------------------------------------------------


def _t(*shape, dtype=f32):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize(
    "q_heads,k_heads,v_heads,match",
    [
        (4, 3, 3, r"must divide the heads of q"),       # 3 does not divide 4
        (2, 4, 4, r"must divide the heads of q"),       # more kv heads than query heads
        (4, 2, 1, r"batch and heads must match"),       # k and v differ
        (4, 1, 2, r"batch and heads must match"),
        (4, 0, 0, r"must divide the heads of q"),
    ],
)
@pytest.mark.parametrize("kind", KINDS)
def test_bad_head_counts_raise(kind, q_heads, k_heads, v_heads, match):
    B, N, D = 1, 8, 16
    q, k, v = _t(B, q_heads, N, D), _t(B, k_heads, N, D), _t(B, v_heads, N, D)
    sparsity = _sparsity(kind, B, q_heads, max(k_heads, 1), N)
    with pytest.raises(ValueError, match=match):
        _call(kind, q, k, v, sparsity)


@pytest.mark.parametrize("kind", ["qk", "hash", "permuted"])
def test_key_side_inputs_need_kv_heads(kind):
    """k_keep / k_buckets / k_pos have k's heads: the query heads are refused, and so is
    a query-side input with the kv heads."""
    B, Hq, Hkv, N, D = 1, 4, 2, 8, 16
    q, k, v = _t(B, Hq, N, D), _t(B, Hkv, N, D), _t(B, Hkv, N, D)
    wrong = _sparsity(kind, B, Hq, Hq, N)          # key side with the query heads
    key_names = [n for n in wrong if n.startswith("k_")]
    with pytest.raises(ValueError, match=rf"{key_names[0]} must have shape \(batch, heads, seq_len\) = \(1, 2, 8\)"):
        _call(kind, q, k, v, wrong)
    swapped = _sparsity(kind, B, Hkv, Hkv, N)       # query side with the kv heads
    with pytest.raises(ValueError, match=r"= \(1, 4, 8\)"):
        _call(kind, q, k, v, swapped)


# ---------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("Hq,Hkv,D", [(8, 2, 64), (4, 1, 128), (6, 3, 80)])
def test_gpu_matches_reference(seed, kind, Hq, Hkv, D):
    _check(kind, 2, Hq, Hkv, 1024, D, bf16, device="cuda", sparsity_kw=dict(n_buckets=4))
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_equals_repeated_kv(seed, kind):
    """On the GPU too, grouping changes only which kv head is read (bf16, N = 1024).  The
    kernels compiled for another group size may schedule differently, so here this is
    checked to rounding (exactly on the CPU, above)."""
    B, Hq, Hkv, N, D = 1, 8, 2, 1024, 64
    q, k, v, do = (t.cuda() for t in _qkv(B, Hq, Hkv, N, D, bf16))
    sparsity = {n: t.cuda() for n, t in _sparsity(kind, B, Hq, Hkv, N).items()}
    got = _grads(lambda q, k, v: _call(kind, q, k, v, sparsity), q, k, v, do)
    wide = {name: (ref.repeat_kv(t, Hq) if name.startswith("k_") else t) for name, t in sparsity.items()}
    mha = _grads(lambda q, k, v: _call(kind, q, k, v, wide), q, ref.repeat_kv(k, Hq), ref.repeat_kv(v, Hq), do)
    assert _err(got[0], mha[0]) <= 1e-3 and _err(got[1], mha[1]) <= 1e-3
    for g, m in zip(got[2:], mha[2:]):
        assert _err(g, m.float().unflatten(1, (Hkv, Hq // Hkv)).sum(2)) <= 1e-2
