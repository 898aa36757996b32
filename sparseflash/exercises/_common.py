"""What every checker of :mod:`sparseflash.exercises` shares: verdicts, calls into the learner's
answer, comparisons and tolerances.

* :func:`_run` runs one check and prints its verdict: ``✓ <exercise>: passed (...)``,
  ``✗ <exercise>: ...`` with a ``hint:`` line (and the seed that replays the random inputs),
  or ``· <exercise>: not attempted yet`` while the answer still raises ``NotImplementedError``.
* Inside a check, :class:`_Fail` is a wrong answer and :class:`_NotAttempted` an unfinished one;
  :func:`_call` turns the learner's exceptions into one of the two.
* :func:`_compare` compares a tensor element-wise against the float64 truth and names the
  worst element; :func:`_tol` is the tolerance of float32 kernels on this device.
* :func:`device`: where the kernel exercises run.
* Masks and measurements used by several notebooks: :func:`_window_mask`, :func:`_tile_any`,
  :func:`_error_near_typical`.

The notebook 07 checkers (:mod:`sparseflash.train.exercises`) use the same verdicts.
"""
from __future__ import annotations

import math
import secrets

import torch
from torch import Tensor

__all__ = ["device"]


class _Fail(Exception):
    """A wrong answer: ``what`` went wrong, and a ``hint``."""

    def __init__(self, what: str, hint: str | None = None):
        super().__init__(what)
        self.what, self.hint = what, hint


class _NotAttempted(Exception):
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


# ---- shared by several notebooks -------------------------------------------------------


def _window_mask(n: int, w: int, device_=None) -> Tensor:
    """Bool ``(n, n)`` sliding-window mask: query ``i`` sees key ``j`` when ``i - w < j <= i``."""
    i = torch.arange(n, device=device_)[:, None]
    j = torch.arange(n, device=device_)[None, :]
    return (j <= i) & (j > i - w)


def _tile_any(mask: Tensor, bm: int, bn: int) -> Tensor:
    """Bool ``(n_q_tiles, n_k_tiles)``: the ``bm × bn`` tiles of ``mask`` that hold an allowed pair."""
    n_q, n_k = mask.shape
    m = torch.nn.functional.pad(mask.int(), (0, (-n_k) % bn, 0, (-n_q) % bm))
    return m.unflatten(1, (-1, bn)).unflatten(0, (-1, bm)).sum((1, 3)) > 0


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
