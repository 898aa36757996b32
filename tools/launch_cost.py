"""Host time of each step of an eager sparse call, on the GPU's host (no GPU time in it).

    PYTHONPATH=. python tools/launch_cost.py [--out launch_cost.json] [--reps 300]

Tiny shapes (B=1, H=4, N=512, D=64), so the GPU never holds the host back: each row is the
host clock over ``reps`` back-to-back calls, per call, before one final synchronisation.
Rows: an empty Triton launch (1 and 40 arguments) through ``kernel[grid]`` and through
``sparseflash.launch`` (the package's path; ``SPARSEFLASH_FAST_LAUNCH=0`` makes it Triton's),
``torch.empty``, an empty autograd Function's forward and backward, each piece of
``hash_sparse_attention`` (layouts, plan, forward, delta, backward), the whole eager call, our
dense call and SDPA's; then cProfile's top entries of the eager forward and of forward and
backward, by own time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time

import torch
import triton
import triton.language as tl

import sparseflash as sf
from sparseflash._steps import kernel_config, softmax_delta
from sparseflash import launch as launch_mod
from sparseflash.launch import launch
from sparseflash.layout import bucket_layouts
from sparseflash.permuted import LayoutPlan, layout_backward, layout_forward
from sparseflash.plan import tile_plan


@triton.jit
def _noop(X):
    pass


@triton.jit
def _noop40(X0, X1, X2, X3, X4, X5, X6, X7, X8, X9, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, b0, b1, b2, b3, b4, b5,
            b6, b7, b8, b9, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, C: tl.constexpr):
    pass


class _Empty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, g):
        return torch.empty_like(g)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _tritons_launch_path(fn):
    """``fn`` with ``sparseflash.launch``'s direct call off: every launch through ``kernel[grid]``."""
    def call():
        launch_mod.ENABLED = False
        try:
            fn()
        finally:
            launch_mod.ENABLED = True
    return call


def host_us(fn, reps: int) -> float:
    for _ in range(10):
        fn()
    _sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    host = time.perf_counter() - t
    _sync()
    return host / reps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="launch_cost.json")
    ap.add_argument("--reps", type=int, default=300)
    args = ap.parse_args()
    B, H, N, D = 1, 4, 512, 64
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: a smoke test
    q, k, v, g = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16) for _ in range(4))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    ids = torch.randint(0, 16, (B, H, N), device=dev)
    keep = torch.rand(B, H, N, device=dev) < 0.3
    x = torch.empty(16, device=dev)
    xs = [torch.empty(16, device=dev) for _ in range(10)]
    cfg = kernel_config(D, dev)
    scale = D ** -0.5

    def layouts():
        return bucket_layouts((B, H, N), q_buckets=ids, k_buckets=ids, n_buckets=16, block_m=cfg["BLOCK_M"],
                              block_n=cfg["BLOCK_N"], overflow=True, device=dev)

    ql, kl = layouts()
    plan = LayoutPlan(ql, kl, tile_plan(ql, kl), ids, ids)
    o, lse2 = layout_forward(q, k, v, plan, scale, cfg)

    def fwd_bwd(call):
        def step():
            out = call(qg, kg, vg)
            torch.autograd.grad(out, (qg, kg, vg), g)
        return step

    xa = torch.empty(16, device=dev, requires_grad=True)
    ga = torch.empty(16, device=dev)
    rows = {
        "triton_launch_1_arg": lambda: _noop[(1,)](x),
        "triton_launch_40_args": lambda: _noop40[(1,)](*xs, *range(30), C=1),
        "direct_launch_1_arg": lambda: launch(_noop, (1,), x),
        "direct_launch_40_args": lambda: launch(_noop40, (1,), *xs, *range(30), C=1),
        "torch_empty": lambda: torch.empty((B, H, N, D), device=dev, dtype=torch.bfloat16),
        "autograd_empty_fwd_bwd": lambda: torch.autograd.grad(_Empty.apply(xa), (xa,), ga),
        "bucket_layouts (2 launches)": layouts,
        "tile_plan (1 launch)": lambda: tile_plan(ql, kl),
        "layout_forward": lambda: layout_forward(q, k, v, plan, scale, cfg),
        "softmax_delta": lambda: softmax_delta(o, g),
        "layout_backward": lambda: layout_backward(q, k, v, o, lse2, g, plan, scale, cfg),
        "hash_fwd": lambda: sf.hash_sparse_attention(q, k, v, ids, ids),
        "hash_fwd_n_buckets_16": lambda: sf.hash_sparse_attention(q, k, v, ids, ids, n_buckets=16),
        "qk_fwd_keep_0.3": lambda: sf.qk_sparse_attention(q, k, v, keep, keep),
        "dense_fwd": lambda: sf.flash_attention(q, k, v, causal=True),
        "hash_fwd_bwd": fwd_bwd(lambda q, k, v: sf.hash_sparse_attention(q, k, v, ids, ids)),
        "hash_w128_fwd_bwd": fwd_bwd(lambda q, k, v: sf.hash_sparse_attention(q, k, v, ids, ids, window=128)),
        "dense_fwd_bwd": fwd_bwd(lambda q, k, v: sf.flash_attention(q, k, v, causal=True)),
        "sdpa_fwd_bwd": fwd_bwd(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True)),
    }
    for name in ("hash_fwd", "hash_fwd_bwd", "hash_w128_fwd_bwd", "dense_fwd_bwd"):  # the same, Triton's launch path
        rows[f"{name} (kernel[grid])"] = _tritons_launch_path(rows[name])
    out = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__, "triton": triton.__version__,
           "shape": [B, H, N, D], "reps": args.reps, "host_us": {}}
    for name, fn in rows.items():
        out["host_us"][name] = us = host_us(fn, args.reps)
        print(f"{name:32s} {us:8.1f} us", flush=True)
    for name in ("hash_fwd", "hash_fwd_bwd"):
        step = rows[name]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(100):
            step()
        prof.disable()
        _sync()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        out[f"cprofile_{name}_100_calls"] = text.getvalue()
        print(text.getvalue())
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
