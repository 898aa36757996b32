"""Host time of eager calls with every Triton launch stubbed out: the Python and PyTorch work around
the launches, on any machine (CPU tensors, the interpreter's launcher replaced by a no-op).

    PYTHONPATH=. python tools/host_stub.py [--reps 100] [ROW ...]     # --profile ROW: cProfile one row

Each row: the minimum (and median) over 15 rounds of ``--reps`` back-to-back calls, per call, in µs,
and the launches a call makes.  Tiny shapes (B=1, H=4, N=512, D=64, bf16), so the CPU work of the
few PyTorch ops that run is small.  Compare two trees ABAB (``PYTHONPATH=old_tree`` against ``.``):
the minimum is the stable number on a noisy machine.  The launches themselves are not in it (see
``tools/launch_cost.py`` on a GPU host).
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

import sparseflash as sf  # noqa: E402

LAUNCHES = [0]


def _stub(self, *args, **kwargs):
    LAUNCHES[0] += 1


def main() -> None:
    B, H, N, D = 1, 4, 512, 64
    torch.manual_seed(0)
    q, k, v, g = (torch.randn(B, H, N, D, dtype=torch.bfloat16) for _ in range(4))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    ids = torch.randint(0, 16, (B, H, N))
    keep = torch.rand(B, H, N) < 0.3

    def fwd_bwd(call):
        def step():
            torch.autograd.grad(call(qg, kg, vg), (qg, kg, vg), g)
        return step

    rows = {
        "dense_fwd": lambda: sf.flash_attention(q, k, v, causal=True),
        "hash_fwd": lambda: sf.hash_sparse_attention(q, k, v, ids, ids),
        "dense_fwd_bwd": fwd_bwd(lambda q, k, v: sf.flash_attention(q, k, v, causal=True)),
        "hash_fwd_bwd": fwd_bwd(lambda q, k, v: sf.hash_sparse_attention(q, k, v, ids, ids)),
        "hash16_fwd_bwd": fwd_bwd(lambda q, k, v: sf.hash_sparse_attention(q, k, v, ids, ids, n_buckets=16)),
        "hash_w128_fwd_bwd": fwd_bwd(lambda q, k, v: sf.hash_sparse_attention(q, k, v, ids, ids, window=128)),
        "qk_fwd_bwd": fwd_bwd(lambda q, k, v: sf.qk_sparse_attention(q, k, v, keep, keep)),
    }
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rows", nargs="*", metavar="ROW", help=f"some of {', '.join(rows)} (default: all)")
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--profile", choices=list(rows))
    args = p.parse_args()
    unknown = sorted(set(args.rows) - set(rows))
    if unknown:
        p.error(f"unknown rows {unknown}; expected some of {list(rows)}")
    interpreter.InterpretedFunction.run = _stub
    for name in args.rows or list(rows):
        fn = rows[name]
        for _ in range(20):
            fn()
        LAUNCHES[0] = 0
        rounds = []
        for _ in range(15):
            start = time.perf_counter()
            for _ in range(args.reps):
                fn()
            rounds.append((time.perf_counter() - start) / args.reps * 1e6)
        rounds.sort()
        print(f"{name:20s} {rounds[0]:8.1f} us  (median {rounds[7]:.1f})  launches/call "
              f"{LAUNCHES[0] / (15 * args.reps):.1f}", flush=True)
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            rows[args.profile]()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
