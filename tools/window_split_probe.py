"""How hash ∪ window is split between its two kernels, timed: the far part with and without the
query shift.

    PYTHONPATH=. python tools/window_split_probe.py --out window_split_probe.json

The union "same bucket, or inside the window" splits exactly into a bucket-layout part and a
band part in two ways:

* ``shift`` (queries placed at position ``i - W``): the layout part takes same-bucket pairs with
  ``i - j >= W``; the band takes every pair with ``i - j < W``.
* ``labels``: the layout part takes every same-bucket causal pair (plain hash attention, the
  unshifted plan); the band takes the pairs with ``i - j < W`` whose ids differ.

This probe times the layout kernels (forward, backward) over both plans, with the visited and
mask-free tile counts, and the band as it runs today, so the cost of the shift can be read
beside what the band would have to pay for an id test.  bf16, 12 heads, 16384 tokens a call, LSH
ids of random vectors (16 buckets, one rotation per head), the training step's shape.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import triton

from sparseflash import flash, hashing
from sparseflash._steps import kernel_config, softmax_delta
from sparseflash.layout import bucket_budget
from sparseflash.permuted import LayoutPlan, bucket_layouts, layout_backward, layout_forward, tile_plan

from _rows import bench_ms, row_writer  # tools/_rows.py (the script's own folder is on sys.path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--windows", type=int, nargs="+", default=[128, 256])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--n-buckets", type=int, default=16)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="window_split_probe.json")
    args = p.parse_args()
    dev = torch.device(args.device)
    cpu = dev.type == "cpu"
    doc = {"meta": {"device": "cpu" if cpu else torch.cuda.get_device_name(), "torch": torch.__version__,
                    "triton": triton.__version__, "argv": sys.argv, "dtype": "bfloat16"}, "rows": []}
    put = row_writer(doc, args.out)
    t0 = time.time()
    for D in args.head_dims:
        for N in args.seq_lens:
            B, H = max(1, args.tokens // N), args.heads
            torch.manual_seed(0)
            q, k, v, do = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16) for _ in range(4))
            qb = hashing.lsh_buckets(q, args.n_buckets, seed=0, per_head=True)
            kb = hashing.lsh_buckets(k, args.n_buckets, seed=0, per_head=True)
            sm, cfg = D ** -0.5, kernel_config(D, dev)
            for W in args.windows:
                for shift in (W, 0):
                    ql, kl = bucket_layouts((B, H, N), q_buckets=qb, k_buckets=kb,
                                            n_buckets=bucket_budget(args.n_buckets), block_m=cfg["BLOCK_M"],
                                            block_n=cfg["BLOCK_N"], q_shift=shift, overflow=True, device=dev)
                    plan = LayoutPlan(ql, kl, tile_plan(ql, kl), qb.contiguous(), kb.contiguous())
                    runs = plan.tiles.q_runs
                    visited = int((runs[..., 2] - runs[..., 0]).sum())
                    free = int((runs[..., 1] - runs[..., 0]).sum())
                    o, lse = layout_forward(q, k, v, plan, sm, cfg)
                    row = dict(D=D, N=N, B=B, H=H, window=W, part="layout", shift=shift, tiles=visited,
                               free_tiles=free,
                               fwd_ms=bench_ms(lambda: layout_forward(q, k, v, plan, sm, cfg), args.device),
                               bwd_ms=bench_ms(lambda: layout_backward(q, k, v, o, lse, do, plan, sm, cfg),
                                               args.device))
                    put(row)
                band_cfg = kernel_config(D, dev, dense=True, seq_len=N, dtype=torch.bfloat16, window=W)
                init = (o.clone(), lse.clone())
                bo, blse = flash.flash_forward(q, k, v, True, sm, band_cfg, window=W, init=init)
                delta = softmax_delta(bo, do)
                acc = tuple(torch.zeros_like(x) for x in (q, k, v))
                put(dict(D=D, N=N, B=B, H=H, window=W, part="band",
                         fwd_ms=bench_ms(lambda: flash.flash_forward(q, k, v, True, sm, band_cfg, window=W,
                                                                     init=init), args.device),
                         bwd_ms=bench_ms(lambda: flash.flash_backward(q, k, v, bo, blse, do, True, sm, band_cfg,
                                                                      window=W, delta=delta, accumulate=acc),
                                         args.device)))
            if not cpu:
                torch.cuda.empty_cache()
    print(f"done in {time.time() - t0:.0f} s: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
