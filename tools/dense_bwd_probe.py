"""Probe: a dense causal backward with five products per tile pair (dQ by atomics) against ours (seven).

    PYTHONPATH=. python tools/dense_bwd_probe.py --out $OUT/dense_bwd_probe_h200.json

Our backward (:func:`sparseflash.flash.flash_backward`) recomputes each tile pair twice: once in
the dK/dV part (``s = q kᵀ``, ``dp = do vᵀ``, ``dv += pᵀ do``, ``dk += dsᵀ q``) and once in the
dQ part (``s``, ``dp``, ``dq += ds k``): seven products.  Here one program per key tile does
the first four and adds ``ds k`` straight into a float32 dQ buffer with ``tl.atomic_add``
(FlashAttention-2's CUDA backward does the same), then one cast gives dQ in the input dtype:
five products, no recomputation, at the price of float32 atomics and a non-deterministic
summation order.  Timed with ``triton.testing.do_bench`` (everything a backward call does:
delta, zeroing the buffer, the kernel, the cast) beside our backward and SDPA's flash and cuDNN
fwd+bwd in the same run (B=2, H=12, bf16, causal), after a check against our backward.
A measurement tool, not a kernel of the package.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys

import torch
import triton
import triton.language as tl

from _backward_case import backward_case, probe_meta  # tools/_backward_case.py (the script's own folder is on sys.path)
from _rows import bench_ms, error_text, max_diff
from sparseflash._steps import LOG2E, attention_grads_step, dot_precision, load_tile, mma, softmax_delta, store_tile


@triton.jit
def _step(dk, dv, k, keys, v, q_tile, Q, DO, LSE, DELTA, DQ, n, qk_scale, sm_scale, MASKED: tl.constexpr,
          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    rows = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    q = load_tile(Q, rows, cols, HEAD_DIM, n, HEAD_DIM, HEAD_DIM)
    do = load_tile(DO, rows, cols, HEAD_DIM, n, HEAD_DIM, HEAD_DIM)
    lse2 = tl.load(LSE + rows, mask=rows < n, other=float("inf"))
    delta = tl.load(DELTA + rows, mask=rows < n, other=0.0)
    p, ds = attention_grads_step(q, k, v, do, lse2, delta, keys[None, :] <= rows[:, None], qk_scale, MASKED,
                                 DOT_PRECISION)
    dv += mma(tl.trans(p).to(do.dtype), do, DOT_PRECISION)
    dsc = ds.to(q.dtype)
    dk += mma(tl.trans(dsc), q, DOT_PRECISION)
    dq = mma(dsc, k, DOT_PRECISION) * sm_scale
    tl.atomic_add(DQ + rows[:, None] * HEAD_DIM + cols[None, :], dq, mask=rows[:, None] < n, sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_atomic_kernel(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, n, qk_scale, sm_scale, HEAD_DIM: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program ``(t, b·H + h)``: dK, dV of key tile ``t`` and its share of dQ.  Key tile 0 walks
    every query tile, so tiles start in order: the longest loops first."""
    k_tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    off = bh * n * HEAD_DIM  # every tensor contiguous (B, H, n, D)
    Q += off
    K += off
    V += off
    DO += off
    DQ += off
    DK += off
    DV += off
    LSE += bh * n
    DELTA += bh * n
    keys = k_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, HEAD_DIM)
    k = load_tile(K, keys, cols, HEAD_DIM, n, HEAD_DIM, HEAD_DIM)
    v = load_tile(V, keys, cols, HEAD_DIM, n, HEAD_DIM, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    k_lo = k_tile * BLOCK_N
    k_last = tl.minimum(k_lo + BLOCK_N, n) - 1
    n_q_tiles = tl.cdiv(n, BLOCK_M)
    first = k_lo // BLOCK_M
    first_full = tl.minimum(tl.cdiv(k_last, BLOCK_M), n_q_tiles)
    for q_tile in range(first, first_full):
        dk, dv = _step(dk, dv, k, keys, v, q_tile, Q, DO, LSE, DELTA, DQ, n, qk_scale, sm_scale, True, HEAD_DIM,
                       BLOCK_M, DOT_PRECISION)
    for q_tile in range(first_full, n_q_tiles):
        dk, dv = _step(dk, dv, k, keys, v, q_tile, Q, DO, LSE, DELTA, DQ, n, qk_scale, sm_scale, False, HEAD_DIM,
                       BLOCK_M, DOT_PRECISION)
    store_tile(DK, dk * sm_scale, keys, cols, HEAD_DIM, n, HEAD_DIM, HEAD_DIM)
    store_tile(DV, dv, keys, cols, HEAD_DIM, n, HEAD_DIM, HEAD_DIM)


def bwd_atomic(q, k, v, o, lse2, do, cfg):
    B, H, n, D = q.shape
    sm_scale = 1.0 / math.sqrt(D)
    delta = softmax_delta(o, do)
    dq32 = torch.zeros((B, H, n, D), device=q.device, dtype=torch.float32)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    _bwd_atomic_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), B * H)](
        q, k, v, do, lse2, delta, dq32, dk, dv, n, sm_scale * LOG2E, sm_scale, HEAD_DIM=D,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"], DOT_PRECISION=dot_precision(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dq32.to(q.dtype), dk, dv


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--configs", nargs="+", default=["64x64x4x2", "64x64x4x3", "128x64x8x2", "128x32x4x2",
                                                    "128x32x8x2", "64x32x4x2"],
                   help="keys per program (BLOCK_N) x query step (BLOCK_M) x warps x stages")
    args = p.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    meta = probe_meta(args, dev, "ms of the backward call alone for ours and the probe; fwd+bwd for SDPA rows "
                                 "(ms_fwd_bwd); ours_fwd is our forward, so ours_fwd + a backward compares with "
                                 "SDPA's")
    rows = []

    def bench(fn):
        return bench_ms(fn, dev)

    for D, n in itertools.product(args.head_dims, args.seq_lens):
        case = backward_case(args.batch, args.heads, n, D, dev, bench)
        rows += case.rows
        for c in args.configs:
            bn, bm, w, s = (int(x) for x in c.split("x"))
            c_ = dict(BLOCK_N=bn, BLOCK_M=bm, num_warps=w, num_stages=s)
            row = dict(variant="atomic_dq", config=c, head_dim=D, seq_len=n)
            try:
                got = bwd_atomic(*case.args, c_)
                err = max_diff(got, case.ours)
                row["max_diff_vs_ours"] = err
                if not err < 0.1:
                    raise RuntimeError(f"wrong gradients (max difference {err})")
                row["ms"] = bench(lambda: bwd_atomic(*case.args, c_))
                row["tflops"] = case.flops_bwd / row["ms"] / 1e9
            except Exception as e:
                row["error"] = error_text(e)
            rows.append(row)
        line = {r.get("config", r["variant"]): round(r.get("ms", r.get("ms_fwd_bwd", float("nan"))), 4)
                for r in rows if r["head_dim"] == D and r["seq_len"] == n}
        print(f"D={D} N={n}", json.dumps(line), flush=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
