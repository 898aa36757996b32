"""sparseflash.nn.SparseCausalSelfAttention: each mode against a float64 re-computation of
the same module with the reference attention, gradients reach every parameter, GQA, bad
arguments, and torch.compile (aot_eager on CPU)."""
from __future__ import annotations

import pytest
import torch
from helpers import err

from sparseflash import reference as ref
from sparseflash.nn import SparseCausalSelfAttention, rotary


def _reference_forward(m: SparseCausalSelfAttention, x: torch.Tensor, keep=None) -> torch.Tensor:
    """The module's computation in float64 with the reference attention (masks built
    from the same buckets / keep masks the module uses)."""
    B, N, C = x.shape
    H, Hkv, D = m.n_heads, m.n_kv_heads, m.head_dim
    w = m.qkv.weight.double()
    q, k, v = (x.double() @ w.T).view(B, N, H + 2 * Hkv, D).transpose(1, 2).split([H, Hkv, Hkv], dim=1)
    if m.mode == "hash":
        qb, kb = m._buckets(q.float()), m._buckets(k.float())
    if m.positional == "rotary":
        q, k = rotary(q), rotary(k)
    g = H // Hkv
    k_rep, v_rep = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    if m.mode == "dense":
        mask = ref.window_mask(N, window=m.window) if m.window else None
        y = ref.attention(q, k_rep, v_rep, mask, causal=True)
    elif m.mode == "hash":
        y = ref.attention(q, k_rep, v_rep, ref.hash_mask(qb, kb.repeat_interleave(g, 1), window=m.window))
    else:
        q_score, k_score = (x.double() @ m.gate.weight.double().T + m.gate.bias.double()).transpose(1, 2).split(
            [H, Hkv], dim=1)
        q_keep, k_keep = keep
        v_rep = (v * torch.sigmoid(k_score)[..., None]).repeat_interleave(g, 1)
        y = ref.attention(q, k_rep, v_rep, ref.qk_dropping_mask(q_keep, k_keep.repeat_interleave(g, 1),
                                                                window=m.window))
        y = y * torch.sigmoid(q_score)[..., None]
    return y.transpose(1, 2).reshape(B, N, H * D) @ m.proj.weight.double().T


@pytest.mark.parametrize("mode, window, n_kv_heads", [
    *((mode, 0, n_kv) for mode in ("dense", "hash", "qk") for n_kv in (4, 2, 1)),
    ("dense", 6, 2), ("hash", 9, 2), ("hash", 9, 1), ("qk", 9, 4), ("hash", None, 4),  # None: hash's default
])
def test_module_matches_reference(seed, mode, window, n_kv_heads):
    torch.manual_seed(seed)
    m = SparseCausalSelfAttention(64, 4, mode=mode, n_kv_heads=n_kv_heads, n_buckets=4, keep_rate=0.5, window=window)
    x = torch.randn(2, 37, 64, requires_grad=True)
    y = m(x)
    keep = None
    if mode == "qk":
        from sparseflash import topk_keep
        scores = m.gate(x).float().transpose(1, 2).split([4, n_kv_heads], dim=1)
        keep = tuple(topk_keep(s, 0.5) for s in scores)
    assert err(y, _reference_forward(m, x, keep)) < 1e-3
    y.square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    assert not torch.isnan(x.grad).any()


def test_default_window():
    """Hash attention keeps an exact local window by default; the other modes have none."""
    from sparseflash.nn import DEFAULT_WINDOW

    assert DEFAULT_WINDOW == {"dense": 0, "hash": 128, "qk": 0}
    for mode, want in DEFAULT_WINDOW.items():
        m = SparseCausalSelfAttention(64, 4, mode=mode)
        assert m.window == want and f"window={want}" in repr(m)
    assert SparseCausalSelfAttention(64, 4, mode="hash", window=0).window == 0


def test_random_dropping_and_no_rotary():
    m = SparseCausalSelfAttention(32, 2, mode="qk", qk_gate="random", keep_rate=0.5, positional=None)
    y = m(torch.randn(1, 20, 32))
    assert y.shape == (1, 20, 32) and not torch.isnan(y).any()
    assert "qk_gate='random'" in repr(m)


@pytest.mark.parametrize("kwargs, match", [
    (dict(embed_dim=64, n_heads=5), "divisible"),
    (dict(embed_dim=64, n_heads=4, n_kv_heads=3), "multiple of n_kv_heads"),
    (dict(embed_dim=64, n_heads=4, mode="sparse"), "mode must be"),
    (dict(embed_dim=64, n_heads=4, positional="alibi"), "positional"),
    (dict(embed_dim=64, n_heads=4, mode="qk", qk_gate="learned"), "qk_gate"),
    (dict(embed_dim=64, n_heads=4, mode="qk", keep_rate=0.0), "keep_rate"),
    (dict(embed_dim=64, n_heads=4, mode="hash", n_buckets=3), "even"),
    (dict(embed_dim=64, n_heads=0), "positive"),
    (dict(embed_dim=0, n_heads=4), "positive"),
    (dict(embed_dim=32, n_heads=4), r"between 16 and 128, got 32 // 4 = 8"),
    (dict(embed_dim=64, n_heads=-2), "positive"),
    (dict(embed_dim=64, n_heads=4, mode="hash", window=-1), "window"),
    (dict(embed_dim=64, n_heads=4, mode="hash", window=2.5), "window"),
    (dict(embed_dim=64, n_heads=4, mode="hash", window=True), "window"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseCausalSelfAttention(**kwargs)


def test_wrong_input_width():
    with pytest.raises(ValueError, match=r"\(batch, seq_len, 64\)"):
        SparseCausalSelfAttention(64, 4)(torch.randn(1, 5, 32))
    with pytest.raises(ValueError, match=r"\(batch, seq_len, 64\), got \(5, 64\)"):
        SparseCausalSelfAttention(64, 4)(torch.randn(5, 64))


@pytest.mark.parametrize("mode", ["dense", "hash", "qk"])
def test_module_compiles_fullgraph(seed, mode):
    torch._dynamo.reset()
    m = SparseCausalSelfAttention(64, 4, mode=mode, n_kv_heads=2, n_buckets=4)
    x = torch.randn(1, 40, 64)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    assert err(compiled(x), m(x)) == 0.0
