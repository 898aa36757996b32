"""The Triton pieces every attention kernel in sparseflash shares, written once.

Loading and storing a tile, the online-softmax step with its empty-row rule,
finishing a row, the backward's recomputation of one tile, the softmax-backward
row term ``delta``, and the tile recorder.  The dense kernels (:mod:`sparseflash.flash`)
and the layout kernels (:mod:`sparseflash.permuted`) are loops around these.

Everything works in base 2: ``exp(x) = exp2(x · log2 e)``, so scores are scaled by
``sm_scale · log2(e)`` once and the kernels use ``exp2``, which is what the hardware has.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _runtime
from .launch import launch

LOG2E = 1.4426950408889634

# --------------------------------------------------------------------------------------


@triton.jit
def load_tile(ptr, rows, cols, stride_row, n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Load a ``(len(rows), BLOCK_D)`` tile; rows past ``n_rows`` and columns past
    ``HEAD_DIM`` (when head_dim is not a power of two) read as 0."""
    mask = rows[:, None] < n_rows
    if BLOCK_D != HEAD_DIM:
        mask = mask & (cols[None, :] < HEAD_DIM)
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :], mask=mask, other=0.0)


@triton.jit
def store_tile(ptr, x, rows, cols, stride_row, n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    mask = rows[:, None] < n_rows
    if BLOCK_D != HEAD_DIM:
        mask = mask & (cols[None, :] < HEAD_DIM)
    tl.store(ptr + rows[:, None] * stride_row + cols[None, :], x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def add_tile(ptr, x, rows, cols, stride_row, n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
             ACCUMULATE: tl.constexpr):
    """:func:`store_tile`, or with ``ACCUMULATE`` add ``x`` to the tile already there (in
    float32, then rounded once to the buffer's dtype)."""
    if ACCUMULATE:
        x = x.to(tl.float32) + load_tile(ptr, rows, cols, stride_row, n_rows, HEAD_DIM, BLOCK_D).to(tl.float32)
    store_tile(ptr, x, rows, cols, stride_row, n_rows, HEAD_DIM, BLOCK_D)


@triton.jit
def load_labels(LAB, rows, n, LABELS: tl.constexpr, fallback):
    """The original ids of tokens ``rows`` as int64 (rows past ``n`` read 0), or ``fallback``
    (unused) without ``LABELS``: the layout kernels' id test in hash attention's overflow run."""
    if LABELS:
        return tl.load(LAB + rows, mask=rows < n, other=0).to(tl.int64)
    else:
        return fallback


@triton.jit
def layout_tile(IDX, POS, LAB, tile, n, LABELS: tl.constexpr, BLOCK: tl.constexpr):
    """Slots of layout tile ``tile``: their token rows (padding reads ``n``), positions and, with
    ``LABELS``, ids (:func:`load_labels`; else the positions stand in)."""
    slots = tile * BLOCK + tl.arange(0, BLOCK)
    rows = tl.load(IDX + slots)
    pos = tl.load(POS + slots)
    return rows, pos, load_labels(LAB, rows, n, LABELS, pos)


@triton.jit
def mma(a, b, DOT_PRECISION: tl.constexpr):
    """``a @ b`` accumulated in float32.

    ``DOT_PRECISION`` is ``"ieee"`` or ``"tf32"`` (for float32 inputs), or
    ``"upcast"``: Triton's CPU interpreter multiplies bfloat16 operands wrongly, so
    there we widen them to float32 first (their values are unchanged by that).
    """
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def online_softmax_step(acc, m_i, l_i, q, k, v, allowed, qk_scale,
                        MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold one key tile into the running softmax of a query tile.

    With ``s = q kᵀ · qk_scale`` (base-2 logits, -inf where not ``allowed``)::

        m'  = max(m, rowmax s)
        l'  = l · 2^(m - m') + rowsum 2^(s - m')
        acc' = acc · 2^(m - m') + 2^(s - m') v

    A row that has seen no allowed key yet keeps ``m = -inf``; it is shifted by 0
    instead, so it stays at ``l = 0, acc = 0`` rather than turning into NaN.
    ``p`` is rounded to the dtype of ``v`` before ``p v``, as in FlashAttention, so the
    second product runs on the tensor cores at the inputs' precision.
    """
    s = mma(q, tl.trans(k), DOT_PRECISION) * qk_scale
    if MASKED:
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def finish_softmax(acc, m_i, l_i):
    """Normalise ``acc`` and return ``(out, lse2)``, ``lse2`` the base-2 log-sum-exp.

    A row with no allowed key (``l = 0``) gets output 0 and ``lse2 = +inf``, so the
    backward's ``p = 2^(s - lse2)`` is 0 for it: no output, no gradient, no NaN.
    """
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    return out, lse2


@triton.jit
def attention_grads_step(q, k, v, do, lse2, delta, allowed, qk_scale,
                         MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Recompute one tile of probabilities and their score gradients.

    ``p = 2^(s - lse2)`` is the softmax row restricted to this tile and
    ``ds = p ⊙ (do vᵀ - delta)`` with ``delta_i = do_i · o_i``; the callers
    accumulate ``dv += pᵀ do``, ``dk += dsᵀ q`` and ``dq += ds k``.
    """
    s = mma(q, tl.trans(k), DOT_PRECISION) * qk_scale
    p = tl.math.exp2(s - lse2[:, None])
    if MASKED:
        p = tl.where(allowed, p, 0.0)
    dp = mma(do, tl.trans(v), DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return p, ds


@triton.jit
def kv_head(h, GROUP: tl.constexpr):
    """The kv head of query head ``h`` when ``GROUP`` query heads share one (grouped-query
    attention, heads grouped contiguously as in SDPA's ``enable_gqa``): ``h // GROUP``.

    Also maps a flat ``b·Hq + h`` to the flat ``b·Hkv + h // GROUP``.  ``GROUP`` is a
    compile-time constant, so with ``GROUP == 1`` this is ``h`` and costs nothing.
    """
    if GROUP > 1:
        h = h // GROUP
    return h


@triton.jit
def owns_kv_tile(tile, n_k_tiles, h, GROUP: tl.constexpr):
    """Whether the backward program ``(tile, b, h)`` computes dK, dV of key tile ``tile``
    of its kv head.

    dK, dV of a kv head sum over the ``GROUP`` query heads that read it, and one program
    sums them all (no atomics, deterministic).  The group's programs take turns: key tile
    ``t`` goes to the query head with ``h % GROUP == t % GROUP``, so each (key tile, kv
    head) is computed exactly once and the dK/dV work is spread evenly over the group.
    """
    mine = tile < n_k_tiles
    if GROUP > 1:
        mine = mine & (h % GROUP == tile % GROUP)
    return mine


@triton.jit
def record_tile(rec_ptr, q_tile, k_tile, n_k_tiles, RECORD: tl.constexpr):
    """Count a computed ``(query tile, key tile)`` pair; compiled away when ``RECORD`` is off.

    Each pair belongs to one program per pass, so load-then-store needs no atomics.
    """
    if RECORD:
        ptr = rec_ptr + q_tile * n_k_tiles + k_tile
        tl.store(ptr, tl.load(ptr) + 1)


# --------------------------------------------------------------------------------------
# Launch configuration and the autograd wrapper shared by every kernel pair
# --------------------------------------------------------------------------------------


#: Launch defaults of the dense kernels on CUDA for 2-byte inputs, measured on an H100 by
#: ``tools/dense_sweep.py`` (results/logs/dense_sweep_h100*.json, NOTES.md "Issue 13").  The
#: backward is best with 64 x 64 tiles at every size; the forward gains from 128-row query tiles
#: once the sequence is long enough to fill the GPU with them.  Rows ``(head dims lo..hi,
#: shortest sequence, forward settings)``, else ``DENSE_CUDA_DEFAULT``; padded head dims
#: (80, 96: BLOCK_D = 128) ran as fast or faster with the default 64 x 64 tiles.
DENSE_CUDA_FORWARD = (
    (1, 64, 4096, dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)),
    (97, 128, 8192, dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)),
)
#: The backward's pipeline depth: 4 stages at head dims up to 64 (5.75 ms against 6.24 ms with 2
#: at N=16384, ``dense_sweep_h100_bwd_stages.json``); at D=128 more stages were slower.
DENSE_CUDA_BACKWARD = ((64, dict(bwd_num_stages=4)),)
DENSE_CUDA_DEFAULT = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3,
                          bwd_BLOCK=64, bwd_STEP=64, bwd_num_warps=4, bwd_num_stages=2)
#: A narrow sliding window (``0 < window <= BAND_MAX_WINDOW``) gives each query tile only a few
#: key tiles, so the dense kernel's long-loop settings do not fit it: 64 x 64 tiles and a
#: two-stage pipeline both ways (the backward one stage above D=64: ``BAND_PIPELINED_BWD_MAX_D``).
#: On an H200 (``tools/layout_sweep.py``, results/logs/layout_sweep_h200.json; window 128, N 8k
#: and 16k) the band's forward took 0.065 ms against 0.110 with the long-loop settings at D=64
#: (0.116 against 0.160 at D=128) and its backward 0.172 against 0.199 ms at D=64.  On an H100
#: at windows 256, 512 and 1024 (results/logs/layout_sweep_band_w*_h100.json, N 8k and 16k) the
#: band settings stayed within 7% of the best tried, and their forward took 6-35% less time than
#: the long-loop one (128-row tiles, 8 warps; least at D=128, window 1024); past 1024 the
#: long-loop settings take over.
BAND_MAX_WINDOW = 1024
DENSE_CUDA_BAND = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2,
                       bwd_BLOCK=64, bwd_STEP=64, bwd_num_warps=4, bwd_num_stages=2)
#: Above this head dim the band's backward runs unpipelined (one stage): its loops are a few tiles
#: long, and at D=128 a second stage's prologue and shared memory cost more than the overlap wins.
#: On an H100 (``tools/layout_sweep.py``, results/logs/layout_sweep_band_bwd_stages_*_h100.json)
#: one stage took 0.33 against 0.41 ms at window 128 (N 8k and 16k), 0.42 against 0.51 at 256,
#: 0.61 against 0.70 at 512 and 0.97 against 1.07 at 1024 (D=96: 0.30 against 0.38 at 128); at
#: D=64 it was 4-14% slower, and the long loops of the dense backward lose with it (D=128, N
#: 16k: 13.5 against 10.8 ms, ``dense_sweep_bwd_1stage_h100.json``).
BAND_PIPELINED_BWD_MAX_D = 64
#: The sparse kernels' launch defaults on CUDA (BLOCK_M and BLOCK_N are shared by both passes).
#: A bucket's run gives a query tile ten or so key tiles, and at head dims up to 64 a two-stage
#: forward pipeline beat three (hash ∪ window far part on an H200, N 16k: 0.169 against 0.210
#: ms; ``layout_sweep_h200.json``); at D=128 three stages stay best (0.265 against 0.298).
SPARSE_CUDA_DEFAULT = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, bwd_num_warps=4, bwd_num_stages=2,
                           bwd_BLOCK=0, bwd_STEP=0)
SPARSE_CUDA_SHORT_PIPELINE_MAX_D = 64


def _dense_cuda(head_dim: int, seq_len: int | None, dtype: torch.dtype | None, window: int = 0) -> dict:
    cfg = dict(DENSE_CUDA_DEFAULT)
    if seq_len is None or dtype not in (torch.float16, torch.bfloat16):  # float32 tiles twice the bytes
        return cfg
    if 0 < window <= BAND_MAX_WINDOW:
        band = dict(DENSE_CUDA_BAND)
        if head_dim > BAND_PIPELINED_BWD_MAX_D:
            band["bwd_num_stages"] = 1
        return band
    for max_d, bwd in DENSE_CUDA_BACKWARD:
        if head_dim <= max_d:
            cfg.update(bwd)
            break
    for lo, hi, min_n, fwd in DENSE_CUDA_FORWARD:
        if lo <= head_dim <= hi and seq_len >= min_n:
            cfg.update(fwd)
    return cfg


def kernel_config(head_dim: int, device: torch.device, kernel_options: dict | None = None,
                  dense: bool = False, seq_len: int | None = None, dtype: torch.dtype | None = None,
                  window: int = 0) -> dict:
    """Tile sizes and launch parameters of the forward and backward kernels.

    ``kernel_options`` (like FlexAttention's) may override ``BLOCK_M``, ``BLOCK_N``
    (shared by both passes of the sparse kernels, so that the backward visits the
    forward's tiles), ``num_warps``, ``num_stages`` (forward) and ``bwd_num_warps``,
    ``bwd_num_stages``.  The dense backward (``dense=True``) may tile differently from its
    forward: ``bwd_BLOCK`` keys per dK/dV program and queries per dQ program, stepping
    ``bwd_STEP`` queries (dK/dV) or keys (dQ) at a time; 0 means the forward's tiles.
    The CUDA defaults were measured on an H100 and an H200 (the dense ones depend on ``seq_len`` and
    ``dtype``: ``DENSE_CUDA_FORWARD``; ``NOTES.md``; a narrow ``window``: ``DENSE_CUDA_BAND``;
    the sparse ones on the head dim: ``SPARSE_CUDA_DEFAULT``).  On the CPU
    interpreter tiles default to 32 so that small inputs still span several tiles.

    ``hopper`` (dense only): 1 (the default) lets the dense forward run :mod:`sparseflash.hopper`'s
    kernel where it is faster (sm_90 GPUs, long sequences), 0 keeps it on the Triton kernel; it is 0
    whenever ``kernel_options`` sets the forward's tiles or launch (``BLOCK_M``, ``BLOCK_N``,
    ``num_warps``, ``num_stages``), so that those are what runs.
    """
    if device.type == "cuda":
        cfg = dict(SPARSE_CUDA_DEFAULT)
        if dense:
            cfg.update(_dense_cuda(head_dim, seq_len, dtype, window))
        elif head_dim <= SPARSE_CUDA_SHORT_PIPELINE_MAX_D:
            cfg["num_stages"] = 2
    else:
        cfg = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1, bwd_num_warps=4, bwd_num_stages=1,
                   bwd_BLOCK=0, bwd_STEP=0)
    cfg["hopper"] = 1
    if kernel_options and "hopper" not in kernel_options and any(
            key in kernel_options for key in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")):
        cfg["hopper"] = 0
    if kernel_options:
        unknown = set(kernel_options) - set(cfg)
        if unknown:
            raise ValueError(f"unknown kernel_options {sorted(unknown)}; expected some of {sorted(cfg)}")
        if not dense and any(kernel_options.get(k) for k in ("bwd_BLOCK", "bwd_STEP")):
            raise ValueError("bwd_BLOCK / bwd_STEP apply to the dense kernel only: the sparse backward visits "
                             "the forward's tiles (set BLOCK_M, BLOCK_N)")
        bad = {k: v for k, v in kernel_options.items() if isinstance(v, bool) or not isinstance(v, int)}
        if bad:
            raise ValueError(f"kernel_options values must be ints, got {bad}")
        cfg.update(kernel_options)
    if cfg["hopper"] not in (0, 1):
        raise ValueError(f"hopper must be 0 or 1, got {cfg['hopper']}")
    for name in ("num_warps", "num_stages", "bwd_num_warps", "bwd_num_stages"):
        if cfg[name] < 1:
            raise ValueError(f"{name} must be at least 1, got {cfg[name]}")
    for name in ("BLOCK_M", "BLOCK_N", "bwd_BLOCK", "bwd_STEP"):
        b = cfg[name]
        if name.startswith("bwd") and b == 0:
            continue
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16{' (or 0)' if name.startswith('bwd') else ''}, "
                             f"got {b}")
    if bool(cfg["bwd_BLOCK"]) != bool(cfg["bwd_STEP"]):
        raise ValueError(f"set both bwd_BLOCK and bwd_STEP, or neither: got {cfg['bwd_BLOCK']}, {cfg['bwd_STEP']}")
    if device.type == "cuda" and 0 < cfg["bwd_STEP"] < 64 and cfg["bwd_num_stages"] > 1:
        # Seen on an H100 and again on an H200 with triton 3.6 (tools/dense_sweep.py; results/logs/
        # dense_sweep_h200.json): such configurations computed wrong gradients (errors of 0.3 to
        # 1.1) at D 64 and 128, others not; refused rather than risked.
        raise ValueError(f"bwd_STEP={cfg['bwd_STEP']} (< 64) with bwd_num_stages={cfg['bwd_num_stages']} (> 1) "
                         "gave wrong gradients on an H100 and an H200 (triton 3.6): use bwd_num_stages=1 or "
                         "bwd_STEP >= 64")
    return cfg


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the kernels' ``tl.dot``.

    float32 inputs use TF32 matrix units only where PyTorch allows it for matmuls
    (``torch.backends.cuda.matmul.allow_tf32``), else exact "ieee" products; for
    float16/bfloat16 the setting has no effect ("tf32" is Triton's default name).
    """
    if dtype == torch.bfloat16 and _runtime.INTERPRET:
        return "upcast"
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def launch_params(cfg: dict, backward: bool = False) -> dict:
    """``num_warps`` / ``num_stages`` for a launch of the forward or backward kernel."""
    if backward:
        return dict(num_warps=cfg["bwd_num_warps"], num_stages=cfg["bwd_num_stages"])
    return dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


@triton.jit
def _delta_kernel(O, DO, DELTA, so_b, so_h, so_n, sdo_b, sdo_h, sdo_n, H, n,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    o = load_tile(O + b * so_b + h * so_h, rows, cols, so_n, n, HEAD_DIM, BLOCK_D)
    do = load_tile(DO + b * sdo_b + h * sdo_h, rows, cols, sdo_n, n, HEAD_DIM, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * n + rows, delta, mask=rows < n)


def record_buffers(record, names, shape, device, stand_in: Tensor) -> list[Tensor]:
    """The tile recorder's buffers for one launch, one per pass name; without a record,
    ``stand_in`` for each (the kernel never touches it: ``RECORD`` is a compile-time switch)."""
    if record is None:
        return [stand_in] * len(names)
    return [record.buffer(name, shape, device) for name in names]


def softmax_delta(o: Tensor, do: Tensor) -> Tensor:
    """``delta_i = do_i · o_i`` (B, H, N) float32: the row term of the softmax backward.

    One small kernel (instead of three PyTorch ops): it reads ``o`` and ``do`` once,
    with any strides whose last one is 1.
    """
    B, H, n, D = o.shape
    o, do = (t if t.stride(-1) == 1 else t.contiguous() for t in (o, do))
    delta = _runtime.new_output((B, H, n), torch.float32, o.device)
    block = 64
    launch(_delta_kernel, (_runtime.cdiv(n, block), B * H),
        o, do, delta, *o.stride()[:3], *do.stride()[:3], H, n,
        HEAD_DIM=D, BLOCK_D=max(16, _runtime.next_power_of_2(D)), BLOCK=block, num_warps=4)
    return delta


class KernelAttention(torch.autograd.Function):
    """Autograd for every kernel pair in sparseflash.

    ``forward_pass(q, k, v) -> (o, lse2)`` runs a forward kernel and
    ``backward_pass(q, k, v, o, lse2, do) -> (dq, dk, dv)`` the matching backward,
    which recomputes the tiles from the saved log-sum-exp.  The dense kernels here and
    the permuted-layout kernels of ``permuted.py`` bind their settings with
    ``functools.partial``.  Once differentiable: second derivatives (``create_graph=True``
    then a backward through the gradient) raise instead of coming back silently wrong.
    """

    @staticmethod
    def forward(ctx, q, k, v, forward_pass, backward_pass):
        o, lse2 = forward_pass(q, k, v)
        ctx.save_for_backward(q, k, v, o, lse2)
        ctx.backward_pass = backward_pass
        return o

    @staticmethod
    def backward(ctx, do):
        # create_graph=True (grad mode on here): the gradients must refuse a second derivative.  The
        # usual backward runs with grad mode off: nothing to guard, and once_differentiable's
        # wrapper costs a few µs of host time a call.
        return (_backward_once if torch.is_grad_enabled() else _backward)(ctx, do)


def _backward(ctx, do):
    return (*ctx.backward_pass(*ctx.saved_tensors, do), None, None)


#: The backward kernels have no derivative: differentiating their results again raises.
_backward_once = once_differentiable(_backward)


def run_attention(q: Tensor, k: Tensor, v: Tensor, forward_pass, backward_pass) -> Tensor:
    """``o`` of ``forward_pass(q, k, v)``, through :class:`KernelAttention` when autograd will
    need its backward, else directly: a call under ``torch.no_grad()`` or on tensors that need
    no gradient (inference, decoding, the benchmark's forward) skips ``autograd.Function``'s
    host time, about a fifth of a dense forward call's (``tools/host_stub.py``)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return KernelAttention.apply(q, k, v, forward_pass, backward_pass)
    return forward_pass(q, k, v)[0]
