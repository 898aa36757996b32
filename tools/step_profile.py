"""Where a training step's time goes (GPU only): wall clock against GPU busy time, and the
attention kernels' share, for experiment configurations and compile modes.

    PYTHONPATH=. python tools/step_profile.py --configs sdpa hash16w128 none --seq-len 8192 \
        --modes default reduce-overhead --out $OUT/step_profile_h200.json

For each (configuration, compile mode): the experiment's speed model (12 layers, 768 wide, 12
heads, ``--tokens`` tokens a step), ``--train-steps`` steps first (hash/qk: trained
patterns; all: compile and CUDA-graph recording), then ``--steps`` steps under
``torch.profiler``.  Per step: *wall* (host clock between synchronisations), *busy* (the
union of the GPU's kernel intervals: time the GPU computes), *idle* = wall − busy (the GPU
waits for the host: launch-bound), and *attention* (the summed time of our kernels, SDPA's
and FlexAttention's: names in ``ATTENTION_KERNELS``).  A step is host-bound when idle is a
large part of wall; attention's share of busy bounds what a faster kernel can win.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from sparseflash.train import data as data_mod
from sparseflash.train.experiment import parse_config, parse_model
from sparseflash.train.loop import Stepper, TrainConfig, build, setup, sync

#: Substrings of the kernel names counted as attention.
ATTENTION_KERNELS = ("_flash_", "_layout_", "_count_kernel", "_place_kernel", "_plan_kernel", "_delta_kernel",
                     "flash_fwd", "flash_bwd", "cudnn", "fmha", "sdpa", "attention")


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals."""
    total, end = 0.0, -float("inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def profile_one(name: str, mode: str, args, data) -> dict:
    model = parse_model(args.model)
    batch = max(1, args.tokens // args.seq_len)
    cfg = TrainConfig(data=args.data, seq_len=args.seq_len, batch_size=batch, device="cuda", compile=mode != "eager",
                      compile_mode="default" if mode == "eager" else mode, max_steps=1000, progress=False,
                      **model, **parse_config(name))
    torch._dynamo.reset()
    d = setup(cfg.device)
    m, opt, wrapped = build(cfg, d)
    stepper = Stepper(m, wrapped, opt, cfg, data, d)
    for i in range(args.train_steps):
        stepper(i, sync_loss=False)
    sync(d.device)
    first = args.train_steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for i in range(first, first + args.steps):
            stepper(i, sync_loss=False)
        sync(d.device)
        wall = (time.perf_counter() - t0) / args.steps * 1e3
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    spans = [(e.time_range.start, e.time_range.end) for e in kernels]
    busy = busy_us(spans) / args.steps / 1e3
    top: dict[str, float] = {}  # ms per step by kernel name: attention kernels
    other: dict[str, float] = {}  # and the rest
    for e in kernels:
        into = top if any(s in e.name for s in ATTENTION_KERNELS) else other
        into[e.name[:60]] = into.get(e.name[:60], 0.0) + (e.time_range.end - e.time_range.start) / args.steps / 1e3
    attn_ms = sum(top.values())
    del m, opt, wrapped, stepper
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return {"name": name, "compile_mode": mode, "seq_len": args.seq_len, "batch": batch, "wall_ms": wall,
            "busy_ms": busy, "idle_ms": wall - busy, "gpu_busy_fraction": busy / wall, "attention_ms": attn_ms,
            "attention_share_of_busy": attn_ms / busy if busy else None, "kernels_per_step": len(kernels) / args.steps,
            "attention_kernels": dict(sorted(top.items(), key=lambda kv: -kv[1])[:8]),
            "other_kernels": dict(sorted(other.items(), key=lambda kv: -kv[1])[:20])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["sdpa", "hash16w128", "none"])
    p.add_argument("--modes", nargs="+", default=["default", "reduce-overhead"],
                   help="eager, or torch.compile modes (default, reduce-overhead, ...)")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--model", default="12x768x12")
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--data", default=data_mod.DEFAULT_CORPUS)
    p.add_argument("--out", default="step_profile.json")
    args = p.parse_args()
    data = data_mod.load(args.data)
    rows = []
    for mode in args.modes:
        for name in args.configs:
            r = profile_one(name, mode, args, data)
            rows.append(r)
            print(f"{name:12s} {mode:16s} wall {r['wall_ms']:7.2f} ms  busy {r['busy_ms']:7.2f}  idle {r['idle_ms']:6.2f}"
                  f"  attention {r['attention_ms']:6.2f}  kernels/step {r['kernels_per_step']:.0f}", flush=True)
            with open(args.out, "w") as f:
                json.dump({"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                    "argv": sys.argv}, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
