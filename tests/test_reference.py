"""The float64 reference (sparseflash.reference) against torch's SDPA and hand-written masks."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import grads as _grads
import torch.nn.functional as F

from sparseflash import reference as ref


def _qkv(B, H, N, D, M=None, requires_grad=False):
    M = N if M is None else M
    q = torch.randn(B, H, N, D, dtype=torch.float64, requires_grad=requires_grad)
    k = torch.randn(B, H, M, D, dtype=torch.float64, requires_grad=requires_grad)
    v = torch.randn(B, H, M, D, dtype=torch.float64, requires_grad=requires_grad)
    return q, k, v


# ---------------------------------------------------------------------------
# Against scaled_dot_product_attention (float64)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("N,M", [(1, 1), (9, 9), (33, 33), (12, 20), (20, 12)])
def test_matches_sdpa(seed, causal, N, M):
    q, k, v = _qkv(2, 3, N, 16, M)
    do = torch.randn(2, 3, N, 16, dtype=torch.float64)
    got = _grads(lambda q, k, v: ref.attention(q, k, v, causal=causal), q, k, v, do)
    want = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal), q, k, v, do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"{name} differs from SDPA")


def test_matches_sdpa_sm_scale(seed):
    q, k, v = _qkv(1, 2, 17, 32)
    got = ref.attention(q, k, v, sm_scale=0.37, causal=True)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.37)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_matches_sdpa_bool_mask(seed, causal):
    B, H, N, D = 2, 2, 24, 16
    q, k, v = _qkv(B, H, N, D)
    allowed = torch.rand(B, H, N, N) < 0.5
    allowed[..., 0] = True  # every row keeps key 0, so no row is empty and SDPA is defined
    do = torch.randn(B, H, N, D, dtype=torch.float64)
    got = _grads(lambda q, k, v: ref.attention(q, k, v, allowed, causal=causal), q, k, v, do)
    sdpa_mask = allowed & ref.causal_mask(N) if causal else allowed
    want = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask), q, k, v, do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"{name} differs from SDPA")


def test_broadcast_mask(seed):
    """A (N, N) mask broadcasts over batch and heads."""
    q, k, v = _qkv(2, 2, 10, 16)
    allowed = torch.rand(10, 10) < 0.6
    allowed[:, 0] = True
    got = ref.attention(q, k, v, allowed)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_float64_false_keeps_dtype(seed):
    q, k, v = (t.float() for t in _qkv(1, 2, 20, 32))
    out = ref.attention(q, k, v, causal=True, float64=False)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref.attention(q, k, v, causal=True), rtol=1e-5, atol=1e-5)
    assert ref.attention(q, k, v).dtype == torch.float64


# ---------------------------------------------------------------------------
# Empty rows: output 0, gradient 0, never NaN
# ---------------------------------------------------------------------------


def test_empty_rows_zero_output_and_grad(seed):
    B, H, N, D = 1, 2, 12, 16
    q, k, v = _qkv(B, H, N, D, requires_grad=True)
    allowed = torch.rand(B, H, N, N) < 0.5
    allowed[..., 0] = True
    empty = torch.zeros(B, H, N, dtype=torch.bool)
    empty[0, 0, [2, 5]] = True
    empty[0, 1, [0, 11]] = True
    allowed &= ~empty[..., None]
    out = ref.attention(q, k, v, allowed)
    do = torch.randn_like(out)
    out.backward(do)
    for name, t in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert not torch.isnan(t).any(), f"NaN in {name}"
    assert (out[empty] == 0).all()
    assert (q.grad[empty] == 0).all()
    # The other rows are unaffected: compare them with SDPA on a mask where the
    # empty rows are given a dummy key (their SDPA rows are then dropped).
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    filled = allowed | empty[..., None]
    out2 = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=filled)
    (out2 * do * (~empty[..., None])).sum().backward()
    torch.testing.assert_close(out[~empty], out2[~empty], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(q.grad, q2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(k.grad, k2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v.grad, v2.grad, rtol=1e-10, atol=1e-12)


def test_all_rows_empty(seed):
    q, k, v = _qkv(1, 1, 6, 16, requires_grad=True)
    out = ref.attention(q, k, v, torch.zeros(6, 6, dtype=torch.bool), causal=True)
    out.backward(torch.randn_like(out))
    assert (out == 0).all()
    for t in (q.grad, k.grad, v.grad):
        assert (t == 0).all()


def test_causal_with_more_keys_leaves_late_keys_unused(seed):
    """Causal with M > N is top-left aligned: keys j >= N get zero gradient."""
    q, k, v = _qkv(1, 1, 5, 16, M=9, requires_grad=True)
    out = ref.attention(q, k, v, causal=True)
    out.backward(torch.randn_like(out))
    assert (k.grad[..., 5:, :] == 0).all() and (v.grad[..., 5:, :] == 0).all()
    assert (k.grad[..., :5, :] != 0).any()
    # query 0 sees only key 0
    torch.testing.assert_close(out[..., 0, :], v[..., 0, :].detach())


# ---------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------


def test_causal_mask_shapes():
    assert torch.equal(ref.causal_mask(3), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    assert torch.equal(ref.causal_mask(2, 4), torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool))
    assert torch.equal(ref.causal_mask(3, 2), torch.tensor([[1, 0], [1, 1], [1, 1]], dtype=torch.bool))


def test_qk_dropping_mask_hand_written():
    q_keep = torch.tensor([[[True, False, True, True]]])
    k_keep = torch.tensor([[[True, True, False, True]]])
    want = torch.tensor(
        [
            [1, 0, 0, 0],  # query 0 kept: key 0
            [0, 0, 0, 0],  # query 1 dropped
            [1, 1, 0, 0],  # query 2: keys 0, 1 (key 2 dropped)
            [1, 1, 0, 1],  # query 3: keys 0, 1, 3
        ],
        dtype=torch.bool,
    )
    got = ref.qk_dropping_mask(q_keep, k_keep)
    assert got.shape == (1, 1, 4, 4)
    assert torch.equal(got[0, 0], want)


def test_qk_dropping_mask_per_head():
    q_keep = torch.tensor([[[True, True, True], [True, True, False]]])  # (1, 2, 3)
    k_keep = torch.tensor([[[False, True, True], [True, True, True]]])
    got = ref.qk_dropping_mask(q_keep, k_keep)
    assert got.shape == (1, 2, 3, 3)
    assert torch.equal(got[0, 0], torch.tensor([[0, 0, 0], [0, 1, 0], [0, 1, 1]], dtype=torch.bool))
    assert torch.equal(got[0, 1], torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool))


def test_hash_mask_hand_written():
    qb = torch.tensor([[[0, 1, 0, 1, 2]]])
    kb = torch.tensor([[[0, 1, 1, 0, 2]]])
    want = torch.tensor(
        [
            [1, 0, 0, 0, 0],  # q bucket 0: key 0 (bucket 0)
            [0, 1, 0, 0, 0],  # q bucket 1: key 1
            [1, 0, 0, 0, 0],  # q bucket 0: key 0 (key 2 is bucket 1)
            [0, 1, 1, 0, 0],  # q bucket 1: keys 1, 2
            [0, 0, 0, 0, 1],  # q bucket 2: key 4
        ],
        dtype=torch.bool,
    )
    got = ref.hash_mask(qb, kb)
    assert got.shape == (1, 1, 5, 5)
    assert torch.equal(got[0, 0], want)


def test_hash_mask_can_leave_rows_empty(seed):
    qb = torch.tensor([[[3, 0, 0]]])
    kb = torch.tensor([[[0, 0, 0]]])
    m = ref.hash_mask(qb, kb)
    assert not m[0, 0, 0].any()
    q, k, v = _qkv(1, 1, 3, 16)
    out = ref.attention(q, k, v, m)
    assert (out[0, 0, 0] == 0).all() and not torch.isnan(out).any()


def test_all_kept_is_causal(seed):
    B, H, N = 2, 2, 11
    keep = torch.ones(B, H, N, dtype=torch.bool)
    m = ref.qk_dropping_mask(keep, keep)
    assert torch.equal(m, ref.causal_mask(N).expand(B, H, N, N))
    q, k, v = _qkv(B, H, N, 16)
    torch.testing.assert_close(ref.attention(q, k, v, m), ref.attention(q, k, v, causal=True), rtol=0, atol=0)


def test_one_bucket_is_causal(seed):
    B, H, N = 2, 2, 11
    b = torch.full((B, H, N), 7, dtype=torch.int64)
    m = ref.hash_mask(b, b)
    assert torch.equal(m, ref.causal_mask(N).expand(B, H, N, N))
    q, k, v = _qkv(B, H, N, 16)
    torch.testing.assert_close(ref.attention(q, k, v, m), ref.attention(q, k, v, causal=True), rtol=0, atol=0)


def test_uniform_attention_hand_computed():
    """Zero queries: every allowed key weighs the same, so out_i = mean of v_0..v_i."""
    v = torch.arange(4 * 16, dtype=torch.float64).reshape(1, 1, 4, 16)
    q = torch.zeros(1, 1, 4, 16, dtype=torch.float64)
    k = torch.randn(1, 1, 4, 16, dtype=torch.float64)
    out = ref.attention(q, k, v, causal=True)
    want = torch.cumsum(v, dim=-2) / torch.arange(1, 5, dtype=torch.float64)[:, None]
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    assert math.isclose(ref.attention(q, k, v, causal=False)[0, 0, 0, 0].item(), v[0, 0, :, 0].mean().item())


# ---------------------------------------------------------------------------
# The test helper that measures what rounding the output alone costs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_rounding_floor_backward_is_exact_without_rounding(seed, causal):
    """In float64 (no rounding) ``rounding_floor``'s hand-written backward equals autograd's,
    with grouped kv heads, a mask with empty rows, and a non-default scale."""
    from helpers import rounding_floor

    q = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    do = torch.randn_like(q)
    k, v = (torch.randn(2, 2, 9, 8, dtype=torch.float64) for _ in range(2))
    allowed = torch.rand(2, 4, 9, 9) < 0.4
    want = _grads(lambda q, k, v: ref.attention(q, k, v, allowed, 0.3, causal=causal), q, k, v, do)
    assert max(rounding_floor(want, want[0], q, k, v, do, allowed, 0.3, causal=causal)) < 1e-12
    floor = rounding_floor(want, want[0].bfloat16(), q, k, v, do, allowed, 0.3, causal=causal)
    assert 0 < floor[0] < 1e-2 and floor[1] > 0 and floor[3] < 1e-12  # dv does not use delta
