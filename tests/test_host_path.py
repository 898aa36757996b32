"""The host's share of an eager call: how many kernel launches and tensor operations it makes.

An eager call at a few thousand tokens is bound by the host (``results/*.json``: ``host_bound_ratio``),
and on the GPU hosts measured each tensor a call makes (an allocation, a view, a slice) costs about
as much as a few launch arguments (``tools/host_stub.py``).  So these counts are held down on purpose:
the sparse calls pass each layout and the tile plan as whole buffers, the kernels find the fields.
A change that adds a launch or a tensor operation to these paths should mean to, and update the
numbers here.  Launches are counted with Triton's interpreter stubbed out (nothing runs: only the
host path is exercised), tensor operations with a dispatch mode.
"""
from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime import interpreter

import sparseflash as sf
from sparseflash import _runtime


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


B, H, N, D = 1, 2, 256, 32
IDS = torch.arange(B * H * N).view(B, H, N) % 16
KEEP = torch.arange(B * H * N).view(B, H, N) % 3 == 0
CALLS = {
    "dense": (lambda q, k, v: sf.flash_attention(q, k, v, causal=True), 1, 3),
    "hash": (lambda q, k, v: sf.hash_sparse_attention(q, k, v, IDS, IDS), 4, 6),
    "hash16": (lambda q, k, v: sf.hash_sparse_attention(q, k, v, IDS, IDS, n_buckets=16), 4, 6),
    "hash_w64": (lambda q, k, v: sf.hash_sparse_attention(q, k, v, IDS, IDS, window=64), 5, 8),
    "qk": (lambda q, k, v: sf.qk_sparse_attention(q, k, v, KEEP, KEEP), 4, 6),
}
#: Allocations of a forward (outputs, layouts, plan) and of a forward and backward.
ALLOCATIONS = {"dense": (2, 6), "hash": (8, 12), "hash16": (8, 12), "hash_w64": (8, 12), "qk": (8, 12)}


@pytest.fixture
def stubbed(monkeypatch):
    """Launches counted, not run; outputs left unfilled (no NaN poisoning: it is a tensor op)."""
    launches = []
    monkeypatch.setattr(interpreter.InterpretedFunction, "run",
                        lambda self, *args, **kwargs: launches.append(self.fn.__name__))
    monkeypatch.setattr(_runtime, "POISON", False)
    return launches


@pytest.mark.parametrize("name", list(CALLS))
def test_eager_call_launches_and_tensor_ops(name, stubbed):
    call, fwd_launches, fwd_bwd_launches = CALLS[name]
    q, k, v, g = (torch.randn(B, H, N, D, dtype=torch.bfloat16) for _ in range(4))
    fwd_allocs, fwd_bwd_allocs = ALLOCATIONS[name]

    mode = _Ops()
    with mode:
        call(q, k, v)
    assert len(stubbed) == fwd_launches, stubbed
    assert set(mode.ops) == {"empty"} and mode.ops["empty"] == fwd_allocs, mode.ops

    stubbed.clear()
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    mode = _Ops()
    with mode:
        torch.autograd.grad(call(qg, kg, vg), (qg, kg, vg), g)
    assert len(stubbed) == fwd_bwd_launches, stubbed
    # autograd's own: a detach per saved input it may hand back.
    assert set(mode.ops) <= {"empty", "detach"} and mode.ops["empty"] == fwd_bwd_allocs, mode.ops


def test_host_stub_tool_runs_both_ways():
    """``tools/host_stub.py`` (the numbers behind these counts) still runs: launches stubbed, and through
    the installed Triton's own launch path against a faked sm_90 device."""
    root = Path(__file__).resolve().parent.parent
    for extra in ([], ["--launch-path"]):
        proc = subprocess.run([sys.executable, str(root / "tools" / "host_stub.py"), "--reps", "1", "hash16_fwd_bwd",
                               *extra], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "hash16_fwd_bwd" in proc.stdout and "launches/call 6.0" in proc.stdout, proc.stdout
