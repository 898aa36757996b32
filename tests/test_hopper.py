"""The Gluon forward for Hopper GPUs (``sparseflash/hopper.py``) against the float64 reference: output
and base-2 log-sum-exp, causal or not, grouped-query heads, ragged and unequal lengths, strided
views; and through ``flash_attention`` (its forward, the Triton backward) with values and gradients.
The kernel needs an sm_90 GPU; on the CPU only the eligibility rules are tested."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import err as rel_err  # relative Frobenius error, NaN refused
from helpers import grads

from sparseflash import hopper
from sparseflash import reference as ref
from sparseflash.flash import flash_attention

bf16, f16 = torch.bfloat16, torch.float16
TOL = {bf16: 1e-2, f16: 2e-3}


def _lse2_reference(q, k, causal):
    """Base-2 log-sum-exp of the scaled scores, float64 (what the backward reads)."""
    G = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(G, dim=1)
    s = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(~ref.causal_mask(q.shape[2], k.shape[2], device=q.device), float("-inf"))
    return torch.logsumexp(s, -1) / math.log(2)


def test_usable_rules_on_cpu():
    q = torch.randn(1, 2, 64, 64, dtype=bf16)
    assert not hopper.usable(q, q, q, force=True)         # not CUDA
    assert hopper._tma_ready(q)
    assert not hopper._tma_ready(torch.randn(1, 2, 64, 65, dtype=bf16)[..., 1:])    # 2-byte offset, 130-byte rows
    assert not hopper._tma_ready(torch.randn(1, 2, 64, 20, dtype=bf16))           # 40-byte row stride
    assert not hopper._tma_ready(torch.randn(1, 2, 64, 64, dtype=bf16).transpose(-1, -2))
    assert not hopper._tma_ready(torch.randn(1, 1, 64, 64, dtype=bf16).expand(1, 4, 64, 64))   # broadcast heads


@pytest.mark.skipif(not hopper.AVAILABLE, reason="needs Gluon (Triton 3.6+)")
def test_descriptors_on_cpu():
    """The descriptors are plain host objects: 4-D blocks of 64 query rows and ``block_n`` key rows,
    the strides of the views as given, one shared-memory layout object per tile shape."""
    q = torch.randn(2, 3, 100, 64, dtype=bf16)
    kv = torch.randn(2, 100, 1, 64, dtype=bf16).transpose(1, 2)     # (B, Hkv=1, M, D), strided
    qd, kd, vd = hopper.descriptors(q, kv, kv, 128)
    assert list(qd.block_shape) == [1, 1, 64, 64] and list(kd.block_shape) == [1, 1, 128, 64]
    assert list(kd.strides) == list(kv.stride()) and list(qd.shape) == [2, 3, 100, 64]
    assert kd.layout is vd.layout is hopper.descriptors(q, kv, kv, 128)[1].layout


HOPPER = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
                                 and hopper.AVAILABLE), reason="needs an sm_90 GPU and Gluon")

# (B, H, Hkv, N, M, D, dtype, causal)
CASES = [
    (1, 2, 2, 1, 1, 64, bf16, True), (1, 2, 2, 7, 7, 128, f16, True), (2, 4, 2, 100, 100, 64, bf16, True),
    (1, 2, 2, 257, 257, 128, bf16, False), (1, 3, 3, 1000, 1000, 64, f16, False),
    (2, 2, 1, 4097, 4097, 128, bf16, True), (1, 2, 2, 777, 2049, 64, bf16, True),
    (1, 2, 2, 2049, 777, 128, f16, True), (1, 2, 2, 4096, 4096, 64, bf16, True),
]


@pytest.mark.gpu
@HOPPER
@pytest.mark.parametrize("B,H,Hkv,N,M,D,dtype,causal", CASES,
                         ids=[f"B{c[0]}H{c[1]}kv{c[2]}-N{c[3]}M{c[4]}-D{c[5]}-{str(c[6])[6:]}-{'causal' if c[7] else 'full'}"
                              for c in CASES])
@pytest.mark.parametrize("setting", ["default", "n64_s3", "no_pingpong", "three_warpgroups"])
def test_gpu_hopper_forward_matches_reference(seed, B, H, Hkv, N, M, D, dtype, causal, setting):
    cfg = {"default": None, "n64_s3": dict(BLOCK_N=64, STAGES=3), "no_pingpong": dict(PINGPONG=False),
           "three_warpgroups": dict(BLOCK_N=64, STAGES=4, WARPGROUPS=3)}[setting]
    q = torch.randn(B, H, N, D, device="cuda").to(dtype)
    k, v = (torch.randn(B, Hkv, M, D, device="cuda").to(dtype) for _ in range(2))
    o, lse2 = hopper.hopper_forward(q, k, v, causal, D ** -0.5, cfg)
    torch.cuda.synchronize()
    assert o.shape == q.shape and o.dtype == dtype and lse2.shape == (B, H, N)
    assert not o.isnan().any() and not lse2.isnan().any()
    want = ref.attention(q.double(), k.double(), v.double(), causal=causal)
    assert rel_err(o, want) < TOL[dtype]
    assert (lse2.double() - _lse2_reference(q, k, causal)).abs().max().item() < 1e-2


@pytest.mark.gpu
@HOPPER
def test_gpu_hopper_forward_strided_views(seed):
    B, N, H, D = 2, 1500, 4, 64
    qkv = torch.randn(B, N, 3, H, D, device="cuda").to(bf16)
    q, k, v = (qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3))
    assert hopper._tma_ready(q)
    o, _ = hopper.hopper_forward(q, k, v, True, D ** -0.5)
    assert rel_err(o, ref.attention(q.double(), k.double(), v.double(), causal=True)) < TOL[bf16]


@pytest.mark.gpu
@HOPPER
@pytest.mark.parametrize("D,dtype,causal", [(64, bf16, True), (128, f16, False), (128, bf16, True)])
def test_gpu_flash_attention_with_hopper_forward(seed, monkeypatch, D, dtype, causal):
    """flash_attention's forward through the Gluon kernel (every length), backward through Triton's."""
    monkeypatch.setattr(hopper, "USE_FROM_SEQ_LEN", {64: 1, 128: 1})
    B, H, N = 1, 2, 1025
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda").to(dtype) for _ in range(4))
    assert hopper.usable(q, k, v)
    got = grads(lambda q, k, v: flash_attention(q, k, v, causal=causal), q, k, v, do)
    want = grads(lambda q, k, v: ref.attention(q, k, v, causal=causal), *(t.double() for t in (q, k, v, do)))
    for i, (a, b) in enumerate(zip(got, want)):  # out, dq, dk, dv
        assert not a.isnan().any()
        assert rel_err(a, b) < TOL[dtype] * (1 if i == 0 else 2)


@pytest.mark.gpu
@HOPPER
def test_gpu_kernel_options_keep_the_triton_forward(monkeypatch):
    """``kernel_options`` that set the forward's tiles, or ``{"hopper": 0}``, keep the Triton forward."""
    monkeypatch.setattr(hopper, "USE_FROM_SEQ_LEN", {64: 1, 128: 1})
    calls = []
    real = hopper.hopper_forward
    monkeypatch.setattr(hopper, "hopper_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q = torch.randn(1, 2, 300, 64, device="cuda", dtype=bf16)
    flash_attention(q, q, q)
    assert calls == [1]
    flash_attention(q, q, q, kernel_options={"hopper": 0})
    flash_attention(q, q, q, kernel_options={"BLOCK_M": 64})
    assert calls == [1]


def test_probe_file_draws(tmp_path):
    """``tools/plot_hopper_forward.py`` draws the committed probe file (the README's figure)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "hopper.png"
    proc = subprocess.run([sys.executable, str(root / "tools" / "plot_hopper_forward.py"),
                           str(root / "results" / "logs" / "gluon_fa3_probe_h100.json"), "--out", str(out)],
                          capture_output=True, text=True, cwd=root, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
