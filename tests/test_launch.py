"""The direct launch (``sparseflash.launch``) against Triton's own launch path.

No GPU here: a ``JITFunction`` runs against a faked device whose "compile" records a kernel object
and whose launcher records its arguments. The direct call must pick the compiled kernel Triton's
``JITFunction.run`` picks for the same arguments (same specialisation: dtypes, pointer alignment,
an int's divisibility or being 1, constexprs, launch options) and pass its launcher the same
arguments, and it must step aside for launch hooks, changed globals and when switched off.
"""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from sparseflash import launch as launch_mod

pytestmark = pytest.mark.skipif(launch_mod.RUN_OPTIONS.get(launch_mod._VERSION) is None,
                                reason=f"triton {triton.__version__}: the direct launch is off, nothing to check")

_FACTOR = tl.constexpr(2)


def _copy(x_ptr, y_ptr, n, stride, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i * stride, mask=i < n) * _FACTOR, mask=i < n)


class _Compiled:
    """A compiled kernel as the launch path sees it; its launcher records each call."""

    def __init__(self, key, calls):
        self.key, self.calls = key, calls
        self.function, self.packed_metadata = object(), object()

    def launch_metadata(self, grid, stream, *args):
        return ("metadata", grid)

    def run(self, *args):
        self.calls.append((self, args))


@pytest.fixture
def faked(monkeypatch):
    """A JITFunction of ``_copy`` on a faked device 0; returns (kernel, launcher calls, compiles)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import jit

    class Active:
        get_current_device = staticmethod(lambda: 0)
        get_current_stream = staticmethod(lambda device: 1234)
        get_current_target = staticmethod(lambda: GPUTarget("cuda", 90, 32))

    monkeypatch.setattr(jit, "driver", type("Driver", (), {"active": Active()})())
    monkeypatch.setattr(launch_mod, "ENABLED", True)
    kernel = jit.JITFunction(_copy)
    calls, compiles = [], []

    def compile(key, *args, **kwargs):
        compiled = kernel.device_caches[0][0][key] = _Compiled(key, calls)
        compiles.append(compiled)
        return compiled

    kernel._do_compile = compile
    return kernel, calls, compiles


def _args(dtype=torch.float32, offset=0, n=16, stride=1):
    x = torch.zeros(64, dtype=dtype)[offset:]
    return (x, torch.zeros(64, dtype=dtype), n, stride)


def test_second_call_is_direct_with_tritons_arguments(faked):
    kernel, calls, compiles = faked
    args = _args()
    first = launch_mod.launch(kernel, (3, 2), *args, BLOCK=16, num_warps=4)
    second = launch_mod.launch(kernel, (3, 2), *args, BLOCK=16, num_warps=4)
    assert first is second and len(compiles) == 1 and len(calls) == 2
    (_, slow), (_, direct) = calls
    # Triton's path: launch metadata and its (empty) hook chains; the direct call: None for all three.
    assert slow[6] == ("metadata", (3, 2)) and direct[6:9] == (None, None, None)
    assert slow[:6] == direct[:6] == (3, 2, 1, 1234, first.function, first.packed_metadata)
    assert slow[9:] == direct[9:] and len(direct[9:]) == 5  # every argument, the constexpr included


@pytest.mark.parametrize("variant", [
    dict(), dict(n=17), dict(n=1), dict(n=2**33), dict(stride=16), dict(dtype=torch.bfloat16),
    dict(offset=1), dict(BLOCK=32), dict(num_warps=8), dict(num_stages=2),
])
def test_each_specialisation_runs_tritons_kernel(faked, variant):
    """Every fact Triton specialises on gives the kernel Triton's own path picks for it."""
    kernel, calls, compiles = faked
    base = dict(BLOCK=16, num_warps=4)
    args = dict(n=16, stride=1, dtype=torch.float32, offset=0)
    for name in ("n", "stride", "dtype", "offset"):
        args[name] = variant.get(name, args[name])
    opts = {**base, **{k: v for k, v in variant.items() if k not in args}}
    plain = _args()
    launch_mod.launch(kernel, (1,), *plain, **base)  # the base kernel, remembered
    launch_mod.launch(kernel, (1,), *plain, **base)
    mine = _args(**args)
    got = [launch_mod.launch(kernel, (1,), *mine, **opts) for _ in range(3)]  # first through Triton, then direct
    theirs = kernel.run(*mine, grid=(1,), warmup=False, **opts)
    assert got[0] is got[1] is got[2] is theirs
    assert (theirs is compiles[0]) == (not variant)  # a new fact, a new compile: never the base kernel
    assert all(c is theirs for c, _ in calls[-4:])


def test_launch_hooks_take_tritons_path(faked):
    from triton import knobs
    kernel, calls, _ = faked

    def hook(metadata):  # (the faked launcher calls no hook: what it was given is checked below)
        pass

    launch_mod.launch(kernel, (1,), *_args(), BLOCK=16)
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        launch_mod.launch(kernel, (1,), *_args(), BLOCK=16)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    (_, with_hook) = calls[-1]
    assert with_hook[6] == ("metadata", (1,)) and with_hook[7] is knobs.runtime.launch_enter_hook
    launch_mod.launch(kernel, (1,), *_args(), BLOCK=16)
    assert calls[-1][1][6:9] == (None, None, None)


def test_pre_run_hooks_take_tritons_path(faked):
    kernel, calls, _ = faked
    launch_mod.launch(kernel, (1,), *_args(), BLOCK=16)
    ran = []
    kernel.add_pre_run_hook(lambda *args, **kwargs: ran.append(1))
    launch_mod.launch(kernel, (1,), *_args(), BLOCK=16)
    assert ran == [1] and calls[-1][1][6] == ("metadata", (1,))


def test_changed_global_raises_as_triton_does(faked, monkeypatch):
    kernel, _, _ = faked
    kernel.cache_key  # records the globals the kernel reads (Triton does it while compiling)
    launch_mod.launch(kernel, (1,), *_args(), BLOCK=16)
    launch_mod.launch(kernel, (1,), *_args(), BLOCK=16)
    monkeypatch.setitem(globals(), "_FACTOR", tl.constexpr(3))
    with pytest.raises(RuntimeError, match="_FACTOR"):
        launch_mod.launch(kernel, (1,), *_args(), BLOCK=16)


def test_switched_off_always_takes_tritons_path(faked, monkeypatch):
    kernel, calls, _ = faked
    monkeypatch.setattr(launch_mod, "ENABLED", False)
    for _ in range(3):
        launch_mod.launch(kernel, (1,), *_args(), BLOCK=16)
    assert all(args[6] == ("metadata", (1,)) for _, args in calls)


def test_interpreted_kernels_take_their_own_path():
    """Under the interpreter (this machine's kernels) ``launch`` is ``kernel[grid]``."""
    from sparseflash import _steps
    assert not launch_mod.direct_launch_possible(_steps._delta_kernel)
    o = torch.randn(1, 2, 5, 16)
    do = torch.randn(1, 2, 5, 16)
    delta = _steps.softmax_delta(o, do)
    torch.testing.assert_close(delta, (o * do).sum(-1).float())


@pytest.mark.gpu
@pytest.mark.parametrize("N", [1000, 1001])
def test_gpu_direct_launch_gives_tritons_results(monkeypatch, N):
    """On the GPU: the same outputs and gradients, to the bit, with the direct launch on and off,
    on a contiguous input and on a strided view (other strides, another specialisation)."""
    import sparseflash as sf
    from sparseflash import permuted

    torch.manual_seed(0)
    base = torch.randn(3, 2, 2, N + 1, 64, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 16, (2, 2, N), device="cuda")
    results = []
    for enabled in (False, True, True):  # Triton's path; the direct path's first call, then its direct call
        monkeypatch.setattr(launch_mod, "ENABLED", enabled)
        for q, k, v in (base[:, :, :, :N].contiguous().unbind(0), base[:, :, :, 1:].unbind(0)):
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            out = sf.hash_sparse_attention(q, k, v, ids, ids, window=64)
            out.backward(torch.ones_like(out))
            results.append([out, q.grad, k.grad, v.grad])
    assert launch_mod._KEY_ATTR in vars(permuted._layout_fwd_kernel)
    for i in range(2, len(results)):  # each against Triton's path on the same input
        for a, b in zip(results[i % 2], results[i]):
            assert not a.isnan().any() and torch.equal(a, b)
