"""The dense forward on Hopper GPUs (sm_90) in Gluon, with FlashAttention-3's schedule.

The same computation as :func:`sparseflash.flash.flash_forward` (``o = softmax(q kᵀ · scale) v`` and
the base-2 log-sum-exp ``lse2`` the backward reads), written in Gluon, Triton's lower-level dialect,
where loads, barriers and the order of the tensor-core products are the program's own:

* one program per ``64 · WARPGROUPS`` query rows of one head, in warp-specialised partitions;
* a producer warp loads every K/V tile with the tensor-memory accelerator (TMA) into a
  ``STAGES``-deep ring of shared memory (``kv_ready``: the tile has landed; ``kv_empty``: every
  consumer is done with it, so it may be overwritten);
* ``WARPGROUPS`` consumer warpgroups (2, or 3 with fewer registers each) own 64 rows each (their
  own running max ``m``, sum ``l`` and output) and read the same K/V tiles.  Inside each
  (FlashAttention-3's intra-warpgroup overlap),
  ``S_j = Q K_jᵀ`` and ``O += P_{j-1} V_{j-1}`` are issued together, the softmax of ``S_j`` runs
  while the second product is still on the tensor cores, and ``O`` is rescaled once it has landed;
* ``PINGPONG``: the warpgroups also take turns to issue their products (one mbarrier each, passed
  round robin), so one's softmax runs while another's products do (the inter-warpgroup schedule).

Tile skipping is the dense kernel's: under a causal mask the key tiles after the tile's last row
are never loaded, and only tiles that cross a warpgroup's first row (or the ragged end of the keys)
are masked.  Tensor descriptors are 4-D, ``(B, H, N, D)`` with the inputs' own strides, so a
ragged last tile reads zeros past the end of its head (masked) and never another head's rows.

Used by :func:`sparseflash.flash.flash_forward` where :func:`usable` says so; the backward is
always the Triton kernel's.  Gluon compiles for NVIDIA GPUs only: on the CPU interpreter (and
without Gluon) :data:`AVAILABLE` is false and nothing here runs.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

import triton

try:  # Gluon's Hopper API as of Triton 3.6, which this file is written (and was measured) against.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    AVAILABLE = tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 6)
except ImportError:  # pragma: no cover  (an older Triton: the Triton kernel runs everywhere)
    AVAILABLE = False

from . import _runtime
from .launch import launch

#: Head dims the kernel is built for (its tiles are whole wgmma instructions).
HEAD_DIMS = (64, 128)

#: Launch settings per head dim: keys per tile, ring depth, consumer warpgroups, ping-pong (the
#: fastest two-consumer settings of ``tools/gluon_fa3_probe.py`` at 8k-16k on an H100; three stages
#: of 128 keys use 112 KB of shared memory at D=64 and 224 KB at D=128).  Three consumers (160
#: registers a thread) spill with 128-key tiles, so they take 64-key tiles.
CONFIG = {64: dict(BLOCK_N=128, STAGES=3, WARPGROUPS=2, PINGPONG=True),
          128: dict(BLOCK_N=128, STAGES=3, WARPGROUPS=2, PINGPONG=True)}

#: Where ``flash_forward`` uses this kernel on an sm_90 GPU: head dim -> shortest query length.
#: Measured on an H100 (B=2, H=12, bf16, causal; two runs) against the Triton kernel: D=128 faster
#: from 4k in kernel time (1.12-1.15x at 4k, 1.19-1.24x at 8k, 1.21-1.29x at 16k), but its launch
#: costs the host about 40 µs more, which the 4k call's wall time shows; D=64 faster at 16k only
#: (1.07x), slower at 4k (0.85x) and 8k (0.93x).
USE_FROM_SEQ_LEN: dict[int, int] = {64: 16384, 128: 8192}

_WG = 64      # rows of a consumer warpgroup


def _tma_ready(t: Tensor) -> bool:
    """A TMA descriptor needs a 16-byte aligned base, unit last stride and 16-byte aligned, nonzero
    strides (a broadcast dimension, stride 0, is not one a descriptor can describe)."""
    es = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(s > 0 and (s * es) % 16 == 0 for s in t.stride()[:-1]))


@functools.lru_cache(maxsize=None)
def _sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0)


def usable(q: Tensor, k: Tensor, v: Tensor, *, window: int = 0, init=None, record=None,
           force: bool = False) -> bool:
    """Whether ``flash_forward`` runs this kernel: Gluon present, CUDA sm_90, float16/bfloat16,
    ``D`` in :data:`HEAD_DIMS`, no window, no ``init``, no tile record, TMA-ready strides, and
    ``N`` at least :data:`USE_FROM_SEQ_LEN`'s entry for ``D`` (``force``: whatever the table says)."""
    if not (AVAILABLE and q.is_cuda and not _runtime.INTERPRET and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] in HEAD_DIMS and window == 0 and init is None and record is None):
        return False
    if not force and q.shape[2] < USE_FROM_SEQ_LEN.get(q.shape[-1], 1 << 62):
        return False
    return _sm90(q.device.index if q.device.index is not None else torch.cuda.current_device()) and all(
        _tma_ready(t) for t in (q, k, v))


if AVAILABLE:

    @gluon.jit
    def _loader(k_desc, v_desc, k_smem, v_smem, kv_ready, kv_empty, b, hk, n_tiles,
                BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        """The producer warp: key tile ``j`` into stage ``j % STAGES`` once every consumer released the
        tile that held it before (a fresh barrier's parity-1 wait passes at once)."""
        kv_bytes: gl.constexpr = 2 * BLOCK_N * k_desc.block_type.shape[3] * 2     # K and V, 16-bit values
        for j in range(n_tiles):
            stage = j % STAGES
            mbarrier.wait(kv_empty.index(stage), ((j // STAGES) & 1) ^ 1)
            mbarrier.expect(kv_ready.index(stage), kv_bytes)
            tma.async_copy_global_to_shared(k_desc, [b, hk, j * BLOCK_N, 0], kv_ready.index(stage), k_smem.index(stage))
            tma.async_copy_global_to_shared(v_desc, [b, hk, j * BLOCK_N, 0], kv_ready.index(stage), v_smem.index(stage))

    @gluon.jit
    def _take_turn(turn, wg: gl.constexpr, k, PINGPONG: gl.constexpr):
        """Wait for this warpgroup's ``k``-th turn to issue products: warpgroup 0 goes first, each
        passes the turn to the next (round robin); warpgroup 0's first wait passes at once."""
        if PINGPONG:
            mbarrier.wait(turn.index(wg), (k & 1) ^ (1 if wg == 0 else 0))

    @gluon.jit
    def _pass_turn(turn, wg: gl.constexpr, WARPGROUPS: gl.constexpr, PINGPONG: gl.constexpr):
        if PINGPONG:
            mbarrier.arrive(turn.index((wg + 1) % WARPGROUPS))

    @gluon.jit
    def _softmax(s, rows, keys, m_i, l_i, n_k, qk_scale, CAUSAL: gl.constexpr, MASKED: gl.constexpr):
        """One key tile's online-softmax step (base 2): probabilities, rescale, new max and sum."""
        s = s * qk_scale
        if MASKED:
            ok = keys[None, :] < n_k
            if CAUSAL:
                ok = ok & (keys[None, :] <= rows[:, None])
            s = gl.where(ok, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        # A row with no key yet keeps m = -inf: shift by 0 there (its p are 0 either way).
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s - m_safe[:, None])
        alpha = gl.exp2(m_i - m_safe)
        return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)

    @gluon.jit
    def _consumer(q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, turn, O, LSE, b, h, H, n_q, n_k, q_lo,
                  n_tiles, qk_scale, so_b, so_h, so_n,
                  wg: gl.constexpr, WARPGROUPS: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr):
        """Consumer warpgroup ``wg``: rows ``q_lo + 64·wg ...`` over every key tile of the program."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        dtype: gl.constexpr = v_smem.dtype
        q_wg = q_smem.index(wg).reshape([64, HEAD_DIM])
        wg_lo = q_lo + wg * 64
        rows = wg_lo + gl.arange(0, 64, layout=row_s)
        m_i = gl.full([64], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.zeros([64], gl.float32, layout=row_s)
        s_zero = gl.zeros([64, BLOCK_N], gl.float32, layout=s_layout)
        # Key tiles before this are inside every row's causal past and inside the keys: no mask.
        free = n_k // BLOCK_N
        if CAUSAL:
            free = gl.minimum(free, (wg_lo + 1) // BLOCK_N)

        mbarrier.wait(q_bar, 0)
        mbarrier.wait(kv_ready.index(0), 0)
        _take_turn(turn, wg, 0, PINGPONG)
        s = warpgroup_mma(q_wg, k_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), s_zero,
                          use_acc=False, is_async=True)
        _pass_turn(turn, wg, WARPGROUPS, PINGPONG)
        s = warpgroup_mma_wait(0, deps=(s,))
        keys = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        p, alpha, m_i, l_i = _softmax(s, rows, keys, m_i, l_i, n_k, qk_scale, CAUSAL, True)
        p = gl.convert_layout(p.to(dtype), p_layout)
        acc = gl.zeros([64, HEAD_DIM], gl.float32, layout=o_layout)
        for j in range(1, n_tiles):
            stage = j % STAGES
            prev = (j - 1) % STAGES
            keys = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            mbarrier.wait(kv_ready.index(stage), (j // STAGES) & 1)
            _take_turn(turn, wg, j, PINGPONG)
            s = warpgroup_mma(q_wg, k_smem.index(stage).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), s_zero,
                              use_acc=False, is_async=True)
            acc = warpgroup_mma(p, v_smem.index(prev).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
            _pass_turn(turn, wg, WARPGROUPS, PINGPONG)
            s = warpgroup_mma_wait(1, deps=(s,))        # S_j has landed; P_{j-1} V_{j-1} may still run
            if j >= free:
                p_new, alpha, m_i, l_i = _softmax(s, rows, keys, m_i, l_i, n_k, qk_scale, CAUSAL, True)
            else:
                p_new, alpha, m_i, l_i = _softmax(s, rows, keys, m_i, l_i, n_k, qk_scale, CAUSAL, False)
            acc = warpgroup_mma_wait(0, deps=(acc,))
            mbarrier.arrive(kv_empty.index(prev))       # this warpgroup is done with tile j - 1
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            p = gl.convert_layout(p_new.to(dtype), p_layout)
        last = (n_tiles - 1) % STAGES
        _take_turn(turn, wg, n_tiles, PINGPONG)
        acc = warpgroup_mma(p, v_smem.index(last).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
        _pass_turn(turn, wg, WARPGROUPS, PINGPONG)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(kv_empty.index(last))

        # The dense kernel's finish: a row with no key gets 0 and lse2 = +inf (see finish_softmax).
        empty = l_i == 0.0
        lse2 = gl.where(empty, float("inf"), m_i + gl.log2(gl.where(empty, 1.0, l_i)))
        out = acc / gl.convert_layout(gl.where(empty, 1.0, l_i), row_o)[:, None]
        o_rows = wg_lo + gl.arange(0, 64, layout=row_o)
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        O += b.to(gl.int64) * so_b + h.to(gl.int64) * so_h
        gl.store(O + o_rows.to(gl.int64)[:, None] * so_n + cols[None, :], out.to(dtype),
                 mask=(o_rows < n_q)[:, None])
        gl.store(LSE + (b * H + h).to(gl.int64) * n_q + rows, lse2, mask=rows < n_q)

    @gluon.jit
    def _hopper_fwd_kernel(q_desc, k_desc, v_desc, O, LSE, H, n_q, n_k, qk_scale, so_b, so_h, so_n,
                           GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                           STAGES: gl.constexpr, WARPGROUPS: gl.constexpr, CAUSAL: gl.constexpr,
                           PINGPONG: gl.constexpr):
        """Program ``(t, b·H + h)``: the ``64·WARPGROUPS`` rows of query tile ``n_tiles - 1 - t``
        (longest first) of head ``h``, which reads kv head ``h // GROUP``."""
        q_tile = gl.num_programs(0) - 1 - gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // GROUP
        q_lo = q_tile * (64 * WARPGROUPS)
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [WARPGROUPS] + q_desc.block_type.shape, q_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [WARPGROUPS, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(kv_ready.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=WARPGROUPS)      # one arrival per consumer warpgroup
        for i in gl.static_range(WARPGROUPS):
            mbarrier.init(turn.index(i), count=1)
        n_tiles = (n_k + BLOCK_N - 1) // BLOCK_N
        if CAUSAL:   # key tiles up to the tile's last row
            n_tiles = gl.minimum(n_tiles, (gl.minimum(q_lo + 64 * WARPGROUPS, n_q) - 1) // BLOCK_N + 1)
        mbarrier.expect(q_bar, WARPGROUPS * 64 * HEAD_DIM * 2)      # 64-row blocks of 16-bit values
        for i in gl.static_range(WARPGROUPS):
            tma.async_copy_global_to_shared(q_desc, [b, h, q_lo + 64 * i, 0], q_bar, q_smem.index(i))
        # Registers: 240 a consumer thread with two consumers, 160 with three (FlashAttention-3's split).
        # (The JIT takes no tuples of functions in variables: each partition list is written out.)
        if WARPGROUPS == 2:
            gl.warp_specialize([
                (_consumer, (q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, turn, O, LSE, b, h, H, n_q, n_k, q_lo,
                             n_tiles, qk_scale, so_b, so_h, so_n, 0, 2, HEAD_DIM, BLOCK_N, STAGES, CAUSAL, PINGPONG)),
                (_consumer, (q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, turn, O, LSE, b, h, H, n_q, n_k, q_lo,
                             n_tiles, qk_scale, so_b, so_h, so_n, 1, 2, HEAD_DIM, BLOCK_N, STAGES, CAUSAL, PINGPONG)),
                (_loader, (k_desc, v_desc, k_smem, v_smem, kv_ready, kv_empty, b, hk, n_tiles, BLOCK_N, STAGES)),
            ], [4, 1], [240, 24])
        else:
            gl.warp_specialize([
                (_consumer, (q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, turn, O, LSE, b, h, H, n_q, n_k, q_lo,
                             n_tiles, qk_scale, so_b, so_h, so_n, 0, 3, HEAD_DIM, BLOCK_N, STAGES, CAUSAL, PINGPONG)),
                (_consumer, (q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, turn, O, LSE, b, h, H, n_q, n_k, q_lo,
                             n_tiles, qk_scale, so_b, so_h, so_n, 1, 3, HEAD_DIM, BLOCK_N, STAGES, CAUSAL, PINGPONG)),
                (_consumer, (q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, turn, O, LSE, b, h, H, n_q, n_k, q_lo,
                             n_tiles, qk_scale, so_b, so_h, so_n, 2, 3, HEAD_DIM, BLOCK_N, STAGES, CAUSAL, PINGPONG)),
                (_loader, (k_desc, v_desc, k_smem, v_smem, kv_ready, kv_empty, b, hk, n_tiles, BLOCK_N, STAGES)),
            ], [4, 4, 1], [160, 160, 24])
        mbarrier.invalidate(q_bar)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(kv_ready.index(i))
            mbarrier.invalidate(kv_empty.index(i))
        for i in gl.static_range(WARPGROUPS):
            mbarrier.invalidate(turn.index(i))

@functools.lru_cache(maxsize=None)
def _smem_layout(rows: int, head_dim: int, dtype: torch.dtype):
    """The swizzled shared-memory layout of a ``(1, 1, rows, head_dim)`` tile (built once: Gluon's
    ``get_default_for`` costs about as much host time as the descriptor itself)."""
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, head_dim],
                                                gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


def descriptors(q: Tensor, k: Tensor, v: Tensor, block_n: int):
    """4-D TMA descriptors of q (64-row blocks) and k, v (``block_n``-row blocks), strides as given."""
    D = q.shape[-1]
    lay_q, lay_kv = _smem_layout(_WG, D, q.dtype), _smem_layout(block_n, D, q.dtype)
    return (TensorDescriptor.from_tensor(q, [1, 1, _WG, D], lay_q),
            TensorDescriptor.from_tensor(k, [1, 1, block_n, D], lay_kv),
            TensorDescriptor.from_tensor(v, [1, 1, block_n, D], lay_kv))


def hopper_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, sm_scale: float,
                   config: dict | None = None) -> tuple[Tensor, Tensor]:
    """``(o, lse2)`` as :func:`sparseflash.flash.flash_forward` returns them, from the Gluon kernel.

    q ``(B, H, Nq, D)``, k and v ``(B, Hkv, Nk, D)`` (``Hkv`` dividing ``H``), float16 or bfloat16,
    ``D`` 64 or 128, on an sm_90 GPU, strides TMA-ready (see :func:`usable`).  ``config``: the
    launch settings (:data:`CONFIG`'s keys), default :data:`CONFIG` for ``D``.
    """
    B, H, n_q, D = q.shape
    n_k = k.shape[2]
    cfg = dict(CONFIG[D], **(config or {}))
    o = _runtime.new_output((B, H, n_q, D), q.dtype, q.device)
    lse2 = _runtime.new_output((B, H, n_q), torch.float32, q.device)
    qd, kd, vd = descriptors(q, k, v, cfg["BLOCK_N"])
    launch(_hopper_fwd_kernel, (_runtime.cdiv(n_q, 64 * cfg["WARPGROUPS"]), B * H),
        qd, kd, vd, o, lse2, H, n_q, n_k, sm_scale * math.log2(math.e), o.stride(0), o.stride(1), o.stride(2),
        GROUP=H // k.shape[1], HEAD_DIM=D, BLOCK_N=cfg["BLOCK_N"], STAGES=cfg["STAGES"], CAUSAL=bool(causal),
        WARPGROUPS=cfg["WARPGROUPS"], PINGPONG=cfg["PINGPONG"], num_warps=4)
    return o, lse2
