"""Per-call cost of the registered ops, eager and compiled (GPU only).

    PYTHONPATH=. python tools/op_overhead.py --out $OUT/op_overhead.json

For the dense, hash (16 buckets) and query/key-dropping (keep 0.3) calls at B=2, H=12,
D=64, bf16, one fwd+bwd per call, four ways of calling:

* ``eager``: the public function, eager (the launch code through a plain
  ``torch.autograd.Function``: eager calls skip the op dispatcher);
* ``op``: the registered ops called explicitly, eager (what a compiled graph runs):
  the difference to ``eager`` is the op dispatcher's cost;
* ``compiled``: ``torch.compile(fullgraph=True)`` (Inductor) around the call;
* ``graphs``: ``torch.compile(mode="reduce-overhead")`` (Inductor + CUDA graphs);
* ``cuda_graph``: the eager fwd+bwd captured once with ``torch.cuda.graph`` and replayed
  (what a training loop that graphs its whole step pays per call).

Per way: *wall* = host clock over 100 back-to-back calls with one final sync, per call
(what a training loop pays when the host is the bottleneck); *busy* = the GPU's kernel
time per call (torch.profiler, sum of kernel durations); and ``do_bench``'s median.
"""
from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch
import triton

import sparseflash as sf
from sparseflash._steps import kernel_config
from sparseflash.flash import _flash_op
from sparseflash.ops import cfg_args
from sparseflash.permuted import _bucket_plan_op, _layout_op


def op_dense(q, k, v):
    """The registered op pair called explicitly (what a compiled graph runs), eagerly."""
    cfg = kernel_config(q.shape[-1], q.device, dense=True, seq_len=q.shape[2], dtype=q.dtype)
    return _flash_op.forward_op(q, k, v, True, q.shape[-1] ** -0.5, cfg_args(cfg))[0]


def op_layout(q, k, v, q_buckets=None, k_buckets=None, q_keep=None, k_keep=None, n_buckets=1):
    cfg = kernel_config(q.shape[-1], q.device)
    B, H, N, _ = q.shape
    plan = _bucket_plan_op(q_buckets, k_buckets, q_keep, k_keep, None, None, B, H, N, k.shape[1], N, n_buckets,
                           cfg["BLOCK_M"], cfg["BLOCK_N"])
    return _layout_op.forward_op(q, k, v, *plan, n_buckets, q.shape[-1] ** -0.5, cfg_args(cfg))[0]


def graphed(fn, q, k, v, g):
    """A whole eager fwd+bwd captured once in a CUDA graph (static q, k, v, g); returns replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(q, k, v).backward(g)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(q, k, v).backward(g)
    return graph.replay


def measure(fn, q, k, v, g, reps=100, replay=None):
    step = replay or (lambda: fn(q, k, v).backward(g))  # noqa: E731
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / reps * 1e3
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    busy = sum(e.device_time for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA) / 10 / 1e3
    med = triton.testing.do_bench(step, warmup=10, rep=50, grad_to_none=None if replay else [q, k, v],
                                  return_mode="median")
    return dict(wall_ms=wall, busy_ms=busy, do_bench_ms=med, wall_over_busy=wall / busy)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--out", default="op_overhead.json")
    args = ap.parse_args()
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, rows=[])
    B, H, D = 2, 12, 64
    for N in args.seq_lens:
        torch.manual_seed(0)
        q, k, v, g = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        qk, kk = torch.rand(B, H, N, device="cuda") < 0.3, torch.rand(B, H, N, device="cuda") < 0.3
        qb, kb = torch.randint(0, 16, (B, H, N), device="cuda"), torch.randint(0, 16, (B, H, N), device="cuda")
        calls = {
            "dense": (lambda q, k, v: sf.flash_attention(q, k, v), op_dense),
            "hash16": (lambda q, k, v: sf.hash_sparse_attention(q, k, v, qb, kb, n_buckets=16),
                       partial(op_layout, q_buckets=qb, k_buckets=kb, n_buckets=16)),
            "qk0.3": (lambda q, k, v: sf.qk_sparse_attention(q, k, v, qk, kk),
                      partial(op_layout, q_keep=qk, k_keep=kk)),
        }
        for name, (public, op) in calls.items():
            torch._dynamo.reset()
            ways = {"eager": public, "op": op, "compiled": torch.compile(public, fullgraph=True),
                    "graphs": torch.compile(public, mode="reduce-overhead", fullgraph=True)}
            ways["cuda_graph"] = public
            for way, fn in ways.items():
                try:
                    row = measure(fn, q, k, v, g, replay=graphed(fn, q, k, v, g) if way == "cuda_graph" else None)
                except Exception as e:  # noqa: BLE001
                    row = dict(error=repr(e)[:300])
                row.update(call=name, way=way, N=N, B=B, H=H, D=D)
                res["rows"].append(row)
                print(json.dumps(row), flush=True)
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
