"""The window band two ways, same run: the dense kernel's windowed loop against band.py's sweep (CUDA).

    PYTHONPATH=. python tools/band_sweep_ab.py [--out band_sweep_ab.json]
    TRITON_INTERPRET=1 PYTHONPATH=. python tools/band_sweep_ab.py --smoke     # CPU: one tiny shape, wall clock

For each shape (bf16, 12 heads; B=2 at N=8192, B=1 at 16384; D 64 / 128; window 128 / 256), times the
band's forward (continuing a partial result, as in hash ∪ window) and its backward (adding to
gradients), each call replayed from a CUDA graph (``do_bench`` median: the GPU's time, no launch
overhead): the dense kernel with the band's launch defaults, then the sweep kernel at several
pipeline depths and programs per multiprocessor, reading the held tiles every step or once
(``band.LOAD_ONCE``).  Each variant's output and gradients are
compared with the dense kernel's (``max_diff``, bf16 rounding is ~1e-2).  One JSON row per
(shape, pass, variant), printed and written as it is measured.
"""
from __future__ import annotations

import argparse

import torch
import triton
from _rows import graph_ms, max_diff, row_writer  # tools/_rows.py (the script's own folder is on sys.path)

from sparseflash import band
from sparseflash._steps import kernel_config, softmax_delta
from sparseflash.flash import flash_backward, flash_forward

SHAPES = ((2, 8192, 64, 128), (1, 16384, 64, 128), (2, 8192, 128, 128), (2, 8192, 64, 256), (2, 8192, 128, 256))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="band_sweep_ab.json")
    p.add_argument("--smoke", action="store_true", help="one tiny shape on the CPU (Triton's interpreter)")
    args = p.parse_args()
    device, shapes, H = ("cpu", ((1, 100, 16, 40),), 2) if args.smoke else ("cuda", SHAPES, 12)
    put = row_writer(dict(meta=dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                    torch=torch.__version__, triton=triton.__version__), rows=[]), args.out)
    default_pps, default_once = band.PROGRAMS_PER_SM, band.LOAD_ONCE
    for B, N, D, W in shapes:
        torch.manual_seed(0)
        q, k, v, do = (torch.randn(B, H, N, D, device=device, dtype=torch.bfloat16) for _ in range(4))
        scale = D ** -0.5
        cfg = kernel_config(D, q.device, dense=True, seq_len=N, dtype=q.dtype, window=W)
        # A partial result to continue (the far part's, here a dense pass over the first half of keys).
        o0, l0 = flash_forward(q, k[:, :, : N // 2], v[:, :, : N // 2], False, scale, kernel_config(D, q.device))
        o_ref, l_ref = o0.clone(), l0.clone()
        flash_forward(q, k, v, True, scale, cfg, window=W, init=(o_ref, l_ref))
        delta = softmax_delta(o_ref, do)
        g_ref = flash_backward(q, k, v, o_ref, l_ref, do, True, scale, cfg, window=W, delta=delta)
        shape = dict(B=B, H=H, N=N, D=D, window=W)

        o, lse = o0.clone(), l0.clone()
        ms = graph_ms(lambda: flash_forward(q, k, v, True, scale, cfg, window=W, init=(o, lse)))
        put(dict(shape, pass_="fwd", variant="dense_kernel", ms=ms, max_diff=0.0))
        grads = tuple(torch.zeros_like(t) for t in (q, k, v))
        ms = graph_ms(lambda: flash_backward(q, k, v, o_ref, l_ref, do, True, scale, cfg, window=W, delta=delta,
                                          accumulate=grads))
        put(dict(shape, pass_="bwd", variant="dense_kernel", ms=ms, max_diff=0.0))

        # (load once: at two pipeline depths only, to bound the compiles)
        for once, fwd_stages, bwd_stages in ((False, (2, 3), (1, 2, 3)), (True, (2,), (1, 2))):
            band.LOAD_ONCE = once
            name = "sweep_once" if once else "sweep"
            for pps in (2, 4, 8):
                band.PROGRAMS_PER_SM = pps
                for stages in fwd_stages:
                    c = dict(cfg, num_stages=stages)
                    o, lse = o0.clone(), l0.clone()
                    band.band_forward(q, k, v, scale, c, window=W, init=(o, lse))
                    diff = max_diff([o], [o_ref])
                    o, lse = o0.clone(), l0.clone()
                    ms = graph_ms(lambda: band.band_forward(q, k, v, scale, c, window=W, init=(o, lse)))
                    put(dict(shape, pass_="fwd", variant=f"{name}_pps{pps}_s{stages}", ms=ms, max_diff=diff))
                for stages in bwd_stages:
                    c = dict(cfg, bwd_num_stages=stages)
                    diff = max_diff(band.band_backward(q, k, v, o_ref, l_ref, do, scale, c, window=W, delta=delta),
                                    g_ref)
                    grads = tuple(torch.zeros_like(t) for t in (q, k, v))
                    ms = graph_ms(lambda: band.band_backward(q, k, v, o_ref, l_ref, do, scale, c, window=W, delta=delta,
                                                          accumulate=grads))
                    put(dict(shape, pass_="bwd", variant=f"{name}_pps{pps}_s{stages}", ms=ms, max_diff=diff))
        band.PROGRAMS_PER_SM, band.LOAD_ONCE = default_pps, default_once

if __name__ == "__main__":
    main()
