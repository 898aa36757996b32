"""Where kernels run, how outputs are allocated, and input checks shared by every op.

Triton kernels need a CUDA device.  On a machine without one, sparseflash turns on
Triton's interpreter (``TRITON_INTERPRET=1``) *before* its kernels are defined, so
the very same kernels run on CPU tensors, slowly but exactly.  This module is
imported first by ``sparseflash/__init__.py`` for that reason.
"""
from __future__ import annotations

import math
import operator
import os
import warnings

import torch
from torch import Tensor

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") is None:
    os.environ["TRITON_INTERPRET"] = "1"
    _AUTO_INTERPRET = True
else:
    _AUTO_INTERPRET = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_said_interpret = False

#: Fill every kernel output with NaN before the kernel runs, so an element the
#: kernel forgot to write shows up as NaN instead of as plausible garbage.  The
#: tests turn this on; set ``SPARSEFLASH_POISON=1`` to turn it on yourself.
POISON = os.environ.get("SPARSEFLASH_POISON", "0") not in ("", "0")

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints: ``triton.cdiv`` without its host-side wrapper (a few µs a call,
    and an eager call computes several of these per launch)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two ``>= n`` for ``n >= 1`` (``triton.next_power_of_2`` on the host)."""
    return 1 << (n - 1).bit_length()


def new_output(shape, dtype: torch.dtype, device) -> Tensor:
    """``torch.empty``, or NaN-filled when :data:`POISON` is set."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(float("nan"))
    return out


def check_runnable(t: Tensor) -> None:
    """Raise if a kernel cannot run on ``t``'s device; say once that we interpret."""
    global _said_interpret
    if t.device.type == "cuda":
        if INTERPRET:
            raise ValueError("TRITON_INTERPRET=1 is set, so kernels run on CPU tensors; got CUDA tensors")
        return
    if t.device.type != "cpu":
        raise ValueError(f"expected CUDA tensors (or CPU tensors under Triton's interpreter), got {t.device}")
    if not INTERPRET:
        raise ValueError(
            "got CPU tensors but Triton's interpreter is off (a CUDA device is present): move the inputs "
            "to CUDA, or set TRITON_INTERPRET=1 before importing sparseflash"
        )
    # Not while torch.compile traces: Dynamo cannot trace warnings.warn (fullgraph=True would fail).
    if _AUTO_INTERPRET and not _said_interpret and not torch.compiler.is_compiling():
        _said_interpret = True
        warnings.warn(
            "sparseflash: no CUDA device, so Triton kernels run on the CPU through Triton's interpreter "
            "(exact but slow; keep sizes small)",
            stacklevel=4,
        )


def check_qkv(q: Tensor, k: Tensor, v: Tensor, same_length: bool = False) -> None:
    """Validate queries ``(B, Hq, N, D)`` and keys, values ``(B, Hkv, M, D)``; raise ``ValueError``
    naming what was expected.

    ``Hkv`` divides ``Hq`` (grouped-query attention; ``Hkv = Hq`` is plain multi-head): query
    head ``h`` reads kv head ``h // (Hq // Hkv)``, as SDPA's ``enable_gqa=True``.
    """
    # Every call checks its inputs, so the usual case is one expression (whatever it accepts,
    # _check_qkv_each accepts too); anything else goes through those checks and gets its error.
    if isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor):
        qs, ks = q.shape, k.shape
        if (len(qs) == 4 and len(ks) == 4 and ks == v.shape and ks[0] == qs[0] and ks[3] == qs[3]
                and qs[1] >= ks[1] > 0 and qs[1] % ks[1] == 0 and qs[2] >= 1 and ks[2] >= 1
                and (not same_length or ks[2] == qs[2]) and MIN_HEAD_DIM <= qs[3] <= MAX_HEAD_DIM
                and q.dtype in SUPPORTED_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
                and q.device == k.device == v.device):
            check_runnable(q)
            return
    _check_qkv_each(q, k, v, same_length)


def _check_qkv_each(q: Tensor, k: Tensor, v: Tensor, same_length: bool) -> None:
    """:func:`check_qkv`'s checks one by one, each with its error."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, heads, seq_len, head_dim), got {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, N, D = q.shape
    h_kv = k.shape[1]
    if H < 1:  # (zero kv heads for some query heads is the GQA check's below)
        raise ValueError(f"q needs at least one head, got q {tuple(q.shape)}")
    if k.shape[0] != B or v.shape[:2] != (B, h_kv):
        raise ValueError(
            f"batch and heads must match (k and v with the same heads): q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if h_kv != H and (h_kv == 0 or H % h_kv):
        raise ValueError(
            f"the heads of k and v must divide the heads of q (grouped-query attention), got {h_kv} kv heads "
            f"for {H} query heads: q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if k.shape[3] != D or v.shape[3] != D:
        raise ValueError(f"q, k, v must share head_dim {D}: got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same seq_len, got {k.shape[2]} and {v.shape[2]}")
    if same_length and k.shape[2] != N:
        raise ValueError(f"q and k must have the same seq_len, got {N} and {k.shape[2]}")
    if N < 1 or k.shape[2] < 1:
        raise ValueError(f"seq_len must be at least 1, got q {N}, k {k.shape[2]}")
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be between {MIN_HEAD_DIM} and {MAX_HEAD_DIM}, got {D}")
    check_runnable(q)


def softmax_scale(sm_scale: float | None, head_dim: int) -> float:
    """The score scale: ``1/sqrt(head_dim)`` by default; a given one must be a finite number."""
    if sm_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(sm_scale, (bool, str)):
        raise ValueError(f"sm_scale must be a number (default 1/sqrt(head_dim)), got {sm_scale!r}")
    scale = float(sm_scale)
    if not math.isfinite(scale):
        raise ValueError(f"sm_scale must be a finite number (default 1/sqrt(head_dim)), got {sm_scale}")
    return scale


def check_per_token(name: str, t: Tensor, x: Tensor, kind: str) -> None:
    """Validate a per-token ``(B, H, N)`` tensor (``kind``: 'bool' or 'int') of the side of ``x``:
    ``(B, H, N)`` of ``x`` ``(B, H, N, D)``, so q for a query-side tensor and k for a key-side one
    (whose heads are the kv heads)."""
    B, H, N, _ = x.shape
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, H, N) = {(B, H, N)}")
    if tuple(t.shape) != (B, H, N):
        raise ValueError(f"{name} must have shape (batch, heads, seq_len) = {(B, H, N)}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but the inputs are on {x.device}")
    if kind == "bool" and t.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got {t.dtype}")
    if kind == "int" and (t.dtype == torch.bool or t.is_floating_point() or t.is_complex()):
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")


def as_int(n) -> int | None:
    """``n`` as an ``int`` if it is an integer (numpy integers too; not a bool), else None."""
    if isinstance(n, bool):
        return None
    try:
        return operator.index(n)
    except TypeError:
        return None


def check_window(window) -> int:
    """A sliding-window width: an ``int >= 0`` (numpy integers too; 0 means no window), else ``ValueError``."""
    value = as_int(window)
    if value is None or value < 0:
        raise ValueError(f"window must be an int >= 0 (0: no window), got {window!r}")
    return value


def check_n_buckets(n_buckets) -> int | None:
    """``None``, or a positive integer (numpy integers too) returned as ``int``; else ``ValueError``."""
    if n_buckets is None:
        return None
    value = as_int(n_buckets)
    if value is None or value < 1:
        raise ValueError(f"n_buckets must be a positive int, got {n_buckets!r}")
    return value


def check_compilable_buckets(fn: str, n_buckets: int | None, validate: bool, max_direct: int) -> None:
    """Under ``torch.compile`` a call may not read ids back to the host: ``n_buckets`` must be
    given, small enough to be used directly (``max_direct``), and ``validate`` off."""
    if validate or n_buckets is None or n_buckets > max_direct:
        raise ValueError(f"under torch.compile, {fn} needs n_buckets and validate=False, with n_buckets at most "
                         f"{max_direct}: anything else reads ids back to the host; got n_buckets={n_buckets}, "
                         f"validate={validate}.  Check or renumber ids outside the compiled region")


def check_bucket_range(q_buckets: Tensor, k_buckets: Tensor, n_buckets: int | None) -> int | None:
    """Bucket ids in ``[0, n_buckets)`` (or ``>= 0`` and int32 without it); raise ``ValueError``.

    Reads four numbers back from the device: one host synchronisation, so the
    attention functions run it only when asked (``validate=True``).  Returns the
    largest id (None without ids).
    """
    if q_buckets.numel() == 0:
        return None
    q_lo, k_lo, q_hi, k_hi = torch.stack(
        [q_buckets.min(), k_buckets.min(), q_buckets.max(), k_buckets.max()]).tolist()
    for name, lo, hi in (("q_buckets", q_lo, q_hi), ("k_buckets", k_lo, k_hi)):
        if lo < 0:
            raise ValueError(f"{name} must be >= 0, got a bucket id {lo}")
        if hi >= 2**31 - 1:
            raise ValueError(f"{name} must be below 2**31 - 1, got a bucket id {hi}")
        if n_buckets is not None and hi >= n_buckets:
            raise ValueError(f"{name} must be < n_buckets={n_buckets}, got a bucket id {hi}")
    return max(q_hi, k_hi)


def check_fast_path_ids(q_buckets: Tensor, k_buckets: Tensor, budget: int, n_buckets: int | None,
                        default: int, max_direct: int) -> None:
    """Hash attention's ``validate``: every id in ``[0, budget)``, the ids with runs of their own
    (``budget``: ``n_buckets``, at most ``max_direct``, or ``default`` without it); raise
    ``ValueError`` otherwise.

    A performance check, not a correctness one: other ids are attended exactly too, at
    about dense speed among themselves.  Reads four numbers back from the device (one host
    synchronisation).
    """
    if q_buckets.numel() == 0:
        return
    q_lo, k_lo, q_hi, k_hi = torch.stack(
        [q_buckets.min().long(), k_buckets.min().long(), q_buckets.max().long(), k_buckets.max().long()]).tolist()
    given = (f"n_buckets={default} (the default)" if n_buckets is None else
             f"n_buckets={n_buckets}" + (f", of which the first {max_direct} get runs" if n_buckets > max_direct
                                         else ""))
    for name, lo, hi in (("q_buckets", q_lo, q_hi), ("k_buckets", k_lo, k_hi)):
        bad = lo if lo < 0 else hi if hi >= budget else None
        if bad is not None:
            raise ValueError(f"{name} must lie in [0, {budget}) to take the tile-skipping path ({given}), got a "
                             f"bucket id {bad} (validate=True checks this; such ids are still attended exactly, "
                             f"at about dense speed among themselves)")
