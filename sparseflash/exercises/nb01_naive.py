"""Checkers of notebook 01, naive attention (``01_naive_attention.ipynb``).

* :func:`check_sliding_window_mask`: ``sliding_window_mask(n, w)`` is the bool ``(n, n)`` mask
  with True where ``i - w < j <= i``, for ``w = 1``, ``w > n`` and random sizes.
* :func:`check_window_pairs`: ``window_pairs(n, w)`` counts the allowed pairs of that mask.
* :func:`check_peak_memory`: ``peak_bytes(n, requires_grad=False)`` measures the peak memory of
  naive attention, growing as N² (a few score matrices), higher with the backward.
  :func:`peak_memory` is the measuring tool it expects (on CUDA or on the CPU).
* :func:`check_stable_softmax`: ``stable_softmax(x)`` matches the float64 softmax on logits
  up to ±1e4, with ``-inf`` entries, in float32 and float16.
* :func:`check_float16_exp_overflow`: the smallest logit whose ``exp`` overflows float16.
* :func:`check_bf16_error`: ``bf16_error(n)`` measures naive attention's error in bfloat16
  (within 3× of the same measurement made by the checker).
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.utils._python_dispatch
import torch.utils._pytree
from torch import Tensor

from .. import reference
from ._common import (_as_number, _as_tensor, _call, _compare, _error_near_typical, _Fail, _gen, _new_seed,
                      _NotAttempted, _randn, _require_callable, _run, _window_mask)

__all__ = [
    "check_sliding_window_mask", "check_window_pairs", "check_peak_memory", "peak_memory",
    "check_stable_softmax", "check_float16_exp_overflow", "check_bf16_error",
]


def _grids(expected: Tensor, got: Tensor) -> str:
    """Two small bool masks side by side ('#' allowed, '.' not), with a row of '^' under wrong entries."""
    rows = ["  expected" + " " * (2 * expected.shape[1] - 8) + "   got"]
    for e_row, g_row in zip(expected.tolist(), got.tolist()):
        e = " ".join("#" if x else "." for x in e_row)
        g = " ".join(("#" if y else ".") if bool(x) == bool(y) else ("X" if y else "o") for x, y in zip(e_row, g_row))
        rows.append(f"  {e}   {g}")
    return "\n".join(rows) + "\n  (X: allowed but should not be; o: missing)"


def check_sliding_window_mask(sliding_window_mask, *, seed=None) -> bool:
    """01 · exercise 1: ``sliding_window_mask(n, w)`` -> bool ``(n, n)``, True where ``i - w < j <= i``."""
    _require_callable(sliding_window_mask, "sliding_window_mask", "check_sliding_window_mask")
    seed = _new_seed(seed)
    g = _gen(seed)

    def body():
        cases = [(1, 1), (6, 1), (8, 3), (10, 10), (7, 20)]
        for _ in range(3):
            n = int(torch.randint(5, 41, (), generator=g))
            cases.append((n, int(torch.randint(1, n + 4, (), generator=g))))
        for n, w in cases:
            what = f"sliding_window_mask({n}, {w})"
            got = _as_tensor(_call(sliding_window_mask, n, w, what=what), what)
            expected = _window_mask(n, w)
            if tuple(got.shape) != (n, n):
                raise _Fail(f"{what}: expected shape ({n}, {n}), got {tuple(got.shape)}")
            if got.dtype != torch.bool:
                raise _Fail(f"{what}: expected a bool tensor, got {got.dtype}",
                            "compare positions (j <= i) instead of building numbers; masks are bool")
            got = got.cpu()
            if not torch.equal(got, expected):
                i, j = torch.nonzero(got != expected)[0].tolist()
                grid = f"\n{_grids(expected, got)}" if n <= 16 else ""
                raise _Fail(f"{what}: {int((got != expected).sum())} of {n * n} entries wrong; first at query "
                            f"i={i}, key j={j}: expected {bool(expected[i, j])}, got {bool(got[i, j])}{grid}",
                            "query i may attend key j when i - w < j <= i: itself and the w - 1 keys before it")
        return f"{len(cases)} (n, w) pairs, n up to {max(n for n, _ in cases)}, w = 1 and w > n included"

    return _run("01 · exercise 1, sliding_window_mask", body, seed)


def check_window_pairs(window_pairs) -> bool:
    """01 · exercise 1b: ``window_pairs(n, w)``, the number of allowed pairs of the window mask."""
    _require_callable(window_pairs, "window_pairs", "check_window_pairs")

    def body():
        cases = [(n, w) for n in (1, 2, 5, 16, 100, 1000) for w in (1, 3, 16, 999, 5000)]
        for n, w in cases:
            expected = sum(min(i + 1, w) for i in range(n))
            got = _call(window_pairs, n, w, what=f"window_pairs({n}, {w})")
            if _as_number(got, f"window_pairs({n}, {w})") != expected:
                raise _Fail(f"window_pairs({n}, {w}) = {got}, expected {expected}",
                            "row i has min(i + 1, w) allowed keys; add them up (two cases: n <= w and n > w)")
        return f"{len(cases)} (n, w) pairs; for n ≫ w it is ≈ n·w: linear in n"

    return _run("01 · exercise 1b, window_pairs", body)


# ---- peak memory ----------------------------------------------------------------------


class _PeakTracker(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of tensor storage created inside the mode and still alive: current and peak."""

    def __init__(self, external):
        super().__init__()
        self.live: dict[int, list] = {}
        self.current = self.peak = 0
        self.external = external

    def _release(self, ptr):
        entry = self.live.get(ptr)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                del self.live[ptr]
                self.current -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0 or ptr in self.external:
                continue
            if ptr in self.live:
                self.live[ptr][1] += 1
            else:
                self.live[ptr] = [storage.nbytes(), 1]
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, ptr)
        return out


def peak_memory(fn, *args, **kwargs) -> int:
    """Peak bytes of the tensors that ``fn(*args, **kwargs)`` allocates (its inputs not counted).

    On CUDA: ``torch.cuda.max_memory_allocated`` around the call.  On the CPU, where
    PyTorch keeps no such statistic, every tensor an operation creates is tracked
    until it is freed (a ``TorchDispatchMode``): the same number, up to the
    allocator's rounding.
    """
    _require_callable(fn, "fn", "peak_memory")
    tensors = [a for a in torch.utils._pytree.tree_flatten((args, kwargs))[0] if isinstance(a, Tensor)]
    if any(t.device.type == "cuda" for t in tensors):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(*args, **kwargs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    tracker = _PeakTracker({t.untyped_storage().data_ptr() for t in tensors})
    with tracker:
        fn(*args, **kwargs)
    return tracker.peak


def check_peak_memory(peak_bytes) -> bool:
    """01 · exercise 2: ``peak_bytes(n, requires_grad=False)``, the measured peak memory of
    ``naive_attention(q, k, v, causal=True)`` (forward, and forward + backward with
    ``requires_grad=True``) for ``(1, 1, n, 64)`` float32 inputs."""
    _require_callable(peak_bytes, "peak_bytes", "check_peak_memory")

    def body():
        sizes = (256, 512, 1024)
        table = {}
        for grad in (False, True):
            vals = []
            for n in sizes:
                what = f"peak_bytes({n}, requires_grad={grad})"
                got = _call(peak_bytes, n, requires_grad=grad, what=what)
                got = _as_number(got, what, "a number of bytes")
                if not got > 0:
                    raise _Fail(f"{what} = {got}", "measure the peak around the call, e.g. "
                                "exercises.peak_memory(naive_attention, q, k, v, causal=True)")
                vals.append(got)
            table[grad] = vals
            slope = (math.log2(vals[-1]) - math.log2(vals[0])) / (math.log2(sizes[-1]) - math.log2(sizes[0]))
            if not 1.7 <= slope <= 2.3:
                raise _Fail(f"peak_bytes(n, requires_grad={grad}) grows as N^{slope:.2f} over N = {sizes}, "
                            "expected about N^2", "the score matrix alone is 4·N² bytes: are you measuring "
                            "naive_attention at the given n (not a fixed size, not the inputs)?")
            for n, v in zip(sizes, vals):
                if not 0.9 <= v / (4 * n * n) <= 12:
                    raise _Fail(f"peak_bytes({n}, requires_grad={grad}) = {v:.3g} bytes = {v / (4 * n * n):.2f} "
                                f"score matrices (4·N² = {4 * n * n} bytes); expected between 1 and ~10",
                                "measure bytes, for (1, 1, n, 64) float32 inputs")
        if table[True][-1] < table[False][-1]:
            raise _Fail("the peak with requires_grad=True is lower than without",
                        "with requires_grad=True, run the backward too: naive_attention(...).sum().backward()")
        ratios = ", ".join(f"N={n}: {a / (4 * n * n):.1f} → {b / (4 * n * n):.1f}"
                           for n, a, b in zip(sizes, table[False], table[True]))
        return f"score-sized tensors alive at the peak, forward → with backward: {ratios}"

    return _run("01 · exercise 2, peak_bytes", body)


# ---- softmax --------------------------------------------------------------------------


def check_stable_softmax(stable_softmax, *, seed=None) -> bool:
    """01 · exercise 3: ``stable_softmax(x)``, softmax over the last dim that never overflows."""
    _require_callable(stable_softmax, "stable_softmax", "check_stable_softmax")
    seed = _new_seed(seed)
    g = _gen(seed)

    def body():
        inf = float("inf")
        cases = [
            ("small logits [1, 2, 3]", torch.tensor([1.0, 2.0, 3.0])),
            ("large logits [100, 200, 300]", torch.tensor([100.0, 200.0, 300.0])),
            ("random (4, 7) · 3", _randn(4, 7, gen=g, dtype=torch.float32) * 3),
            ("random (2, 3, 5) · 1000", _randn(2, 3, 5, gen=g, dtype=torch.float32) * 1000),
            ("very negative logits, around -1e4", _randn(3, 6, gen=g, dtype=torch.float32) - 1e4),
            ("rows with -inf entries", torch.tensor([[0.0, -inf, 2.0, -inf], [-inf, -inf, 50.0, 49.0]])),
            ("float16, random (3, 8) · 100", (_randn(3, 8, gen=g) * 100).half()),
        ]
        worst = 0.0
        for name, x in cases:
            what = f"stable_softmax on {name}"
            got = _call(stable_softmax, x.clone(), what=what)
            expected = torch.softmax(x.double(), dim=-1)
            atol = 2e-3 if x.dtype == torch.float16 else 2e-6
            worst = max(worst, _compare(
                got, expected, what, atol=atol,
                hint="divide exp(x) by its sum over the last dim (dim=-1, keepdim=True); a -inf logit gets 0",
                nan_hint="exp(300) overflows float32 to inf, and inf/inf = nan: subtract each row's max "
                         "(x.max(dim=-1, keepdim=True).values) before exp; softmax does not change"))
        return f"max error {worst:.1e} on {len(cases)} inputs, logits up to ±1e4, float32 and float16"

    return _run("01 · exercise 3, stable_softmax", body, seed)


def _float16_exp_threshold() -> float:
    x = torch.arange(10.5, 11.5, 2**-7, dtype=torch.float64).half().unique()
    overflow = torch.isinf(torch.exp(x))
    return float(x[overflow][0])


def check_float16_exp_overflow(x) -> bool:
    """01 · exercise 3b: the smallest logit ``x`` whose ``exp`` overflows in float16."""
    if x is not None and not isinstance(x, (int, float, Tensor)):
        raise TypeError(f"check_float16_exp_overflow expects a number, got {type(x).__name__}")

    def body():
        if x is None:
            raise _NotAttempted
        threshold = _float16_exp_threshold()
        got = float(x)
        if abs(got - threshold) > 0.02:
            raise _Fail(f"exp overflows float16 from x ≈ {threshold:.4f}; you said {got:.4f}",
                        f"float16's largest finite number is torch.finfo(torch.float16).max = "
                        f"{torch.finfo(torch.float16).max:.0f}: solve e^x = that")
        return f"e^x > {torch.finfo(torch.float16).max:.0f} from x ≈ {threshold:.4f} = ln(65504) + rounding"

    return _run("01 · exercise 3b, float16 overflow", body)


def _naive_attention(q, k, v, causal=False):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def check_bf16_error(bf16_error, *, seed=None) -> bool:
    """01 · exercise 4: ``bf16_error(n)``, the max abs error of ``naive_attention(causal=True)`` in
    bfloat16 for ``(1, 4, n, 64)`` inputs, against ``ref.attention`` of the same inputs."""
    _require_callable(bf16_error, "bf16_error", "check_bf16_error")
    seed = _new_seed(seed)
    g = _gen(seed)

    def measure(n):
        q, k, v = (_randn(1, 4, n, 64, gen=g, dtype=torch.bfloat16) for _ in range(3))
        return (_naive_attention(q, k, v, causal=True).double() - reference.attention(q, k, v, causal=True)
                ).abs().max().item()

    def body():
        return _error_near_typical(
            bf16_error, "bf16_error", (64, 256, 1024), measure, "naive attention in bfloat16 has max errors",
            "cast q, k, v to torch.bfloat16 first, run naive_attention on them, and compare with "
            "ref.attention of the same bfloat16 tensors: (out.double() - truth).abs().max()",
        ) + " (about bfloat16's 2^-8 = 4e-3 relative step)"

    return _run("01 · exercise 4, bf16_error", body, seed)
