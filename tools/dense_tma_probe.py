"""Probe: does the dense causal forward gain from tensor descriptors (TMA) and warp specialisation?

    PYTHONPATH=. python tools/dense_tma_probe.py --out $OUT/dense_tma_probe_h200.json

A copy of :func:`sparseflash.flash._flash_fwd_kernel`'s causal path (no window, no record, no
GQA) whose Q, K, V loads and O store go through device-side tensor descriptors
(``tl.make_tensor_descriptor``: the copy engine fetches whole tiles, out-of-range rows read as
0), and whose key loop may be a ``tl.range(..., warp_specialize=True)``.  It is timed with
``triton.testing.do_bench`` beside our dense forward and SDPA's flash and cuDNN backends in the
same run (B=2, H=12, bf16, causal), after a check against SDPA.  A measurement tool, not a
kernel of the package: what it shows decides whether the package's kernels take descriptors.
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

from _rows import bench_ms, error_text  # tools/_rows.py (the script's own folder is on sys.path)
from sparseflash._steps import LOG2E, finish_softmax, online_softmax_step


@triton.jit
def _fwd_step(acc, m_i, l_i, q, rows, k_tile, k_desc, v_desc, qk_scale, MASKED: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    keys = k_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    k = k_desc.load([k_tile * BLOCK_N, 0])
    v = v_desc.load([k_tile * BLOCK_N, 0])
    allowed = keys[None, :] <= rows[:, None]
    return online_softmax_step(acc, m_i, l_i, q, k, v, allowed, qk_scale, MASKED, DOT_PRECISION)


@triton.jit
def _fwd_tma_kernel(Q, K, V, O, LSE, sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, so_b, so_h, H, n, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, WS: tl.constexpr):
    bh = tl.program_id(0)
    q_tile = tl.num_programs(1) - 1 - tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    # Rows are contiguous (stride HEAD_DIM): one descriptor per (b, h) so a ragged last tile reads 0.
    q_desc = tl.make_tensor_descriptor(Q + b * sq_b + h * sq_h, shape=[n, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(K + b * sk_b + h * sk_h, shape=[n, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V + b * sv_b + h * sv_h, shape=[n, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    o_desc = tl.make_tensor_descriptor(O + b * so_b + h * so_h, shape=[n, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    q_lo = q_tile * BLOCK_M
    rows = q_lo + tl.arange(0, BLOCK_M)
    q = q_desc.load([q_lo, 0])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    i_max = tl.minimum(q_lo + BLOCK_M, n) - 1
    n_visit = i_max // BLOCK_N + 1
    free_hi = tl.minimum(q_lo + 1, n) // BLOCK_N
    for k_tile in tl.range(0, free_hi, warp_specialize=WS):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, rows, k_tile, k_desc, v_desc, qk_scale, False, BLOCK_N,
                                  DOT_PRECISION)
    for k_tile in range(free_hi, n_visit):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, rows, k_tile, k_desc, v_desc, qk_scale, True, BLOCK_N,
                                  DOT_PRECISION)
    out, lse2 = finish_softmax(acc, m_i, l_i)
    o_desc.store([q_lo, 0], out.to(O.dtype.element_ty))
    tl.store(LSE + bh.to(tl.int64) * n + rows, lse2, mask=rows < n)


def fwd_tma(q, k, v, cfg):
    B, H, n, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((B, H, n), device=q.device, dtype=torch.float32)
    grid = (B * H, triton.cdiv(n, cfg["BLOCK_M"]))
    _fwd_tma_kernel[grid](q, k, v, o, lse, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
                          v.stride(1), o.stride(0), o.stride(1), H, n, LOG2E / math.sqrt(D), HEAD_DIM=D,
                          BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                          DOT_PRECISION="upcast" if q.device.type == "cpu" else "ieee", WS=cfg["WS"],
                          num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return o


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--configs", nargs="+", default=[
        "128x64x4x3x0", "128x64x8x3x0", "128x128x8x3x0", "128x64x4x2x1", "128x128x8x2x1", "128x64x8x3x1"],
        help="BLOCK_M x BLOCK_N x warps x stages x warp_specialize")
    args = p.parse_args(argv)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from sparseflash import flash_attention

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))
    rows = []
    meta = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", torch=torch.__version__,
                triton=triton.__version__, argv=sys.argv, batch=args.batch, heads=args.heads, dtype="bfloat16")

    def bench(fn):
        return bench_ms(fn, dev)

    for D, n in itertools.product(args.head_dims, args.seq_lens):
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(args.batch, args.heads, n, D, device=dev, generator=g, dtype=torch.bfloat16)
                   for _ in range(3))
        flops = 4 * args.batch * args.heads * n * n * D / 2
        ref = None
        base = {}
        for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            if dev == "cpu":
                continue
            with sdpa_kernel(backend):
                base[name] = bench(lambda: sdpa(q, k, v, is_causal=True))
                if ref is None:
                    ref = sdpa(q, k, v, is_causal=True)
        base["ours_dense"] = bench(lambda: flash_attention(q, k, v))
        if ref is None:
            ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
        for name, ms in base.items():
            rows.append(dict(variant=name, head_dim=D, seq_len=n, ms=ms, tflops=flops / ms / 1e9))
        for c in args.configs:
            bm, bn, w, s, ws = (int(x) for x in c.split("x"))
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, WS=bool(ws))
            row = dict(variant="tma", config=c, head_dim=D, seq_len=n)
            try:
                o = fwd_tma(q, k, v, cfg)
                err = (o.float() - ref.float()).abs().max().item()
                row["max_err"] = err
                if not err < 0.05:
                    raise RuntimeError(f"wrong output (max error {err})")
                row["ms"] = bench(lambda: fwd_tma(q, k, v, cfg))
                row["tflops"] = flops / row["ms"] / 1e9
            except Exception as e:  # a config that does not compile or run is a row too
                row["error"] = error_text(e)
            rows.append(row)
        line = {r.get("config", r["variant"]): round(r.get("ms", float("nan")), 4) for r in rows
                if r["head_dim"] == D and r["seq_len"] == n}
        print(f"D={D} N={n}", json.dumps(line), flush=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
