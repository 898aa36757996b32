"""What Triton makes of the decode kernel's loop on Hopper, without a GPU: is the next block in flight?

    TRITON_INTERPRET=0 python tools/decode_ir.py [--out-dir /tmp/decode_ir]

Compiles :func:`sparseflash.decode._decode_split_kernel` for sm_90 (Triton ships ``ptxas``, so
this runs on a CPU-only machine) in its variants (dense with pointer or descriptor loads,
hash ∪ window lists; the fold as elementwise sums or as matrix products, ``MMA_FOLD``) and
prints, for each, the asynchronous copies in the Triton GPU IR (``ttg.async_copy_global_to_local``:
loads the software pipeliner multi-buffers), the tensor-descriptor (TMA) loads (two, K and V,
when each iteration loads its own block; more when the pipeliner issues later blocks' ahead), and
the shared memory a program takes.  No asynchronous copy means each block's loads are issued and
waited for inside its own iteration: the loop's latency is exposed.  ``--out-dir`` keeps the IR.

The device's Triton, not this machine's, is the one that matters: ``pip install --target
/tmp/t36 triton==3.6.0 --no-deps`` and ``PYTHONPATH=/tmp/t36:.`` in front of the command.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile for the GPU target even where there is none

import triton  # noqa: E402
from sm90_compile import compile_sm90  # noqa: E402

import sparseflash.decode as dec  # noqa: E402

POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "KD": "*bf16", "VD": "*bf16",
            "LENS": "*i32", "IDX": "*i32", "NK": "*i32", "LIST": "*i32", "PM": "*fp32", "PL": "*fp32",
            "PACC": "*fp32", "qk_scale": "fp32"}


DIVISIBLE = ("sq_b", "sq_h", "sk_b", "sk_h", "sk_n", "sv_b", "sv_h", "sv_n", "si_b", "si_h", "si_g", "snk_b",
             "so_b", "so_h", "S", "L")


def compile_variant(mode: str, fold: str, block_n: int, head_dim: int, stages: int, warps: int, group: int = 1):
    kernel = dec._decode_split_kernel
    const = dict(SPARSE=mode == "hash", LISTS=mode == "hash", LEN_TENSOR=True, SPLITS=64, HEAD_DIM=head_dim,
                 BLOCK_D=head_dim, BLOCK_N=block_n, GROUP=group, DESC=mode == "dense_desc", MMA=fold == "mma",
                 DOT_PRECISION="tf32", GROUPED=fold == "mma" and mode != "hash" and group > 1,
                 QROWS=max(16, triton.next_power_of_2(group)))
    types = dict(POINTERS)
    if const["DESC"]:
        types["KD"] = types["VD"] = f"tensordesc<bf16[1, 1, {block_n}, {head_dim}]>"
    # As launched on a contiguous cache of 65536 rows of 64 (strides and sizes divisible by 16).
    return compile_sm90(kernel, types, const, DIVISIBLE, warps, stages)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--block-n", type=int, default=dec.MAX_BLOCK_N)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--stages", type=int, default=dec.NUM_STAGES)
    p.add_argument("--warps", type=int, default=dec.NUM_WARPS)
    p.add_argument("--group", type=int, default=1, help="query heads per kv head (GQA; > 1 groups them)")
    p.add_argument("--out-dir", type=Path, default=None)
    args = p.parse_args(argv)
    print(f"sm_90, triton {triton.__version__}, BLOCK_N={args.block_n}, D={args.head_dim}, "
          f"{args.warps} warps, {args.stages} stages, {args.group} query heads per kv head")
    print(f"{'variant':<22} {'async copies':>12} {'TMA loads':>10} {'shared KB':>10}")
    for mode in ("dense", "dense_desc", "hash"):
        for fold in ("sum", "mma"):
            k = compile_variant(mode, fold, args.block_n, args.head_dim, args.stages, args.warps, args.group)
            ir = k.asm["ttgir"]
            n_async = ir.count("ttg.async_copy_global_to_local")
            n_tma = ir.count("async_tma_copy_global_to_local")
            print(f"{mode + ' / ' + fold:<22} {n_async:>12} {n_tma:>10} {k.metadata.shared / 1024:>10.1f}")
            if args.out_dir:
                args.out_dir.mkdir(parents=True, exist_ok=True)
                (args.out_dir / f"{mode}_{fold}.ttgir").write_text(ir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
