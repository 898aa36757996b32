"""Launch settings of the decode kernel: keys per block, warps, pipeline stages, keys per split, split cap,
descriptor loads (and the read size from which they are used), the evict-first hint, and the fold as
matrix products (``MMA_FOLD``).

    PYTHONPATH=. python tools/decode_sweep.py --out $OUT/decode_sweep.json

For each case (context, batch, dense or hash ∪ window) the inputs are built as
``python -m sparseflash.bench.decode`` builds its layer rows (random bf16 cache, H=8, D=64,
uniform random buckets), every configuration's output is compared with the default's, and
each call is timed as the replay of a captured CUDA graph (``do_bench`` median, L2 flushed
before each replay), SDPA over the whole cache beside it in the same run.  The module's
constants are patched per configuration (what ``decode_attention`` reads at each call).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import torch.nn.functional as F
import triton.testing

import sparseflash.decode as dec
from sparseflash.bench.decode import layer_case
from sparseflash.bench.timing import cuda_graph_of

DEFAULT = dict(block_n=dec.MAX_BLOCK_N, warps=dec.NUM_WARPS, stages=dec.NUM_STAGES, kps=dec.KEYS_PER_SPLIT,
               max_splits=dec.DEFAULT_MAX_SPLITS, tma=dec.TMA, mma=dec.MMA_FOLD, evict=dec.EVICT_FIRST,
               desc_min_blocks=dec.DESC_MIN_BLOCKS)


def configs():
    """Block, warps and stages (with the descriptor loads of dense calls, where a block needs few
    threads to be fetched: 2 warps too), then keys per split, the split cap and descriptors off."""
    out = [dict(DEFAULT, block_n=b, warps=w, stages=s)
           for b, w, s in itertools.product((64, 128, 256), (2, 4, 8), (2, 3, 4))]
    out += [dict(DEFAULT, kps=k) for k in (128, 512, 1024, 2048) if k != DEFAULT["kps"]]
    out += [dict(DEFAULT, max_splits=m) for m in (32, 128, 256) if m != DEFAULT["max_splits"]]
    out += [dict(DEFAULT, kps=128, max_splits=128), dict(DEFAULT, tma=not DEFAULT["tma"]),
            dict(DEFAULT, evict=not DEFAULT["evict"]), dict(DEFAULT, desc_min_blocks=0),
            dict(DEFAULT, desc_min_blocks=1 << 30)]
    # The fold as matrix products, whose loads Triton pipelines (the stages matter there).
    out += [dict(DEFAULT, mma=True, block_n=b, warps=w, stages=st)
            for b, w, st in itertools.product((64, 128), (4, 8), (2, 3, 4))]
    return out


def apply(cfg, D):
    dec.MAX_BLOCK_N = cfg["block_n"]
    dec.KEY_TILE = cfg["block_n"] * max(16, triton.next_power_of_2(D))
    dec.NUM_WARPS, dec.NUM_STAGES, dec.KEYS_PER_SPLIT = cfg["warps"], cfg["stages"], cfg["kps"]
    dec.DEFAULT_MAX_SPLITS, dec.TMA, dec.MMA_FOLD = cfg["max_splits"], cfg["tma"], cfg["mma"]
    dec.EVICT_FIRST, dec.DESC_MIN_BLOCKS = cfg["evict"], cfg["desc_min_blocks"]


def bench(fn, warmup, rep):
    g = cuda_graph_of(fn, torch.device("cuda"))
    return triton.testing.do_bench(g.replay, warmup=warmup, rep=rep, return_mode="median")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 65536, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--buckets", type=int, default=16)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--warmup", type=float, default=10)
    p.add_argument("--rep", type=float, default=40)
    p.add_argument("--kinds", nargs="+", choices=["dense", "hash"], default=["dense", "hash"])
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    H, D, nb, W = args.heads, args.head_dim, args.buckets, args.window
    rows = []
    for L, B in itertools.product(args.contexts, args.batches):
        q, cache, qb = layer_case(L, B, heads=H, head_dim=D, buckets=nb, device=dev)
        sdpa = bench(lambda: F.scaled_dot_product_attention(q, cache.k, cache.v), args.warmup, args.rep)
        rows.append(dict(context=L, batch=B, kind="sdpa", ms=sdpa))
        for kind in args.kinds:
            call = (lambda: cache.attend(q)) if kind == "dense" else (lambda: cache.attend(q, window=W, q_buckets=qb))
            apply(DEFAULT, D)
            want = call().float()
            best = None
            for cfg in configs():
                apply(cfg, D)
                try:
                    err = (call().float() - want).abs().max().item()
                    ms = bench(call, args.warmup, args.rep) if err < 2e-2 else None
                except Exception as e:  # noqa: BLE001 (one config out of resources must not stop the sweep)
                    err, ms = None, None
                    print(f"  {kind} {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
                rows.append(dict(context=L, batch=B, kind=kind, **cfg, ms=ms, max_abs_diff=err, vs_sdpa=sdpa / ms
                                 if ms else None, is_default=cfg == DEFAULT))
                if ms and (best is None or ms < best[0]):
                    best = (ms, cfg)
            apply(DEFAULT, D)
            d = next(r["ms"] for r in rows if r["kind"] == kind and r["context"] == L and r["batch"] == B
                     and r.get("is_default"))
            print(f"ctx={L} B={B} {kind}: sdpa {sdpa * 1e3:.1f} us | default {d * 1e3 if d else float('nan'):.1f} us"
                  f" | best {best[0] * 1e3:.1f} us {best[1]}", flush=True)
        json.dump(dict(argv=sys.argv, device=torch.cuda.get_device_name(), default=DEFAULT, rows=rows),
                  open(args.out, "w"), indent=1)
        del cache
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
