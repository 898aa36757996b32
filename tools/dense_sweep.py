"""Launch-configuration sweep of the dense kernels (issue 13): which tiles, warps and stages
make ``flash_attention`` fastest on this GPU, per head dim and pass.

    PYTHONPATH=. python tools/dense_sweep.py --out results/logs/dense_sweep_h100.json

For each head dim and sequence length (B=2, H=12, bf16, causal): SDPA's FlashAttention-2
and cuDNN backends (forward, and forward+backward), then every forward configuration
(``BLOCK_M, BLOCK_N, num_warps, num_stages``) and every backward configuration
(``bwd_BLOCK, bwd_STEP, bwd_num_warps, bwd_num_stages``) of our dense kernel, each timed
alone with ``triton.testing.do_bench`` (median) after a warm-up call that compiles it, and
checked against SDPA's output (a configuration that computes wrong numbers is recorded as
such).  TFLOP/s counts the causal half: forward ``2·B·H·N²·D``, backward ``2.5×`` that.
Rows are written after each configuration, so a cut-off run keeps what it measured;
``--time-budget`` stops starting new ones.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparseflash import flash
from sparseflash._steps import kernel_config

from _rows import max_diff, probe_writer  # tools/_rows.py (the script's own folder is on sys.path)

FWD = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
       for (bm, bn), w, s in itertools.product([(64, 64), (128, 64), (128, 128), (128, 32)], (4, 8), (2, 3, 4))]
BWD = [dict(bwd_BLOCK=b, bwd_STEP=st, bwd_num_warps=w, bwd_num_stages=s)
       for (b, st), w, s in itertools.product([(64, 64), (128, 32), (128, 64), (64, 32), (128, 16)], (4, 8), (1, 2))]


def parse(specs: list[str], like: dict) -> list[dict]:
    """``"128x64x8x3"`` -> the four values of a configuration, keyed as ``like``."""
    return [dict(zip(like, (int(x) for x in spec.split("x")))) for spec in specs]


def bench(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=20, rep=80, return_mode="median")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[16384])
    p.add_argument("--passes", nargs="+", default=["fwd", "bwd"])
    p.add_argument("--fwd", nargs="+", help="forward configurations BMxBNxWARPSxSTAGES instead of the full list")
    p.add_argument("--bwd", nargs="+", help="backward configurations BLOCKxSTEPxWARPSxSTAGES instead of the full list")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--time-budget", type=float, default=540)
    p.add_argument("--out", default="dense_sweep.json")
    args = p.parse_args()
    t0 = time.time()
    dev = torch.device("cuda")
    put = probe_writer(args.out, batch=args.batch, heads=args.heads, dtype="bfloat16", causal=True)

    for D, N in itertools.product(args.head_dims, args.seq_lens):
        B, H = args.batch, args.heads
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
        do = torch.randn_like(q)
        flops_fwd = 2 * B * H * N * N * D
        base = dict(D=D, N=N)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            with sdpa_kernel(backend):
                fwd = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
                both = bench(lambda: torch.autograd.grad(F.scaled_dot_product_attention(qg, kg, vg, is_causal=True),
                                                         (qg, kg, vg), do))
            put({**base, "kind": name, "fwd_ms": fwd, "fwd_bwd_ms": both, "bwd_ms": both - fwd,
                 "fwd_tflops": flops_fwd / fwd * 1e-9, "bwd_tflops": 2.5 * flops_fwd / (both - fwd) * 1e-9})
        sm = D ** -0.5
        default = kernel_config(D, dev, dense=True, seq_len=N, dtype=torch.bfloat16)
        o, lse2 = flash.flash_forward(q, k, v, True, sm, default)
        configs = [("fwd", c) for c in (parse(args.fwd, FWD[0]) if args.fwd else FWD) if "fwd" in args.passes]
        configs += [("bwd", c) for c in (parse(args.bwd, BWD[0]) if args.bwd else BWD) if "bwd" in args.passes]
        for kind, c in configs:
            if time.time() - t0 > args.time_budget:
                put({**base, "kind": kind, **c, "error": "time budget spent: not run"})
                continue
            cfg = {**default, **c}
            row = {**base, "kind": kind, **c}
            try:
                if kind == "fwd":
                    got, _ = flash.flash_forward(q, k, v, True, sm, cfg)
                    row["max_err"] = (got.float() - want.float()).abs().max().item()
                    row["ms"] = bench(lambda: flash.flash_forward(q, k, v, True, sm, cfg))
                    row["tflops"] = flops_fwd / row["ms"] * 1e-9
                else:
                    dq, dk, dv = flash.flash_backward(q, k, v, o, lse2, do, True, sm, cfg)
                    ref = flash.flash_backward(q, k, v, o, lse2, do, True, sm, default)
                    row["max_err"] = max_diff((dq, dk, dv), ref)
                    row["ms"] = bench(lambda: flash.flash_backward(q, k, v, o, lse2, do, True, sm, cfg))
                    row["tflops"] = 2.5 * flops_fwd / row["ms"] * 1e-9
            except Exception as e:  # noqa: BLE001  (out of shared memory, registers: recorded, not fatal)
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            put(row)
        del q, k, v, do, o, lse2
        torch.cuda.empty_cache()
    print(f"done in {time.time() - t0:.0f} s: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
