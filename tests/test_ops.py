"""Registered ops (sparseflash/ops.py): opcheck, torch.compile with no graph break and no
recompilation on new data, compiled == eager, CUDA graphs (GPU), and the FlexAttention interop.

On CPU the compiled graphs use ``backend="aot_eager"`` (Dynamo + AOT autograd tracing, the
kernels run through Triton's interpreter); on the GPU, Inductor (the default backend).
"""
from __future__ import annotations

import pytest
import torch
from helpers import err

import sparseflash as sf
from sparseflash.flash import _flash_op
from sparseflash.ops import cfg_args, cfg_dict
from sparseflash.permuted import _bucket_plan_op, _layout_op

CPU_CFG = [32, 32, 4, 1, 4, 1]


def _inputs(B=1, H=2, N=70, D=32, Hkv=None, dtype=torch.float32, device="cpu"):
    Hkv = H if Hkv is None else Hkv
    q = torch.randn(B, H, N, D, dtype=dtype, device=device)
    k, v = (torch.randn(B, Hkv, N, D, dtype=dtype, device=device) for _ in range(2))
    return q, k, v


def _calls(N, B=1, H=2, device="cpu"):
    """One call of each public attention on fixed random patterns, as ``fn(q, k, v)``."""
    qb, kb = (torch.randint(0, 4, (B, H, N), device=device) for _ in range(2))
    # The default hash call (fast ids [0, 64)) with ids outside it mixed in: labels in the overflow run.
    qb_any, kb_any = qb.clone(), kb.clone()
    qb_any[..., ::3], kb_any[..., ::4], kb_any[..., 1::5] = 10**12, 10**12, -1
    qk, kk = (torch.rand(B, H, N, device=device) < 0.6 for _ in range(2))
    pos = torch.arange(N, device=device).expand(B, H, N)
    return {
        "dense": lambda q, k, v: sf.flash_attention(q, k, v),
        "qk": lambda q, k, v: sf.qk_sparse_attention(q, k, v, qk, kk),
        "hash": lambda q, k, v: sf.hash_sparse_attention(q, k, v, qb_any, kb_any),
        "permuted": lambda q, k, v: sf.permuted_attention(q, k, v, pos, pos, qb, kb, n_buckets=4),
        "dense_window": lambda q, k, v: sf.flash_attention(q, k, v, window=9),
        "qk_window": lambda q, k, v: sf.qk_sparse_attention(q, k, v, qk, kk, window=9),
        "hash_window": lambda q, k, v: sf.hash_sparse_attention(q, k, v, qb, kb, n_buckets=4, window=9),
    }


def _fwd_bwd(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(do)
    return [out.detach(), q.grad, k.grad, v.grad]


def test_cfg_round_trip():
    cfg = dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=3, bwd_num_warps=4, bwd_num_stages=2, bwd_BLOCK=128,
               bwd_STEP=32, hopper=0)
    assert cfg_dict(cfg_args(cfg)) == cfg


@pytest.mark.parametrize("window", [0, 12])
def test_opcheck_flash(seed, window):
    q, k, v = (t.requires_grad_() for t in _inputs(N=40))
    torch.library.opcheck(_flash_op.forward_op, (q, k, v, True, 0.2, CPU_CFG, window))
    if not window:
        torch.library.opcheck(_flash_op.forward_op, (q.detach(), k.detach(), v.detach(), False, 0.2, CPU_CFG, 0))
    o, lse2 = _flash_op.forward_op(q.detach(), k.detach(), v.detach(), True, 0.2, CPU_CFG, window)
    torch.library.opcheck(_flash_op.backward_op, (q.detach(), k.detach(), v.detach(), o, lse2, torch.randn_like(o),
                                                  True, 0.2, CPU_CFG, window))


@pytest.mark.parametrize("kind,window", [("hash", 0), ("qk", 0), ("hash", 12), ("qk", 12)])
def test_opcheck_plan_and_layout(seed, kind, window):
    B, H, N = 1, 2, 50
    q, k, v = (t.requires_grad_() for t in _inputs(B, H, N))
    if kind == "hash":  # ids 3 and -1 outside [0, 3): the overflow run, with the ids as labels
        ids = (torch.randint(-1, 4, (B, H, N)), torch.randint(-1, 4, (B, H, N)))
        plan_args = (*ids, None, None, None, None, B, H, N, H, N, 3, 32, 32, window, True)
        labels, runs = ids, 3 + 1
    else:
        keep = (torch.rand(B, H, N) < 0.5, torch.rand(B, H, N) < 0.5)
        plan_args = (None, None, *keep, None, None, B, H, N, H, N, 1, 32, 32, window, False)
        labels, runs = (None, None), 1
    torch.library.opcheck(_bucket_plan_op, plan_args)
    plan = _bucket_plan_op(*plan_args)
    extra = (*plan, *labels, runs, 0.2, CPU_CFG, window, CPU_CFG)
    torch.library.opcheck(_layout_op.forward_op, (q, k, v, *extra))
    o, lse2 = _layout_op.forward_op(q.detach(), k.detach(), v.detach(), *extra)
    torch.library.opcheck(_layout_op.backward_op, (q.detach(), k.detach(), v.detach(), o, lse2, torch.randn_like(o),
                                                   *extra))


@pytest.mark.parametrize("kind", ["dense", "qk", "hash", "permuted", "dense_window", "qk_window", "hash_window"])
def test_compile_fullgraph_matches_eager(seed, kind):
    """Dynamo traces each public call forward and backward in one graph (fullgraph: a graph
    break would raise), and the compiled call gives the eager outputs and gradients.  "hash"
    is the default call, ``hash_sparse_attention(q, k, v, qb, kb)``, with ids outside its fast
    range: no ``n_buckets`` is needed, and nothing is read back to the host."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    N = 70
    fn = _calls(N)[kind]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    for _ in range(2):  # new data, same shapes: no recompilation
        q, k, v = _inputs(N=N)
        do = torch.randn_like(q)
        want, got = _fwd_bwd(fn, q, k, v, do), _fwd_bwd(compiled, q, k, v, do)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            assert err(a, b) == 0.0, f"{kind} {name}: compiled differs from eager"
    assert counter.frame_count == 1, f"{kind}: compiled {counter.frame_count} times for the same shapes"


def test_compile_refuses_host_reads():
    """Under torch.compile, calls that would read values back to the host raise a clear error.
    (Hash attention reads nothing back without ``validate``, whatever ``n_buckets``: the
    default call is in test_compile_fullgraph_matches_eager.)"""
    q, k, v = _inputs(N=20)
    ids = torch.randint(0, 4, (1, 2, 20))
    pos = torch.arange(20).expand(1, 2, 20)
    for n_buckets in (None, 4):
        torch._dynamo.reset()
        with pytest.raises(Exception, match="hash_sparse_attention needs validate=False"):
            torch.compile(lambda q: sf.hash_sparse_attention(q, k, v, ids, ids, n_buckets=n_buckets, validate=True),
                          backend="aot_eager", fullgraph=True)(q)
    for call in (lambda q: sf.permuted_attention(q, k, v, pos, pos, ids, ids),
                 lambda q: sf.permuted_attention(q, k, v, pos, pos, ids, ids, n_buckets=2**20)):
        torch._dynamo.reset()
        with pytest.raises(Exception, match="n_buckets and validate=False"):
            torch.compile(call, backend="aot_eager", fullgraph=True)(q)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="needs validate=False"):
        torch.compile(lambda q: sf.permuted_attention(q, k, v, pos, pos, validate=True), backend="aot_eager",
                      fullgraph=True)(q)


@pytest.mark.parametrize("kind", ["dense", "qk", "hash", "permuted", "hash_window"])
def test_double_backward_raises(seed, kind):
    """Second derivatives are not implemented: a backward through a gradient raises
    instead of silently dropping that gradient's own derivative."""
    q, k, v = (t.requires_grad_() for t in _inputs(N=20))
    out = _calls(20)[kind](q, k, v)
    (dq,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (out.sum() + dq.pow(2).sum()).backward()


@pytest.mark.parametrize("kind", ["dense", "hash", "qk_window"])
def test_no_grad_call_skips_autograd(seed, kind):
    """A call that needs no gradient (under no_grad, or on tensors that need none) runs the
    forward alone: the same values as the differentiable call, and no autograd node; one
    input that needs a gradient still gets the node."""
    q, k, v = _inputs(N=37)
    fn = _calls(37)[kind]
    want = fn(*(t.clone().requires_grad_() for t in (q, k, v)))
    assert want.grad_fn is not None
    got_plain = fn(q, k, v)
    with torch.no_grad():
        got_no_grad = fn(*(t.clone().requires_grad_() for t in (q, k, v)))
    for got in (got_plain, got_no_grad):
        assert got.grad_fn is None and not got.requires_grad
        assert torch.equal(got, want.detach())
    assert fn(q, k.clone().requires_grad_(), v).grad_fn is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's warning is given only without CUDA")
def test_compile_fullgraph_in_a_fresh_process():
    """The first call of a process, compiled (fullgraph), works on CPU: the one-time
    'running through the interpreter' warning is not given while Dynamo traces."""
    import os
    import subprocess
    import sys

    code = ("import torch, sparseflash as sf\n"
            "q, k, v = (torch.randn(1, 2, 20, 16) for _ in range(3))\n"
            "out = torch.compile(sf.flash_attention, backend='aot_eager', fullgraph=True)(q, k, v)\n"
            "assert (out - sf.flash_attention(q, k, v)).abs().max() == 0\n")
    # Without TRITON_INTERPRET (this process set it), as a user's fresh process starts.
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("kind", ["hash", "qk"])
def test_flex_block_mask_matches(seed, kind):
    """The pattern as FlexAttention's BlockMask (from the same tile plan) gives our output."""
    from sparseflash.flex import flex_pattern

    B, H, N = 1, 2, 200
    q, k, v = _inputs(B, H, N)
    if kind == "hash":
        qb, kb = torch.randint(0, 3, (B, H, N)), torch.randint(0, 3, (B, H, N))
        pattern = flex_pattern((B, H, N), q_buckets=qb, k_buckets=kb, n_buckets=3)
        ours = sf.hash_sparse_attention(q, k, v, qb, kb, n_buckets=3)
    else:
        qk, kk = torch.rand(B, H, N) < 0.4, torch.rand(B, H, N) < 0.4
        pattern = flex_pattern((B, H, N), q_keep=qk, k_keep=kk)
        ours = sf.qk_sparse_attention(q, k, v, qk, kk)
    assert err(pattern.attention(q, k, v), ours) < 1e-5
    # The block mask holds exactly the plan's tiles.
    dense = pattern.block_mask.to_dense()
    assert torch.equal(dense.bool(), pattern.plan.visited())


# --------------------------------------------------------------------------------------
# GPU: Inductor, CUDA graphs, FlexAttention's compiled kernel
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dense", "qk", "hash", "permuted"])
def test_inductor_fullgraph_matches_eager(kind):
    torch._dynamo.reset()
    N = 1000
    fn = _calls(N, B=2, H=4, device="cuda")[kind]
    compiled = torch.compile(fn, fullgraph=True)
    for _ in range(2):
        q, k, v = _inputs(2, 4, N, 64, dtype=torch.bfloat16, device="cuda")
        do = torch.randn_like(q)
        want, got = _fwd_bwd(fn, q, k, v, do), _fwd_bwd(compiled, q, k, v, do)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            assert err(a, b) == 0.0, f"{kind} {name}: compiled differs from eager"


def _tiny_model(mode, device="cuda"):
    from sparseflash.nn import SparseCausalSelfAttention

    torch.manual_seed(0)
    extra = dict(n_buckets=8) if mode == "hash" else dict(keep_rate=0.5) if mode == "qk" else {}
    return torch.nn.Sequential(
        torch.nn.Embedding(100, 128),
        SparseCausalSelfAttention(128, 4, mode=mode, n_kv_heads=2, **extra),
        torch.nn.Linear(128, 100),
    ).to(device=device, dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["dense", "hash", "qk"])
def test_model_step_cuda_graph(mode):
    """A fwd+bwd step of a small model captures in a CUDA graph and replays with new tokens."""
    model = _tiny_model(mode)
    tokens = torch.randint(0, 100, (2, 512), device="cuda")

    def step(t):
        model.zero_grad(set_to_none=False)
        loss = torch.nn.functional.cross_entropy(model(t).flatten(0, 1).float(), t.flatten())
        loss.backward()
        return loss

    static = tokens.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step(static)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step(static)
    for _ in range(2):
        new = torch.randint(0, 100, (2, 512), device="cuda")
        static.copy_(new)
        graph.replay()
        replayed = loss.item(), [p.grad.clone() for p in model.parameters()]
        want = step(new).item()
        assert abs(replayed[0] - want) < 1e-3
        for a, p in zip(replayed[1], model.parameters()):
            assert err(a, p.grad) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["dense", "hash", "qk"])
def test_model_reduce_overhead(mode):
    """torch.compile(mode="reduce-overhead") (Inductor + CUDA graphs) of a training step."""
    torch._dynamo.reset()
    model = _tiny_model(mode)

    def loss_fn(t):
        return torch.nn.functional.cross_entropy(model(t).flatten(0, 1).float(), t.flatten())

    compiled = torch.compile(loss_fn, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        t = torch.randint(0, 100, (2, 512), device="cuda")
        model.zero_grad()
        got = compiled(t)
        got.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        want = loss_fn(t)
        want.backward()
        assert abs(got.item() - want.item()) < 2e-2
        for a, p in zip(grads, model.parameters()):
            assert err(a, p.grad) < 5e-2


@pytest.mark.gpu
def test_flex_compiled_matches_hash():
    from torch.nn.attention.flex_attention import flex_attention

    from sparseflash.flex import flex_pattern

    B, H, N, D = 2, 4, 4096, 64
    q, k, v = _inputs(B, H, N, D, dtype=torch.bfloat16, device="cuda")
    qb, kb = (torch.randint(0, 8, (B, H, N), device="cuda") for _ in range(2))
    pattern = flex_pattern((B, H, N), q_buckets=qb, k_buckets=kb, n_buckets=8)
    got = pattern.attention(q, k, v, kernel=torch.compile(flex_attention))
    assert err(got, sf.hash_sparse_attention(q, k, v, qb, kb, n_buckets=8)) < 1e-2
