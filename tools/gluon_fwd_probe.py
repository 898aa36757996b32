"""Does a hand-scheduled Hopper forward beat our Triton kernel? A causal FlashAttention forward in
Gluon (Triton's low-level dialect: explicit TMA loads, mbarriers, asynchronous wgmma) against SDPA's
cuDNN and flash backends and ``sparseflash.flash_attention``, same run (CUDA, sm_90 only).

    PYTHONPATH=. python tools/gluon_fwd_probe.py [--out gluon_fwd_probe.json]
    PYTHONPATH=. python tools/gluon_fwd_probe.py --compile-only      # any machine: sm_90 compiles

Two schedules of one kernel (one program per 128-row query tile and head, K/V tiles through a
``STAGES``-deep TMA ring):

* ``OVERLAP=False``: FlashAttention-2's order, ``S = Q Kᵀ`` then the softmax then ``O += P V``,
  each product waited for before the next step;
* ``OVERLAP=True``: part of FlashAttention-3's intra-warpgroup pipelining:
  ``S_{j+1} = Q K_{j+1}ᵀ`` is issued before tile ``j``'s softmax, so the tensor cores and the
  exponentials overlap; ``O += P_j V_j`` runs on while the next tile's loads are issued.

No warp specialisation (the same warps issue the loads), no ping-pong between warpgroups: the
probe asks whether these two Gluon steps alone move the forward toward cuDNN's.  Rows: each
schedule's time and TFLOP/s at B=2, H=12, bf16, N 4k/8k/16k, D 64/128, with its largest difference
from SDPA's output (``max_diff``; a wrong schedule shows here, not as a crash).  Lengths must be
multiples of 128 (the probe's TMA view is ``(B·H·N, D)``).
"""
from __future__ import annotations

import argparse
import math
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

BLOCK_M = 128


@gluon.jit
def _softmax_step(s, rows, keys, m_i, l_i, qk_scale, MASKED: gl.constexpr):
    """One key tile's online-softmax statistics: the tile's probabilities ``p`` (unnormalised, base
    2), the rescale ``alpha`` of the running sums, and the new row maximum and sum."""
    s = s * qk_scale
    if MASKED:
        s = gl.where(keys[None, :] <= rows[:, None], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1))
    p = gl.exp2(s - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _gluon_fwd_kernel(q_desc, k_desc, v_desc, O, n, qk_scale,
                      HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                      STAGES: gl.constexpr, OVERLAP: gl.constexpr, num_warps: gl.constexpr):
    # Longest rows first (causal): tile t of the launch is query tile n_tiles - 1 - t.
    q_tile = gl.num_programs(0) - 1 - gl.program_id(0)
    bh = gl.program_id(1)
    q_row = bh * n + q_tile * BLOCK_M          # rows of the (B·H·N, D) view
    kv_row = bh * n

    # Warps stacked along the rows (8 warps: two warpgroups of 64 rows each, as FA3's consumers), so
    # each row's softmax reductions stay inside one warp.
    warps: gl.constexpr = [num_warps, 1]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=warps,
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=warps,
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(kv_bar.index(i), count=1)

    n_tiles = (q_tile * BLOCK_M + BLOCK_M) // BLOCK_N     # causal: key tiles up to the diagonal
    kv_bytes: gl.constexpr = 2 * BLOCK_N * HEAD_DIM * 2
    mbarrier.expect(q_bar, BLOCK_M * HEAD_DIM * 2)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
    for i in gl.static_range(STAGES - 1):
        ok = i < n_tiles
        mbarrier.expect(kv_bar.index(i), kv_bytes, pred=ok)
        tma.async_copy_global_to_shared(k_desc, [kv_row + i * BLOCK_N, 0], kv_bar.index(i), k_smem.index(i), pred=ok)
        tma.async_copy_global_to_shared(v_desc, [kv_row + i * BLOCK_N, 0], kv_bar.index(i), v_smem.index(i), pred=ok)
    mbarrier.wait(q_bar, 0)

    rows = q_tile * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_s)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    first_masked = q_tile * BLOCK_M // BLOCK_N            # key tiles from here cross the diagonal

    if OVERLAP:
        acc = warpgroup_mma_init(acc)      # carried through the loop as an in-flight product
        mbarrier.wait(kv_bar.index(0), 0)
        s_next = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    for j in range(n_tiles):
        stage = j % STAGES
        keys = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        if OVERLAP:
            s, acc = warpgroup_mma_wait(0, deps=(s_next, acc))   # S_j and O's last product are done
        # Refill the stage tile j - 1 used (both its products are done) with tile j + STAGES - 1.
        nxt = j + STAGES - 1
        ok = nxt < n_tiles
        mbarrier.expect(kv_bar.index(nxt % STAGES), kv_bytes, pred=ok)
        tma.async_copy_global_to_shared(k_desc, [kv_row + nxt * BLOCK_N, 0], kv_bar.index(nxt % STAGES),
                                        k_smem.index(nxt % STAGES), pred=ok)
        tma.async_copy_global_to_shared(v_desc, [kv_row + nxt * BLOCK_N, 0], kv_bar.index(nxt % STAGES),
                                        v_smem.index(nxt % STAGES), pred=ok)
        if OVERLAP:
            if j + 1 < n_tiles:                                 # issue S_{j+1} before S_j's softmax
                mbarrier.wait(kv_bar.index((j + 1) % STAGES), ((j + 1) // STAGES) & 1)
                s_next = warpgroup_mma(q_smem, k_smem.index((j + 1) % STAGES).permute((1, 0)), s_zero,
                                       use_acc=False, is_async=True)
        else:
            mbarrier.wait(kv_bar.index(stage), (j // STAGES) & 1)
            s = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(0, deps=(s,))
        if j >= first_masked:
            p, alpha, m_i, l_i = _softmax_step(s, rows, keys, m_i, l_i, qk_scale, True)
        else:
            p, alpha, m_i, l_i = _softmax_step(s, rows, keys, m_i, l_i, qk_scale, False)
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        p = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        acc = warpgroup_mma(p, v_smem.index(stage), acc, is_async=True)
        if not OVERLAP:
            acc = warpgroup_mma_wait(0, deps=(acc,))
    if OVERLAP:
        acc = warpgroup_mma_wait(0, deps=(acc,))

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(kv_bar.index(i))
    out = acc / gl.convert_layout(l_i, row_o)[:, None]
    o_rows = q_row + gl.arange(0, BLOCK_M, layout=row_o)
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    gl.store(O + o_rows.to(gl.int64)[:, None] * HEAD_DIM + cols[None, :], out.to(gl.bfloat16))


@gluon.jit
def _ws_loader(k_desc, v_desc, k_smem, v_smem, kv_ready, kv_empty, kv_row, n_tiles,
               BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """The producer warp: K/V tile ``j`` into ring stage ``j % STAGES`` once the consumers have
    released the tile that used it before (``kv_empty``; a fresh barrier's parity-1 wait passes)."""
    kv_bytes: gl.constexpr = 2 * BLOCK_N * k_desc.block_type.shape[1] * 2
    for j in range(n_tiles):
        stage = j % STAGES
        mbarrier.wait(kv_empty.index(stage), ((j // STAGES) & 1) ^ 1)
        mbarrier.expect(kv_ready.index(stage), kv_bytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row + j * BLOCK_N, 0], kv_ready.index(stage), k_smem.index(stage))
        tma.async_copy_global_to_shared(v_desc, [kv_row + j * BLOCK_N, 0], kv_ready.index(stage), v_smem.index(stage))


@gluon.jit
def _ws_consumer(q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, O, q_row, q_tile, n_tiles, qk_scale,
                 HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                 num_warps: gl.constexpr):
    """The two consumer warpgroups: the OVERLAP schedule of the kernel above, reading the ring the
    producer fills and releasing each stage once both warpgroups' products on it are done."""
    warps: gl.constexpr = [num_warps, 1]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=warps,
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=warps,
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    rows = q_tile * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_s)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
    acc = warpgroup_mma_init(gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout))
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    first_masked = q_tile * BLOCK_M // BLOCK_N

    mbarrier.wait(q_bar, 0)
    mbarrier.wait(kv_ready.index(0), 0)
    s_next = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    for j in range(n_tiles):
        stage = j % STAGES
        keys = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s, acc = warpgroup_mma_wait(0, deps=(s_next, acc))
        if j > 0:                  # both warpgroups are done with tile j - 1: its stage is free
            gl.thread_barrier()
            mbarrier.arrive(kv_empty.index((j - 1) % STAGES))
        if j + 1 < n_tiles:
            mbarrier.wait(kv_ready.index((j + 1) % STAGES), ((j + 1) // STAGES) & 1)
            s_next = warpgroup_mma(q_smem, k_smem.index((j + 1) % STAGES).permute((1, 0)), s_zero,
                                   use_acc=False, is_async=True)
        if j >= first_masked:
            p, alpha, m_i, l_i = _softmax_step(s, rows, keys, m_i, l_i, qk_scale, True)
        else:
            p, alpha, m_i, l_i = _softmax_step(s, rows, keys, m_i, l_i, qk_scale, False)
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        p = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        acc = warpgroup_mma(p, v_smem.index(stage), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    out = acc / gl.convert_layout(l_i, row_o)[:, None]
    o_rows = q_row + gl.arange(0, BLOCK_M, layout=row_o)
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    gl.store(O + o_rows.to(gl.int64)[:, None] * HEAD_DIM + cols[None, :], out.to(gl.bfloat16))


@gluon.jit
def _gluon_ws_fwd_kernel(q_desc, k_desc, v_desc, O, n, qk_scale,
                         HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                         STAGES: gl.constexpr, OVERLAP: gl.constexpr, num_warps: gl.constexpr):
    """Warp-specialised: one producer warp issues every K/V load (FlashAttention-3's producer), the
    kernel's ``num_warps`` warps compute (``OVERLAP`` is always on; the argument keeps one launch
    signature for both kernels)."""
    q_tile = gl.num_programs(0) - 1 - gl.program_id(0)
    bh = gl.program_id(1)
    q_row = bh * n + q_tile * BLOCK_M
    kv_row = bh * n
    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(kv_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=1)
    n_tiles = (q_tile * BLOCK_M + BLOCK_M) // BLOCK_N
    mbarrier.expect(q_bar, BLOCK_M * HEAD_DIM * 2)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
    gl.warp_specialize([
        (_ws_consumer, (q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, O, q_row, q_tile, n_tiles, qk_scale,
                        HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, num_warps)),
        (_ws_loader, (k_desc, v_desc, k_smem, v_smem, kv_ready, kv_empty, kv_row, n_tiles, BLOCK_N, STAGES)),
    ], [1], [24])
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(kv_ready.index(i))
        mbarrier.invalidate(kv_empty.index(i))


def _descriptors(q, k, v, block_n):
    B, H, N, D = q.shape
    lay_q = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], gl.bfloat16)
    lay_kv = gl.NVMMASharedLayout.get_default_for([block_n, D], gl.bfloat16)
    return (TensorDescriptor.from_tensor(q.view(B * H * N, D), [BLOCK_M, D], lay_q),
            TensorDescriptor.from_tensor(k.view(B * H * N, D), [block_n, D], lay_kv),
            TensorDescriptor.from_tensor(v.view(B * H * N, D), [block_n, D], lay_kv))


def gluon_attention(q, k, v, *, block_n=128, stages=2, overlap=False, ws=False, num_warps=8):
    """Causal attention of contiguous bf16 ``(B, H, N, D)`` with ``N % 128 == 0``, the Gluon kernel."""
    B, H, N, D = q.shape
    if N % BLOCK_M or N % block_n or q.dtype != torch.bfloat16:
        raise ValueError("the probe takes bf16 and N a multiple of 128")
    o = torch.empty_like(q)
    qd, kd, vd = _descriptors(q, k, v, block_n)
    kernel = _gluon_ws_fwd_kernel if ws else _gluon_fwd_kernel
    kernel[(N // BLOCK_M, B * H)](qd, kd, vd, o, N, D ** -0.5 * math.log2(math.e), HEAD_DIM=D,
                                             BLOCK_M=BLOCK_M, BLOCK_N=block_n, STAGES=stages, OVERLAP=overlap,
                                             num_warps=num_warps)
    return o


def _compile_only() -> int:
    """sm_90 compiles of every setting the probe times (no GPU needed: Triton ships ptxas)."""
    from _sm90 import compile_sm90, print_compile  # tools/_sm90.py

    for D in (64, 128):
        for block_n, stages, overlap, ws in SETTINGS[D]:
            q = torch.empty(1, 1, 256, D, dtype=torch.bfloat16)
            args = dict(zip(("q_desc", "k_desc", "v_desc"), _descriptors(q, q, q, block_n)), O="*bf16", n="i32",
                        qk_scale="fp32")
            const = dict(HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=block_n, STAGES=stages, OVERLAP=overlap, num_warps=8)
            print_compile(f"D={D} BLOCK_N={block_n} stages={stages} overlap={overlap} ws={ws}",
                          lambda: compile_sm90(_gluon_ws_fwd_kernel if ws else _gluon_fwd_kernel, args, const, 8,
                                               aligned=("O",)))
    return 0


#: (BLOCK_N, STAGES, OVERLAP) settings timed at each head dim (D=128 with 128-key tiles and three
#: stages would need about 230 KB of shared memory, past the 227 KB a block may have).
SETTINGS = {64: [(128, 2, False, False), (64, 3, False, False), (128, 2, True, False), (128, 3, True, False),
                 (64, 3, True, False), (128, 2, True, True), (128, 3, True, True)],
            128: [(128, 2, False, False), (64, 3, False, False), (128, 2, True, False), (64, 3, True, False),
                  (128, 2, True, True), (64, 3, True, True)]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gluon_fwd_probe.json")
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--kernels", choices=("all", "plain", "ws"), default="all",
                   help="time only the kernels without (plain) or with (ws) warp specialisation; baselines always")
    args = p.parse_args()
    if args.compile_only:
        return _compile_only()
    from _rows import probe_writer, time_cases  # tools/_rows.py (the script's own folder is on sys.path)

    import sparseflash as sf
    from torch.nn.attention import SDPBackend, sdpa_kernel

    put = probe_writer(args.out)
    for D in (64, 128):
        for N in (4096, 8192, 16384):
            torch.manual_seed(0)
            q, k, v = (torch.randn(2, 12, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            flops = 2 * 2 * 12 * N * N * D   # causal: half of 4·N²·D per head
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            cases = {}
            for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
                def run(backend=backend):
                    with sdpa_kernel([backend]):
                        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                cases[name] = run
            cases["ours_triton"] = lambda: sf.flash_attention(q, k, v, causal=True)
            for block_n, stages, overlap, ws in SETTINGS[D]:
                if args.kernels != "all" and ws != (args.kernels == "ws"):
                    continue
                tag = '_ws' if ws else '_overlap' if overlap else ''
                cases[f"gluon_n{block_n}_s{stages}{tag}"] = (
                    lambda b=block_n, s=stages, o=overlap, w=ws: gluon_attention(q, k, v, block_n=b, stages=s, overlap=o, ws=w))
            time_cases(put, {"D": D, "N": N}, cases, flops,
                       lambda name, got: {"max_diff": (got.float() - want.float()).abs().max().item()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
