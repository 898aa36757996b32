"""Probe: the dense causal backward as two launches, dK/dV and dQ, each with its own tiles.

    PYTHONPATH=. python tools/dense_bwd_split_probe.py --out $OUT/dense_bwd_split_probe_h100.json

Our backward (:func:`sparseflash.flash.flash_backward`) is one launch: program ``t`` does dK, dV
of key tile ``t``, then dQ of query tile ``t``, so both parts share one tile size, one warp count
and one register budget (the larger part's).  128-key tiles lost in that kernel from register
pressure (dK, dV and dQ accumulators alive in one program).  Here the same kernel runs twice with
``PARTS=1`` (dK/dV only) and ``PARTS=2`` (dQ only, longest tiles first), each part with its own
``BLOCK x STEP x warps x stages``: same seven products, but each part tiled for itself, as in
Triton's fused-attention tutorial (128 keys x 32-query steps for dK/dV, 128 queries x 32-key
steps for dQ).  Each part is timed alone for every configuration, then the best pair as one call
(delta, both launches), beside our backward and SDPA's flash and cuDNN fwd+bwd in the same run
(B=2, H=12, bf16, causal), after a check of every configuration against our backward.
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

from sparseflash._steps import LOG2E, dot_precision, kernel_config, softmax_delta
from sparseflash.flash import _flash_bwd_kernel, flash_backward, flash_forward


def _parse(c: str) -> dict:
    block, step, w, s = (int(x) for x in c.split("x"))
    return dict(block=block, step=step, num_warps=w, num_stages=s)


def part(q, k, v, do, lse2, delta, dq, dk, dv, which: int, c: dict) -> None:
    """One launch of the dense backward doing ``which`` (1: dK/dV, 2: dQ) with config ``c``."""
    B, H, n, D = q.shape
    sm_scale = 1.0 / math.sqrt(D)
    tiles = dict(BLOCK_KV=c["block"], STEP_Q=c["step"], BLOCK_Q=c["block"], STEP_K=c["step"])
    _flash_bwd_kernel[(triton.cdiv(n, c["block"]), B * H)](
        q, k, v, do, lse2, delta, dq, dk, dv, delta, delta,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        H, n, n, sm_scale * LOG2E, sm_scale, 0,
        CAUSAL=True, WINDOWED=False, ACCUMULATE=False, HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
        **tiles, DOT_PRECISION=dot_precision(q.dtype), RECORD=False, GROUP=1, PARTS=which,
        num_warps=c["num_warps"], num_stages=c["num_stages"])


def split_backward(q, k, v, o, lse2, do, c_kv: dict, c_q: dict):
    """The whole backward call as two launches (with the softmax row term, as ours computes it)."""
    delta = softmax_delta(o, do)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    part(q, k, v, do, lse2, delta, dq, dk, dv, 1, c_kv)
    part(q, k, v, do, lse2, delta, dq, dk, dv, 2, c_q)
    return dq, dk, dv


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 8192, 4096])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-configs", nargs="+",
                   default=["64x64x4x2", "64x64x4x4", "64x64x8x2", "128x64x8x2", "128x32x8x1", "128x32x8x2",
                            "64x32x4x1", "128x32x4x1"],
                   help="dK/dV part: keys per program x query step x warps x stages")
    p.add_argument("--q-configs", nargs="+",
                   default=["64x64x4x2", "64x64x4x4", "128x64x8x2", "128x64x8x3", "128x32x8x1", "128x32x8x2",
                            "128x64x4x2", "64x32x4x2"],
                   help="dQ part: queries per program x key step x warps x stages")
    args = p.parse_args(argv)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    meta = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", torch=torch.__version__,
                triton=triton.__version__, argv=sys.argv, batch=args.batch, heads=args.heads, dtype="bfloat16",
                note="ms of one part's launch (kv_part, q_part), of the backward call (ours_bwd, split_best: "
                     "delta and both launches), of our forward (ours_fwd) and of SDPA fwd+bwd (ms_fwd_bwd)")
    rows = []

    def bench(fn):
        if dev == "cpu":
            fn()
            return float("nan")
        return triton.testing.do_bench(fn, warmup=25, rep=100)

    for D, n in itertools.product(args.head_dims, args.seq_lens):
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v, do = (torch.randn(args.batch, args.heads, n, D, device=dev, generator=g, dtype=torch.bfloat16)
                       for _ in range(4))
        scale = 1.0 / math.sqrt(D)
        flops_bwd = 2.5 * 4 * args.batch * args.heads * n * n * D / 2  # FA convention: bwd = 2.5 x fwd
        cfg = kernel_config(D, q.device, None, dense=True, seq_len=n, dtype=q.dtype)
        o, lse2 = flash_forward(q, k, v, True, scale, cfg)
        ours = flash_backward(q, k, v, o, lse2, do, True, scale, cfg)
        delta = softmax_delta(o, do)
        rows.append(dict(variant="ours_fwd", head_dim=D, seq_len=n,
                         ms=bench(lambda: flash_forward(q, k, v, True, scale, cfg))))
        rows.append(dict(variant="ours_bwd", head_dim=D, seq_len=n,
                         ms=bench(lambda: flash_backward(q, k, v, o, lse2, do, True, scale, cfg))))
        rows[-1]["tflops"] = flops_bwd / rows[-1]["ms"] / 1e9
        if dev == "cuda":
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                                  ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                with sdpa_kernel(backend):
                    def fb():
                        sdpa(qg, kg, vg, is_causal=True).backward(do)
                    rows.append(dict(variant=name, head_dim=D, seq_len=n, ms_fwd_bwd=bench(fb)))
        best = {}
        for which, name, configs in ((1, "kv_part", args.kv_configs), (2, "q_part", args.q_configs)):
            for c in configs:
                row = dict(variant=name, config=c, head_dim=D, seq_len=n)
                try:
                    c_ = _parse(c)
                    dq, dk, dv = (torch.zeros_like(t) for t in (q, k, v))
                    part(q, k, v, do, lse2, delta, dq, dk, dv, which, c_)
                    got = (dk, dv) if which == 1 else (dq,)
                    want = ours[1:] if which == 1 else ours[:1]
                    err = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, want))
                    row["max_diff_vs_ours"] = err
                    if not err < 0.05:
                        raise RuntimeError(f"wrong gradients (max difference {err})")
                    row["ms"] = bench(lambda: part(q, k, v, do, lse2, delta, dq, dk, dv, which, c_))
                    if name not in best or row["ms"] < best[name][0]:  # the first, on CPU (NaN times)
                        best[name] = (row["ms"], c)
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                rows.append(row)
        if "kv_part" in best and "q_part" in best:
            c_kv, c_q = _parse(best["kv_part"][1]), _parse(best["q_part"][1])
            got = split_backward(q, k, v, o, lse2, do, c_kv, c_q)
            err = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, ours))
            row = dict(variant="split_best", config=f"{best['kv_part'][1]}+{best['q_part'][1]}", head_dim=D,
                       seq_len=n, max_diff_vs_ours=err,
                       ms=bench(lambda: split_backward(q, k, v, o, lse2, do, c_kv, c_q)))
            row["tflops"] = flops_bwd / row["ms"] / 1e9
            rows.append(row)
        line = {f"{r['variant']}:{r.get('config', '')}": round(r.get("ms", r.get("ms_fwd_bwd", float("nan"))), 4)
                for r in rows if r["head_dim"] == D and r["seq_len"] == n}
        print(f"D={D} N={n}", json.dumps(line), flush=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
