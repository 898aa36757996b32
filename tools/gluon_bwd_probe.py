"""The dense causal backward in Gluon with the forward's structure (``sparseflash/hopper.py``): does it
bring forward+backward toward cuDNN's?  (CUDA, sm_90 only.)

    PYTHONPATH=. python tools/gluon_bwd_probe.py [--out gluon_bwd_probe.json]
    PYTHONPATH=. python tools/gluon_bwd_probe.py --compile-only      # any machine: sm_90 compiles

Two kernels, each with a producer warp (TMA loads into a ``STAGES``-deep ring) and two consumer
warpgroups of 64 rows, the products asynchronous wgmma:

* ``dK, dV``: a program owns 128 keys (64 a warpgroup, K and V held in shared memory) and walks the
  query tiles at or after them (64 queries a tile: Q and dO through the ring).  Per tile,
  ``Sᵀ = K Qᵀ`` and ``dPᵀ = V dOᵀ`` are issued together, then ``Pᵀ = 2^(Sᵀ·c - lse)``,
  ``dSᵀ = Pᵀ ⊙ (dPᵀ - delta)``, then ``dV += Pᵀ dO`` and ``dK += dSᵀ Q`` (operands A from registers);
* ``dQ``: a program owns 128 queries (Q and dO held) and walks the key tiles up to them:
  ``S = Q Kᵀ``, ``dP = dO Vᵀ``, ``dS = P ⊙ (dP - delta)``, ``dQ += dS K``.

Seven products a tile pair, as the Triton kernel's; what changes is the schedule (TMA, a producer
warp, asynchronous wgmma, no CTA-wide barrier in the loops).  ``lse`` and ``delta`` come from the
package (``flash_forward``, ``softmax_delta``).  Rows: each kernel's time, the pair's, our Triton
backward's and SDPA cuDNN's / flash's backward (autograd of one call, the forward outside the timing)
at B=2, H=12, bf16, N 4k/8k/16k, D 64/128, with the largest difference of dQ, dK, dV from our Triton
backward's (``max_diff``).  Lengths must be multiples of 128.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from sparseflash.hopper import _pass_turn, _take_turn


@gluon.jit
def _ring_loader(a_desc, b_desc, a_smem, b_smem, ready, empty, b, h, first, count,
                 BLOCK: gl.constexpr, STAGES: gl.constexpr):
    """Producer warp: tiles ``first, first + 1, ...`` (``count`` of them, ``BLOCK`` rows each) of two
    tensors into ring stage ``i % STAGES`` once every consumer released it."""
    nbytes: gl.constexpr = 2 * BLOCK * a_desc.block_type.shape[3] * 2
    for i in range(count):
        stage = i % STAGES
        mbarrier.wait(empty.index(stage), ((i // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(stage), nbytes)
        row = (first + i) * BLOCK
        tma.async_copy_global_to_shared(a_desc, [b, h, row, 0], ready.index(stage), a_smem.index(stage))
        tma.async_copy_global_to_shared(b_desc, [b, h, row, 0], ready.index(stage), b_smem.index(stage))


@gluon.jit
def _dkdv_consumer(k_smem, v_smem, kv_bar, q_smem, do_smem, ready, empty, LSE, DELTA, DK, DV, b, h, H, n, k_lo,
                   q_first, count, qk_scale, sm_scale, turn,
                   wg: gl.constexpr, HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, STAGES: gl.constexpr,
                   PINGPONG: gl.constexpr):
    t_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    g_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=g_layout, k_width=2)
    dtype: gl.constexpr = q_smem.dtype
    keys = k_lo + wg * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, t_layout))
    k_w = k_smem.index(wg).reshape([64, HEAD_DIM])
    v_w = v_smem.index(wg).reshape([64, HEAD_DIM])
    t_zero = gl.zeros([64, 64], gl.float32, layout=t_layout)
    dk = gl.zeros([64, HEAD_DIM], gl.float32, layout=g_layout)
    dv = gl.zeros([64, HEAD_DIM], gl.float32, layout=g_layout)
    base = (b * H + h).to(gl.int64) * n
    mbarrier.wait(kv_bar, 0)
    for i in range(count):
        stage = i % STAGES
        q_lo = (q_first + i) * 64
        q_t = q_smem.index(stage).reshape([64, HEAD_DIM])
        do_t = do_smem.index(stage).reshape([64, HEAD_DIM])
        mbarrier.wait(ready.index(stage), (i // STAGES) & 1)
        _take_turn(turn, wg, 2 * i, PINGPONG)
        st = warpgroup_mma(k_w, q_t.permute((1, 0)), t_zero, use_acc=False, is_async=True)
        dpt = warpgroup_mma(v_w, do_t.permute((1, 0)), t_zero, use_acc=False, is_async=True)
        _pass_turn(turn, wg, 2, PINGPONG)
        queries = q_lo + gl.arange(0, 64, layout=gl.SliceLayout(0, t_layout))
        lse = gl.load(LSE + base + queries, mask=queries < n, other=0.0)
        delta = gl.load(DELTA + base + queries, mask=queries < n, other=0.0)
        st, dpt = warpgroup_mma_wait(0, deps=(st, dpt))
        pt = gl.exp2(st * qk_scale - lse[None, :])
        if CAUSAL:
            pt = gl.where(keys[:, None] <= queries[None, :], pt, 0.0)
        dst = pt * (dpt - delta[None, :])
        pt_a = gl.convert_layout(pt.to(dtype), a_layout)
        dst_a = gl.convert_layout(dst.to(dtype), a_layout)
        _take_turn(turn, wg, 2 * i + 1, PINGPONG)
        dv = warpgroup_mma(pt_a, do_t, dv, is_async=True)
        dk = warpgroup_mma(dst_a, q_t, dk, is_async=True)
        _pass_turn(turn, wg, 2, PINGPONG)
        dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))
        mbarrier.arrive(empty.index(stage))
    rows = k_lo + wg * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, g_layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, g_layout))
    offs = (base + rows.to(gl.int64))[:, None] * HEAD_DIM + cols[None, :]
    gl.store(DK + offs, (dk * sm_scale).to(dtype), mask=(rows < n)[:, None])
    gl.store(DV + offs, dv.to(dtype), mask=(rows < n)[:, None])


@gluon.jit
def _dkdv_kernel(q_desc, k_desc, v_desc, do_desc, LSE, DELTA, DK, DV, H, n, qk_scale, sm_scale,
                 HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr):
    """Program ``(t, b·H + h)``: keys ``128·t ...`` of head ``h`` (causal: the lowest keys see the
    most queries, and start first)."""
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    k_lo = gl.program_id(0) * 128
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [2] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [2] + v_desc.block_type.shape, v_desc.layout)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(do_desc.dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    q_first = 0
    if CAUSAL:
        q_first = k_lo // 64
    count = (n + 63) // 64 - q_first
    mbarrier.expect(kv_bar, 4 * 64 * HEAD_DIM * 2)
    for i in gl.static_range(2):
        tma.async_copy_global_to_shared(k_desc, [b, h, k_lo + 64 * i, 0], kv_bar, k_smem.index(i))
        tma.async_copy_global_to_shared(v_desc, [b, h, k_lo + 64 * i, 0], kv_bar, v_smem.index(i))
    gl.warp_specialize([
        (_dkdv_consumer, (k_smem, v_smem, kv_bar, q_smem, do_smem, ready, empty, LSE, DELTA, DK, DV, b, h, H, n,
                          k_lo, q_first, count, qk_scale, sm_scale, turn, 0, HEAD_DIM, CAUSAL, STAGES, PINGPONG)),
        (_dkdv_consumer, (k_smem, v_smem, kv_bar, q_smem, do_smem, ready, empty, LSE, DELTA, DK, DV, b, h, H, n,
                          k_lo, q_first, count, qk_scale, sm_scale, turn, 1, HEAD_DIM, CAUSAL, STAGES, PINGPONG)),
        (_ring_loader, (q_desc, do_desc, q_smem, do_smem, ready, empty, b, h, q_first, count, 64, STAGES)),
    ], [4, 1], [240, 24])
    mbarrier.invalidate(kv_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
        mbarrier.invalidate(empty.index(i))


@gluon.jit
def _dq_consumer(q_smem, do_smem, q_bar, k_smem, v_smem, ready, empty, LSE, DELTA, DQ, b, h, H, n, q_lo, count,
                 qk_scale, sm_scale, turn,
                 wg: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                 STAGES: gl.constexpr, PINGPONG: gl.constexpr):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    g_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=g_layout, k_width=2)
    dtype: gl.constexpr = k_smem.dtype
    base = (b * H + h).to(gl.int64) * n
    rows = q_lo + wg * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))
    lse = gl.load(LSE + base + rows, mask=rows < n, other=0.0)
    delta = gl.load(DELTA + base + rows, mask=rows < n, other=0.0)
    q_w = q_smem.index(wg).reshape([64, HEAD_DIM])
    do_w = do_smem.index(wg).reshape([64, HEAD_DIM])
    s_zero = gl.zeros([64, BLOCK_N], gl.float32, layout=s_layout)
    dq = gl.zeros([64, HEAD_DIM], gl.float32, layout=g_layout)
    mbarrier.wait(q_bar, 0)
    for j in range(count):
        stage = j % STAGES
        k_t = k_smem.index(stage).reshape([BLOCK_N, HEAD_DIM])
        v_t = v_smem.index(stage).reshape([BLOCK_N, HEAD_DIM])
        mbarrier.wait(ready.index(stage), (j // STAGES) & 1)
        _take_turn(turn, wg, 2 * j, PINGPONG)
        s = warpgroup_mma(q_w, k_t.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        dp = warpgroup_mma(do_w, v_t.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        _pass_turn(turn, wg, 2, PINGPONG)
        s, dp = warpgroup_mma_wait(0, deps=(s, dp))
        p = gl.exp2(s * qk_scale - lse[:, None])
        if CAUSAL:
            keys = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            p = gl.where(keys[None, :] <= rows[:, None], p, 0.0)
        ds = p * (dp - delta[:, None])
        ds_a = gl.convert_layout(ds.to(dtype), a_layout)
        _take_turn(turn, wg, 2 * j + 1, PINGPONG)
        dq = warpgroup_mma(ds_a, k_t, dq, is_async=True)
        _pass_turn(turn, wg, 2, PINGPONG)
        dq = warpgroup_mma_wait(0, deps=(dq,))
        mbarrier.arrive(empty.index(stage))
    o_rows = q_lo + wg * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, g_layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, g_layout))
    offs = (base + o_rows.to(gl.int64))[:, None] * HEAD_DIM + cols[None, :]
    gl.store(DQ + offs, (dq * sm_scale).to(dtype), mask=(o_rows < n)[:, None])


@gluon.jit
def _dq_kernel(q_desc, do_desc, k_desc, v_desc, LSE, DELTA, DQ, H, n, qk_scale, sm_scale,
               HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
               PINGPONG: gl.constexpr):
    """Program ``(t, b·H + h)``: queries of tile ``n_tiles - 1 - t`` (128 rows, longest first)."""
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    q_lo = (gl.num_programs(0) - 1 - gl.program_id(0)) * 128
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(do_desc.dtype, [2] + do_desc.block_type.shape, do_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    count = (n + BLOCK_N - 1) // BLOCK_N
    if CAUSAL:
        count = gl.minimum(count, (gl.minimum(q_lo + 128, n) - 1) // BLOCK_N + 1)
    mbarrier.expect(q_bar, 4 * 64 * HEAD_DIM * 2)
    for i in gl.static_range(2):
        tma.async_copy_global_to_shared(q_desc, [b, h, q_lo + 64 * i, 0], q_bar, q_smem.index(i))
        tma.async_copy_global_to_shared(do_desc, [b, h, q_lo + 64 * i, 0], q_bar, do_smem.index(i))
    gl.warp_specialize([
        (_dq_consumer, (q_smem, do_smem, q_bar, k_smem, v_smem, ready, empty, LSE, DELTA, DQ, b, h, H, n, q_lo, count,
                        qk_scale, sm_scale, turn, 0, HEAD_DIM, BLOCK_N, CAUSAL, STAGES, PINGPONG)),
        (_dq_consumer, (q_smem, do_smem, q_bar, k_smem, v_smem, ready, empty, LSE, DELTA, DQ, b, h, H, n, q_lo, count,
                        qk_scale, sm_scale, turn, 1, HEAD_DIM, BLOCK_N, CAUSAL, STAGES, PINGPONG)),
        (_ring_loader, (k_desc, v_desc, k_smem, v_smem, ready, empty, b, h, 0, count, BLOCK_N, STAGES)),
    ], [4, 1], [240, 24])
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
        mbarrier.invalidate(empty.index(i))


def _desc(t, rows):
    D = t.shape[-1]
    gdt = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    return TensorDescriptor.from_tensor(t, [1, 1, rows, D], gl.NVMMASharedLayout.get_default_for([1, 1, rows, D], gdt))


def gluon_backward(q, k, v, do, lse2, delta, sm_scale, *, causal=True, dkdv_stages=2, dq_block_n=64, dq_stages=3,
                   pingpong=False, parts=("dkdv", "dq")):
    """``(dq, dk, dv)`` of contiguous ``(B, H, N, D)`` inputs (no grouped heads), from ``lse2`` (base 2)
    and ``delta`` as the package computes them; ``parts`` runs only some of the two kernels."""
    B, H, N, D = q.shape
    if N % 128 or q.dtype not in (torch.bfloat16, torch.float16) or k.shape != q.shape:
        raise ValueError("the probe takes fp16/bf16, equal q/k shapes and N a multiple of 128")
    qk_scale = sm_scale * math.log2(math.e)
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    if "dkdv" in parts:
        _dkdv_kernel[(triton.cdiv(N, 128), B * H)](
            _desc(q, 64), _desc(k, 64), _desc(v, 64), _desc(do, 64), lse2, delta, dk, dv, H, N, qk_scale, sm_scale,
            HEAD_DIM=D, STAGES=dkdv_stages, CAUSAL=causal, PINGPONG=pingpong, num_warps=4)
    if "dq" in parts:
        _dq_kernel[(triton.cdiv(N, 128), B * H)](
            _desc(q, 64), _desc(do, 64), _desc(k, dq_block_n), _desc(v, dq_block_n), lse2, delta, dq, H, N, qk_scale,
            sm_scale, HEAD_DIM=D, BLOCK_N=dq_block_n, STAGES=dq_stages, CAUSAL=causal, PINGPONG=pingpong,
            num_warps=4)
    return dq, dk, dv


#: (dK/dV stages, dQ keys per tile, dQ stages, ping-pong turns between the two consumers) timed at
#: each head dim.  (At D=128 the dK/dV kernel
#: spills ~430 B a thread: two 64×128 float32 accumulators and the 64×64 score tiles in 240 registers.)
SETTINGS = {64: [(2, 64, 3, False), (2, 64, 3, True), (3, 128, 2, True), (4, 64, 4, True)],
            128: [(2, 64, 3, False), (2, 64, 3, True), (3, 64, 2, True), (2, 128, 2, True)]}


def _compile_only() -> int:
    """sm_90 compiles of both kernels at every setting, with ptxas's spill report."""
    from _sm90 import compile_sm90, print_compile  # tools/_sm90.py

    scalars = dict(LSE="*fp32", DELTA="*fp32", H="i32", n="i32", qk_scale="fp32", sm_scale="fp32")
    for D in (64, 128):
        t = torch.empty(1, 2, 256, D, dtype=torch.bfloat16)
        for dkdv_stages, bn, dq_stages, pingpong in SETTINGS[D]:
            label = f"dkdv_stages={dkdv_stages} dq_block_n={bn} dq_stages={dq_stages} pp={pingpong}"
            dkdv = dict(q_desc=_desc(t, 64), k_desc=_desc(t, 64), v_desc=_desc(t, 64), do_desc=_desc(t, 64),
                        DK="*bf16", DV="*bf16", **scalars)
            print_compile(f"D={D} dkdv {label}", lambda: compile_sm90(
                _dkdv_kernel, dkdv, dict(HEAD_DIM=D, STAGES=dkdv_stages, CAUSAL=True, PINGPONG=pingpong), 4))
            dq = dict(q_desc=_desc(t, 64), do_desc=_desc(t, 64), k_desc=_desc(t, bn), v_desc=_desc(t, bn), DQ="*bf16",
                      **scalars)
            print_compile(f"D={D} dq {label}", lambda: compile_sm90(
                _dq_kernel, dq, dict(HEAD_DIM=D, BLOCK_N=bn, STAGES=dq_stages, CAUSAL=True, PINGPONG=pingpong), 4))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gluon_bwd_probe.json")
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384])
    args = p.parse_args()
    if args.compile_only:
        return _compile_only()
    from _rows import probe_writer, time_cases  # tools/_rows.py

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sparseflash._steps import kernel_config, softmax_delta
    from sparseflash.flash import flash_backward, flash_forward

    put = probe_writer(args.out)
    for D in (64, 128):
        for N in args.seq_lens:
            torch.manual_seed(0)
            q, k, v, do = (torch.randn(2, 12, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
            sm_scale = D ** -0.5
            flops = 2.5 * 2 * 2 * 12 * N * N * D    # causal backward: 5 of the 2·N²·D products, halved
            # lse2 from the Triton forward at every length (the Gluon one's agrees to ~2e-6)
            cfg = kernel_config(D, q.device, {"hopper": 0}, dense=True, seq_len=N, dtype=q.dtype)
            o, lse2 = flash_forward(q, k, v, True, sm_scale, cfg)
            delta = softmax_delta(o, do)
            want = flash_backward(q, k, v, o, lse2, do, True, sm_scale, cfg, delta=delta)

            def sdpa_bwd(backend):
                qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
                with sdpa_kernel([backend]):
                    out = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
                return lambda: torch.autograd.grad(out, (qq, kk, vv), do, retain_graph=True)
            cases = {"sdpa_cudnn_bwd": sdpa_bwd(SDPBackend.CUDNN_ATTENTION),
                     "sdpa_flash_bwd": sdpa_bwd(SDPBackend.FLASH_ATTENTION),
                     "ours_triton_bwd": lambda: flash_backward(q, k, v, o, lse2, do, True, sm_scale, cfg)}
            for dkdv_stages, bn, dq_stages, pingpong in SETTINGS[D]:
                kw = dict(dkdv_stages=dkdv_stages, dq_block_n=bn, dq_stages=dq_stages, pingpong=pingpong)
                tag = f"s{dkdv_stages}_dq_n{bn}_s{dq_stages}{'_pp' if pingpong else ''}"
                cases[f"gluon_{tag}"] = lambda kw=kw: gluon_backward(q, k, v, do, lse2, softmax_delta(o, do),
                                                                     sm_scale, **kw)
                cases[f"gluon_dkdv_{tag}"] = lambda kw=kw: gluon_backward(q, k, v, do, lse2, delta, sm_scale,
                                                                          parts=("dkdv",), **kw)
                cases[f"gluon_dq_{tag}"] = lambda kw=kw: gluon_backward(q, k, v, do, lse2, delta, sm_scale,
                                                                        parts=("dq",), **kw)
            def check(name, got):   # the whole backward's gradients against ours; the parts unchecked
                if not name.startswith("gluon_s"):
                    return {}
                return {"max_diff": max((a.float() - b.float()).abs().max().item() for a, b in zip(got, want))}
            time_cases(put, {"D": D, "N": N}, cases, flops, check, no_grad=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
