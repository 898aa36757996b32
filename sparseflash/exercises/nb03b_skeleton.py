"""Notebook 03b, write the kernel (``03b_write_the_kernel.ipynb``): the skeleton kernels that run
the learner's pieces.

The learner writes five ``@triton.jit`` pieces:

* ``load_tile(ptr, rows, cols, stride_row, n_rows)`` -> the ``(len(rows), len(cols))`` tile,
  rows ``>= n_rows`` read 0;
* ``key_tile_range(q_tile, n, BLOCK_M, BLOCK_N)`` -> the number of key tiles the causal query
  tile visits;
* ``softmax_step(acc, m_i, l_i, q, k, v, allowed, qk_scale) -> (acc, m_i, l_i)``;
* ``finish_row(acc, m_i, l_i) -> (out, lse2)``;
* ``backward_step(q, k, v, do, lse2, delta, allowed, qk_scale) -> (p, ds)``;

and optionally ``query_tile_start(k_tile, BLOCK_M, BLOCK_N)`` for the dK/dV loop (else
:func:`given_query_tile_start`).  :func:`forward_skeleton` and :func:`backward_skeleton`
take them as ``tl.constexpr`` arguments and call them, so each piece runs inside a real
kernel, on CPU tensors through Triton's interpreter or on a GPU.

* :func:`run_forward`, :func:`run_backward`: launch the skeletons with the learner's pieces;
  :func:`build_attention` makes them one differentiable function.
* :func:`show` prints the source of a skeleton (or of any function).
* The probes (one piece in a small kernel) and the launcher, whose failures (an exception,
  a load or store out of bounds under the interpreter) become a verdict, serve the checkers
  of :mod:`.nb03b_write_kernel`.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import warnings

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _runtime, tiles
from .._steps import LOG2E, online_softmax_step, record_buffers
from .._steps import load_tile as _load_tile
from ._common import _Fail, _NotAttempted, _randn, _short

__all__ = [
    "forward_skeleton", "backward_skeleton", "given_query_tile_start", "run_forward", "run_backward",
    "build_attention", "show",
]


class _OutOfBounds(Exception):
    pass


def show(fn) -> None:
    """Print the source of a function or a ``@triton.jit`` kernel (e.g. this module's skeletons)."""
    print(inspect.getsource(getattr(fn, "fn", fn)))


# ---- the skeletons -------------------------------------------------------------------------


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
