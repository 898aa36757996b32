"""Decode steps a CUDA graph can replay: the cache keeps its length on the device.

With ``KVCache(device_position=True)`` a one-token step reads its position only from a device
tensor (row written with ``index_copy_``, bucket index, kernel length, rotary offset), so one
captured step serves every position.  On the CPU (interpreted kernel) such a cache must give
the same logits as the ordinary cache at every step, dense, window, hash ∪ window and GQA;
the rotary embedding takes a tensor offset; ``generate(cuda_graph=True)`` refuses what it
cannot replay in one line.  On CUDA, graph-replayed greedy generation gives the same tokens as
the eager loop, with and without autocast.
"""
from __future__ import annotations

import pytest
import torch

from sparseflash.nn import KVCache
from sparseflash.rotary import rotary
from sparseflash.train.model import GPT, GPTConfig

pytestmark = pytest.mark.filterwarnings("ignore:sparseflash. no CUDA device")


def _gpt(attention="dense", n_layer=1, **kw) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=n_layer, n_embd=32, n_head=2, attention=attention, **kw)).eval()
    with torch.no_grad():  # peaked logits: argmax far from ties
        for p in model.parameters():
            p.mul_(10.0)
    return model


@pytest.mark.parametrize("attention, kw", [
    ("dense", dict(n_kv_heads=1)),
    ("dense", dict(window=3)),
    ("hash", dict(n_buckets=4, window=4)),
    ("hash", dict(n_buckets=4, window=0, n_kv_heads=1)),
], ids=["dense-gqa", "dense-w3", "hash-w4", "hash-w0-gqa"])
def test_device_position_steps_equal_the_ordinary_cache(attention, kw):
    model = _gpt(attention, 2, **kw)
    idx = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    got, want = [], []
    for device_position, out in ((True, got), (False, want)):
        caches = [KVCache(9, kernel=True, device_position=device_position) for _ in model.blocks]
        with torch.no_grad():
            out.append(model._forward_cached(idx[:, :4], caches))
            out += [model._forward_cached(idx[:, t:t + 1], caches) for t in range(4, 9)]
        if device_position:
            assert all(c.position.tolist() == [9] and len(c) == 9 for c in caches)
            if attention == "hash":  # the index lists hold every row once
                assert all(int(c.bucket_count.sum()) == 9 * c.k.shape[0] * c.k.shape[1] for c in caches)
        else:
            assert all(c.position is None for c in caches)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_one_token_prompt_and_the_kernel_only_rule():
    model = _gpt("hash", n_buckets=4, window=2)
    idx = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(2))
    caches = [KVCache(4, kernel=True, device_position=True) for _ in model.blocks]
    plain = [KVCache(4, kernel=True) for _ in model.blocks]
    with torch.no_grad():
        for t in range(4):
            torch.testing.assert_close(model._forward_cached(idx[:, t:t + 1], caches),
                                       model._forward_cached(idx[:, t:t + 1], plain), atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="device_position=True attends with the kernel only"):
            caches[0].attend(torch.randn(1, 2, 1, 16), kernel=False)


def test_rotary_tensor_offset_equals_int_offset():
    x = torch.randn(2, 3, 5, 8, generator=torch.Generator().manual_seed(3))
    for offset in (0, 7, 1000):
        torch.testing.assert_close(rotary(x, offset=torch.tensor([offset])), rotary(x, offset=offset))
        torch.testing.assert_close(rotary(x, offset=torch.tensor(offset, dtype=torch.int32)), rotary(x, offset=offset))
    for bad in (torch.tensor([1.0]), torch.tensor([1, 2])):
        with pytest.raises(ValueError, match="one-element integer tensor"):
            rotary(x, offset=bad)


@pytest.mark.parametrize("attention, kwargs, said", [
    ("dense", dict(), "CUDA device"),
    ("dense", dict(use_cache=False), "use_cache=False"),
    ("sdpa", dict(), "attention 'sdpa'"),
    ("dense", dict(decode_kernel=False), "decode_kernel=False"),
    ("dense", dict(max_context=3), r"max_context \(3\)"),
    ("dense", dict(cuda_graph="yes"), "cuda_graph must be True or False"),
])
def test_cuda_graph_refusals(attention, kwargs, said):
    model = _gpt(attention)
    kwargs.setdefault("cuda_graph", True)
    if said != "CUDA device" and torch.cuda.is_available():
        model = model.cuda()
    idx = torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device)
    with pytest.raises(ValueError, match=said):
        model.generate(idx, 2, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["dense", "hash"])
def test_gpu_graph_generation_equals_eager(attention):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_embd=128, n_head=4, n_kv_heads=2, attention=attention, n_buckets=8,
                          window=16)).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    idx = torch.randint(0, 256, (2, 300), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    eager = model.generate(idx, 40, temperature=0)
    assert torch.equal(model.generate(idx, 40, temperature=0, cuda_graph=True), eager)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = model.generate(idx, 40, temperature=0)
        b = model.generate(idx, 40, temperature=0, cuda_graph=True)
    # bf16 can flip a near-tie between the two runs' rounding only if they computed differently:
    # the same kernels run, so the tokens agree exactly
    assert torch.equal(a, b)
    g1, g2 = (torch.Generator("cuda").manual_seed(5) for _ in range(2))
    assert torch.equal(model.generate(idx, 20, top_k=10, generator=g1, cuda_graph=True),
                       model.generate(idx, 20, top_k=10, generator=g2))
