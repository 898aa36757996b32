"""Shared by the backward probes: one dense causal case and its same-run baselines.

``backward_case(batch, heads, n, D, device, bench)`` draws bf16 ``q, k, v, do`` (seed 0), runs our
dense forward and backward with their launch defaults, and times our forward, our backward call and
SDPA's flash and cuDNN fwd+bwd (on CUDA).  ``probe_meta`` is the probes' file header.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import triton

from sparseflash._steps import kernel_config
from sparseflash.flash import flash_backward, flash_forward


@dataclass
class BackwardCase:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    do: torch.Tensor
    o: torch.Tensor
    lse2: torch.Tensor
    ours: tuple  #: our backward's (dq, dk, dv)
    flops_bwd: float  #: FlashAttention's convention: the backward counts 2.5 forwards
    rows: list  #: ours_fwd, ours_bwd (ms of the call), sdpa_flash and sdpa_cudnn (ms_fwd_bwd)

    @property
    def args(self) -> tuple:
        """``(q, k, v, o, lse2, do)``, the arguments of a backward call."""
        return self.q, self.k, self.v, self.o, self.lse2, self.do


def backward_case(batch: int, heads: int, n: int, D: int, device: str, bench) -> BackwardCase:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (torch.randn(batch, heads, n, D, device=device, generator=g, dtype=torch.bfloat16)
                   for _ in range(4))
    scale = 1.0 / math.sqrt(D)
    flops_bwd = 2.5 * 4 * batch * heads * n * n * D / 2
    cfg = kernel_config(D, q.device, None, dense=True, seq_len=n, dtype=q.dtype)
    o, lse2 = flash_forward(q, k, v, True, scale, cfg)
    ours = flash_backward(q, k, v, o, lse2, do, True, scale, cfg)
    rows = [dict(variant="ours_fwd", head_dim=D, seq_len=n,
                 ms=bench(lambda: flash_forward(q, k, v, True, scale, cfg))),
            dict(variant="ours_bwd", head_dim=D, seq_len=n,
                 ms=bench(lambda: flash_backward(q, k, v, o, lse2, do, True, scale, cfg)))]
    rows[-1]["tflops"] = flops_bwd / rows[-1]["ms"] / 1e9
    if device == "cuda":
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            with sdpa_kernel(backend):
                def fb():
                    sdpa(qg, kg, vg, is_causal=True).backward(do)
                rows.append(dict(variant=name, head_dim=D, seq_len=n, ms_fwd_bwd=bench(fb)))
    return BackwardCase(q, k, v, do, o, lse2, ours, flops_bwd, rows)


def probe_meta(args, device: str, note: str) -> dict:
    """A probe file's ``meta``: the device and versions, the command, the case's shape and ``note``."""
    return dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                triton=triton.__version__, argv=sys.argv, batch=args.batch, heads=args.heads, dtype="bfloat16",
                note=note)
