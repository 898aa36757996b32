"""A/B of the window band's backward pipeline inside a whole hash ∪ window call (CUDA only).

    PYTHONPATH=. python tools/band_stages_ab.py [--seq-lens 8192] [--head-dim 128] [--window 256]

Alternates ``BAND_PIPELINED_BWD_MAX_D`` between 128 (the band's backward two-stage at every head
dim: the setting before) and 64 (one stage above D=64: the default), ABAB, and prints for each:
the GPU time of every kernel of one fwd+bwd (``torch.profiler``, mean of 5 calls, each after a
256 MB write that flushes the L2 cache, as ``do_bench`` does), then ``do_bench`` of the eager call
and of the same call replayed from a CUDA graph.  The graph time is the GPU's alone; at 8k the
eager call is bound by the host (its time varies run to run by more than the change).
bf16, batch 2, 12 heads, 16 LSH buckets of random vectors.
"""
from __future__ import annotations

import argparse

import torch
import triton
from torch.profiler import ProfilerActivity, profile

import sparseflash._steps as steps
from sparseflash import hash_sparse_attention, hashing
from sparseflash.bench.timing import cuda_graph_of


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192])
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--window", type=int, default=256)
    args = p.parse_args()
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    for max_d in (128, 64, 128, 64):
        steps.BAND_PIPELINED_BWD_MAX_D = max_d
        for N in args.seq_lens:
            torch.manual_seed(0)
            q, k, v = (torch.randn(2, 12, N, args.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            qb = hashing.lsh_buckets(q.detach(), 16, seed=0, per_head=True)
            kb = hashing.lsh_buckets(k.detach(), 16, seed=0, per_head=True)
            do = torch.randn_like(q)

            def f():
                o = hash_sparse_attention(q, k, v, qb, kb, n_buckets=16, window=args.window)
                return torch.autograd.grad(o, (q, k, v), do)

            for _ in range(3):
                f()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    flush.zero_()
                    f()
                torch.cuda.synchronize()
            us = {}
            for e in prof.events():
                if e.device_type.name == "CUDA":
                    us[e.name] = us.get(e.name, 0) + e.device_time / 5
            top = sorted(us.items(), key=lambda x: -x[1])[:8]
            print("M", max_d, "N", N, " ".join(f"{name[:18]}={t:.0f}" for name, t in top), flush=True)
            graph = cuda_graph_of(f, q.device)
            eager = triton.testing.do_bench(f, warmup=10, rep=50)
            replay = triton.testing.do_bench(graph.replay, warmup=10, rep=50)
            print(f"   e2e eager {eager:.3f} graph {replay:.3f}", flush=True)


if __name__ == "__main__":
    main()
