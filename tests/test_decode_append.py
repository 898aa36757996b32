"""One decode step's cache bookkeeping in one launch (:mod:`sparseflash.decode_append`) against its
float64 reference, and :class:`~sparseflash.nn.KVCache` stepping through it.

On the CPU interpreter: LSH buckets of the new query and key heads (GQA groups, odd head dims,
2 to 64 buckets), the key and value rows written at an int or a device position, the bucket
index appended, nothing written outside the cache; the cache's one-launch steps leave the same
state as its general append; bad inputs raise ``ValueError``.
"""
from __future__ import annotations

import pytest
import torch

from sparseflash import reference as ref
from sparseflash.decode_append import append_step
from sparseflash.hashing import lsh_rotations
from sparseflash.nn import KVCache, SparseCausalSelfAttention
from sparseflash.rotary import rotary_freq

bf16 = torch.bfloat16


def _state(B, Hkv, S, D, nb, dtype):
    return (torch.zeros(B, Hkv, S, D, dtype=dtype), torch.zeros(B, Hkv, S, D, dtype=dtype),
            torch.zeros(B, Hkv, S, dtype=torch.int32), torch.zeros(B, Hkv, nb, S, dtype=torch.int32),
            torch.zeros(B, Hkv, nb, dtype=torch.int32))


def _check_rows(got, want, dtype):
    """Rows computed in float32 by the kernel and by PyTorch: equal to rounding (cos and sin may
    differ in their last bit between the two)."""
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("B,H,Hkv,D,nb", [(2, 8, 2, 64, 16), (1, 3, 3, 21, 2), (2, 4, 1, 128, 64), (3, 2, 2, 16, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, bf16])
def test_matches_reference(B, H, Hkv, D, nb, dtype):
    """Rotary at the position, rows, buckets of the query and key heads and the bucket index, at
    int and device positions, against the reference step after step (an odd head dim's last
    channel is not rotated)."""
    S = 9
    g = torch.Generator().manual_seed(D + nb)
    rot = lsh_rotations(D, nb, heads=Hkv, seed=nb)
    freq = rotary_freq(D // 2)
    state = _state(B, Hkv, S, D, nb, dtype)
    want = tuple(t.clone() for t in state)
    for p in range(S):
        q, k, v = (torch.randn(B, h, 1, D, generator=g).to(dtype) for h in (H, Hkv, Hkv))
        q_out, q_buckets = append_step(q, k, v, *state[:2], torch.tensor([p]) if p % 2 else p, rotary_freq=freq,
                                       rotations=rot, buckets=state[2], bucket_rows=state[3], bucket_count=state[4])
        want_q, want_qb, *want = ref.decode_append(q, k, v, *want[:2], p, True, rot, *want[2:])
        assert q_buckets.dtype == torch.int32 and torch.equal(q_buckets.long(), want_qb)
        _check_rows(q_out, want_q, dtype)
        _check_rows(state[0], want[0], dtype)
        want[0] = state[0].clone()  # (carry the kernel's rows on: the next steps compare only new ones)
        for got_t, want_t in zip(state[1:], want[1:]):
            assert torch.equal(got_t, want_t)


def test_position_outside_writes_nothing_and_the_plain_form():
    B, Hkv, S, D, nb = 2, 2, 5, 32, 8
    state = _state(B, Hkv, S, D, nb, torch.float32)
    k, v, q = torch.randn(B, Hkv, 1, D), torch.randn(B, Hkv, 1, D), torch.randn(B, 4, 1, D)
    rot = lsh_rotations(D, nb, heads=Hkv)
    for p in (S, torch.tensor([S + 3]), -1):
        append_step(q, k, v, *state[:2], p, rotary_freq=rotary_freq(D // 2), rotations=rot, buckets=state[2],
                    bucket_rows=state[3], bucket_count=state[4])
    assert not any(t.any() for t in state)
    q_out, q_buckets = append_step(q, k, v, *state[:2], 3)  # no rotary, no buckets: the rows only
    assert q_out is q and q_buckets is None
    assert torch.equal(state[0][:, :, 3], k[:, :, 0]) and torch.equal(state[1][:, :, 3], v[:, :, 0])
    assert not state[0][:, :, :3].any() and not state[2].any()


@pytest.mark.parametrize("device_position", [False, True])
@pytest.mark.parametrize("mode,h_kv", [("hash", 2), ("hash", 4), ("dense", 2)])
def test_cache_steps_in_one_launch_as_append(mode, h_kv, device_position, monkeypatch):
    """A decode step of the attention module with the kernel goes through one launch and leaves
    the cache, and gives the output, that the general append (and the module's own LSH) give."""
    torch.manual_seed(0)
    attn = SparseCausalSelfAttention(64, 4, mode=mode, n_kv_heads=h_kv, n_buckets=8, window=3, seed=1).eval()
    x = torch.randn(2, 9, 64)
    caches = {name: KVCache(16, kernel=True, device_position=device_position) for name in ("one", "general")}
    launches = []
    with torch.no_grad():
        for name, cache in caches.items():
            attn(x[:, :6], cache=cache)
        outs = {"one": [], "general": []}
        for t in range(6, 9):
            for name, cache in caches.items():
                if name == "general":  # the general path: refuse the one launch
                    monkeypatch.setattr(KVCache, "one_launch", lambda self, q, hashed: False)
                else:  # the one launch: the general append must not be called
                    monkeypatch.setattr(KVCache, "append", lambda *a, **kw: launches.append("append"))
                outs[name].append(attn(x[:, t:t + 1], cache=cache))
                monkeypatch.undo()
    assert launches == []  # every step of "one" went through append_step
    one, general = caches["one"], caches["general"]
    assert one.length == general.length == 9
    for a, b in zip(outs["one"], outs["general"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    _check_rows(one.k[:, :, :9], general.k[:, :, :9], torch.float32)  # (rotary in the kernel, and in PyTorch)
    assert torch.equal(one.v[:, :, :9], general.v[:, :, :9])
    if mode == "hash":
        assert torch.equal(one.buckets[:, :, :9], general.buckets[:, :, :9])
        assert torch.equal(one.bucket_count, general.bucket_count)
        for u in range(8):
            n = one.bucket_count[..., u].max()
            assert torch.equal(one.bucket_rows[:, :, u, :n], general.bucket_rows[:, :, u, :n])



def test_one_launch_only_with_room_and_the_kernel():
    q = torch.zeros(1, 2, 1, 16)
    cache = KVCache(4, kernel=True)
    assert not cache.one_launch(q, False)  # no storage yet: the first append sizes it
    cache.append(torch.zeros(1, 2, 4, 16), torch.zeros(1, 2, 4, 16))
    assert not cache.one_launch(q, False)  # full: append grows it
    cache = KVCache(8, kernel=True)
    cache.append(torch.zeros(1, 2, 4, 16), torch.zeros(1, 2, 4, 16))
    assert cache.one_launch(q, False) and not cache.one_launch(q, True)  # (no bucket index here)
    plain = KVCache(8, kernel=False)
    plain.append(torch.zeros(1, 2, 4, 16), torch.zeros(1, 2, 4, 16))
    assert not plain.one_launch(q, False)  # the PyTorch path keeps its own steps


@pytest.mark.parametrize("case,match", [
    (dict(k=torch.zeros(2, 2, 2, 16)), "k must be"),
    (dict(q=torch.zeros(1, 3, 1, 16)), "multiple of 2"),
    (dict(position=torch.zeros(2, dtype=torch.long)), "position must be"),
    (dict(position=torch.zeros(1)), "position must be"),
    (dict(rotary_freq=torch.zeros(16)), "rotary_freq must be"),
    (dict(rotations=torch.zeros(2, 16, 4), buckets=None), "give buckets"),
    (dict(rotations=torch.zeros(2, 16, 3)), "rotations must be"),
    (dict(rotations=torch.zeros(2, 16, 4), bucket_count=torch.zeros(1, 2, 8)), "bucket_count must be"),
    (dict(v_cache=torch.zeros(1, 2, 6, 16)), "k_cache and v_cache"),
])
def test_bad_inputs_raise(case, match):
    B, Hkv, S, D, nb = 1, 2, 5, 16, 8
    k_cache, v_cache, buckets, rows, count = _state(B, Hkv, S, D, nb, torch.float32)
    args = dict(q=torch.zeros(B, 4, 1, D), k=torch.zeros(B, Hkv, 1, D), v=torch.zeros(B, Hkv, 1, D), k_cache=k_cache,
                v_cache=v_cache, position=0, rotary_freq=None, rotations=None, buckets=buckets, bucket_rows=rows,
                bucket_count=count)
    args.update(case)
    positional = [args.pop(n) for n in ("q", "k", "v", "k_cache", "v_cache", "position")]
    with pytest.raises(ValueError, match=match):
        append_step(*positional, **args)


@pytest.mark.gpu
@pytest.mark.parametrize("h_kv", [2, 8])
def test_gpu_matches_reference(h_kv):
    """On CUDA (bf16 rows, a device position, rotary and buckets), against the reference."""
    B, H, S, D, nb = 4, 8, 33, 64, 16
    g = torch.Generator().manual_seed(h_kv)
    rot, freq = lsh_rotations(D, nb, heads=h_kv, seed=h_kv).cuda(), rotary_freq(D // 2, device="cuda")
    state = tuple(t.cuda() for t in _state(B, h_kv, S, D, nb, bf16))
    want = tuple(t.clone() for t in state)
    for p in range(S):
        q, k, v = (torch.randn(B, h, 1, D, generator=g).to(bf16).cuda() for h in (H, h_kv, h_kv))
        q_out, q_buckets = append_step(q, k, v, *state[:2], torch.tensor([p], device="cuda"), rotary_freq=freq,
                                       rotations=rot, buckets=state[2], bucket_rows=state[3], bucket_count=state[4])
        want_q, want_qb, *want = ref.decode_append(q, k, v, *want[:2], p, True, rot, *want[2:])
        assert torch.equal(q_buckets.long(), want_qb)
        _check_rows(q_out, want_q, bf16)
        _check_rows(state[0], want[0], bf16)
        want[0] = state[0].clone()
    for got_t, want_t in zip(state[1:], want[1:]):
        assert torch.equal(got_t, want_t)
