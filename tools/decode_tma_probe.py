"""Probe: does dense split-KV decoding gain from tensor descriptors (TMA) for its K and V blocks?

    PYTHONPATH=. python tools/decode_tma_probe.py --out $OUT/decode_tma_probe_h200.json

A dense-only copy of :func:`sparseflash.decode._decode_split_kernel` (an int cache length, no
window, no list) whose K and V blocks are fetched by device-side tensor descriptors, merged by
the package's own merge kernel.  Timed as CUDA-graph replays (``do_bench_cudagraph``) beside
``decode_attention`` and SDPA (flash backend) in the same run, after a check against SDPA; bf16,
H=8, D=64, one query per sequence.  A measurement tool, not a kernel of the package.
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

from _rows import error_text  # tools/_rows.py (the script's own folder is on sys.path)
from sparseflash._steps import LOG2E
from sparseflash.decode import _decode_merge_kernel, decode_attention, default_num_splits


@triton.jit
def _decode_tma_kernel(Q, K, V, PM, PL, PACC, sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, H, n_valid, qk_scale,
                       SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    k_desc = tl.make_tensor_descriptor(K + b * sk_b + h * sk_h, shape=[n_valid, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V + b * sv_b + h * sv_h, shape=[n_valid, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    cols = tl.arange(0, HEAD_DIM)
    n_blocks = tl.cdiv(n_valid, BLOCK_N)
    per_split = tl.cdiv(n_blocks, SPLITS)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n_blocks)
    q = tl.load(Q + b * sq_b + h * sq_h + cols).to(tl.float32)
    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)
    l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for block in range(lo, hi):
        offs = block * BLOCK_N + tl.arange(0, BLOCK_N)
        k = k_desc.load([block * BLOCK_N, 0])
        v = v_desc.load([block * BLOCK_N, 0])
        s = tl.sum(k.to(tl.float32) * q[None, :], 1) * qk_scale
        s = tl.where(offs < n_valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift)
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m_i = m_new
    part = bh.to(tl.int64) * SPLITS + split
    tl.store(PM + part, m_i)
    tl.store(PL + part, l_i)
    tl.store(PACC + part * HEAD_DIM + cols, acc)


def decode_tma(q, k, v, n_valid, splits, block_n, warps, stages):
    B, H, _, D = q.shape
    out = torch.empty_like(q)
    pm = torch.empty((B * H, splits), device=q.device, dtype=torch.float32)
    pl = torch.empty_like(pm)
    pacc = torch.empty((B * H, splits, D), device=q.device, dtype=torch.float32)
    _decode_tma_kernel[(B * H, splits)](q, k, v, pm, pl, pacc, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                        v.stride(0), v.stride(1), H, n_valid, LOG2E / math.sqrt(D), SPLITS=splits,
                                        HEAD_DIM=D, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    _decode_merge_kernel[(B * H,)](pm, pl, pacc, out, H, out.stride(0), out.stride(1), SPLITS=splits, HEAD_DIM=D,
                                   BLOCK_D=D, BLOCK_S=triton.next_power_of_2(splits),
                                   num_warps=4 if splits <= 64 else 8)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--contexts", type=int, nargs="+", default=[65536, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--configs", nargs="+", default=["64x128x4x3", "64x128x4x4", "128x128x4x3", "64x256x8x3",
                                                    "32x128x4x3"],
                   help="splits x keys per block x warps x stages")
    args = p.parse_args(argv)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))
    H, D = 8, 64
    meta = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", torch=torch.__version__,
                triton=triton.__version__, argv=sys.argv, heads=H, head_dim=D, dtype="bfloat16")
    rows = []

    def bench(fn):
        if dev == "cpu":
            fn()
            return float("nan")
        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench_cudagraph(fn, rep=100)

    for n, B in itertools.product(args.contexts, args.batches):
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(B, H, 1, D, device=dev, generator=g, dtype=torch.bfloat16)
        k, v = (torch.randn(B, H, n, D, device=dev, generator=g, dtype=torch.bfloat16) for _ in range(2))
        gbytes = 2 * B * H * n * D * 2 / 1e9
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION if dev == "cuda" else SDPBackend.MATH):
            ref = sdpa(q, k, v)
            base = dict(sdpa=bench(lambda: sdpa(q, k, v)))
        base["ours_dense"] = bench(lambda: decode_attention(q, k, v, n))
        for name, ms in base.items():
            rows.append(dict(variant=name, context=n, batch=B, ms=ms, tb_per_s=gbytes / ms))
        if dev == "cuda":
            rows[-1]["splits"] = default_num_splits(n, B * H, q.device)
        for c in args.configs:
            splits, bn, w, s = (int(x) for x in c.split("x"))
            row = dict(variant="tma", config=c, context=n, batch=B)
            try:
                o = decode_tma(q, k, v, n, splits, bn, w, s)
                err = (o.float() - ref.float()).abs().max().item()
                row["max_err"] = err
                if not err < 0.02:
                    raise RuntimeError(f"wrong output (max error {err})")
                row["ms"] = bench(lambda: decode_tma(q, k, v, n, splits, bn, w, s))
                row["tb_per_s"] = gbytes / row["ms"]
            except Exception as e:
                row["error"] = error_text(e)
            rows.append(row)
        line = {r.get("config", r["variant"]): round(r.get("ms", float("nan")) * 1e3, 1) for r in rows
                if r["context"] == n and r["batch"] == B}
        print(f"N={n} B={B} us:", json.dumps(line), flush=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
