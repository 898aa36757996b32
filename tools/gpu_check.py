"""One-call GPU session script: correctness at scale, then timings and a small tuning sweep.

Run on the lent GPU:  PYTHONPATH=. python tools/gpu_check.py [--tune] [--out $OUT]
Where the time of the sparse calls goes (layout, plan, kernels, host): tools/sparse_speed.py.
"""
import argparse, json, math, os, sys, time
import torch
import triton
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import sparseflash as sf
from sparseflash import reference as ref

p = argparse.ArgumentParser()
p.add_argument("--tune", action="store_true")
p.add_argument("--out", default=os.environ.get("OUT", "."))
p.add_argument("--skip-check", action="store_true")
p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
args = p.parse_args()
dev = "cuda"
print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "checks": [], "times": [], "tune": []}


def rel(a, b):
    n = b.norm().item()
    return (a.double() - b).norm().item() / max(n, 1e-30)


def check(name, fn, mask, N, D, dtype, causal=True):
    q, k, v = (torch.randn(1, 2, N, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    o = fn(q, k, v)
    do = torch.randn_like(o)
    o.backward(do)
    r = ref.attention(q, k, v, mask, causal=causal)
    g = torch.autograd.grad(r, (q, k, v), do.double())
    errs = dict(o=rel(o, r), dq=rel(q.grad, g[0]), dk=rel(k.grad, g[1]), dv=rel(v.grad, g[2]))
    nan = any(torch.isnan(t).any().item() for t in (o, q.grad, k.grad, v.grad))
    rec = dict(name=name, N=N, D=D, dtype=str(dtype), nan=nan, **errs)
    results["checks"].append(rec)
    ok = not nan and max(errs.values()) < (2e-2 if dtype != torch.float32 else 2e-3)
    print(("ok  " if ok else "FAIL"), rec, flush=True)


if not args.skip_check:
    for N, D, dtype in [(1000, 64, torch.bfloat16), (2048, 128, torch.bfloat16), (777, 80, torch.float16),
                        (1500, 64, torch.float32)]:
        g = torch.Generator(device=dev).manual_seed(N)
        check("flash_causal", lambda q, k, v: sf.flash_attention(q, k, v), None, N, D, dtype)
        check("flash_full", lambda q, k, v: sf.flash_attention(q, k, v, causal=False), None, N, D, dtype, causal=False)
        qk = sf.random_keep((1, 2, N), 0.3, device=dev); kk = sf.random_keep((1, 2, N), 0.3, device=dev)
        check("qk0.3", lambda q, k, v: sf.qk_sparse_attention(q, k, v, qk, kk), ref.qk_dropping_mask(qk, kk), N, D, dtype, False)
        qb = torch.randint(0, 16, (1, 2, N), device=dev); kb = torch.randint(0, 16, (1, 2, N), device=dev)
        check("hash16", lambda q, k, v: sf.hash_sparse_attention(q, k, v, qb, kb), ref.hash_mask(qb, kb), N, D, dtype, False)


def bench(fn, mode, inputs):
    q, k, v = inputs
    if mode == "fwd":
        with torch.no_grad():
            fn(q, k, v)
            return triton.testing.do_bench(lambda: fn(q, k, v), warmup=25, rep=100, return_mode="median")
    o = fn(q, k, v)
    do = torch.randn_like(o)

    def step():
        o = fn(q, k, v)
        o.backward(do)
    step()
    return triton.testing.do_bench(step, warmup=25, rep=100, grad_to_none=[q, k, v], return_mode="median")


def sdpa(backend):
    def fn(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return fn


B, H = 2, 12
for D in args.dims:
    for N in (4096, 8192, 16384):
        q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        qk = sf.random_keep((B, H, N), 0.3, device=dev); kk = sf.random_keep((B, H, N), 0.3, device=dev)
        qb = torch.randint(0, 16, (B, H, N), device=dev); kb = torch.randint(0, 16, (B, H, N), device=dev)
        variants = {
            "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
            "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
            "ours_dense": lambda q, k, v: sf.flash_attention(q, k, v),
            "ours_qk0.3": lambda q, k, v: sf.qk_sparse_attention(q, k, v, qk, kk),
            "ours_hash16": lambda q, k, v: sf.hash_sparse_attention(q, k, v, qb, kb),
        }
        row = {}
        for mode in ("fwd", "fwd+bwd"):
            for name, fn in variants.items():
                try:
                    ms = bench(fn, mode, (q, k, v))
                except Exception as e:  # noqa
                    print("ERR", name, mode, repr(e)[:300], flush=True)
                    ms = float("nan")
                row[(name, mode)] = ms
                results["times"].append(dict(variant=name, mode=mode, N=N, D=D, ms=ms))
            base = row[("sdpa_flash", mode)]
            print(f"D={D} N={N:6d} {mode:8s} " + " ".join(f"{n}={row[(n, mode)]:.3f}ms({base / row[(n, mode)]:.2f}x)" for n in variants), flush=True)
        del q, k, v

if args.tune:
    for D in (64, 128):
        N = 8192
        q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        for BM, BN, W, S in [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 4, 3), (128, 32, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (32, 64, 4, 3)]:
            opts = dict(BLOCK_M=BM, BLOCK_N=BN, num_warps=W, num_stages=S)
            out = {}
            for mode in ("fwd", "fwd+bwd"):
                try:
                    out[mode] = bench(lambda q, k, v: sf.flash_attention(q, k, v, kernel_options=opts), mode, (q, k, v))
                except Exception as e:  # noqa
                    out[mode] = float("nan"); print("ERR", opts, repr(e)[:200])
            results["tune"].append(dict(D=D, N=N, **opts, **out))
            print("tune", D, opts, {m: round(t, 3) for m, t in out.items()}, flush=True)

json.dump(results, open(os.path.join(args.out, "gpu_check.json"), "w"), indent=1)
