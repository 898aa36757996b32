"""Launch-configuration sweep of the sparse kernels: which tiles, warps and stages make the
bucket-layout kernels (the far part of hash ∪ window) and the window band fastest.

    PYTHONPATH=. python tools/layout_sweep.py --out results/logs/layout_sweep_h200.json

The case is the training step's attention: bf16, head dim 64 (``--head-dims``), 12 heads,
16384 tokens per call (B=2 at 8k, B=1 at 16k), LSH bucket ids of random vectors (16 buckets,
``--n-buckets``) and a window of 128 (``--window``).  For every layout configuration
(``BLOCK_M x BLOCK_N x warps x stages``, the forward's and the backward's launch apart) it
builds the layouts and tile plan once, times the layout forward and backward kernels alone
(``triton.testing.do_bench`` median after a compiling call), counts the tiles they visit and
checks them against the default configuration (max abs difference of o, dq, dk, dv).  Then the
window band's dense-kernel configurations (``--band-fwd``, ``--band-bwd``) the same way.
``us_per_tile`` is kernel time over visited (query tile, key tile) pairs.  Rows are written
after each configuration, so a cut-off run keeps what it measured; ``--time-budget`` stops
starting new ones.  ``--device cpu`` runs a tiny case through the interpreter (a smoke test).
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

from _rows import max_diff, row_writer  # tools/_rows.py (the script's own folder is on sys.path)

# BLOCK_M x BLOCK_N x warps x stages; the backward's warps and stages follow the block shape.
FWD = ["64x64x4x3", "64x64x4x2", "64x64x4x4", "64x64x8x3", "128x64x8x3", "128x64x8x2", "128x64x4x3", "128x64x8x4",
       "64x128x4x3", "64x128x8x3", "128x128x8x3", "128x128x8x2"]
BWD = ["64x64x4x2", "64x64x4x1", "64x64x4x3", "64x64x8x2", "128x64x8x2", "128x64x8x1", "128x64x4x2",
       "64x128x4x2", "64x128x8x2", "64x128x8x1", "128x128x8x1", "128x128x8x2"]
# The band's dense kernel: forward BLOCK_M x BLOCK_N x warps x stages; backward BLOCK x STEP x warps x stages.
BAND_FWD = ["64x64x4x3", "128x64x8x3", "64x32x4x3", "128x32x4x3", "64x64x4x2", "32x64x4x3"]
BAND_BWD = ["64x64x4x4", "64x64x4x2", "64x64x4x3", "128x64x8x2", "64x64x8x2"]


def spec(s: str, keys: tuple[str, ...]) -> dict:
    return dict(zip(keys, (int(x) for x in s.split("x"))))


def bench(fn, cpu: bool) -> float:
    fn()
    if cpu:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=20, rep=80, return_mode="median")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 8192])
    p.add_argument("--tokens", type=int, default=16384, help="tokens per call: batch = tokens // seq_len")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--n-buckets", type=int, default=16)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--fwd", nargs="*", default=FWD)
    p.add_argument("--bwd", nargs="*", default=BWD)
    p.add_argument("--band-fwd", nargs="+", default=BAND_FWD)
    p.add_argument("--band-bwd", nargs="+", default=BAND_BWD)
    p.add_argument("--device", default="cuda")
    p.add_argument("--time-budget", type=float, default=540)
    p.add_argument("--out", default="layout_sweep.json")
    args = p.parse_args()
    t0 = time.time()
    dev = torch.device(args.device)
    cpu = dev.type == "cpu"
    doc = {"meta": {"device": "cpu" if cpu else torch.cuda.get_device_name(), "torch": torch.__version__,
                    "triton": triton.__version__, "argv": sys.argv, "dtype": "bfloat16", "heads": args.heads,
                    "n_buckets": args.n_buckets, "window": args.window, "tokens": args.tokens}, "rows": []}

    put = row_writer(doc, args.out)

    def over_budget(row) -> bool:
        if time.time() - t0 > args.time_budget:
            put({**row, "error": "time budget spent: not run"})
            return True
        return False

    for D in args.head_dims:
        for N in args.seq_lens:
            B, H, W = max(1, args.tokens // N), args.heads, args.window
            torch.manual_seed(0)
            q, k, v, do = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16) for _ in range(4))
            # LSH ids of the queries and keys themselves, one rotation per head (as the model does).
            qb = hashing.lsh_buckets(q, args.n_buckets, seed=0, per_head=True)
            kb = hashing.lsh_buckets(k, args.n_buckets, seed=0, per_head=True)
            sm = D ** -0.5
            budget = bucket_budget(args.n_buckets)
            base = dict(D=D, N=N, B=B, H=H, n_buckets=args.n_buckets, window=W)
            default = kernel_config(D, dev)

            def plan_for(cfg):
                ql, kl = bucket_layouts((B, H, N), q_buckets=qb, k_buckets=kb, n_buckets=budget,
                                        block_m=cfg["BLOCK_M"], block_n=cfg["BLOCK_N"], q_shift=W, overflow=True,
                                        device=dev)
                return LayoutPlan(ql, kl, tile_plan(ql, kl), qb.contiguous(), kb.contiguous())

            plans = {}
            ref_plan = plan_for(default)
            o_ref, lse_ref = layout_forward(q, k, v, ref_plan, sm, default)
            g_ref = layout_backward(q, k, v, o_ref, lse_ref, do, ref_plan, sm, default)
            for kind, specs in (("layout_fwd", args.fwd), ("layout_bwd", args.bwd)):
                for s in specs:
                    c = spec(s, ("BLOCK_M", "BLOCK_N") + (("num_warps", "num_stages") if kind == "layout_fwd"
                                                          else ("bwd_num_warps", "bwd_num_stages")))
                    row = {**base, "kind": kind, "config": s}
                    if over_budget(row):
                        continue
                    try:
                        cfg = kernel_config(D, dev, c)
                        key = (cfg["BLOCK_M"], cfg["BLOCK_N"])
                        if key not in plans:
                            plans[key] = plan_for(cfg)
                        plan = plans[key]
                        row["tiles"] = int(plan.tiles.visited().sum().item())
                        if kind == "layout_fwd":
                            o, lse = layout_forward(q, k, v, plan, sm, cfg)
                            row["max_err"] = max_diff((o,), (o_ref,))
                            row["ms"] = bench(lambda: layout_forward(q, k, v, plan, sm, cfg), cpu)
                        else:
                            o, lse = layout_forward(q, k, v, plan, sm, {**default, "BLOCK_M": key[0], "BLOCK_N": key[1]})
                            g = layout_backward(q, k, v, o, lse, do, plan, sm, cfg)
                            row["max_err"] = max_diff(g, g_ref)
                            row["ms"] = bench(lambda: layout_backward(q, k, v, o, lse, do, plan, sm, cfg), cpu)
                        row["us_per_tile"] = row["ms"] * 1e3 / max(1, row["tiles"])
                    except Exception as e:  # noqa: BLE001  (out of shared memory, registers: recorded, not fatal)
                        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    put(row)
            # The band on the dense kernel, continuing the far part's softmax (as the union does).
            dense_default = kernel_config(D, dev, dense=True, seq_len=N, dtype=torch.bfloat16)
            band_o, band_lse = flash.flash_forward(q, k, v, True, sm, dense_default, window=W,
                                                   init=(o_ref.clone(), lse_ref.clone()))
            delta = softmax_delta(band_o, do)
            band_g = flash.flash_backward(q, k, v, band_o, band_lse, do, True, sm, dense_default, window=W,
                                          delta=delta, accumulate=tuple(g.clone() for g in g_ref))
            for kind, specs in (("band_fwd", args.band_fwd), ("band_bwd", args.band_bwd)):
                for s in specs:
                    keys = (("BLOCK_M", "BLOCK_N", "num_warps", "num_stages") if kind == "band_fwd"
                            else ("bwd_BLOCK", "bwd_STEP", "bwd_num_warps", "bwd_num_stages"))
                    row = {**base, "kind": kind, "config": s}
                    if over_budget(row):
                        continue
                    try:
                        cfg = {**dense_default, **spec(s, keys)}
                        kernel_config(D, dev, cfg, dense=True)  # refuses known-bad combinations
                        if kind == "band_fwd":
                            init = (o_ref.clone(), lse_ref.clone())
                            got, _ = flash.flash_forward(q, k, v, True, sm, cfg, window=W, init=init)
                            row["max_err"] = max_diff((got,), (band_o,))
                            row["ms"] = bench(lambda: flash.flash_forward(q, k, v, True, sm, cfg, window=W,
                                                                          init=init), cpu)
                        else:
                            acc = tuple(g.clone() for g in g_ref)
                            got = flash.flash_backward(q, k, v, band_o, band_lse, do, True, sm, cfg, window=W,
                                                       delta=delta, accumulate=acc)
                            row["max_err"] = max_diff(got, band_g)
                            row["ms"] = bench(lambda: flash.flash_backward(q, k, v, band_o, band_lse, do, True, sm,
                                                                           cfg, window=W, delta=delta,
                                                                           accumulate=acc), cpu)
                    except Exception as e:  # noqa: BLE001
                        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    put(row)
            plans.clear()
            if not cpu:
                torch.cuda.empty_cache()
    print(f"done in {time.time() - t0:.0f} s: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
