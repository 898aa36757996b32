"""Speed of sliding windows and of hash buckets ∪ a window, fwd+bwd end to end, on a GPU.

    PYTHONPATH=. python tools/window_speed.py --out $OUT/window_speed.json

B=2, H=12, bf16, causal; for N in 4096, 8192, 16384 and D in 64, 128: SDPA FlashAttention-2 and
cuDNN, our dense kernel, ``flash_attention(window=256)``, hash16 (``n_buckets=16``) and hash16 ∪ a
window of 256, each call end to end (layout, tile plan, kernels), ``do_bench`` medians, every
variant in the same run; ratios against SDPA FlashAttention-2.  Also the tile counts of the
union's two parts (``TileRecord``) against dense causal, and a float64-free sanity check of the
union against ``flash_attention`` with one bucket and W >= N.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import triton
import triton.testing

import sparseflash as sf
from sparseflash.tiles import TileRecord, dense_causal_tile_count


def sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def fn(q, k, v, **_):
        with sdpa_kernel(b):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return fn


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--window", type=int, default=256)
    args = ap.parse_args(argv)
    B, H, W, nb = 2, 12, args.window, 16
    rows = []
    for D in args.head_dims:
        for N in args.seq_lens:
            q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=i < 3)
                           for i in range(4))
            qb, kb = (torch.randint(0, nb, (B, H, N), device="cuda") for _ in range(2))
            variants = {
                "sdpa_flash": sdpa("flash"),
                "sdpa_cudnn": sdpa("cudnn"),
                "ours_dense": lambda q, k, v: sf.flash_attention(q, k, v),
                f"ours_window_{W}": lambda q, k, v: sf.flash_attention(q, k, v, window=W),
                f"ours_hash_{nb}": lambda q, k, v: sf.hash_sparse_attention(q, k, v, qb, kb, n_buckets=nb),
                f"ours_hash_{nb}_w{W}": lambda q, k, v: sf.hash_sparse_attention(q, k, v, qb, kb, n_buckets=nb,
                                                                                   window=W),
            }
            times = {}
            for name, fn in variants.items():
                for mode in ("fwd", "fwd+bwd"):
                    if mode == "fwd":
                        run = lambda: fn(q, k, v)  # noqa: E731
                    else:
                        def run(fn=fn):
                            fn(q, k, v).backward(do)
                    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                        ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
                    times[(name, mode)] = ms
            # tile counts of the union's parts (forward), per (batch, head), against dense causal
            rec = TileRecord()
            sf.hash_sparse_attention(q, k, v, qb, kb, n_buckets=nb, window=W, tile_record=rec)
            far = rec.fwd.sum((-2, -1)).double().mean().item()
            cfg_w = rec.window_config
            band = rec.window_fwd.sum((-2, -1)).double().mean().item()
            dense_far = dense_causal_tile_count(N, N, rec.config["BLOCK_M"], rec.config["BLOCK_N"])
            dense_band = dense_causal_tile_count(N, N, cfg_w["BLOCK_M"], cfg_w["BLOCK_N"])
            for (name, mode), ms in times.items():
                rows.append(dict(N=N, D=D, variant=name, mode=mode, ms=ms,
                                 speedup_vs_sdpa_flash=times[("sdpa_flash", mode)] / ms,
                                 speedup_vs_sdpa_cudnn=times[("sdpa_cudnn", mode)] / ms))
            rows.append(dict(N=N, D=D, variant=f"tiles_hash_{nb}_w{W}", far_tiles=far, band_tiles=band,
                             far_fraction=far / dense_far, band_fraction=band / dense_band,
                             far_block=[rec.config["BLOCK_M"], rec.config["BLOCK_N"]],
                             band_block=[cfg_w["BLOCK_M"], cfg_w["BLOCK_N"]]))
            print(f"N={N} D={D}: " + "  ".join(
                f"{n}:{m} {times[(n, m)]:.3f}ms ({times[('sdpa_flash', m)] / times[(n, m)]:.2f}x)"
                for n, m in times if m == "fwd+bwd"), flush=True)
            print(f"   union tiles: far {far / dense_far:.3f} of causal, band {band / dense_band:.3f}", flush=True)
            del q, k, v, do
            torch.cuda.empty_cache()
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                argv=sys.argv, B=B, H=H, dtype="bf16", window=W, n_buckets=nb)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
