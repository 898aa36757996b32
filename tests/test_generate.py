"""Sampling from the GPT (CPU, tiny): a decode step over the key/value cache gives what the
forward gives at every position (dense, sliding window, hash buckets ∪ window, GQA, SDPA), so
greedy generation with the cache equals generation without it token for token, through the
PyTorch decode path and the Triton kernel (interpreted); the cache's per-bucket row lists give
the same keys as comparing buckets over the whole cache; top_k=1 is
greedy; a seeded generator repeats its sample; ``qk`` refuses the cache; and the ``sample``
command streams text from a checkpoint of a 2-step training run, or fails in one line."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from sparseflash.nn import KVCache, SparseCausalSelfAttention, _decode_attend
from sparseflash.train.model import GPT, GPTConfig, SDPACausalSelfAttention

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data" / "corpus_sample"

pytestmark = pytest.mark.filterwarnings("ignore:sparseflash. no CUDA device")


def _peaked(model: torch.nn.Module, scale: float = 10.0) -> torch.nn.Module:
    """Weights scaled up, so that a fresh model's logits are far from ties (argmax is stable
    under rounding)."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


def _gpt(attention="dense", n_layer=1, **kw) -> GPT:
    torch.manual_seed(0)
    return _peaked(GPT(GPTConfig(n_layer=n_layer, n_embd=32, n_head=2, attention=attention, **kw)))


@pytest.mark.parametrize("make", [
    pytest.param(lambda: SparseCausalSelfAttention(32, 2, mode="dense"), id="dense"),
    pytest.param(lambda: SparseCausalSelfAttention(32, 2, mode="dense", window=3, n_kv_heads=1), id="dense-w3-gqa"),
    pytest.param(lambda: SparseCausalSelfAttention(32, 2, mode="hash", n_buckets=4, window=4), id="hash-w4"),
    pytest.param(lambda: SparseCausalSelfAttention(64, 4, mode="hash", n_buckets=4, window=0, n_kv_heads=2),
                 id="hash-w0-gqa"),
    pytest.param(lambda: SDPACausalSelfAttention(32, 2, n_kv_heads=1), id="sdpa-gqa"),
    pytest.param(lambda: SDPACausalSelfAttention(32, 2, backend="none"), id="none"),
])
def test_decode_step_matches_forward_at_every_position(make):
    torch.manual_seed(1)
    m = make()
    x = torch.randn(2, 12, m.embed_dim)
    with torch.no_grad():
        full = m(x)
        cache = KVCache()
        prefill = m(x[:, :4], cache=cache)
        steps = [m(x[:, t:t + 1], cache=cache) for t in range(4, 12)]
    torch.testing.assert_close(prefill, full[:, :4], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 4:], atol=1e-5, rtol=1e-4)
    assert len(cache) == 12
    if getattr(m, "mode", None) == "hash" and m.window:  # both paths matter: keys outside the window share buckets
        with torch.no_grad():
            q, k, _ = m.qkv(x).view(2, 12, -1, m.head_dim).transpose(1, 2).split(
                [m.n_heads, m.n_kv_heads, m.n_kv_heads], dim=1)
            same = m._buckets(q)[..., :, None] == m._buckets(k)[..., None, :]
        i, j = torch.arange(12)[:, None], torch.arange(12)[None, :]
        assert (same & (i - j >= m.window)).any() and (~same & (i - j >= 0) & (i - j < m.window)).any()


def test_bucket_index_replaces_the_bucket_comparison():
    """The cache's per-bucket row lists hold exactly each bucket's rows, ascending, after a prompt
    and after single steps; the mask they give equals comparing the query's bucket with every
    cached key's (the former O(S) rule) ∪ the window; the kernel's steps equal the forward."""
    torch.manual_seed(4)
    m = SparseCausalSelfAttention(64, 4, mode="hash", n_buckets=4, window=3, n_kv_heads=2)
    x = torch.randn(2, 11, 64)
    with torch.no_grad():
        full = m(x)
        q, k, _ = m.qkv(x).view(2, 11, -1, 16).transpose(1, 2).split([4, 2, 2], dim=1)
        qb, kb = m._buckets(q), m._buckets(k)
        cache = KVCache(kernel=True)  # (the PyTorch path's steps: test_decode_step_matches_forward_at_every_position)
        m(x[:, :5], cache=cache)
        steps = torch.cat([m(x[:, t:t + 1], cache=cache) for t in range(5, 11)], dim=1)
    torch.testing.assert_close(steps, full[:, 5:], atol=1e-5, rtol=1e-4)
    for b in range(2):
        for j in range(2):
            for u in range(4):
                want = (kb[b, j] == u).nonzero().flatten()
                n = int(cache.bucket_count[b, j, u])
                assert n == len(want) and torch.equal(cache.bucket_rows[b, j, u, :n].long(), want)
    L = len(cache)
    old = (kb.repeat_interleave(2, dim=1) == qb[..., -1:]) | (torch.arange(L) >= L - 3)
    assert torch.equal(cache.allowed(4, 3, qb[..., -1]), old)
    with pytest.raises(ValueError, match="n_buckets"):
        KVCache().append(k, k, kb)


def test_decode_attend_index_form_equals_mask_form():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    mask = torch.rand(1, 4, 7) < 0.5
    mask[0, 3] = False  # a query with no key: 0
    n_keys = mask.sum(-1)
    index = torch.full((1, 4, 7), 5, dtype=torch.int32)
    for h in range(4):
        rows = mask[0, h].nonzero().flatten()
        index[0, h, :len(rows)] = rows.int()
    a = _decode_attend(q, k, v, 7, mask)
    b = _decode_attend(q, k, v, 7, (index, n_keys))
    torch.testing.assert_close(a, b)
    assert (a[0, 3] == 0).all() and torch.isfinite(a).all()


@pytest.mark.parametrize("attention, n_layer, kw, kernel", [
    ("dense", 2, {}, True),
    ("hash", 1, dict(n_buckets=4, window=4), False),
    ("hash", 1, dict(n_buckets=4, window=4, n_kv_heads=1), True),
    ("sdpa", 2, dict(n_kv_heads=1), False),
], ids=["dense", "hash-w4", "hash-w4-gqa", "sdpa-gqa"])
def test_greedy_with_cache_equals_without(attention, n_layer, kw, kernel):
    model = _gpt(attention, n_layer, **kw)
    prompt = torch.randint(0, 256, (2, 3), generator=torch.Generator().manual_seed(3))
    cached = model.generate(prompt, 8, temperature=0)
    plain = model.generate(prompt, 8, temperature=0, use_cache=False)
    assert cached.shape == (2, 11) and torch.equal(cached[:, :3], prompt)
    assert torch.equal(cached, plain)
    if kernel:  # the decode steps through the Triton kernel (interpreted here), as on CUDA
        assert torch.equal(model.generate(prompt, 5, temperature=0, decode_kernel=True), plain[:, :8])
    # the cache's last-token logits are the forward's
    caches = [KVCache() for _ in model.blocks]
    with torch.no_grad():
        logits = model._forward_cached(cached[:, :3], caches)
        torch.testing.assert_close(logits, model(cached[:, :3])[0][:, -1], atol=1e-4, rtol=1e-4)
        for t in range(3, cached.shape[1]):
            logits = model._forward_cached(cached[:, t:t + 1], caches)
        full = model(cached)[0][:, -1]
    torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)


def test_max_context_with_cache_equals_without():
    model = _gpt("dense")
    prompt = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(4))
    cached = model.generate(prompt, 8, temperature=0, max_context=6)
    assert torch.equal(cached, model.generate(prompt, 8, temperature=0, max_context=6, use_cache=False))
    assert not torch.equal(cached, model.generate(prompt, 8, temperature=0))  # the crop changes the text


def test_top_k_1_is_greedy_and_seeds_repeat():
    model = _gpt("sdpa", 2)
    prompt = torch.randint(0, 256, (3, 4), generator=torch.Generator().manual_seed(5))
    greedy = model.generate(prompt, 10, temperature=0)
    assert torch.equal(model.generate(prompt, 10, top_k=1, generator=torch.Generator().manual_seed(0)), greedy)
    flat = _peaked(GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, attention="sdpa")), 1.0)  # near-uniform logits
    a = flat.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = flat.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(7))
    c = flat.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    top3 = flat.generate(prompt, 1, top_k=3, generator=torch.Generator().manual_seed(9))[:, -1]
    best = torch.topk(flat(prompt)[0][:, -1], 3).indices
    assert (best == top3[:, None]).any(-1).all()
    iterated = torch.cat(list(model.generate_iter(prompt, 10, temperature=0)), dim=1)
    assert torch.equal(iterated, greedy[:, 4:])


def test_qk_refuses_the_cache_and_samples_without_it():
    model = _gpt("qk", keep_rate=0.5)
    prompt = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(6))
    with pytest.raises(ValueError, match="attention 'qk' cannot generate with a cache.*use_cache=False"):
        model.generate(prompt, 3)
    out = model.generate(prompt, 3, temperature=0, use_cache=False)
    assert out.shape == (1, 7) and torch.equal(out[:, :4], prompt)
    assert not model.can_cache and _gpt("hash", n_buckets=4).can_cache


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["dense", "hash"])
def test_gpu_decode_step_kernel_no_host_sync(attention):
    """On CUDA a cached step runs the kernel (equal to the PyTorch path) and never waits for the GPU.

    float32 products are exact here: the trainer turns TF32 on for the process (as nanoGPT does),
    and with it the PyTorch path's einsums, not the kernel's float32 sums, would round to 10 bits.
    (conftest's autouse fixture puts the flag back afterwards.)"""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_embd=128, n_head=4, n_kv_heads=2, attention=attention, n_buckets=8,
                          window=16)).cuda().eval()
    idx = torch.randint(0, 256, (2, 300), device="cuda")
    outs = {}
    for kern in (True, False):
        caches = [KVCache(400, kernel=kern) for _ in model.blocks]
        with torch.no_grad():
            model._forward_cached(idx, caches)
            outs[kern] = torch.stack([model._forward_cached(idx[:, t:t + 1], caches) for t in range(5)])
    torch.testing.assert_close(outs[True], outs[False], atol=2e-4, rtol=2e-4)
    caches = [KVCache(400) for _ in model.blocks]
    with torch.no_grad():
        model._forward_cached(idx, caches)
        model._forward_cached(idx[:, :1], caches)  # compile first
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for t in range(3):
                model._forward_cached(idx[:, t:t + 1], caches)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("kwargs, said", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"), (dict(max_context=0), "max_context"),
    (dict(decode_kernel="yes"), "decode_kernel"),
])
def test_bad_arguments(kwargs, said):
    model = _gpt("sdpa")
    with pytest.raises(ValueError, match=said):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 2, **kwargs)
    with pytest.raises(ValueError, match="idx"):
        model.generate(torch.zeros(1, 2), 2)


# --------------------------------------------------------------------------------------
# The sample command
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """The checkpoint of a 2-step tiny training run (dense attention, seq_len 32)."""
    from sparseflash.train.loop import TrainConfig, train

    tmp = tmp_path_factory.mktemp("run")
    text = tmp / "text.txt"
    text.write_bytes(b"".join(p.read_bytes() for p in sorted((SAMPLE / "sotu").rglob("*.txt"))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(TrainConfig(data=str(text), seq_len=32, batch_size=1, n_layer=1, n_embd=32, n_head=2, max_steps=2,
                          eval_every=100, eval_windows=1, ckpt_every=100, device="cpu", progress=False,
                          out_dir=str(tmp / "run")))
    return tmp / "run" / "ckpt.pt"


class _Out(io.StringIO):
    def __init__(self):
        super().__init__()
        self.flushes = 0

    def flush(self):
        self.flushes += 1


def test_sample_streams_text_from_a_checkpoint(ckpt, capsys):
    from sparseflash.train import sample
    from sparseflash.train.__main__ import main

    assert main(["sample", "--ckpt", str(ckpt), "--prompt", "The ", "--tokens", "40", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("The ") and len(text) > 4 + 1
    out = _Out()
    args = ["--ckpt", str(ckpt), "--prompt", "Héllo", "--tokens", "40", "--temperature", "0", "--device", "cpu"]
    assert sample.main(args, out=out) == 0
    assert out.getvalue().startswith("Héllo") and out.flushes >= 40  # one flush per byte
    again = _Out()
    assert sample.main(args + ["--no-cache"], out=again) == 0
    assert again.getvalue() == out.getvalue()  # greedy: the cache changes nothing
    model, config = sample.load_model(ckpt)
    assert config["seq_len"] == 32 and not model.training


def test_sample_mistakes_are_one_line(ckpt, tmp_path, capsys):
    from sparseflash.train.__main__ import main

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "sparseflash.train", "sample", "--ckpt", str(tmp_path / "nope.pt")],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "nope.pt" in proc.stderr, proc.stderr
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(ckpt.read_bytes()[:200])
    not_ckpt = tmp_path / "other.pt"
    torch.save({"weights": 1}, not_ckpt)
    for argv, said in ((["--ckpt", str(damaged)], "damaged.pt is damaged"),
                       (["--ckpt", str(not_ckpt)], "not a training checkpoint"),
                       (["--ckpt", str(ckpt), "--tokens", "-1"], "--tokens"),
                       (["--ckpt", str(ckpt), "--top-k", "0"], "--top-k"),
                       (["--ckpt", str(ckpt), "--cuda-graph", "--tokens", "5", "--device", "cpu"], "CUDA device"),
                       (["--ckpt", str(ckpt), "--cuda-graph", "--device", "cpu"], r"max_context \(32\)")):
        assert main(["sample", *argv]) == 2
        captured = capsys.readouterr()
        assert len(captured.err.splitlines()) == 1 and re.search(said, captured.err) and captured.out == "", captured.err


def test_samples_tool_writes_side_by_side_rows(ckpt, tmp_path):
    """``tools/samples.py`` (what notebook 07 reads): one row per model, prompt and mode, with the
    checkpoint's pattern (a dense model has no buckets and window 0) and seeded, repeatable text."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("samples_tool", ROOT / "tools" / "samples.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    outs = []
    for i in range(2):
        out = tmp_path / f"samples_{i}.json"
        assert tool.main(["--ckpt", f"dense={ckpt}", "--out", str(out), "--tokens", "6", "--long-prompt", "0",
                          "--device", "cpu"]) == 0
        outs.append(json.loads(out.read_text()))
    doc = outs[0]
    assert doc["meta"]["schema"] == "sparseflash.samples/1"
    rows = doc["rows"]
    assert [(r["prompt_name"], r["mode"]) for r in rows] == [(p, m) for p in tool.SHORT_PROMPTS
                                                             for m in ("greedy", "topk")]
    for r in rows:
        assert (r["model"], r["attention"], r["n_buckets"], r["window"]) == ("dense", "dense", None, 0)
        assert len(r["text"].encode("utf-8", errors="replace")) >= 1 and r["ms_per_token"] > 0
        assert r["ms_per_token_cuda_graph"] is None  # graphs only on CUDA
    assert [r["text"] for r in rows] == [r["text"] for r in outs[1]["rows"]]
