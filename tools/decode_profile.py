"""Where one decode call's time goes (GPU only): each kernel's GPU time against the replayed graph.

    PYTHONPATH=. python tools/decode_profile.py --out $OUT/decode_profile.json

For each (context, batch) the layer rows of ``python -m sparseflash.bench.decode`` (random bf16
cache, H=8, D=64, hash 16 ∪ w256 with uniform random buckets) are built; SDPA over the whole cache,
our dense call and our hash ∪ window call are each captured in a CUDA graph and

* ``graph_us``: the replay's ``do_bench`` median (L2 flushed before each replay), as the bench times it;
* ``kernels``: every kernel of ``--reps`` replays under ``torch.profiler``, mean GPU time per call
  (with the L2 flushed before each replay, as above);
* ``busy_us``: the union of those kernels' intervals per call; ``graph_us - busy_us`` is what the
  replay spends outside kernels (launch latency between graph nodes, event timing).

``--scope model``: the same for one decode step of the bench's model rows (6 × 512 GPT, random
weights, ``sparseflash.bench.decode.model_step``), with ``n_kernels``, the kernels a step launches:
a small model's step is bound by its launches more than by their work.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import sys

import torch
import torch.nn.functional as F
import triton.testing

from sparseflash.bench.decode import layer_case, model_step
from sparseflash.bench.timing import cuda_graph_of

sys.path.insert(0, "tools")
from step_profile import busy_us  # noqa: E402


def profile_graph(graph, reps: int) -> tuple[dict, float]:
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(64 << 20, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            flush.zero_()
            graph.replay()
        torch.cuda.synchronize()
    per, intervals, n = collections.defaultdict(float), [], 0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA or getattr(e, "is_user_annotation", False):
            continue
        if "elementwise" in e.name or "fill" in e.name.lower():  # the L2 flush
            continue
        per[e.name[:80]] += e.device_time / reps
        intervals.append((float(e.time_range.start), float(e.time_range.end)))
        n += 1
    busy = busy_us(intervals) / reps
    return dict(per), busy, n / reps


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 65536, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--scope", choices=["layer", "model"], default="layer")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    H, D, nb, W = 8, 64, 16, 256
    rows = []
    for L, B in itertools.product(args.contexts, args.batches):
        q, cache, qb = layer_case(L, B, heads=H, head_dim=D, buckets=nb, device=dev)
        calls = dict(sdpa=lambda: F.scaled_dot_product_attention(q, cache.k, cache.v),
                     dense=lambda: cache.attend(q), hash=lambda: cache.attend(q, window=W, q_buckets=qb))
        if args.scope == "model":
            del cache
            calls = {name: model_step(name, context=L, batch=B, heads=H, kv_heads=H, width=512, layers=6, buckets=nb,
                                      window=W, dtype=torch.bfloat16, device=dev) for name in calls}
        for name, fn in calls.items():
            graph = cuda_graph_of(fn, dev)
            ms = triton.testing.do_bench(graph.replay, warmup=10, rep=40, return_mode="median")
            kernels, busy, n_kernels = profile_graph(graph, args.reps)
            row = dict(scope=args.scope, context=L, batch=B, call=name, graph_us=ms * 1e3, busy_us=busy,
                       n_kernels=n_kernels, kernels=kernels)
            rows.append(row)
            top = sorted(kernels.items(), key=lambda kv: -kv[1])[:6]
            ks = " + ".join(f"{k.split('(')[0][:40]} {v:.1f}" for k, v in top)
            print(f"{args.scope} ctx={L} B={B} {name}: graph {ms * 1e3:.1f} us, busy {busy:.1f} us, "
                  f"{n_kernels:.0f} kernels | {ks}", flush=True)
        calls = cache = None
        torch.cuda.empty_cache()
    json.dump(dict(argv=sys.argv, device=torch.cuda.get_device_name(), rows=rows), open(args.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
