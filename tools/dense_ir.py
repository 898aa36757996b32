"""What Triton makes of the dense kernels on Hopper, without a GPU: products, pipelining, registers.

    TRITON_INTERPRET=0 python tools/dense_ir.py [--head-dims 64 128] [--seq-lens 4096 16384]
    TRITON_INTERPRET=0 python tools/dense_ir.py --bwd 64x64x8x2 128x64x8x2   # other backward launches

Compiles :func:`sparseflash.flash._flash_fwd_kernel` and ``_flash_bwd_kernel`` (causal, bf16) for
sm_90 with the launch settings ``kernel_config`` picks on CUDA (Triton ships ``ptxas``, so this
runs on a CPU-only machine) and prints, per kernel: the matrix products as Hopper's warpgroup
MMA (``wgmma``, asynchronous, operands in shared memory) or the older ``mma`` ones, the
asynchronous copies the software pipeliner made, shared memory, and what ``ptxas -v`` reports:
registers per thread and bytes spilled to local memory (a spill in the inner loop is a memory
round trip per tile).  ``--bwd BLOCKxSTEPxWARPSxSTAGES`` compiles other backward settings.

The device's Triton, not this machine's, is the one that matters: ``pip install --target
/tmp/t36 triton==3.6.0 --no-deps`` and ``PYTHONPATH=/tmp/t36:.`` in front of the command.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile for the GPU target even where there is none

import torch  # noqa: E402
import triton  # noqa: E402
from sm90_compile import compile_sm90  # noqa: E402

import sparseflash.flash as flash  # noqa: E402
from sparseflash._steps import kernel_config  # noqa: E402

PTRS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "DO": "*bf16", "DQ": "*bf16", "DK": "*bf16",
        "DV": "*bf16", "LSE": "*fp32", "DELTA": "*fp32", "REC": "*i32", "REC_KV": "*i32", "REC_Q": "*i32",
        "qk_scale": "fp32", "sm_scale": "fp32"}


DIVISIBLE = ("sq_b", "sq_h", "sq_n", "sk_b", "sk_h", "sk_n", "sv_b", "sv_h", "sv_n", "so_b", "so_h", "so_n",
             "sdo_b", "sdo_h", "sdo_n", "n_q", "n_k")


def compile_kernel(kernel, const: dict, warps: int, stages: int):
    """The kernel as launched on B=2, H=12, N=16384 contiguous tensors (strides, lengths divisible by 16)."""
    return compile_sm90(kernel, PTRS, const, DIVISIBLE, warps, stages)


def ptxas_report(ptx: str) -> dict:
    """Registers and spill bytes of the kernel, from ``ptxas -v`` on its PTX (sm_90a)."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    stores = re.search(r"(\d+) bytes spill stores", text)
    loads = re.search(r"(\d+) bytes spill loads", text)
    return dict(registers=int(regs[1]) if regs else None, spill_stores=int(stores[1]) if stores else None,
                spill_loads=int(loads[1]) if loads else None)


def describe(name: str, k) -> str:
    ir = k.asm["ttgir"]
    rep = ptxas_report(k.asm["ptx"])
    return (f"{name:<34} wgmma {ir.count('ttng.warp_group_dot '):>2}  mma {ir.count('tt.dot '):>2}  "
            f"async copies {ir.count('ttg.async_copy_global_to_local'):>2}  shared {k.metadata.shared / 1024:6.1f} KB  "
            f"registers {rep['registers']}  spills {rep['spill_stores']} B stored / {rep['spill_loads']} B loaded")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--bwd", nargs="*", default=[], help="extra backward settings BLOCKxSTEPxWARPSxSTAGES")
    args = p.parse_args(argv)
    print(f"sm_90, triton {triton.__version__}, causal, bf16")
    for D in args.head_dims:
        for n in args.seq_lens:
            cfg = kernel_config(D, torch.device("cuda"), None, dense=True, seq_len=n, dtype=torch.bfloat16)
            common = dict(CAUSAL=True, WINDOWED=False, HEAD_DIM=D, BLOCK_D=D, DOT_PRECISION="tf32", RECORD=False,
                          GROUP=1)
            fwd = compile_kernel(flash._flash_fwd_kernel, dict(common, INIT=False, BLOCK_M=cfg["BLOCK_M"],
                                                               BLOCK_N=cfg["BLOCK_N"]),
                                 cfg["num_warps"], cfg["num_stages"])
            tag = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['num_warps']}x{cfg['num_stages']}"
            print(describe(f"D={D} N={n} fwd {tag}", fwd))
            settings = [(cfg["bwd_BLOCK"], cfg["bwd_STEP"], cfg["bwd_num_warps"], cfg["bwd_num_stages"])]
            settings += [tuple(int(x) for x in s.split("x")) for s in args.bwd]
            for block, step, warps, stages in dict.fromkeys(settings):
                bwd = compile_kernel(flash._flash_bwd_kernel, dict(common, ACCUMULATE=False, BLOCK_KV=block,
                                                                   STEP_Q=step, BLOCK_Q=block, STEP_K=step),
                                     warps, stages)
                print(describe(f"D={D} N={n} bwd {block}x{step}x{warps}x{stages}", bwd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
