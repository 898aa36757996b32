"""Checkers for the exercises of notebook 07 (training a long-context LM).

Same conventions as :mod:`sparseflash.exercises` (whose verdict plumbing, in
:mod:`sparseflash.exercises._common`, they use): each ``check_*`` prints ``✓``, ``✗`` with a
hint, or ``· not attempted yet``, and returns whether the answer passed.  Solutions, for
teachers: ``notebooks/solutions/ex07.py``.
"""
from __future__ import annotations

import math
import random

from ..exercises._common import _as_number, _call, _Fail, _new_seed, _require_callable, _run
from .experiment import reach

__all__ = ["check_predicted_step_ms", "check_time_to_reach", "check_decode_speedup_bound"]


def _close(got: float, want: float, rel: float = 1e-6) -> bool:
    return abs(got - want) <= rel * max(1.0, abs(want))


def check_predicted_step_ms(fn, *, seed=None) -> bool:
    """07 · exercise 1: ``predicted_step_ms(dense_ms, none_ms, attention_speedup)``: the step time
    when only the attention (``dense_ms - none_ms`` of the step) runs ``attention_speedup`` × faster."""
    _require_callable(fn, "predicted_step_ms", "check_predicted_step_ms")
    seed = _new_seed(seed)

    def body():
        rng = random.Random(seed)
        cases = [(100.0, 40.0, 2.0), (100.0, 40.0, 1.0), (80.0, 30.0, math.inf)] + [
            (d, rng.uniform(0.1, 0.9) * d, rng.uniform(1.0, 12.0)) for d in (rng.uniform(20, 200) for _ in range(4))]
        for dense, none, s in cases:
            what = f"predicted_step_ms({dense:.4g}, {none:.4g}, {s:.4g})"
            got = _as_number(_call(fn, dense, none, s, what=what), what, "a time in ms")
            want = none + (dense - none) / s
            if not _close(got, want):
                hint = "the step is the attention (dense_ms - none_ms) plus the rest (none_ms); only the first shrinks"
                if _close(got, dense / s):
                    hint = "that speeds up the whole step; the rest of the step (none_ms) keeps its time"
                elif s != math.inf and _close(got, dense / (none + (dense - none) / s)):
                    hint = "that is the step's speed-up; the exercise asks for the step time in ms"
                raise _Fail(f"{what} returned {got:.6g}, expected {want:.6g}", hint)
        return f"{len(cases)} cases; as attention_speedup -> inf the step time falls to none_ms, never below"

    return _run("07 · exercise 1: Amdahl's law for a training step", body, seed)


def check_time_to_reach(fn, *, seed=None) -> bool:
    """07 · exercise 2: ``time_to_reach(curve, target)``: the first time a validation curve (a list
    of ``{"step", "time_s", "loss"}``) reaches ``target``, interpolating linearly between
    validations; None if it never does."""
    _require_callable(fn, "time_to_reach", "check_time_to_reach")
    seed = _new_seed(seed)

    def curve(losses, dt=2.0):
        return [{"step": 10 * i, "time_s": dt * i, "loss": x} for i, x in enumerate(losses)]

    def body():
        rng = random.Random(seed)
        falling = [5.0]
        for _ in range(12):
            falling.append(falling[-1] - rng.uniform(0.0, 0.5))
        cases = [(curve([5.0, 3.0, 2.0]), 4.0, "between the first two points"),
                 (curve([5.0, 3.0, 2.0]), 2.0, "exactly at the last point"),
                 (curve([5.0, 3.0, 2.0]), 1.0, "never reached"),
                 (curve([5.0, 4.0, 2.5, 3.0, 2.0]), 2.8, "a curve that goes up again: the first time counts"),
                 (curve(falling, dt=rng.uniform(0.5, 3.0)), rng.uniform(falling[-1], falling[0]), "random")]
        for c, target, label in cases:
            what = f"time_to_reach(curve, {target:.4g}) ({label})"
            got = _call(fn, [dict(p) for p in c], target, what=what)
            hit = reach(c, target)
            want = hit[0] if hit else None
            if want is None:
                if got is not None:
                    raise _Fail(f"{what} returned {got!r}; the curve never gets down to {target:.4g}",
                                "return None when no point is at or below the target")
                continue
            got = _as_number(got, what, "a time in seconds")
            if not _close(got, want, 1e-6):
                hint = "find the first point at or below the target, and interpolate between it and the one before"
                first = next(p for p in c if p["loss"] <= target)
                if _close(got, first["time_s"]):
                    hint = "that is the time of the first validation below the target; interpolate from the one before"
                raise _Fail(f"{what} returned {got:.6g}, expected {want:.6g}", hint)
        return f"{len(cases)} curves, interpolated, None when never reached"

    return _run("07 · exercise 2: time to reach a loss", body, seed)


def check_decode_speedup_bound(fn, *, seed=None) -> bool:
    """07 · exercise 4: ``decode_speedup_bound(context, window, n_buckets)``: how many times fewer
    cached keys a new token of a hash ∪ window layer reads than a dense one, with buckets of equal
    size: the ``min(window, context)`` most recent keys, and of the older ones the ``1 / n_buckets``
    in the query's bucket."""
    _require_callable(fn, "decode_speedup_bound", "check_decode_speedup_bound")
    seed = _new_seed(seed)

    def body():
        rng = random.Random(seed)
        cases = [(65536, 256, 16), (8192, 256, 16), (100, 256, 16), (4096, 0, 8), (1000, 1000, 4)] + [
            (rng.randint(1, 1 << 18), rng.choice([0, 64, 128, 256, 1024]), rng.choice([2, 8, 16, 64]))
            for _ in range(5)]
        for n, w, u in cases:
            what = f"decode_speedup_bound({n}, {w}, {u})"
            got = _as_number(_call(fn, n, w, u, what=what), what, "a ratio (dense keys / hash ∪ window keys)")
            recent = min(w, n)
            want = n / (recent + (n - recent) / u)
            if not _close(got, want, 1e-6):
                hint = "count the window's keys, then 1/n_buckets of the keys older than the window"
                if _close(got, n / (recent + n / u)):
                    hint = "the window's keys are counted twice: only keys older than the window come from the bucket"
                elif _close(got, float(u)):
                    hint = "that forgets the window: every query also reads its window most recent keys"
                elif _close(got, 1.0 / want):
                    hint = "that is the fraction of keys read; the exercise asks for dense / hash ∪ window"
                elif w > n and _close(got, n / (w + (n - w) / u)):
                    hint = "a context shorter than the window holds only context keys: min(window, context)"
                raise _Fail(f"{what} returned {got:.6g}, expected {want:.6g}", hint)
        return f"{len(cases)} cases; at 65536 keys, window 256 and 16 buckets a new token reads 15x fewer keys"

    return _run("07 · exercise 4: how much less a sparse decode step reads", body, seed)

