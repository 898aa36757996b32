"""Checkers for the exercises of the course notebooks (01, 02, 03, 03b and 08).

Each ``check_*`` function takes the learner's answer (a function, a Triton
``@triton.jit`` piece, or a dict of answers), runs it on fresh random inputs against
:mod:`sparseflash.reference` (float64) or the tile schedules of :mod:`sparseflash.tiles`,
and prints one verdict:

* ``✓ <exercise>: passed (<what was checked, the max error>)``,
* ``✗ <exercise>: <which input, expected vs got>`` and a ``hint:`` line,
* ``· <exercise>: not attempted yet`` while the answer still raises ``NotImplementedError``
  (or is still ``None``).

They return ``True`` or ``False`` and never raise on a wrong answer; they raise
``TypeError`` only on misuse (e.g. passing a number where a function is expected).
Every checker takes ``seed=`` to replay the random inputs a failure was found with.

Notebook 03b ("write the kernel") has its own part below: a FlashAttention skeleton
(:func:`forward_skeleton`, :func:`backward_skeleton`) that takes the learner's
``@triton.jit`` pieces as compile-time arguments, so each piece runs inside a real
kernel, on CPU tensors through Triton's interpreter or on a GPU.

Solutions, for teachers: ``notebooks/solutions/`` (one module per notebook).
"""
from __future__ import annotations

import contextlib
import inspect
import math
import secrets
import warnings
import weakref

import torch
import torch.utils._python_dispatch
import torch.utils._pytree
import triton
import triton.language as tl
from torch import Tensor

from . import _runtime, reference, tiles
from ._steps import LOG2E, dot_precision, online_softmax_step, record_buffers
from ._steps import load_tile as _load_tile

__all__ = [
    # notebook 01
    "check_sliding_window_mask", "check_window_pairs", "check_peak_memory", "peak_memory",
    "check_stable_softmax", "check_float16_exp_overflow", "check_bf16_error",
    # notebook 02
    "check_merge", "check_fp16_online_stats", "check_tiled_macs", "check_needs_mask", "check_window_tiles",
    "check_hash_setting",
    # notebook 03
    "check_scores_computed", "check_window_attention", "check_empty_row", "check_kernel_bf16_error",
    "check_tile_products",
    # notebook 03b
    "check_load_tile", "check_key_tile_range", "check_softmax_step", "check_finish_row", "check_forward",
    "check_backward_step", "check_query_tile_start", "check_backward",
    "forward_skeleton", "backward_skeleton", "given_query_tile_start", "run_forward", "run_backward",
    "build_attention", "plot_key_tile_range", "plot_tile_record", "show", "device",
    # notebook 08
    "check_top2_key_slots",
]


# ======================================================================================
# Plumbing: verdicts, learner calls, comparisons
# ======================================================================================


class _Fail(Exception):
    """A wrong answer: ``what`` went wrong, and a ``hint``."""

    def __init__(self, what: str, hint: str | None = None):
        super().__init__(what)
        self.what, self.hint = what, hint


class _NotAttempted(Exception):
    pass


class _OutOfBounds(Exception):
    pass


def device() -> torch.device:
    """Where the kernel exercises run: CUDA if present, else the CPU (Triton's interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _new_seed(seed):
    return secrets.randbelow(2**31) if seed is None else int(seed)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, gen, dtype=torch.float64, device_=None):
    x = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    return x if device_ is None else x.to(device_)


def _run(title: str, body, seed: int | None = None) -> bool:
    """Run one check; print the verdict; return whether it passed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the checks are many small operations: threads only contend
    try:
        detail = body()
    except _NotAttempted:
        print(f"· {title}: not attempted yet (fill in the cell above)")
        return False
    except _Fail as f:
        replay = f"\n  (random inputs from seed={seed}: pass seed={seed} to replay them)" if seed is not None else ""
        print(f"✗ {title}: {f.what}" + (f"\n  hint: {f.hint}" if f.hint else "") + replay)
        return False
    except Exception as e:  # a safety net: the checker could not even use the answer
        if _is_not_implemented(e):
            return _run(title, _raise_not_attempted)
        print(f"✗ {title}: the checker could not use your answer: {type(e).__name__}: {_short(e)}")
        return False
    finally:
        torch.set_num_threads(threads)
    print(f"✓ {title}: passed" + (f" ({detail})" if detail else ""))
    return True


def _raise_not_attempted():
    raise _NotAttempted


def _is_not_implemented(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, NotImplementedError) or "NotImplementedError" in repr(e)[:200]:
            return True
        e = e.__cause__ or e.__context__
    return False


def _short(e: BaseException, lines: int = 6) -> str:
    text = str(e).strip().splitlines()
    return "\n    ".join(text[:lines] + (["..."] if len(text) > lines else []))


def _call(fn, *args, what: str, **kwargs):
    """Call the learner's ``fn``; its exceptions become a failure (or 'not attempted')."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise _NotAttempted from None
    except Exception as e:
        raise _Fail(f"{what} raised {type(e).__name__}: {_short(e)}",
                    "run it yourself in a cell to see the whole traceback") from None


def _as_number(got, what: str, unit: str = "a number") -> float:
    """The learner's answer as a float, or a failure saying it should have been ``unit``."""
    try:
        return float(got)
    except Exception:
        raise _Fail(f"{what} should return {unit}, got {type(got).__name__}") from None


def _require_callable(fn, name: str, checker: str):
    if not callable(fn):
        raise TypeError(f"{checker} expects your function, e.g. {checker}({name}); got {type(fn).__name__}")


def _as_tensor(x, what: str, dtype=None) -> Tensor:
    if isinstance(x, Tensor):
        return x
    try:
        return torch.as_tensor(x, dtype=dtype)
    except Exception:
        raise _Fail(f"{what} should return a tensor, got {type(x).__name__}") from None


def _fmt_index(idx, names=None) -> str:
    if names is None:
        return str(tuple(idx))
    return ", ".join(f"{n} {i}" for n, i in zip(names, idx))


def _compare(got, expected: Tensor, what: str, *, atol: float, rtol: float = 0.0, names=None,
             hint: str | None = None, nan_hint: str | None = None) -> float:
    """Compare element-wise (equal infinities match); raise ``_Fail`` naming the worst element."""
    got = _as_tensor(got, what)
    if tuple(got.shape) != tuple(expected.shape):
        raise _Fail(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}", hint)
    g = got.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    same = (g == e) | (torch.isnan(g) & torch.isnan(e))
    err = (g - e).abs().masked_fill(same, 0.0).nan_to_num(nan=math.inf)
    bad = err > atol + rtol * e.abs().nan_to_num(posinf=0.0, neginf=0.0)
    if bad.any():
        score = torch.where(bad, err, torch.full_like(err, -1.0)).flatten()
        idx = list(torch.unravel_index(torch.argmax(score), err.shape))
        idx = [int(i) for i in idx]
        n_bad, n = int(bad.sum()), bad.numel()
        nan_got = bool(torch.isnan(g[bad]).any())
        msg = (f"{what}: {n_bad} of {n} values wrong; at {_fmt_index(idx, names)} expected "
               f"{e[tuple(idx)].item():.6g}, got {g[tuple(idx)].item():.6g}")
        raise _Fail(msg, nan_hint if (nan_got and nan_hint) else hint)
    finite = err[torch.isfinite(err)]
    return float(finite.max()) if finite.numel() else 0.0


def _tol() -> float:
    """Absolute tolerance of float32 kernels: exact products on the interpreter, TF32 on a GPU."""
    return 2e-4 if device().type == "cpu" else 3e-2


def show(fn) -> None:
    """Print the source of a function or a ``@triton.jit`` kernel (e.g. this module's skeletons)."""
    print(inspect.getsource(getattr(fn, "fn", fn)))


# ======================================================================================
# Notebook 01 · naive attention
# ======================================================================================


def _window_mask(n: int, w: int, device_=None) -> Tensor:
    i = torch.arange(n, device=device_)[:, None]
    j = torch.arange(n, device=device_)[None, :]
    return (j <= i) & (j > i - w)


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


def _typical(measure, draws: int = 3) -> float:
    vals = sorted(measure() for _ in range(draws))
    return vals[len(vals) // 2]


def _error_near_typical(fn, name: str, sizes, measure, described: str, hint: str) -> str:
    """The learner's measured error ``fn(n)`` for each size, within 3× of the same measurement
    made here (``measure(n)``, median of three); returns a one-line summary."""
    rows = []
    for n in sizes:
        what = f"{name}({n})"
        got = _as_number(_call(fn, n, what=what), what)
        typical = _typical(lambda: measure(n))
        if not typical / 3 <= got <= typical * 3:
            raise _Fail(f"{what} = {got:.2e}, but {described} around {typical:.1e} at this size", hint)
        rows.append(f"N={n}: {got:.1e}")
    return ", ".join(rows)


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


# ======================================================================================
# Notebook 02 · online softmax and tiling
# ======================================================================================


def _stats(x: Tensor):
    """(m, l) of each row of float64 x, with (-inf, 0) for a row of only -inf."""
    m = x.max(-1).values
    shift = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    return m, torch.exp(x - shift[..., None]).sum(-1)


def check_merge(merge, *, seed=None) -> bool:
    """02 · exercise 1: ``merge(m1, l1, m2, l2) -> (m, l)``: the stats of a row from those of its halves."""
    _require_callable(merge, "merge", "check_merge")
    seed = _new_seed(seed)
    g = _gen(seed)

    def body():
        rows, length = 6, 40
        x = _randn(rows, length, gen=g) * 4
        x[1, 25:] += 20.0                                 # the max in the second half
        split = [int(s) for s in torch.randint(1, length, (rows,), generator=g)]
        x[2, :split[2]] = -math.inf                       # an empty first half
        x[3, split[3]:] = -math.inf                       # an empty second half
        x[4, :] = -math.inf                               # an empty row: merge of two empty halves
        m1, l1, m2, l2 = (torch.empty(rows, dtype=torch.float64) for _ in range(4))
        for r, s in enumerate(split):
            m1[r], l1[r] = _stats(x[r, :s])
            m2[r], l2[r] = _stats(x[r, s:])
        m_true, l_true = _stats(x)
        got = _call(merge, m1.clone(), l1.clone(), m2.clone(), l2.clone(), what="merge(m1, l1, m2, l2)")
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise _Fail("merge should return the pair (m, l)")
        names = ("row",)
        hint = "m = max(m1, m2); each sum was relative to its own max, so rescale: l = l1·e^(m1-m) + l2·e^(m2-m)"
        nan_hint = ("a half that saw nothing has m = -inf and l = 0; when both are empty, m1 - m = -inf - (-inf) "
                    "is nan: shift by 0 instead of m when m = -inf (torch.where), so the row stays (-inf, 0)")
        _compare(got[0], m_true, "m (running max)", atol=1e-12, names=names, hint=hint, nan_hint=nan_hint)
        err = _compare(got[1], l_true, "l (running sum)", atol=0, rtol=1e-9, names=names, hint=hint,
                       nan_hint=nan_hint)
        return f"{rows} rows split at random points, empty halves and an empty row included; max rel. error {err:.0e}"

    return _run("02 · exercise 1, merge", body, seed)


def check_fp16_online_stats(online_softmax_stats_fp16, *, seed=None) -> bool:
    """02 · exercise 2: ``online_softmax_stats_fp16(x, chunk) -> (m, l)`` for float16 ``x``, accurate to 1e-4."""
    _require_callable(online_softmax_stats_fp16, "online_softmax_stats_fp16", "check_fp16_online_stats")
    seed = _new_seed(seed)
    g = _gen(seed)

    def body():
        x = (_randn(2, 16384, gen=g) * 3).half()
        m_true, l_true = _stats(x.double())
        worst = 0.0
        for chunk in (1, 16, 256, 16384):
            what = f"online_softmax_stats_fp16(x, chunk={chunk}) on 2 float16 rows of 16384 logits"
            got = _call(online_softmax_stats_fp16, x.clone(), chunk, what=what)
            if not isinstance(got, (tuple, list)) or len(got) < 2:
                raise _Fail(f"{what} should return (m, l)")
            _compare(got[0], m_true, what + ": m", atol=0, hint="m is the max of the row, exactly")
            l_got = _as_tensor(got[1], what).double().cpu()
            rel = ((l_got - l_true).abs() / l_true).max().item() if l_got.shape == l_true.shape else math.inf
            if not rel <= 1e-4:
                raise _Fail(f"{what}: l has relative error {rel:.1e} against float64 (need ≤ 1e-4)",
                            "keep m and l in float32 (convert each chunk with .float() before exp and sum): a "
                            "float16 running sum stops growing once it is ~2048× the terms added to it")
            worst = max(worst, rel)
        return f"chunks 1, 16, 256, 16384: max relative error of l {worst:.1e}"

    return _run("02 · exercise 2, online_softmax_stats_fp16", body, seed)


def _tiled_macs_expected(n, d, bm, bn):
    total = 0
    for qt in range(-(-n // bm)):
        r0, r1 = qt * bm, min((qt + 1) * bm, n) - 1
        for kt in range(-(-n // bn)):
            c0, c1 = kt * bn, min((kt + 1) * bn, n) - 1
            if c0 <= r1:
                total += 2 * (r1 - r0 + 1) * (c1 - c0 + 1) * d
    return total


def check_tiled_macs(tiled_macs) -> bool:
    """02 · exercise 3: ``tiled_macs(N, D, block_m, block_n)``, multiply-adds of the two matrix products
    of causal ``tiled_attention``."""
    _require_callable(tiled_macs, "tiled_macs", "check_tiled_macs")

    def body():
        cases = [(200, 32, 32, 16), (200, 32, 16, 16), (64, 16, 16, 16), (100, 8, 32, 32), (37, 4, 8, 16)]
        for n, d, bm, bn in cases:
            what = f"tiled_macs(N={n}, D={d}, block_m={bm}, block_n={bn})"
            got = _call(tiled_macs, n, d, bm, bn, what=what)
            expected = _tiled_macs_expected(n, d, bm, bn)
            if _as_number(got, what) != expected:
                raise _Fail(f"{what} = {got}, expected {expected} (naive: 2·N²·D = {2 * n * n * d})",
                            "per computed tile, q kᵀ and p v each cost len(rows)·len(cols)·D multiply-adds, with "
                            "the real (ragged) tile sizes; skipped tiles cost nothing")
        fr = ", ".join(f"{bm}×{bn}: {_tiled_macs_expected(n, d, bm, bn) / (2 * n * n * d):.3f}"
                       for n, d, bm, bn in cases[:2])
        return f"{len(cases)} shapes; fraction of naive work at N=200: {fr} (→ ½ as N grows)"

    return _run("02 · exercise 3, tiled_macs", body)


def check_needs_mask(needs_mask) -> bool:
    """02 · exercise 4: ``needs_mask(rows, cols)``: does this computed causal tile need the mask?"""
    _require_callable(needs_mask, "needs_mask", "check_needs_mask")

    def body():
        checked = full = 0
        for n, bm, bn in [(200, 32, 16), (128, 16, 32), (64, 16, 16), (100, 32, 32)]:
            for qt in range(-(-n // bm)):
                rows = torch.arange(qt * bm, min((qt + 1) * bm, n))
                for kt in range(-(-n // bn)):
                    cols = torch.arange(kt * bn, min((kt + 1) * bn, n))
                    if cols[0] > rows[-1]:
                        continue                                  # skipped tile
                    what = f"needs_mask(rows={int(rows[0])}..{int(rows[-1])}, cols={int(cols[0])}..{int(cols[-1])})"
                    got = _call(needs_mask, rows.clone(), cols.clone(), what=what)
                    try:
                        got = bool(got)
                    except Exception:
                        raise _Fail(f"{what} should return True or False, got {type(got).__name__}") from None
                    expected = bool(cols[-1] > rows[0])
                    if got != expected:
                        why = (f"key {int(cols[-1])} comes after query {int(rows[0])}" if expected else
                               f"every key (≤ {int(cols[-1])}) is at or before every query (≥ {int(rows[0])})")
                        raise _Fail(f"{what} = {got}, expected {expected}: {why} (N={n}, {bm}×{bn} tiles)",
                                    "a tile needs no mask when its last key is at or before its first query")
                    checked += 1
                    full += not expected
        return f"{checked} computed tiles of 4 shapes, {full} of them full (no mask needed)"

    return _run("02 · exercise 4, needs_mask", body)


def _tile_any(mask: Tensor, bm: int, bn: int) -> Tensor:
    n_q, n_k = mask.shape
    m = torch.nn.functional.pad(mask.int(), (0, (-n_k) % bn, 0, (-n_q) % bm))
    return m.unflatten(1, (-1, bn)).unflatten(0, (-1, bm)).sum((1, 3)) > 0


def check_window_tiles(window_tiles) -> bool:
    """02 · exercise 5: ``window_tiles(N, w, block_m, block_n)`` -> bool ``(n_q_tiles, n_k_tiles)``: the
    tiles a sliding-window kernel must compute (exactly those holding an allowed pair)."""
    _require_callable(window_tiles, "window_tiles", "check_window_tiles")

    def body():
        for n, w, bm, bn in [(256, 64, 32, 32), (200, 50, 32, 16), (100, 1, 16, 16), (128, 300, 32, 32),
                             (96, 17, 16, 32)]:
            what = f"window_tiles(N={n}, w={w}, block_m={bm}, block_n={bn})"
            got = _as_tensor(_call(window_tiles, n, w, bm, bn, what=what), what)
            expected = _tile_any(_window_mask(n, w), bm, bn)
            if tuple(got.shape) != tuple(expected.shape):
                raise _Fail(f"{what}: expected shape {tuple(expected.shape)} (query tiles, key tiles), "
                            f"got {tuple(got.shape)}")
            got = got.bool().cpu()
            missing, extra = expected & ~got, got & ~expected
            hint = ("tile (rows r0..r1, keys c0..c1) holds an allowed pair iff c0 <= r1 (causal) "
                    "and c1 > r0 - w (inside the window of its first query)")
            if missing.any():
                qt, kt = torch.nonzero(missing)[0].tolist()
                raise _Fail(f"{what} skips {int(missing.sum())} tile(s) that hold allowed pairs, e.g. query tile "
                            f"{qt} × key tile {kt} (queries {qt * bm}.., keys {kt * bn}..{min((kt + 1) * bn, n) - 1}"
                            "): the output would be wrong", hint)
            if extra.any():
                qt, kt = torch.nonzero(extra)[0].tolist()
                raise _Fail(f"{what} computes {int(extra.sum())} tile(s) with no allowed pair, e.g. query tile {qt}"
                            f" × key tile {kt}: correct, but wasted work", hint)
        counts = []
        for n in (1024, 2048, 4096):
            got = _as_tensor(_call(window_tiles, n, 128, 64, 64, what=f"window_tiles({n}, 128, 64, 64)"), "")
            counts.append(f"N={n}: {int(got.sum())}")
        return "5 shapes; computed 64×64 tiles at w=128: " + ", ".join(counts) + " (linear in N)"

    return _run("02 · exercise 5, window_tiles", body)


def check_hash_setting(setting) -> bool:
    """02 · exercise 6: a hash setting ``dict(seq_len=, block=, n_buckets=, seed=)`` of the explorer
    (random bucket ids) where the kernel computes at most a quarter of the dense causal tiles."""
    keys = {"seq_len", "block", "n_buckets", "seed"}
    if setting is not None:
        if not isinstance(setting, dict):
            raise TypeError(f"check_hash_setting expects a dict like dict(seq_len=256, block=16, n_buckets=4, "
                            f"seed=0), got {type(setting).__name__}")
        unknown = set(setting) - keys
        if unknown:
            raise TypeError(f"check_hash_setting: unknown keys {sorted(unknown)}; expected {sorted(keys)}")

    def body():
        if setting is None:
            raise _NotAttempted
        s = {"seq_len": 128, "block": 16, "n_buckets": 4, "seed": 0, **setting}
        try:
            seq_len, block, n_buckets, seed = (int(s[k]) for k in ("seq_len", "block", "n_buckets", "seed"))
        except Exception:
            raise _Fail("seq_len, block, n_buckets and seed must be integers") from None
        if not (1 <= seq_len <= 4096 and block in (16, 32, 64) and 1 <= n_buckets <= 64):
            raise _Fail("stay in the explorer's range: seq_len up to 512 (4096 at most here), block 16, 32 or 64, "
                        "n_buckets from 1 to 16")
        sched = tiles.schedule_for("hash", seq_len, block, n_buckets=n_buckets, seed=seed)
        frac = sched.computed_fraction
        desc = f"hash, N={seq_len}, {block}×{block} tiles, {n_buckets} buckets, seed {seed}"
        if frac > 0.25:
            raise _Fail(f"{desc}: the kernel computes {frac:.2f} of the dense causal tiles (ideal speed-up "
                        f"{sched.ideal_speedup:.1f}×); need at most 0.25",
                        "more buckets make each bucket smaller, but a tile cannot skip less than itself: buckets "
                        "must stay several tiles long (longer sequences, smaller tiles)")
        return f"{desc}: {frac:.2f} of the dense causal tiles, ideal speed-up {sched.ideal_speedup:.1f}×"

    return _run("02 · exercise 6, a hash setting with a 4× ideal speed-up", body)


# ======================================================================================
# Notebook 03 · FlashAttention in Triton
# ======================================================================================


def check_scores_computed(scores_computed) -> bool:
    """03 · exercise 1: ``scores_computed(N, bm, bn)``: scores the forward computes (visited tiles × bm × bn,
    read off a ``TileRecord``)."""
    _require_callable(scores_computed, "scores_computed", "check_scores_computed")

    def body():
        rows = []
        for n, bm, bn in [(256, 16, 16), (256, 32, 64), (200, 64, 32), (128, 16, 64)]:
            what = f"scores_computed(N={n}, bm={bm}, bn={bn})"
            got = _call(scores_computed, n, bm, bn, what=what)
            expected = int(tiles.flash_schedule(n, n, True, bm, bn).computed.sum()) * bm * bn
            if _as_number(got, what) != expected:
                raise _Fail(f"{what} = {got}, expected {expected}",
                            "run flash_attention with kernel_options={'BLOCK_M': bm, 'BLOCK_N': bn} and "
                            "tile_record=rec; count the tiles with rec.maps['fwd'][0, 0] > 0 and multiply by bm·bn")
            rows.append(f"{bm}×{bn} at N={n}: {expected / (n * (n + 1) / 2):.2f}× the allowed pairs")
        return "; ".join(rows)

    return _run("03 · exercise 1, scores_computed", body)


def check_window_attention(window_attention, *, seed=None) -> bool:
    """03 · exercise 2: ``window_attention(q, k, v, window, tile_record=None)``: sliding-window causal
    attention in Triton (query i sees keys i - window < j <= i), visiting only the tiles that hold an
    allowed pair (recorded in ``tile_record.maps['fwd']``)."""
    _require_callable(window_attention, "window_attention", "check_window_attention")
    seed = _new_seed(seed)
    g = _gen(seed)
    dev = device()

    def body():
        worst = 0.0
        for n, w in [(128, 1), (100, 16), (128, 40), (100, 1000)]:
            q, k, v = (_randn(1, 2, n, 32, gen=g, dtype=torch.float32, device_=dev) for _ in range(3))
            what = f"window_attention(q, k, v, window={w}) with N={n}, D=32, float32"
            out = _call(window_attention, q, k, v, w, what=what)
            truth = reference.attention(q, k, v, allowed=_window_mask(n, w, dev))
            worst = max(worst, _compare(out, truth, what, atol=_tol(), names=("batch", "head", "query", "dim"),
                                        hint="allowed = (key <= query) & (key > query - WINDOW); the loop must "
                                             "start at the key tile of key max(first query - WINDOW + 1, 0)",
                                        nan_hint="nan: a key tile with nothing allowed for a row must leave it "
                                                 "unchanged (online_softmax_step does, with MASKED=True)"))
        visited = []
        for n, w in [(128, 40), (100, 16)]:
            q, k, v = (_randn(1, 1, n, 32, gen=g, dtype=torch.float32, device_=dev) for _ in range(3))
            rec = tiles.TileRecord()
            _call(window_attention, q, k, v, w, tile_record=rec, what=f"window_attention(..., tile_record=rec)")
            if "fwd" not in rec.maps:
                raise _Fail("tile_record.maps['fwd'] is missing after the call",
                            "in your launch: rec.start('window', cfg); buf = rec.buffer('fwd', (B, H, n_q_tiles, "
                            "n_k_tiles), q.device); pass buf and RECORD=True, and call record_tile in the loop")
            counts = rec.maps["fwd"][0, 0].cpu()
            n_qt, n_kt = counts.shape
            bm = rec.config.get("BLOCK_M") or next((b for b in (16, 32, 64, 128) if -(-n // b) == n_qt), None)
            bn = rec.config.get("BLOCK_N") or next((b for b in (16, 32, 64, 128) if -(-n // b) == n_kt), None)
            if bm is None or bn is None:
                raise _Fail(f"cannot tell the tile sizes from tile_record.maps['fwd'] of shape {tuple(counts.shape)}",
                            "call tile_record.start('window', {'BLOCK_M': bm, 'BLOCK_N': bn}) in your launch")
            expected = _tile_any(_window_mask(n, w), bm, bn)
            got = counts > 0
            if tuple(got.shape) != tuple(expected.shape) or not torch.equal(got, expected):
                extra = int((got & ~expected).sum()) if got.shape == expected.shape else -1
                raise _Fail(f"N={n}, window={w}, {bm}×{bn} tiles: your kernel visited {int(got.sum())} tiles, the "
                            f"window needs exactly {int(expected.sum())}" +
                            (f" ({extra} visited tiles hold no allowed pair)" if extra > 0 else ""),
                            "start the key loop at (max(q_tile·BLOCK_M - WINDOW + 1, 0)) // BLOCK_N; end it as the "
                            "causal loop does")
            visited.append(f"N={n}, W={w}: {int(got.sum())} tiles (dense causal: "
                           f"{tiles.dense_causal_tile_count(n, n, bm, bn)})")
        return f"max error {worst:.1e} on 4 (N, window) pairs; " + "; ".join(visited)

    return _run("03 · exercise 2, window_attention", body, seed)


def check_empty_row(answers) -> bool:
    """03 · exercise 3: ``dict(m=, l=, acc=, lse2=)``: the state of a query row that sees no key, after the
    loop (m, l, acc: one number each, acc stands for every entry) and the lse2 the forward stores."""
    keys = ("m", "l", "acc", "lse2")
    if answers is not None and not isinstance(answers, dict):
        raise TypeError(f"check_empty_row expects a dict like dict(m=..., l=..., acc=..., lse2=...), "
                        f"got {type(answers).__name__}")
    if answers is not None and set(answers) - set(keys):
        raise TypeError(f"check_empty_row: unknown keys {sorted(set(answers) - set(keys))}; expected {keys}")

    def body():
        if answers is None or all(answers.get(k) is None for k in keys):
            raise _NotAttempted
        expected = {"m": -math.inf, "l": 0.0, "acc": 0.0, "lse2": math.inf}
        hints = {
            "m": "m starts at -inf and only a score that is allowed can raise it",
            "l": "nothing was ever added to l",
            "acc": "nothing was ever added to acc (p is 0 everywhere: m_shift = 0 keeps 2^(-inf - 0) = 0)",
            "lse2": "the backward computes p = 2^(s - lse2): which lse2 makes p = 0 for every score s?",
        }
        for key in keys:
            if answers.get(key) is None:
                raise _Fail(f"{key} is missing", hints[key])
            try:
                got = float(answers[key])
            except Exception:
                raise _Fail(f"{key} should be a number (use float('inf') or math.inf for infinity)") from None
            if got != expected[key]:
                raise _Fail(f"{key} = {got}, expected {expected[key]}", hints[key])
        return ("m = -inf, l = 0, acc = 0: out = 0 (not 0/0 = nan); lse2 = +inf makes p = 0 and no gradient; "
                "lse2 = 0 would give p = 2^s ≠ 0 and -inf would give p = inf")

    return _run("03 · exercise 3, the empty row", body)


def check_kernel_bf16_error(kernel_bf16_error, *, seed=None) -> bool:
    """03 · exercise 4: ``kernel_bf16_error(n)``: relative error (Frobenius) of ``flash_attention(causal=True)``
    in bfloat16 for ``(1, 2, n, 64)`` inputs, against ``ref.attention`` of the same inputs."""
    _require_callable(kernel_bf16_error, "kernel_bf16_error", "check_kernel_bf16_error")
    seed = _new_seed(seed)
    g = _gen(seed)
    dev = device()

    def measure(n):
        from .flash import flash_attention

        q, k, v = (_randn(1, 2, n, 64, gen=g, dtype=torch.bfloat16, device_=dev) for _ in range(3))
        truth = reference.attention(q, k, v, causal=True)
        out = flash_attention(q, k, v, causal=True)
        return ((out.double() - truth).norm() / truth.norm()).item()

    def body():
        return _error_near_typical(
            kernel_bf16_error, "kernel_bf16_error", (64, 128) if dev.type == "cpu" else (512, 2048), measure,
            "flash_attention in bfloat16 has relative errors",
            "rel_err(flash_attention(q, k, v, causal=True), ref.attention(q, k, v, causal=True)) "
            "with q, k, v of shape (1, 2, n, 64) in torch.bfloat16 on `device`",
        )

    return _run("03 · exercise 4, kernel_bf16_error", body, seed)


def check_tile_products(answers) -> bool:
    """03 · exercise 5: ``dict(atomic=, two_loops=)``: tile matrix products per (query tile, key tile) pair
    in the backward with an atomic dQ and in sparseflash's two-loop backward."""
    if answers is not None and not isinstance(answers, dict):
        raise TypeError(f"check_tile_products expects dict(atomic=..., two_loops=...), got {type(answers).__name__}")

    def body():
        if answers is None or all(v is None for v in answers.values()):
            raise _NotAttempted
        products = "s = q kᵀ, dp = do vᵀ, dv += pᵀ do, dk += dsᵀ q, dq += ds k"
        for key, expected, hint in [
            ("atomic", 5, f"one loop computes all of: {products}"),
            ("two_loops", 7, "the dK/dV loop computes s, dp, dv, dk; the dQ loop recomputes s and dp, then dq"),
        ]:
            got = answers.get(key)
            if got is None:
                raise _Fail(f"{key} is missing", hint)
            if got != expected:
                raise _Fail(f"{key} = {got}, expected {expected}", hint)
        return "5 products with atomics, 7 with two loops: 40% more products, but no atomics and bitwise " \
               "reproducible dQ"

    return _run("03 · exercise 5, tile products", body)


# ======================================================================================
# Notebook 03b · write the kernel
# ======================================================================================
#
# The learner writes five @triton.jit pieces:
#
#   load_tile(ptr, rows, cols, stride_row, n_rows) -> (len(rows), len(cols)) tile, rows >= n_rows read 0
#   key_tile_range(q_tile, n, BLOCK_M, BLOCK_N) -> number of key tiles the causal query tile visits
#   softmax_step(acc, m_i, l_i, q, k, v, allowed, qk_scale) -> (acc, m_i, l_i)
#   finish_row(acc, m_i, l_i) -> (out, lse2)
#   backward_step(q, k, v, do, lse2, delta, allowed, qk_scale) -> (p, ds)
#
# (and optionally query_tile_start(k_tile, BLOCK_M, BLOCK_N) for the dK/dV loop).  The
# skeleton kernels below take them as tl.constexpr arguments and call them.

_PAD = 64  # rows of NaN after every input, so a load that forgets its mask reads NaN, not foreign memory


@triton.jit
def given_query_tile_start(k_tile, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """First query tile that holds a query at or after the key tile's first key (causal)."""
    return (k_tile * BLOCK_N) // BLOCK_M


@triton.jit
def _count_tile(REC, row, col, n_cols):
    """Count one computed (query tile, key tile) pair; tiles past the end count in the last column."""
    ptr = REC + row * n_cols + tl.minimum(col, n_cols - 1)
    tl.store(ptr, tl.load(ptr) + 1)


@triton.jit
def forward_skeleton(Q, K, V, O, LSE, REC,
                    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                    H, N, qk_scale,
                    LOAD_TILE: tl.constexpr, KEY_TILE_RANGE: tl.constexpr, SOFTMAX_STEP: tl.constexpr,
                    FINISH_ROW: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RECORD: tl.constexpr):
    # One program per (query tile, batch·head), as in sparseflash.flash._flash_fwd_kernel.
    q_tile = tl.program_id(0)
    bh = tl.program_id(1)
    Q += (bh // H) * sq_b + (bh % H) * sq_h
    K += (bh // H) * sk_b + (bh % H) * sk_h
    V += (bh // H) * sv_b + (bh % H) * sv_h
    rows = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    q = LOAD_TILE(Q, rows, cols, sq_n, N)                                          # your piece 1

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_k_tiles = tl.cdiv(N, BLOCK_N)
    for k_tile in range(0, KEY_TILE_RANGE(q_tile, N, BLOCK_M, BLOCK_N)):           # your piece 2
        keys = k_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        k = LOAD_TILE(K, keys, cols, sk_n, N)
        v = LOAD_TILE(V, keys, cols, sv_n, N)
        allowed = (keys[None, :] <= rows[:, None]) & (keys[None, :] < N)
        acc, m_i, l_i = SOFTMAX_STEP(acc, m_i, l_i, q, k, v, allowed, qk_scale)      # your piece 3
        if RECORD:
            _count_tile(REC, bh * tl.cdiv(N, BLOCK_M) + q_tile, k_tile, n_k_tiles)

    out, lse2 = FINISH_ROW(acc, m_i, l_i)                                          # your piece 4
    o_ptrs = O + bh * N * HEAD_DIM + rows[:, None] * HEAD_DIM + cols[None, :]
    tl.store(o_ptrs, out, mask=rows[:, None] < N)
    tl.store(LSE + bh * N + rows, lse2, mask=rows < N)


@triton.jit
def backward_skeleton(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, REC_KV, REC_Q,
                     sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sdo_b, sdo_h, sdo_n,
                     H, N, qk_scale, sm_scale,
                     LOAD_TILE: tl.constexpr, KEY_TILE_RANGE: tl.constexpr, QUERY_TILE_START: tl.constexpr,
                     BACKWARD_STEP: tl.constexpr,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RECORD: tl.constexpr):
    # Program t: dK, dV of key tile t (walking the query tiles that see it), then dQ of
    # query tile t (walking its key tiles, as the forward), as sparseflash.flash._flash_bwd_kernel.
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    Q += (bh // H) * sq_b + (bh % H) * sq_h
    K += (bh // H) * sk_b + (bh % H) * sk_h
    V += (bh // H) * sv_b + (bh % H) * sv_h
    DO += (bh // H) * sdo_b + (bh % H) * sdo_h
    LSE += bh * N
    DELTA += bh * N
    n_q_tiles = tl.cdiv(N, BLOCK_M)
    n_k_tiles = tl.cdiv(N, BLOCK_N)
    cols = tl.arange(0, HEAD_DIM)

    if tile < n_k_tiles:                                    # ---- dK, dV of key tile `tile`
        keys = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        k = LOAD_TILE(K, keys, cols, sk_n, N)
        v = LOAD_TILE(V, keys, cols, sv_n, N)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        for q_tile in range(QUERY_TILE_START(tile, BLOCK_M, BLOCK_N), n_q_tiles):
            rows = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
            q = LOAD_TILE(Q, rows, cols, sq_n, N)
            do = LOAD_TILE(DO, rows, cols, sdo_n, N)
            lse2 = tl.load(LSE + rows, mask=rows < N, other=float("inf"))
            delta = tl.load(DELTA + rows, mask=rows < N, other=0.0)
            allowed = (keys[None, :] <= rows[:, None]) & (keys[None, :] < N) & (rows[:, None] < N)
            p, ds = BACKWARD_STEP(q, k, v, do, lse2, delta, allowed, qk_scale)       # your piece 5
            dv += tl.dot(tl.trans(p), do)
            dk += tl.dot(tl.trans(ds), q)
            if RECORD:
                _count_tile(REC_KV, bh * n_q_tiles + q_tile, tile, n_k_tiles)
        d_ptrs = bh * N * HEAD_DIM + keys[:, None] * HEAD_DIM + cols[None, :]
        tl.store(DK + d_ptrs, dk * sm_scale, mask=keys[:, None] < N)
        tl.store(DV + d_ptrs, dv, mask=keys[:, None] < N)

    if tile < n_q_tiles:                                    # ---- dQ of query tile `tile`
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        q = LOAD_TILE(Q, rows, cols, sq_n, N)
        do = LOAD_TILE(DO, rows, cols, sdo_n, N)
        lse2 = tl.load(LSE + rows, mask=rows < N, other=float("inf"))
        delta = tl.load(DELTA + rows, mask=rows < N, other=0.0)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for k_tile in range(0, KEY_TILE_RANGE(tile, N, BLOCK_M, BLOCK_N)):
            keys = k_tile * BLOCK_N + tl.arange(0, BLOCK_N)
            k = LOAD_TILE(K, keys, cols, sk_n, N)
            v = LOAD_TILE(V, keys, cols, sv_n, N)
            allowed = (keys[None, :] <= rows[:, None]) & (keys[None, :] < N) & (rows[:, None] < N)
            p, ds = BACKWARD_STEP(q, k, v, do, lse2, delta, allowed, qk_scale)
            dq += tl.dot(ds, k)
            if RECORD:
                _count_tile(REC_Q, bh * n_q_tiles + tile, k_tile, n_k_tiles)
        d_ptrs = bh * N * HEAD_DIM + rows[:, None] * HEAD_DIM + cols[None, :]
        tl.store(DQ + d_ptrs, dq * sm_scale, mask=rows[:, None] < N)


# ---- probes: one piece in a small kernel ----------------------------------------------


@triton.jit
def _load_probe(X, OUT, row0, stride_row, n_rows, LOAD_TILE: tl.constexpr, BLOCK: tl.constexpr,
                D: tl.constexpr):
    rows = row0 + tl.arange(0, BLOCK)
    cols = tl.arange(0, D)
    tile = LOAD_TILE(X, rows, cols, stride_row, n_rows)
    tl.store(OUT + tl.arange(0, BLOCK)[:, None] * D + cols[None, :], tile)


@triton.jit
def _key_range_probe(OUT, N, KEY_TILE_RANGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    q_tile = tl.program_id(0)
    tl.store(OUT + q_tile, KEY_TILE_RANGE(q_tile, N, BLOCK_M, BLOCK_N))


@triton.jit
def _query_start_probe(OUT, QUERY_TILE_START: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    k_tile = tl.program_id(0)
    tl.store(OUT + k_tile, QUERY_TILE_START(k_tile, BLOCK_M, BLOCK_N))


@triton.jit
def _softmax_probe(Q, K, V, MASK, M, L, ACC, OUT, LSE, N, qk_scale,
                   STEP: tl.constexpr, FINISH: tl.constexpr, USE_MINE: tl.constexpr,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Every key tile, with `allowed` read from MASK (rows may be empty); the learner's
    # step (or sparseflash's), then the learner's finish (or none).
    q_tile = tl.program_id(0)
    rows = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D)
    q = _load_tile(Q, rows, cols, D, N, D, D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for k_tile in range(0, tl.cdiv(N, BLOCK_N)):
        keys = k_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        k = _load_tile(K, keys, cols, D, N, D, D)
        v = _load_tile(V, keys, cols, D, N, D, D)
        inside = (rows[:, None] < N) & (keys[None, :] < N)
        allowed = tl.load(MASK + rows[:, None] * N + keys[None, :], mask=inside, other=0) != 0
        if USE_MINE:
            acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, q, k, v, allowed, qk_scale, True, DOT_PRECISION)
        else:
            acc, m_i, l_i = STEP(acc, m_i, l_i, q, k, v, allowed, qk_scale)
    tl.store(M + rows, m_i, mask=rows < N)
    tl.store(L + rows, l_i, mask=rows < N)
    tl.store(ACC + rows[:, None] * D + cols[None, :], acc, mask=rows[:, None] < N)
    if USE_MINE:
        out, lse2 = FINISH(acc, m_i, l_i)
        tl.store(OUT + rows[:, None] * D + cols[None, :], out, mask=rows[:, None] < N)
        tl.store(LSE + rows, lse2, mask=rows < N)


@triton.jit
def _backward_step_probe(Q, K, V, DO, LSE, DELTA, MASK, P, DS, N, qk_scale, STEP: tl.constexpr,
                         D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program per (query tile, key tile): the learner's p and ds for that tile.
    q_tile = tl.program_id(0)
    k_tile = tl.program_id(1)
    rows = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    keys = k_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, D)
    q = _load_tile(Q, rows, cols, D, N, D, D)
    do = _load_tile(DO, rows, cols, D, N, D, D)
    k = _load_tile(K, keys, cols, D, N, D, D)
    v = _load_tile(V, keys, cols, D, N, D, D)
    lse2 = tl.load(LSE + rows, mask=rows < N, other=float("inf"))
    delta = tl.load(DELTA + rows, mask=rows < N, other=0.0)
    inside = (rows[:, None] < N) & (keys[None, :] < N)
    allowed = tl.load(MASK + rows[:, None] * N + keys[None, :], mask=inside, other=0) != 0
    p, ds = STEP(q, k, v, do, lse2, delta, allowed, qk_scale)
    offs = rows[:, None] * N + keys[None, :]
    tl.store(P + offs, p, mask=inside)
    tl.store(DS + offs, ds, mask=inside)


# ---- running the learner's pieces -----------------------------------------------------


def _is_jit(fn) -> bool:
    return isinstance(fn, triton.runtime.JITFunction) or type(fn).__name__ == "InterpretedFunction"


def _jit_source(fn) -> str:
    src = getattr(fn, "src", None)
    if src:
        return src
    try:
        return inspect.getsource(getattr(fn, "fn", fn))
    except (OSError, TypeError):
        return ""


def _is_stub(fn) -> bool:
    return "NotImplementedError" in _jit_source(fn)


def _require_pieces(checker: str, **pieces) -> None:
    for name, fn in pieces.items():
        if not callable(fn):
            raise TypeError(f"{checker}: {name} must be your @triton.jit function, got {type(fn).__name__}")


def _check_pieces(**pieces) -> None:
    """Inside a check: stubs are 'not attempted'; plain Python functions fail."""
    for name, fn in pieces.items():
        if _is_stub(fn):
            raise _NotAttempted
        if not _is_jit(fn):
            raise _Fail(f"{name} is a plain Python function", f"put @triton.jit on the line above `def {name}`")


@contextlib.contextmanager
def _memory_guard(tensors):
    """Under the interpreter, make a load or store outside ``tensors`` raise instead of crashing Python."""
    builder = None
    if _runtime.INTERPRET:
        try:
            from triton.runtime import interpreter as _interp
            import numpy as np

            builder = _interp.interpreter_builder
            load, store = builder.create_masked_load, builder.create_masked_store
        except Exception:  # another Triton version: run unguarded
            builder = None
    if builder is None:
        yield
        return
    ranges = []
    for t in tensors:
        st = t.untyped_storage()
        ranges.append((st.data_ptr(), st.data_ptr() + st.nbytes()))

    def check(ptrs, mask, what):
        p = ptrs.data[np.broadcast_to(np.asarray(mask.data, dtype=bool), ptrs.data.shape)].astype(np.uint64)
        size = max(ptrs.get_element_ty().primitive_bitwidth // 8, 1)
        ok = np.zeros(p.shape, dtype=bool)
        for lo, hi in ranges:
            ok |= (p >= lo) & (p + size <= hi)
        if not ok.all():
            raise _OutOfBounds(f"a {what} of {int((~ok).sum())} element(s) outside every tensor given to the kernel")

    def guarded_load(ptrs, mask, other, *args):
        check(ptrs, mask, "load")
        return load(ptrs, mask, other, *args)

    def guarded_store(ptrs, value, mask, *args):
        check(ptrs, mask, "store")
        return store(ptrs, value, mask, *args)

    builder.create_masked_load, builder.create_masked_store = guarded_load, guarded_store
    try:
        yield
    finally:
        del builder.create_masked_load, builder.create_masked_store


def _launch(kernel, grid, *args, what: str, **kwargs):
    """Launch a kernel that calls the learner's pieces; its failures become a ``_Fail``."""
    tensors = [a for a in args if isinstance(a, Tensor)]
    try:
        with _memory_guard(tensors), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # numpy under the interpreter: nan, inf, 0/0
            kernel[grid](*args, **kwargs)
        if tensors and tensors[0].device.type == "cuda":
            torch.cuda.synchronize()
    except Exception as e:
        cause = e
        while cause is not None and not isinstance(cause, _OutOfBounds):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise _Fail(f"{what}: {cause} (your kernel would read or write past the end of a tensor)",
                        "every tl.load/tl.store needs mask=rows[:, None] < n_rows (and other=0.0 for loads)") from None
        raise _Fail(f"{what}: the kernel failed with {type(e).__name__}: {_short(e, 12)}",
                    "check the shapes: rows[:, None] and cols[None, :] make a 2-D tile; tl.dot needs 2-D tiles") from None


def _padded(shape, gen, dev) -> Tensor:
    """A ``(..., N, D)`` float32 tensor living in a buffer with ``_PAD`` rows of NaN after each (b, h)."""
    *lead, n, d = shape
    buf = torch.full((*lead, n + _PAD, d), float("nan"), dtype=torch.float32)
    buf[..., :n, :] = _randn(*lead, n, d, gen=gen, dtype=torch.float32)
    return buf.to(dev)[..., :n, :]


def _strides(t: Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def run_forward(q: Tensor, k: Tensor, v: Tensor, *, load_tile, key_tile_range, softmax_step, finish_row,
                block_m: int = 32, block_n: int = 32, tile_record: tiles.TileRecord | None = None):
    """Causal FlashAttention forward assembled from the learner's pieces: returns ``(o, lse2)``.

    ``q, k, v``: float32 ``(B, H, N, D)``, ``D`` a power of two ≥ 16, last dim contiguous.
    ``tile_record``: a :class:`~sparseflash.tiles.TileRecord`; ``maps['fwd']`` counts the
    computed tiles (key tiles past the end of the sequence count in the last column).
    """
    B, H, n, d = q.shape
    o = torch.full((B, H, n, d), float("nan"), dtype=torch.float32, device=q.device)
    lse2 = torch.full((B, H, n), float("nan"), dtype=torch.float32, device=q.device)
    n_qt, n_kt = triton.cdiv(n, block_m), triton.cdiv(n, block_n)
    if tile_record is not None:
        tile_record.start("03b", {"BLOCK_M": block_m, "BLOCK_N": block_n})
    (rec,) = record_buffers(tile_record, ["fwd"], (B, H, n_qt, n_kt), q.device, lse2)
    _launch(forward_skeleton, (n_qt, B * H), q, k, v, o, lse2, rec, *_strides(q), *_strides(k), *_strides(v),
            H, n, (1.0 / math.sqrt(d)) * LOG2E,
            LOAD_TILE=load_tile, KEY_TILE_RANGE=key_tile_range, SOFTMAX_STEP=softmax_step, FINISH_ROW=finish_row,
            HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, RECORD=tile_record is not None,
            what=f"your forward kernel (N={n}, D={d}, {block_m}×{block_n} tiles)")
    return o, lse2


def run_backward(q, k, v, o, lse2, do, *, load_tile, key_tile_range, backward_step, query_tile_start=None,
                 block_m: int = 32, block_n: int = 32, tile_record: tiles.TileRecord | None = None):
    """Causal FlashAttention backward assembled from the learner's pieces: returns ``(dq, dk, dv)``.

    ``lse2``: base-2 log-sum-exp of each row (as :func:`run_forward` returns).  ``tile_record``
    gets ``maps['bwd_kv']`` and ``maps['bwd_q']``.
    """
    B, H, n, d = q.shape
    delta = (o.float() * do.float()).sum(-1).contiguous()
    lse2 = lse2.float().contiguous()
    dq, dk, dv = (torch.full((B, H, n, d), float("nan"), dtype=torch.float32, device=q.device) for _ in range(3))
    n_qt, n_kt = triton.cdiv(n, block_m), triton.cdiv(n, block_n)
    if tile_record is not None and tile_record.kind != "03b":
        tile_record.start("03b", {"BLOCK_M": block_m, "BLOCK_N": block_n})
    rec_kv, rec_q = record_buffers(tile_record, ["bwd_kv", "bwd_q"], (B, H, n_qt, n_kt), q.device, delta)
    _launch(backward_skeleton, (max(n_qt, n_kt), B * H), q, k, v, do, lse2, delta, dq, dk, dv, rec_kv, rec_q,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), H, n,
            (1.0 / math.sqrt(d)) * LOG2E, 1.0 / math.sqrt(d),
            LOAD_TILE=load_tile, KEY_TILE_RANGE=key_tile_range,
            QUERY_TILE_START=query_tile_start or given_query_tile_start, BACKWARD_STEP=backward_step,
            HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, RECORD=tile_record is not None,
            what=f"your backward kernel (N={n}, D={d}, {block_m}×{block_n} tiles)")
    return dq, dk, dv


def build_attention(load_tile, key_tile_range, softmax_step, finish_row, backward_step, query_tile_start=None):
    """Your pieces as one differentiable function ``attention(q, k, v, block_m=32, block_n=32, tile_record=None)``
    (causal, float32, ``D`` a power of two ≥ 16)."""
    _require_pieces("build_attention", load_tile=load_tile, key_tile_range=key_tile_range,
                    softmax_step=softmax_step, finish_row=finish_row, backward_step=backward_step)
    fwd_pieces = dict(load_tile=load_tile, key_tile_range=key_tile_range, softmax_step=softmax_step,
                      finish_row=finish_row)
    bwd_pieces = dict(load_tile=load_tile, key_tile_range=key_tile_range, backward_step=backward_step,
                      query_tile_start=query_tile_start)

    class _Attention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, block_m, block_n, tile_record):
            o, lse2 = run_forward(q, k, v, **fwd_pieces, block_m=block_m, block_n=block_n, tile_record=tile_record)
            ctx.save_for_backward(q, k, v, o, lse2)
            ctx.settings = (block_m, block_n, tile_record)
            return o

        @staticmethod
        def backward(ctx, do):
            block_m, block_n, rec = ctx.settings
            grads = run_backward(*ctx.saved_tensors, do.contiguous(), **bwd_pieces, block_m=block_m,
                                 block_n=block_n, tile_record=rec)
            return (*grads, None, None, None)

    def attention(q, k, v, block_m=32, block_n=32, tile_record=None):
        try:
            return _Attention.apply(q, k, v, block_m, block_n, tile_record)
        except _Fail as f:
            raise RuntimeError(f.what + (f"\nhint: {f.hint}" if f.hint else "")) from None

    return attention


# ---- references for 03b -----------------------------------------------------------------


def _ref_state(q, k, v, mask):
    """float64 (m2, l, acc, out, lse2) of the base-2 online softmax over all keys, for (N, D) inputs."""
    s = (q.double() @ k.double().T) / math.sqrt(q.shape[-1]) * LOG2E
    s = s.masked_fill(~mask, -math.inf)
    m = s.max(-1).values
    empty = torch.isinf(m)
    shift = torch.where(empty, torch.zeros_like(m), m)
    p = torch.exp2(s - shift[:, None])
    l = p.sum(-1)
    acc = p @ v.double()
    out = torch.where(empty[:, None], torch.zeros_like(acc), acc / torch.where(empty, 1.0, l)[:, None])
    lse2 = torch.where(empty, torch.full_like(m, math.inf), m + torch.log2(torch.where(empty, 1.0, l)))
    return m, l, acc, out, lse2


def _test_mask(n: int, block_n: int, gen) -> Tensor:
    """Causal mask with random holes, empty rows, a row that sees only the last key tile and a
    row that sees only the first one: every case of the online softmax's bookkeeping."""
    mask = reference.causal_mask(n) & (torch.rand(n, n, generator=gen) < 0.7)
    mask[[3, n // 2, n - 4]] = False                                # empty rows
    last_tile = ((n - 1) // block_n) * block_n
    mask[n - 1] = False
    mask[n - 1, last_tile:] = True                                  # sees only the last key tile
    mask[n - 3, block_n:] = False
    mask[n - 3, 0] = True                                           # sees only the first key tile
    return mask & reference.causal_mask(n)


_FWD_CASES = [(128, 32, 32, 32), (100, 16, 32, 16), (100, 32, 16, 32)]   # (N, D, BLOCK_M, BLOCK_N)


def check_load_tile(load_tile, *, seed=None) -> bool:
    """03b · piece 1: ``load_tile(ptr, rows, cols, stride_row, n_rows)``: rows ≥ ``n_rows`` read 0."""
    _require_pieces("check_load_tile", load_tile=load_tile)
    seed = _new_seed(seed)
    g = _gen(seed)
    dev = device()

    def body():
        _check_pieces(load_tile=load_tile)
        n, d, H = 100, 32, 3
        contiguous = _padded((n, d), g, dev)
        transposed = _padded((n, H * d), g, dev).unflatten(-1, (H, d))[:, 1]   # (N, D) rows H·D apart
        cases = [("contiguous (N, D)", contiguous, 0, 32), ("contiguous, ragged end", contiguous, n - 5, 32),
                 ("contiguous, 16 rows", contiguous, 40, 16),
                 ("rows H·D apart (a (N, H, D) tensor's head 1)", transposed, 64, 32),
                 ("rows H·D apart, ragged end", transposed, n - 17, 32)]
        for name, x, row0, block in cases:
            out = torch.full((block, d), float("nan"), dtype=torch.float32, device=dev)
            what = f"load_tile on {name}, rows {row0}..{row0 + block - 1} of n_rows={n}"
            _launch(_load_probe, (1,), x, out, row0, x.stride(0), n, LOAD_TILE=load_tile, BLOCK=block, D=d,
                    what=what)
            rows = torch.arange(row0, row0 + block)
            expected = torch.zeros(block, d, dtype=torch.float64)
            valid = rows < n
            expected[valid] = x.cpu()[rows[valid]].double()
            _compare(out, expected, what, atol=0, names=(f"tile row (+{row0})", "col"),
                     hint="the offset of element (r, c) is r·stride_row + c: rows[:, None] * stride_row + "
                          "cols[None, :]",
                     nan_hint="rows past n_rows must read 0: tl.load(..., mask=rows[:, None] < n_rows, other=0.0)")
        return f"{len(cases)} tiles: contiguous and strided rows, ragged ends read as 0"

    return _run("03b · piece 1, load_tile", body, seed)


def _expected_visits(n, bm, bn) -> Tensor:
    return tiles.flash_schedule(n, n, True, bm, bn).computed[0, 0].sum(-1)


def check_key_tile_range(key_tile_range) -> bool:
    """03b · piece 2: ``key_tile_range(q_tile, n, BLOCK_M, BLOCK_N)``: key tiles ``[0, n_visit)`` a causal
    query tile must visit, no more and no fewer (compared with ``tiles.flash_schedule``)."""
    _require_pieces("check_key_tile_range", key_tile_range=key_tile_range)
    dev = device()

    def body():
        _check_pieces(key_tile_range=key_tile_range)
        cases = [(128, 32, 32), (100, 32, 16), (100, 16, 32), (128, 64, 16), (37, 16, 16), (200, 16, 64)]
        for n, bm, bn in cases:
            n_qt = triton.cdiv(n, bm)
            out = torch.full((n_qt,), -1, dtype=torch.int32, device=dev)
            _launch(_key_range_probe, (n_qt,), out, n, KEY_TILE_RANGE=key_tile_range, BLOCK_M=bm, BLOCK_N=bn,
                    what=f"key_tile_range for N={n}, {bm}×{bn} tiles")
            got, expected = out.cpu(), _expected_visits(n, bm, bn)
            for t in range(n_qt):
                g_, e_ = int(got[t]), int(expected[t])
                if g_ == e_:
                    continue
                last_q = min((t + 1) * bm, n) - 1
                where = f"N={n}, {bm}×{bn} tiles, query tile {t} (queries {t * bm}..{last_q})"
                if g_ < e_:
                    raise _Fail(f"{where}: visits {g_} key tiles, needs {e_}: key tile {e_ - 1} (keys "
                                f"{(e_ - 1) * bn}..) holds keys that query {last_q} sees",
                                "the last key a query tile sees is its last query, min((q_tile + 1)·BLOCK_M, n) - 1; "
                                "visit key tiles up to the one holding it")
                raise _Fail(f"{where}: visits {g_} key tiles, needs only {e_}: key tile {e_} starts at key "
                            f"{e_ * bn} > query {last_q}, so nothing in it is allowed",
                            "the last key a query tile sees is its last query, min((q_tile + 1)·BLOCK_M, n) - 1, "
                            "and tiles of keys after it hold no allowed pair")
        return f"{len(cases)} shapes, ragged ends and BLOCK_M ≠ BLOCK_N included: same tiles as flash_schedule"

    return _run("03b · piece 2, key_tile_range", body)


def _softmax_inputs(n, d, bn, gen, dev):
    q = _randn(n, d, gen=gen, dtype=torch.float32) * 2.0     # spread scores: the max moves between tiles
    k = _randn(n, d, gen=gen, dtype=torch.float32)
    v = _randn(n, d, gen=gen, dtype=torch.float32)
    k[-(n % bn or bn):] *= 3.0                               # large scores in the last key tile
    mask = _test_mask(n, bn, gen)
    return q, k, v, mask, tuple(t.to(dev) for t in (q, k, v, mask.to(torch.int8)))


def check_softmax_step(softmax_step, *, seed=None) -> bool:
    """03b · piece 3: ``softmax_step(acc, m_i, l_i, q, k, v, allowed, qk_scale) -> (acc, m_i, l_i)``, the
    online-softmax update in base 2, where a row that has seen no allowed key stays at ``l = 0, acc = 0``."""
    _require_pieces("check_softmax_step", softmax_step=softmax_step)
    seed = _new_seed(seed)
    g = _gen(seed)
    dev = device()

    def body():
        _check_pieces(softmax_step=softmax_step)
        worst = 0.0
        for n, d, bm, bn in _FWD_CASES:
            q, k, v, mask, (qd, kd, vd, maskd) = _softmax_inputs(n, d, bn, g, dev)
            m_, l_, acc_ = (torch.full(s, float("nan"), device=dev) for s in ((n,), (n,), (n, d)))
            what = f"N={n}, D={d}, {bm}×{bn} tiles"
            _launch(_softmax_probe, (triton.cdiv(n, bm),), qd, kd, vd, maskd, m_, l_, acc_, acc_, m_, n,
                    (1 / math.sqrt(d)) * LOG2E, STEP=softmax_step, FINISH=softmax_step, USE_MINE=False, D=d,
                    BLOCK_M=bm, BLOCK_N=bn, DOT_PRECISION="ieee", what=f"your softmax_step, {what}")
            m_ref, l_ref, acc_ref, _, _ = _ref_state(q, k, v, mask)
            empty = ~mask.any(-1)
            nan_hint = ("a row with no allowed key so far has m = -inf and s = -inf everywhere, so s - m = nan: "
                        "subtract m_shift = tl.where(m_new == float('-inf'), 0.0, m_new) instead of m_new "
                        f"(rows {torch.nonzero(empty).flatten().tolist()} here see no key at all)")
            hint = ("m' = max(m, rowmax s); alpha = 2^(m - m'); p = 2^(s - m'); l' = l·alpha + rowsum p; "
                    "acc' = acc·alpha + p v, with s = q kᵀ · qk_scale (already base 2: use tl.math.exp2) "
                    "and -inf where not allowed")
            names = ("query", "dim")
            m_got = m_.cpu().double()
            m_got = torch.where(empty.to(m_got.device), torch.full_like(m_got, -math.inf), m_got)
            _compare(m_got, m_ref, f"m after the last key tile ({what})", atol=_tol(), names=names[:1], hint=hint,
                     nan_hint=nan_hint)
            _compare(l_, l_ref, f"l after the last key tile ({what})", atol=_tol(), rtol=_tol(), names=names[:1],
                     hint=hint, nan_hint=nan_hint)
            worst = max(worst, _compare(acc_, acc_ref, f"acc after the last key tile ({what})", atol=_tol(),
                                        rtol=_tol(), names=names, hint=hint, nan_hint=nan_hint))
        return (f"max error {worst:.1e} on {len(_FWD_CASES)} shapes with empty rows, rows that see only the first "
                "or the last key tile, and a max that moves between tiles")

    return _run("03b · piece 3, softmax_step", body, seed)


def check_finish_row(finish_row, *, seed=None) -> bool:
    """03b · piece 4: ``finish_row(acc, m_i, l_i) -> (out, lse2)``: ``out = acc / l`` (0 for an empty row) and
    the base-2 log-sum-exp ``lse2 = m + log2(l)`` (``+inf`` for an empty row)."""
    _require_pieces("check_finish_row", finish_row=finish_row)
    seed = _new_seed(seed)
    g = _gen(seed)
    dev = device()

    def body():
        _check_pieces(finish_row=finish_row)
        worst = 0.0
        for n, d, bm, bn in _FWD_CASES[:2]:
            q, k, v, mask, (qd, kd, vd, maskd) = _softmax_inputs(n, d, bn, g, dev)
            m_, l_, lse_ = (torch.full((n,), float("nan"), device=dev) for _ in range(3))
            acc_, out_ = (torch.full((n, d), float("nan"), device=dev) for _ in range(2))
            what = f"N={n}, D={d}, {bm}×{bn} tiles"
            _launch(_softmax_probe, (triton.cdiv(n, bm),), qd, kd, vd, maskd, m_, l_, acc_, out_, lse_, n,
                    (1 / math.sqrt(d)) * LOG2E, STEP=finish_row, FINISH=finish_row, USE_MINE=True, D=d,
                    BLOCK_M=bm, BLOCK_N=bn, DOT_PRECISION=dot_precision(torch.float32),
                    what=f"your finish_row, {what}")
            _, _, _, out_ref, lse_ref = _ref_state(q, k, v, mask)
            empty = torch.nonzero(~mask.any(-1)).flatten().tolist()
            worst = max(worst, _compare(out_, out_ref, f"out ({what})", atol=_tol(), names=("query", "dim"),
                                        hint="out = acc / l",
                                        nan_hint=f"rows {empty} see no key: l = 0 there, and acc / 0 = nan; divide "
                                                 "by tl.where(l == 0, 1.0, l) so those rows give 0"))
            _compare(lse_, lse_ref, f"lse2 ({what})", atol=_tol(), rtol=_tol(), names=("query",),
                     hint=f"lse2 = m + log2(l) (base 2, like the scores); rows {empty} see no key and need "
                          "lse2 = +inf, so that the backward's p = 2^(s - lse2) is 0 there",
                     nan_hint=f"rows {empty} see no key (m = -inf, l = 0): give them lse2 = float('inf'), "
                              "with tl.where")
        return f"max error {worst:.1e}; empty rows give out = 0 and lse2 = +inf"

    return _run("03b · piece 4, finish_row", body, seed)


def _ref_lse2(q, k):
    """Base-2 log-sum-exp of each causal row, float64."""
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~reference.causal_mask(q.shape[-2], device=q.device), -math.inf)
    return torch.logsumexp(s, -1) / math.log(2)


def _compare_record(counts: Tensor, expected: Tensor, what: str, loop: str) -> None:
    counts = counts.cpu()
    if counts.max() > 1:
        raise _Fail(f"{what}: the {loop} computed a tile more than once, or visited tiles past the end of the "
                    "sequence (counted in the last key tile)", "there are cdiv(n, BLOCK_N) key tiles")
    got = counts > 0
    missing, extra = expected & ~got, got & ~expected
    if missing.any():
        b, h, qt, kt = torch.nonzero(missing)[0].tolist()
        raise _Fail(f"{what}: the {loop} skipped {int(missing.sum())} tile(s) that hold allowed pairs, "
                    f"e.g. query tile {qt} × key tile {kt}", "compare with tiles.flash_schedule(...).computed")
    if extra.any():
        b, h, qt, kt = torch.nonzero(extra)[0].tolist()
        raise _Fail(f"{what}: the {loop} computed {int(extra.sum())} tile(s) that hold no allowed pair, "
                    f"e.g. query tile {qt} × key tile {kt} (right output, wasted work)",
                    "compare with tiles.flash_schedule(...).computed")


def check_forward(load_tile, key_tile_range, softmax_step, finish_row, *, seed=None) -> bool:
    """03b · your forward kernel: pieces 1-4 in the skeleton ``forward_skeleton``, against ``ref.attention``
    (output and log-sum-exp) and against ``tiles.flash_schedule`` (the tiles it computed)."""
    _require_pieces("check_forward", load_tile=load_tile, key_tile_range=key_tile_range,
                    softmax_step=softmax_step, finish_row=finish_row)
    seed = _new_seed(seed)
    g = _gen(seed)
    dev = device()

    def body():
        _check_pieces(load_tile=load_tile, key_tile_range=key_tile_range, softmax_step=softmax_step,
                      finish_row=finish_row)
        worst = 0.0
        tiles_done = 0
        for n, d, bm, bn in _FWD_CASES:
            q, k, v = (_padded((1, 2, n, d), g, dev) for _ in range(3))
            rec = tiles.TileRecord()
            what = f"N={n}, D={d}, {bm}×{bn} tiles"
            o, lse2 = run_forward(q, k, v, load_tile=load_tile, key_tile_range=key_tile_range,
                                  softmax_step=softmax_step, finish_row=finish_row, block_m=bm, block_n=bn,
                                  tile_record=rec)
            _compare_record(rec.maps["fwd"], tiles.flash_schedule(n, n, True, bm, bn, batch=1, heads=2).computed,
                            what, "forward")
            worst = max(worst, _compare(o, reference.attention(q, k, v, causal=True), f"output ({what})",
                                        atol=_tol(), names=("batch", "head", "query", "dim"),
                                        hint="run check_softmax_step and check_finish_row first"))
            _compare(lse2, _ref_lse2(q, k), f"lse2 ({what})", atol=_tol(), rtol=_tol(),
                     names=("batch", "head", "query"), hint="lse2 = m + log2(l), in base 2")
            tiles_done += int((rec.maps["fwd"] > 0).sum())
        return f"max error {worst:.1e} on {len(_FWD_CASES)} shapes; {tiles_done} tiles computed, exactly " \
               "flash_schedule's"

    return _run("03b · your forward kernel", body, seed)


def check_backward_step(backward_step, *, seed=None) -> bool:
    """03b · piece 5: ``backward_step(q, k, v, do, lse2, delta, allowed, qk_scale) -> (p, ds)``:
    ``p = 2^(s - lse2)`` (0 where not allowed) and ``ds = p · (do vᵀ - delta)``."""
    _require_pieces("check_backward_step", backward_step=backward_step)
    seed = _new_seed(seed)
    g = _gen(seed)
    dev = device()

    def body():
        _check_pieces(backward_step=backward_step)
        worst = 0.0
        for n, d, bm, bn in _FWD_CASES[:2]:
            q, k, v, mask, (qd, kd, vd, maskd) = _softmax_inputs(n, d, bn, g, dev)
            do = _randn(n, d, gen=g, dtype=torch.float32)
            _, _, _, out, lse2 = _ref_state(q, k, v, mask)
            s = (q.double() @ k.double().T) / math.sqrt(d)
            p_ref = torch.softmax(s.masked_fill(~mask, -math.inf), -1).nan_to_num(0.0).masked_fill(~mask, 0.0)
            dp = do.double() @ v.double().T
            delta = (out * do.double()).sum(-1)
            ds_ref = p_ref * (dp - delta[:, None])
            P, DS = (torch.full((n, n), float("nan"), device=dev) for _ in range(2))
            what = f"N={n}, D={d}, {bm}×{bn} tiles"
            _launch(_backward_step_probe, (triton.cdiv(n, bm), triton.cdiv(n, bn)), qd, kd, vd, do.to(dev),
                    lse2.float().to(dev), delta.float().to(dev), maskd, P, DS, n, (1 / math.sqrt(d)) * LOG2E,
                    STEP=backward_step, D=d, BLOCK_M=bm, BLOCK_N=bn, what=f"your backward_step, {what}")
            empty = torch.nonzero(~mask.any(-1)).flatten().tolist()
            _compare(P, p_ref, f"p ({what})", atol=_tol(), names=("query", "key"),
                     hint="p = 2^(s - lse2[:, None]) with s = q kᵀ · qk_scale, and 0 where not allowed "
                          "(tl.where(allowed, p, 0.0))",
                     nan_hint=f"rows {empty} see no key and have lse2 = +inf: 2^(s - inf) = 0 is fine, but "
                              "masking s to -inf first gives -inf - inf... keep s finite and zero p with tl.where")
            worst = max(worst, _compare(DS, ds_ref, f"ds ({what})", atol=_tol(), rtol=_tol(), names=("query", "key"),
                                        hint="dp = do vᵀ (tl.dot(do, tl.trans(v))); ds = p · (dp - delta[:, None])"))
        return f"max error {worst:.1e}; masked pairs and empty rows give p = ds = 0"

    return _run("03b · piece 5, backward_step", body, seed)


def check_query_tile_start(query_tile_start) -> bool:
    """03b · optional piece: ``query_tile_start(k_tile, BLOCK_M, BLOCK_N)``: the first query tile the dK/dV
    loop of a key tile visits (the earlier ones hold no allowed pair)."""
    _require_pieces("check_query_tile_start", query_tile_start=query_tile_start)
    dev = device()

    def body():
        _check_pieces(query_tile_start=query_tile_start)
        cases = [(128, 32, 32), (100, 32, 16), (100, 16, 32), (128, 64, 16), (200, 16, 64)]
        for n, bm, bn in cases:
            n_kt = triton.cdiv(n, bn)
            out = torch.full((n_kt,), -1, dtype=torch.int32, device=dev)
            _launch(_query_start_probe, (n_kt,), out, QUERY_TILE_START=query_tile_start, BLOCK_M=bm, BLOCK_N=bn,
                    what=f"query_tile_start, {bm}×{bn} tiles")
            computed = tiles.flash_schedule(n, n, True, bm, bn).computed[0, 0]
            for kt in range(n_kt):
                expected = int(torch.nonzero(computed[:, kt])[0])
                if int(out[kt]) != expected:
                    raise _Fail(f"N={n}, {bm}×{bn} tiles, key tile {kt} (keys {kt * bn}..): you start at query "
                                f"tile {int(out[kt])}, expected {expected}",
                                "the first query tile holding a query ≥ the key tile's first key k_tile·BLOCK_N")
        return f"{len(cases)} shapes: same first query tiles as flash_schedule"

    return _run("03b · optional piece, query_tile_start", body)


def check_backward(load_tile, key_tile_range, backward_step, query_tile_start=None, *, seed=None) -> bool:
    """03b · your backward kernel: the skeleton ``backward_skeleton`` with your pieces, against the reference's
    gradients (float64 autograd) and ``tiles.flash_schedule`` (both loops' tiles)."""
    pieces = dict(load_tile=load_tile, key_tile_range=key_tile_range, backward_step=backward_step)
    if query_tile_start is not None:
        pieces["query_tile_start"] = query_tile_start
    _require_pieces("check_backward", **pieces)
    seed = _new_seed(seed)
    g = _gen(seed)
    dev = device()

    def body():
        _check_pieces(**pieces)
        worst = 0.0
        for n, d, bm, bn in _FWD_CASES:
            q, k, v, do = (_padded((1, 2, n, d), g, dev) for _ in range(4))
            leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
            o = reference.attention(*leaves, causal=True)
            o.backward(do.double())
            rec = tiles.TileRecord()
            what = f"N={n}, D={d}, {bm}×{bn} tiles"
            grads = run_backward(q, k, v, o.detach().float(), _ref_lse2(q, k).float(), do, **pieces,
                                 block_m=bm, block_n=bn, tile_record=rec)
            expected = tiles.flash_schedule(n, n, True, bm, bn, batch=1, heads=2).computed
            _compare_record(rec.maps["bwd_q"], expected, what, "dQ loop")
            _compare_record(rec.maps["bwd_kv"], expected, what, "dK/dV loop")
            for name, got, leaf in zip(("dq", "dk", "dv"), grads, leaves):
                worst = max(worst, _compare(got, leaf.grad, f"{name} ({what})", atol=_tol(), rtol=_tol(),
                                            names=("batch", "head", "token", "dim"),
                                            hint="run check_backward_step first"))
        return f"max error {worst:.1e} of dq, dk, dv on {len(_FWD_CASES)} shapes; both loops computed exactly " \
               "flash_schedule's tiles"

    return _run("03b · your backward kernel", body, seed)


# ---- pictures for 03b ---------------------------------------------------------------------


def _draw_map(ax, computed: Tensor, bm: int, bn: int, n: int, title: str):
    import numpy as np

    n_qt, n_kt = computed.shape
    ax.imshow(computed.int().numpy(), cmap="Blues", vmin=0, vmax=1.4, extent=(0, n_kt * bn, n_qt * bm, 0))
    ax.plot([0, n], [0, n], "r-", lw=1)
    ax.set_xticks(np.arange(0, n_kt * bn + 1, bn))
    ax.set_yticks(np.arange(0, n_qt * bm + 1, bm))
    ax.tick_params(labelsize=7)
    ax.grid(color="0.6", lw=0.5)
    ax.set(title=title, xlabel="key position", ylabel="query position")
    ax.title.set_fontsize(9)


def plot_key_tile_range(key_tile_range, n: int = 100, block_m: int = 32, block_n: int = 16):
    """Key tiles your ``key_tile_range`` visits (left) against ``tiles.flash_schedule`` (right)."""
    import matplotlib.pyplot as plt

    expected = tiles.flash_schedule(n, n, True, block_m, block_n).computed[0, 0]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    mine = None
    if callable(key_tile_range) and _is_jit(key_tile_range) and not _is_stub(key_tile_range):
        out = torch.full((triton.cdiv(n, block_m),), -1, dtype=torch.int32, device=device())
        try:
            _launch(_key_range_probe, (len(out),), out, n, KEY_TILE_RANGE=key_tile_range, BLOCK_M=block_m,
                    BLOCK_N=block_n, what="key_tile_range")
            kt = torch.arange(expected.shape[1])
            mine = kt[None, :] < out.cpu()[:, None].clamp(min=0)
        except _Fail as f:
            print(f"(key_tile_range failed: {f.what})")
    if mine is None:
        axes[0].text(0.5, 0.5, "key_tile_range\nnot written yet", ha="center", va="center")
        axes[0].set_axis_off()
    else:
        same = "same as flash_schedule" if torch.equal(mine, expected) else "differs from flash_schedule"
        _draw_map(axes[0], mine, block_m, block_n, n, f"your key_tile_range: {int(mine.sum())} tiles ({same})")
    _draw_map(axes[1], expected, block_m, block_n, n, f"tiles.flash_schedule: {int(expected.sum())} tiles")
    fig.suptitle(f"causal tiles visited, N={n}, {block_m}×{block_n} tiles (red: the diagonal j = i)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_tile_record(record: tiles.TileRecord, n: int):
    """The tiles each loop of your kernel computed (from a ``TileRecord`` filled by :func:`run_forward`,
    :func:`run_backward` or :func:`build_attention`), batch 0, head 0."""
    import matplotlib.pyplot as plt

    bm, bn = record.config["BLOCK_M"], record.config["BLOCK_N"]
    names = [name for name in ("fwd", "bwd_kv", "bwd_q") if name in record.maps]
    fig, axes = plt.subplots(1, len(names), figsize=(4.3 * len(names), 4.2), squeeze=False)
    expected = tiles.flash_schedule(n, n, True, bm, bn).computed[0, 0]
    titles = {"fwd": "forward", "bwd_kv": "backward dK, dV", "bwd_q": "backward dQ"}
    for ax, name in zip(axes[0], names):
        counts = record.maps[name][0, 0].cpu()
        ok = "= flash_schedule" if torch.equal(counts > 0, expected) else "≠ flash_schedule"
        _draw_map(ax, counts > 0, bm, bn, n, f"{titles[name]}: {int((counts > 0).sum())} tiles ({ok})")
    fig.tight_layout()
    return fig


# ======================================================================================
# Notebook 08 · your own pattern
# ======================================================================================


def _slots_mask(q_pos, q_buckets, k_index, k_pos, k_buckets, n_k: int):
    """What ``permuted_attention`` computes for these slots, in token coordinates: ``(allowed, copies)``,
    ``(B, H, n_q, n_k)`` bool and int (how many key slots of token ``j`` query ``i`` attends)."""
    ok = (k_pos[..., None, :] <= q_pos[..., :, None]) & (k_pos[..., None, :] >= 0)
    ok &= k_buckets[..., None, :] == q_buckets[..., :, None]
    copies = torch.zeros(*ok.shape[:-1], n_k, dtype=torch.int64)
    copies.scatter_add_(-1, k_index[..., None, :].expand_as(ok).long(), ok.long())
    return copies > 0, copies


def check_top2_key_slots(top2_key_slots, *, seed=None) -> bool:
    """08 · exercise 1: ``top2_key_slots(k_logits) -> (k_index, k_pos, k_buckets)``: each key joins the
    buckets of its two best experts (a learned router with top-2 keys), as key slots for
    ``permuted_attention`` (queries join their best expert's bucket, in token order)."""
    _require_callable(top2_key_slots, "top2_key_slots", "check_top2_key_slots")
    seed = _new_seed(seed)

    def body():
        from .permuted import permuted_attention

        gen = _gen(seed)
        B, H, N, E, D = 1, 2, 48, 4, 16
        q_logits = torch.randn(B, H, N, E, generator=gen)
        k_logits = torch.randn(B, H, N, E, generator=gen)
        what = f"top2_key_slots(k_logits of shape {(B, H, N, E)})"
        got = _call(top2_key_slots, k_logits.clone(), what=what)
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            raise _Fail(f"{what} should return three tensors (k_index, k_pos, k_buckets), got {type(got).__name__}")
        k_index, k_pos, k_buckets = (_as_tensor(t, what) for t in got)
        shape = tuple(k_index.shape)
        if len(shape) != 3 or shape[:2] != (B, H) or tuple(k_pos.shape) != shape or tuple(k_buckets.shape) != shape:
            raise _Fail(f"{what}: k_index, k_pos and k_buckets should share one shape (B, H, S) with B, H = {B}, {H}; "
                        f"got {tuple(k_index.shape)}, {tuple(k_pos.shape)}, {tuple(k_buckets.shape)}")
        if any(t.dtype == torch.bool or t.is_floating_point() for t in (k_index, k_pos, k_buckets)):
            raise _Fail(f"{what}: the three tensors should hold integers")
        k_index, k_pos, k_buckets = (t.cpu().long() for t in (k_index, k_pos, k_buckets))
        if bool(((k_index < 0) | (k_index >= N)).any()):
            raise _Fail(f"{what}: k_index holds {int(k_index.min())}..{int(k_index.max())}; tokens are 0..{N - 1}")
        real = k_pos >= 0
        if not torch.equal(k_pos[real], k_index[real]):
            raise _Fail(f"{what}: a real key slot's k_pos must be its token's position k_index "
                        "(positions are the causal coordinate)", "k_pos = k_index")
        pos = torch.arange(N).expand(B, H, N)
        q_buckets = q_logits.argmax(-1)
        top2 = k_logits.topk(2, dim=-1).indices
        expected = reference.causal_mask(N) & (top2[..., None, :, :] == q_buckets[..., :, None, None]).any(-1)
        allowed, copies = _slots_mask(pos, q_buckets, k_index, k_pos, k_buckets, N)
        if bool((copies > 1).any()):
            b, h, i, j = (int(x) for x in (copies > 1).nonzero()[0])
            raise _Fail(f"query {i} (head {h}) would attend key {j} through {int(copies[b, h, i, j])} slots: its "
                        "softmax would count that key more than once", "give each key one slot per bucket it joins")
        missing, extra = expected & ~allowed, allowed & ~expected
        for bad, word in ((missing, "miss"), (extra, "allow")):
            if bool(bad.any()):
                b, h, i, j = (int(x) for x in bad.nonzero()[0])
                raise _Fail(f"head {h}: the slots {word} the pair query {i} (expert {int(q_buckets[b, h, i])}) × key "
                            f"{j} (top-2 experts {top2[b, h, j].tolist()}); {int(bad.sum())} such pairs",
                            "key j must sit in the buckets of its two best experts, k_logits.topk(2).indices")
        # Real positions must ascend along the slots of each bucket (permuted_attention's contract).
        for b in range(B):
            for h in range(H):
                for e in k_buckets[b, h].unique().tolist():
                    p = k_pos[b, h][(k_buckets[b, h] == e) & real[b, h]]
                    if bool((p[1:] < p[:-1]).any()):
                        raise _Fail(f"head {h}, bucket {e}: key positions {p.tolist()[:8]}... do not ascend along "
                                    "the slots", "order the slots by token: slot 2j and 2j + 1 hold key j")
        dev = device()
        x = [_randn(B, H, N, D, gen=gen) for _ in range(3)]
        def slots(t):  # (B, H, N, D) -> (B, H, S, D): the key of each slot
            return t.gather(2, k_index[..., None].expand(*k_index.shape, D))

        out = permuted_attention(x[0].float().to(dev), slots(x[1]).float().to(dev), slots(x[2]).float().to(dev),
                                 pos.to(dev), k_pos.to(dev), q_buckets.to(dev), k_buckets.to(dev), n_buckets=E)
        truth = reference.attention(*x, allowed=expected)
        err = _compare(out, truth, "permuted_attention on your slots", atol=_tol(), rtol=_tol())
        n_pairs = int(expected.sum())
        return (f"{shape[-1]} key slots for {N} keys, {n_pairs} allowed pairs ({n_pairs / (H * N * (N + 1) / 2):.0%} "
                f"of causal) as the router says; permuted_attention on them matches the reference (max error {err:.1e})")

    return _run("08 · exercise 1, top2_key_slots", body, seed)
