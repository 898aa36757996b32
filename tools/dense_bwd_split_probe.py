"""Probe: the dense causal backward as two launches, dK/dV and dQ, each with its own tiles.

    PYTHONPATH=. python tools/dense_bwd_split_probe.py --out $OUT/dense_bwd_split_probe_h100.json

Our backward (:func:`sparseflash.flash.flash_backward`) is one launch: program ``t`` does dK, dV
of key tile ``t``, then dQ of query tile ``t``, so both parts share one tile size, one warp count
and one register budget (the larger part's).  128-key tiles lost in that kernel from register
pressure (dK, dV and dQ accumulators alive in one program).  Here the same kernel runs twice,
``flash_backward(..., parts=1)`` (dK/dV only) and ``parts=2`` (dQ only, longest tiles first), each part with its own
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

from _backward_case import backward_case, probe_meta  # tools/_backward_case.py (the script's own folder is on sys.path)
from _rows import bench_ms, error_text, max_diff
from sparseflash._steps import softmax_delta
from sparseflash.flash import flash_backward


def _parse(c: str) -> dict:
    """``BLOCK x STEP x warps x stages`` as the backward's launch settings (64 x 64 forward tiles,
    which no part reads)."""
    block, step, w, s = (int(x) for x in c.split("x"))
    return dict(BLOCK_M=64, BLOCK_N=64, bwd_BLOCK=block, bwd_STEP=step, bwd_num_warps=w, bwd_num_stages=s)


def part(q, k, v, o, lse2, do, delta, which: int, cfg: dict):
    """One launch of the dense backward doing ``which`` (1: dK/dV, 2: dQ) with ``cfg``; returns
    ``(dq, dk, dv)``, of which only the part's are written."""
    return flash_backward(q, k, v, o, lse2, do, True, 1.0 / math.sqrt(q.shape[-1]), cfg, delta=delta, parts=which)


def split_backward(q, k, v, o, lse2, do, c_kv: dict, c_q: dict):
    """The whole backward call as two launches (with the softmax row term, as ours computes it)."""
    delta = softmax_delta(o, do)
    _, dk, dv = part(q, k, v, o, lse2, do, delta, 1, c_kv)
    dq, _, _ = part(q, k, v, o, lse2, do, delta, 2, c_q)
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
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    meta = probe_meta(args, dev, "ms of one part's launch (kv_part, q_part), of the backward call (ours_bwd, "
                                 "split_best: delta and both launches), of our forward (ours_fwd) and of SDPA "
                                 "fwd+bwd (ms_fwd_bwd)")
    rows = []

    def bench(fn):
        return bench_ms(fn, dev)

    for D, n in itertools.product(args.head_dims, args.seq_lens):
        case = backward_case(args.batch, args.heads, n, D, dev, bench)
        rows += case.rows
        delta = softmax_delta(case.o, case.do)
        best = {}
        for which, name, configs in ((1, "kv_part", args.kv_configs), (2, "q_part", args.q_configs)):
            for c in configs:
                row = dict(variant=name, config=c, head_dim=D, seq_len=n)
                try:
                    c_ = _parse(c)
                    dq, dk, dv = part(*case.args, delta, which, c_)
                    got = (dk, dv) if which == 1 else (dq,)
                    want = case.ours[1:] if which == 1 else case.ours[:1]
                    err = max_diff(got, want)
                    row["max_diff_vs_ours"] = err
                    if not err < 0.05:
                        raise RuntimeError(f"wrong gradients (max difference {err})")
                    row["ms"] = bench(lambda: part(*case.args, delta, which, c_))
                    if name not in best or row["ms"] < best[name][0]:  # the first, on CPU (NaN times)
                        best[name] = (row["ms"], c)
                except Exception as e:
                    row["error"] = error_text(e)
                rows.append(row)
        if "kv_part" in best and "q_part" in best:
            c_kv, c_q = _parse(best["kv_part"][1]), _parse(best["q_part"][1])
            got = split_backward(*case.args, c_kv, c_q)
            err = max_diff(got, case.ours)
            row = dict(variant="split_best", config=f"{best['kv_part'][1]}+{best['q_part'][1]}", head_dim=D,
                       seq_len=n, max_diff_vs_ours=err, ms=bench(lambda: split_backward(*case.args, c_kv, c_q)))
            row["tflops"] = case.flops_bwd / row["ms"] / 1e9
            rows.append(row)
        line = {f"{r['variant']}:{r.get('config', '')}": round(r.get("ms", r.get("ms_fwd_bwd", float("nan"))), 4)
                for r in rows if r["head_dim"] == D and r["seq_len"] == n}
        print(f"D={D} N={n}", json.dumps(line), flush=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
