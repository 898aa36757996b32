"""The bucket layout's passes two ways, same run: permuted.py's one-tile programs against
layout_sweep.py's sweep (CUDA).

    PYTHONPATH=. python tools/layout_sweep_ab.py [--out layout_sweep_ab.json]
    TRITON_INTERPRET=1 PYTHONPATH=. python tools/layout_sweep_ab.py --smoke     # CPU: one tiny shape

For each shape (bf16, 12 heads; B=2 at N=8192, B=1 at 16384; D 64 / 128; 16 LSH buckets of
random rows; window 0 or 128, the far part of hash ∪ window), times the layout's forward and
backward kernels on one layout and tile plan, each call replayed from a CUDA graph (``do_bench``
median: the GPU's time): the one-tile kernels with the sparse launch defaults, then the sweep at
several pipeline depths and programs per multiprocessor, reading the tile that stays through a
tile's steps every step or once (``layout_sweep.LOAD_ONCE``).  Each sweep's outputs and gradients are
compared with the one-tile kernels' (``max_diff``: the same steps in the same order, so 0 or
rounding).  One JSON row per (shape, pass, variant), printed and written as it is measured.
"""
from __future__ import annotations

import argparse

import torch
import triton
from _rows import graph_ms, max_diff, row_writer  # tools/_rows.py (the script's own folder is on sys.path)

import sparseflash as sf
from sparseflash import layout_sweep
from sparseflash._steps import kernel_config, softmax_delta
from sparseflash.layout import bucket_layouts
from sparseflash.permuted import LayoutPlan, layout_backward, layout_forward
from sparseflash.plan import tile_plan

SHAPES = ((2, 8192, 64, 128), (2, 8192, 64, 0), (1, 16384, 64, 128), (2, 8192, 128, 128), (1, 16384, 128, 0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="layout_sweep_ab.json")
    p.add_argument("--smoke", action="store_true", help="one tiny shape on the CPU (Triton's interpreter)")
    args = p.parse_args()
    device, shapes, H = ("cpu", ((1, 100, 16, 20),), 2) if args.smoke else ("cuda", SHAPES, 12)
    put = row_writer(dict(meta=dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                    torch=torch.__version__, triton=triton.__version__), rows=[]), args.out)
    default = layout_sweep.ENABLED, layout_sweep.PROGRAMS_PER_SM, layout_sweep.LOAD_ONCE
    for B, N, D, W in shapes:
        torch.manual_seed(0)
        q, k, v, do = (torch.randn(B, H, N, D, device=device, dtype=torch.bfloat16) for _ in range(4))
        scale = D ** -0.5
        cfg = kernel_config(D, q.device)
        qb, kb = sf.lsh_buckets(q, 16, seed=0), sf.lsh_buckets(k, 16, seed=0)
        ql, kl = bucket_layouts((B, H, N), q_buckets=qb, k_buckets=kb, n_buckets=16, block_m=cfg["BLOCK_M"],
                                block_n=cfg["BLOCK_N"], n_k=N, k_heads=H, q_shift=W, device=q.device)
        plan = LayoutPlan(ql, kl, tile_plan(ql, kl))
        layout_sweep.ENABLED = False
        o_ref, l_ref = layout_forward(q, k, v, plan, scale, cfg)
        delta = softmax_delta(o_ref, do)
        g_ref = layout_backward(q, k, v, o_ref, l_ref, do, plan, scale, cfg, delta=delta)
        shape = dict(B=B, H=H, N=N, D=D, window=W)
        put(dict(shape, pass_="fwd", variant="one_tile", ms=graph_ms(lambda: layout_forward(q, k, v, plan, scale, cfg)),
                 max_diff=0.0))
        put(dict(shape, pass_="bwd", variant="one_tile", max_diff=0.0,
                 ms=graph_ms(lambda: layout_backward(q, k, v, o_ref, l_ref, do, plan, scale, cfg, delta=delta))))
        layout_sweep.ENABLED = True
        # (load once: at the default pipeline depths only, to bound the compiles)
        for once, fwd_stages, bwd_stages in ((False, (2, 3), (1, 2)), (True, (2,), (2,))):
            layout_sweep.LOAD_ONCE = once
            name = "sweep_once" if once else "sweep"
            for pps in (2, 4, 8):
                layout_sweep.PROGRAMS_PER_SM = pps
                for stages in fwd_stages:
                    c = dict(cfg, num_stages=stages)
                    diff = max_diff(layout_forward(q, k, v, plan, scale, c), (o_ref, l_ref))
                    ms = graph_ms(lambda: layout_forward(q, k, v, plan, scale, c))
                    put(dict(shape, pass_="fwd", variant=f"{name}_pps{pps}_s{stages}", ms=ms, max_diff=diff))
                for stages in bwd_stages:
                    c = dict(cfg, bwd_num_stages=stages)
                    diff = max_diff(layout_backward(q, k, v, o_ref, l_ref, do, plan, scale, c, delta=delta), g_ref)
                    ms = graph_ms(lambda: layout_backward(q, k, v, o_ref, l_ref, do, plan, scale, c, delta=delta))
                    put(dict(shape, pass_="bwd", variant=f"{name}_pps{pps}_s{stages}", ms=ms, max_diff=diff))
        layout_sweep.ENABLED, layout_sweep.PROGRAMS_PER_SM, layout_sweep.LOAD_ONCE = default


if __name__ == "__main__":
    main()
