"""FlashAttention-3's forward schedule in Gluon: does it bring the causal forward to cuDNN's speed?
(CUDA, sm_90 only; the FlashAttention-2-order Gluon kernel it builds on is ``gluon_fwd_probe.py``.)

    PYTHONPATH=. python tools/gluon_fa3_probe.py [--out gluon_fa3_probe.json]
    PYTHONPATH=. python tools/gluon_fa3_probe.py --compile-only      # any machine: sm_90 compiles

One program per 128-row query tile and head, in three warp-specialised partitions:

* a producer warp issues every K/V tile's TMA load into a ``STAGES``-deep ring of shared memory
  (``kv_ready``: landed; ``kv_empty``: both consumers are done with it);
* two consumer warpgroups own 64 query rows each (their own ``m``, ``l`` and output) and read the
  same K/V tiles.  Each overlaps inside itself (FlashAttention-3's Algorithm 2): ``S_j = Q K_jᵀ``
  and ``O += P_{j-1} V_{j-1}`` are issued together, the softmax of ``S_j`` runs while the second
  product is still on the tensor cores (``warpgroup_mma_wait(1)``), and ``O`` is rescaled once
  it has landed.
* ``PINGPONG``: the two warpgroups also take turns to issue their products (an mbarrier pair), so
  one's softmax runs while the other's products do (FlashAttention-3's inter-warpgroup schedule).

Rows: time and TFLOP/s at B=2, H=12, bf16, N 4k/8k/16k, D 64/128 beside SDPA cuDNN / flash, our
Triton kernel and the best FlashAttention-2-order Gluon kernel, each with ``max_diff`` from cuDNN's
output.  Lengths must be multiples of 128.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from gluon_fwd_probe import _softmax_step, gluon_attention

BLOCK_M = gl.constexpr(128)      # query rows of a program: two warpgroups of 64
WG_M = gl.constexpr(64)
_WG = 64                         # the same, as a host int


@gluon.jit
def _loader(k_desc, v_desc, k_smem, v_smem, kv_ready, kv_empty, kv_row, n_tiles,
            BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """The producer warp: tile ``j`` into stage ``j % STAGES`` once both consumers released the tile
    that held it before (a fresh barrier's parity-1 wait passes at once)."""
    kv_bytes: gl.constexpr = 2 * BLOCK_N * k_desc.block_type.shape[1] * 2
    for j in range(n_tiles):
        stage = j % STAGES
        mbarrier.wait(kv_empty.index(stage), ((j // STAGES) & 1) ^ 1)
        mbarrier.expect(kv_ready.index(stage), kv_bytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row + j * BLOCK_N, 0], kv_ready.index(stage), k_smem.index(stage))
        tma.async_copy_global_to_shared(v_desc, [kv_row + j * BLOCK_N, 0], kv_ready.index(stage), v_smem.index(stage))


@gluon.jit
def _take_turn(turn, wg: gl.constexpr, k, PINGPONG: gl.constexpr):
    """Wait for this warpgroup's ``k``-th turn to issue products (warpgroup 0 goes first)."""
    if PINGPONG:
        mbarrier.wait(turn.index(wg), (k & 1) ^ (1 - wg))


@gluon.jit
def _pass_turn(turn, wg: gl.constexpr, PINGPONG: gl.constexpr):
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - wg))


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, turn, O, q_row, q_tile, n_tiles, qk_scale,
              wg: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              PINGPONG: gl.constexpr):
    """Warpgroup ``wg``: rows ``64·wg ..`` of the program's query tile, over every key tile."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    q_wg = q_smem.index(wg)
    rows = q_tile * BLOCK_M + wg * WG_M + gl.arange(0, WG_M, layout=row_s)
    m_i = gl.full([WG_M], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([WG_M], gl.float32, layout=row_s)
    s_zero = gl.zeros([WG_M, BLOCK_N], gl.float32, layout=s_layout)
    first_masked = (q_tile * BLOCK_M + wg * WG_M) // BLOCK_N

    # Tile 0: its scores and softmax alone.
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(kv_ready.index(0), 0)
    _take_turn(turn, wg, 0, PINGPONG)
    s = warpgroup_mma(q_wg, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    _pass_turn(turn, wg, PINGPONG)
    s = warpgroup_mma_wait(0, deps=(s,))
    keys = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    p, alpha, m_i, l_i = _softmax_step(s, rows, keys, m_i, l_i, qk_scale, True)   # (one tile: masked always)
    p = gl.convert_layout(p.to(gl.bfloat16), p_layout)
    acc = gl.zeros([WG_M, HEAD_DIM], gl.float32, layout=o_layout)
    for j in range(1, n_tiles):
        stage = j % STAGES
        prev = (j - 1) % STAGES
        keys = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        mbarrier.wait(kv_ready.index(stage), (j // STAGES) & 1)
        _take_turn(turn, wg, j, PINGPONG)
        s = warpgroup_mma(q_wg, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        acc = warpgroup_mma(p, v_smem.index(prev), acc, is_async=True)
        _pass_turn(turn, wg, PINGPONG)
        s = warpgroup_mma_wait(1, deps=(s,))            # S_j has landed; P_{j-1} V_{j-1} may still run
        if j >= first_masked:
            p_new, alpha, m_i, l_i = _softmax_step(s, rows, keys, m_i, l_i, qk_scale, True)
        else:
            p_new, alpha, m_i, l_i = _softmax_step(s, rows, keys, m_i, l_i, qk_scale, False)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(kv_empty.index(prev))           # this warpgroup is done with tile j - 1
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        p = gl.convert_layout(p_new.to(gl.bfloat16), p_layout)
    last = (n_tiles - 1) % STAGES
    _take_turn(turn, wg, n_tiles, PINGPONG)
    acc = warpgroup_mma(p, v_smem.index(last), acc, is_async=True)
    _pass_turn(turn, wg, PINGPONG)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    mbarrier.arrive(kv_empty.index(last))

    out = acc / gl.convert_layout(l_i, row_o)[:, None]
    o_rows = q_row + wg * WG_M + gl.arange(0, WG_M, layout=row_o)
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    gl.store(O + o_rows.to(gl.int64)[:, None] * HEAD_DIM + cols[None, :], out.to(gl.bfloat16))


@gluon.jit
def _fa3_fwd_kernel(q_desc, k_desc, v_desc, O, n, qk_scale,
                    HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr):
    q_tile = gl.num_programs(0) - 1 - gl.program_id(0)     # longest rows first
    bh = gl.program_id(1)
    q_row = bh * n + q_tile * BLOCK_M
    kv_row = bh * n
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(kv_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)          # one arrival per consumer warpgroup
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    n_tiles = (q_tile * BLOCK_M + BLOCK_M) // BLOCK_N
    mbarrier.expect(q_bar, 2 * WG_M * HEAD_DIM * 2)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem.index(0))
    tma.async_copy_global_to_shared(q_desc, [q_row + WG_M, 0], q_bar, q_smem.index(1))
    gl.warp_specialize([
        (_consumer, (q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, turn, O, q_row, q_tile, n_tiles, qk_scale,
                     0, HEAD_DIM, BLOCK_N, STAGES, PINGPONG)),
        (_consumer, (q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, turn, O, q_row, q_tile, n_tiles, qk_scale,
                     1, HEAD_DIM, BLOCK_N, STAGES, PINGPONG)),
        (_loader, (k_desc, v_desc, k_smem, v_smem, kv_ready, kv_empty, kv_row, n_tiles, BLOCK_N, STAGES)),
    ], [4, 1], [240, 24])
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(kv_ready.index(i))
        mbarrier.invalidate(kv_empty.index(i))
    mbarrier.invalidate(turn.index(0))
    mbarrier.invalidate(turn.index(1))


def _descriptors(q, k, v, block_n):
    B, H, N, D = q.shape
    lay_q = gl.NVMMASharedLayout.get_default_for([_WG, D], gl.bfloat16)
    lay_kv = gl.NVMMASharedLayout.get_default_for([block_n, D], gl.bfloat16)
    return (TensorDescriptor.from_tensor(q.view(B * H * N, D), [_WG, D], lay_q),
            TensorDescriptor.from_tensor(k.view(B * H * N, D), [block_n, D], lay_kv),
            TensorDescriptor.from_tensor(v.view(B * H * N, D), [block_n, D], lay_kv))


def fa3_attention(q, k, v, *, block_n=128, stages=2, pingpong=False):
    """Causal attention of contiguous bf16 ``(B, H, N, D)`` with ``N % 128 == 0``, the FA3-order kernel."""
    B, H, N, D = q.shape
    if N % 128 or N % block_n or q.dtype != torch.bfloat16:
        raise ValueError("the probe takes bf16 and N a multiple of 128")
    o = torch.empty_like(q)
    qd, kd, vd = _descriptors(q, k, v, block_n)
    _fa3_fwd_kernel[(N // 128, B * H)](qd, kd, vd, o, N, D ** -0.5 * math.log2(math.e), HEAD_DIM=D,
                                           BLOCK_N=block_n, STAGES=stages, PINGPONG=pingpong, num_warps=4)
    return o


#: (BLOCK_N, STAGES, PINGPONG) timed at each head dim (shared memory: D=128 with 128-key tiles
#: and three stages is 224 KB, at the 227 KB limit).
SETTINGS = {64: [(128, 2, False), (128, 3, False), (128, 2, True), (128, 3, True), (64, 4, True)],
            128: [(128, 2, False), (128, 2, True), (64, 3, False), (64, 3, True), (128, 3, True)]}


def _compile_only() -> int:
    """sm_90 compiles of every setting (no GPU needed: Triton ships ptxas)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    for D in (64, 128):
        for block_n, stages, pingpong in SETTINGS[D]:
            q = torch.empty(1, 1, 256, D, dtype=torch.bfloat16)
            sig = {name: native_specialize_impl(BaseBackend, d, False, True, True)[0]
                   for name, d in zip(("q_desc", "k_desc", "v_desc"), _descriptors(q, q, q, block_n))}
            sig.update(O="*bf16", n="i32", qk_scale="fp32")
            const = dict(HEAD_DIM=D, BLOCK_N=block_n, STAGES=stages, PINGPONG=pingpong)
            names = _fa3_fwd_kernel.arg_names
            sig.update({k: "constexpr" for k in const})
            src = GluonASTSource(_fa3_fwd_kernel, {n: sig[n] for n in names},
                                 constexprs={(names.index(k),): v for k, v in const.items()},
                                 attrs={(names.index("O"),): [["tt.divisibility", 16]]})
            label = f"D={D} BLOCK_N={block_n} stages={stages} pingpong={pingpong}"
            try:
                ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
                ptx = ck.asm["ptx"]
                print(f"{label}: shared {ck.metadata.shared} B, warps {ck.metadata.num_warps}, "
                      f"wgmma {ptx.count('wgmma.mma_async')}, wait_group {ptx.count('wgmma.wait_group')}, "
                      f"local (spill) {ptx.count('st.local')}")
            except Exception as e:  # noqa: BLE001
                print(f"{label}: {type(e).__name__}: {str(e)[:1500]}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gluon_fa3_probe.json")
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384])
    args = p.parse_args()
    if args.compile_only:
        return _compile_only()
    from _rows import bench_ms, error_text, row_writer  # tools/_rows.py

    import sparseflash as sf
    from torch.nn.attention import SDPBackend, sdpa_kernel

    doc = {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                    "argv": sys.argv}, "rows": []}
    put = row_writer(doc, args.out)
    for D in (64, 128):
        for N in args.seq_lens:
            torch.manual_seed(0)
            q, k, v = (torch.randn(2, 12, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            flops = 2 * 2 * 12 * N * N * D   # causal: half of 4·N²·D per head
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

            def sdpa(backend):
                def run():
                    with sdpa_kernel([backend]):
                        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                return run
            cases = {"sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
                     "ours_triton": lambda: sf.flash_attention(q, k, v, causal=True),
                     "gluon_fa2_n128_s2": lambda: gluon_attention(q, k, v, block_n=128, stages=2)}
            for block_n, stages, pingpong in SETTINGS[D]:
                cases[f"fa3_n{block_n}_s{stages}{'_pingpong' if pingpong else ''}"] = (
                    lambda b=block_n, s=stages, pp=pingpong: fa3_attention(q, k, v, block_n=b, stages=s, pingpong=pp))
            for name, fn in cases.items():
                row = {"D": D, "N": N, "variant": name}
                try:
                    with torch.no_grad():
                        row["max_diff"] = (fn().float() - want.float()).abs().max().item()
                        row["ms"] = bench_ms(fn, "cuda")
                    row["tflops"] = flops / row["ms"] / 1e9
                except Exception as e:  # noqa: BLE001  (a setting that fails is a row, not a stop)
                    row["error"] = error_text(e)
                put(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
