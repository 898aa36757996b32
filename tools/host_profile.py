"""cProfile of one attention call's host side, eager vs the registered ops (GPU).

    PYTHONPATH=. python tools/host_profile.py [--n 4096] [--reps 100]
"""
from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, "tools")
import sparseflash as sf  # noqa: E402
from op_overhead import op_layout  # noqa: E402
from sparse_speed import host_cost  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=4096)
ap.add_argument("--reps", type=int, default=100)
args = ap.parse_args()
B, H, N, D = 2, 12, args.n, 64
q, k, v, g = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
q, k, v = (t.requires_grad_() for t in (q, k, v))
qb, kb = (torch.randint(0, 16, (B, H, N), device="cuda") for _ in range(2))
ways = {"eager": lambda: sf.hash_sparse_attention(q, k, v, qb, kb, n_buckets=16),
        "op": lambda: op_layout(q, k, v, q_buckets=qb, k_buckets=kb, n_buckets=16)}
for name, call in ways.items():
    host_cost(name, call, g, args.reps, rows=25)
