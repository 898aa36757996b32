"""Quick GPU check of the sparse path: correctness, speed against SDPA, and where the time goes.

    PYTHONPATH=. python tools/sparse_speed.py --out $OUT/sparse_speed.json

Prints one table: fwd and fwd+bwd medians (triton.testing.do_bench) of SDPA flash /
cuDNN, our dense kernel and the sparse calls, ratios over SDPA flash, then a profile of
one fwd+bwd call per sparse variant (GPU busy time per kernel, against wall time).
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import sparseflash as sf
from sparseflash import reference as ref


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def check(N=1500, D=64, dtype=torch.bfloat16):
    torch.manual_seed(0)
    B, H = 1, 3
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=dtype) for _ in range(4))
    qk, kk = torch.rand(B, H, N, device="cuda") < 0.3, torch.rand(B, H, N, device="cuda") < 0.3
    qb, kb = torch.randint(0, 16, (B, H, N), device="cuda"), torch.randint(0, 16, (B, H, N), device="cuda")
    cases = {
        "qk0.3": (ref.qk_dropping_mask(qk, kk), lambda q, k, v: sf.qk_sparse_attention(q, k, v, qk, kk)),
        "hash16": (ref.hash_mask(qb, kb), lambda q, k, v: sf.hash_sparse_attention(q, k, v, qb, kb, n_buckets=16)),
    }
    out = {}
    for name, (mask, fn) in cases.items():
        qq, kk_, vv = (t.clone().requires_grad_() for t in (q, k, v))
        o = fn(qq, kk_, vv)
        o.backward(do)
        rq, rk, rv = (t.double().clone().requires_grad_() for t in (q, k, v))
        ro = ref.attention(rq, rk, rv, mask)
        ro.backward(do.double())
        out[name] = dict(out=rel(o, ro), dq=rel(qq.grad, rq.grad), dk=rel(kk_.grad, rk.grad), dv=rel(vv.grad, rv.grad))
        assert all(e < 2e-2 for e in out[name].values()), (name, out[name])
    return out


def bench(fn, q, k, v, g, mode):
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(q, k, v)
    else:
        def step():
            fn(q, k, v).backward(g)
    step()
    torch.cuda.synchronize()
    return triton.testing.do_bench(step, warmup=25, rep=100, grad_to_none=[q, k, v], return_mode="median")


def profile(fn, q, k, v, g, reps=5):
    """Per call: wall time (host clock around un-synchronised calls, then one sync) and
    GPU busy time (sum of kernel durations, torch.profiler), kernel by kernel."""
    for _ in range(3):
        fn(q, k, v).backward(g)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(q, k, v).backward(g)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / reps * 1e3
    from torch.profiler import ProfilerActivity, profile as prof
    with prof(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
        for _ in range(reps):
            fn(q, k, v).backward(g)
        torch.cuda.synchronize()
    kernels = {}
    for e in p.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(e.name, [0, 0.0])
            kernels[e.name][0] += 1
            kernels[e.name][1] += e.device_time / 1e3
    busy = sum(v[1] for v in kernels.values()) / reps
    per = {n: dict(launches=c / reps, ms=t / reps) for n, (c, t) in kernels.items()}
    return dict(wall_ms=wall, busy_ms=busy, kernels=per)


def host_profile(N=1024, reps=50):
    """cProfile of eager fwd+bwd calls at a size where the host is the bottleneck."""
    B, H, D = 2, 12, 64
    q, k, v, g = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    qk, kk = torch.rand(B, H, N, device="cuda") < 0.3, torch.rand(B, H, N, device="cuda") < 0.3
    qb, kb = torch.randint(0, 16, (B, H, N), device="cuda"), torch.randint(0, 16, (B, H, N), device="cuda")
    calls = {"dense": lambda: sf.flash_attention(q, k, v),
             "qk": lambda: sf.qk_sparse_attention(q, k, v, qk, kk),
             "hash": lambda: sf.hash_sparse_attention(q, k, v, qb, kb, n_buckets=16)}
    for name, call in calls.items():
        host_cost(name, call, g, reps)


def host_cost(name, call, g, reps, rows=18):
    """Host time per issued call (fwd, fwd+bwd), then a cProfile of ``reps`` fwd+bwd calls."""
    import cProfile
    import io
    import pstats
    for _ in range(5):
        call().backward(g)
    torch.cuda.synchronize()
    for what, fn in (("fwd", lambda: call()), ("fwd+bwd", lambda: call().backward(g))):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        print(f"host {name} {what}: {(t1 - t0) / reps * 1e3:.3f} ms per call issued "
              f"({(time.perf_counter() - t0) / reps * 1e3:.3f} with the final sync)", flush=True)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(reps):
        call().backward(g)
    torch.cuda.synchronize()
    pr.disable()
    st = io.StringIO()
    pstats.Stats(pr, stream=st).sort_stats("tottime").print_stats(rows)
    print(f"--- cProfile {name}, {reps} fwd+bwd calls ---")
    print("\n".join(line[:160] for line in st.getvalue().splitlines()[4:rows + 14]), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64])
    ap.add_argument("--out", default="sparse_speed.json")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--host-profile", action="store_true")
    args = ap.parse_args()
    if args.host_profile:
        host_profile()
        return
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, rows=[])
    if not args.no_check:
        res["check"] = check()
        print("check", res["check"], flush=True)
    B, H = 2, 12
    for D in args.head_dims:
        for N in args.seq_lens:
            torch.manual_seed(0)
            q, k, v, g = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            qk, kk = torch.rand(B, H, N, device="cuda") < 0.3, torch.rand(B, H, N, device="cuda") < 0.3
            qb, kb = torch.randint(0, 16, (B, H, N), device="cuda"), torch.randint(0, 16, (B, H, N), device="cuda")

            def sdpa(backend):
                def f(q, k, v):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
                return f
            variants = {
                "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
                "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
                "ours_dense": lambda q, k, v: sf.flash_attention(q, k, v, causal=True),
                "ours_qk_0.3": lambda q, k, v: sf.qk_sparse_attention(q, k, v, qk, kk),
                "ours_hash_16": lambda q, k, v: sf.hash_sparse_attention(q, k, v, qb, kb, n_buckets=16),
            }
            times = {}
            for name, fn in variants.items():
                for mode in ("fwd", "fwd+bwd"):
                    try:
                        times[(name, mode)] = bench(fn, q, k, v, g, mode)
                    except Exception as e:  # noqa: BLE001
                        print("FAIL", name, mode, repr(e)[:200], flush=True)
                        times[(name, mode)] = float("nan")
            for name, mode in times:
                row = dict(variant=name, mode=mode, N=N, D=D, B=B, H=H, ms=times[(name, mode)],
                           vs_sdpa_flash=times[("sdpa_flash", mode)] / times[(name, mode)],
                           vs_sdpa_cudnn=times[("sdpa_cudnn", mode)] / times[(name, mode)],
                           vs_ours_dense=times[("ours_dense", mode)] / times[(name, mode)])
                res["rows"].append(row)
            for name in ("ours_dense", "ours_qk_0.3", "ours_hash_16"):
                pr = profile(variants[name], q, k, v, g)
                pr.update(variant=name, N=N, D=D)
                res.setdefault("profiles", []).append(pr)
                top = sorted(pr["kernels"].items(), key=lambda x: -x[1]["ms"])[:6]
                print(f"profile N={N} D={D} {name}: wall {pr['wall_ms']:.3f} ms, GPU busy {pr['busy_ms']:.3f} ms; "
                      + "; ".join(f"{n[:40]} x{d['launches']:.0f} {d['ms']:.3f}" for n, d in top), flush=True)
            # Tile fractions (forward) of the sparse calls, from the kernels' own records.
            from sparseflash.tiles import TileRecord
            for name, call in (("ours_qk_0.3", lambda r: sf.qk_sparse_attention(q[:1, :2], k[:1, :2], v[:1, :2], qk[:1, :2], kk[:1, :2], tile_record=r)),
                               ("ours_hash_16", lambda r: sf.hash_sparse_attention(q[:1, :2], k[:1, :2], v[:1, :2], qb[:1, :2], kb[:1, :2], n_buckets=16, tile_record=r)),
                               ("ours_dense", lambda r: sf.flash_attention(q[:1, :2], k[:1, :2], v[:1, :2], tile_record=r))):
                r = TileRecord()
                with torch.no_grad():
                    call(r)
                res.setdefault("tiles", []).append(dict(variant=name, N=N, D=D, computed=int(r.fwd.sum())))
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
    # Table
    dense_tiles = {(t["N"], t["D"]): t["computed"] for t in res["tiles"] if t["variant"] == "ours_dense"}
    frac = {(t["variant"], t["N"], t["D"]): t["computed"] / dense_tiles[(t["N"], t["D"])] for t in res["tiles"]}
    print(f"{'variant':14} {'mode':8} {'N':>6} {'D':>4} {'ms':>8} {'xSDPAfl':>8} {'xcuDNN':>7} {'xdense':>7} {'tile_eff':>8}")
    for r in res["rows"]:
        f = frac.get((r["variant"], r["N"], r["D"]))
        eff = (r["ms"] and f and r["variant"] != "ours_dense") and \
            (next(x["ms"] for x in res["rows"] if x["variant"] == "ours_dense" and x["mode"] == r["mode"] and x["N"] == r["N"] and x["D"] == r["D"]) * f / r["ms"])
        r["tile_fraction"], r["tile_efficiency"] = f, eff or None
        print(f"{r['variant']:14} {r['mode']:8} {r['N']:6} {r['D']:4} {r['ms']:8.3f} {r['vs_sdpa_flash']:8.2f} "
              f"{r['vs_sdpa_cudnn']:7.2f} {r['vs_ours_dense']:7.2f} {(eff or 0):8.2f}")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
