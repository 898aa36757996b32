"""Host time of one Gluon forward call against the Triton one (tiny shapes: the GPU never waits).

    PYTHONPATH=. python tools/hopper_host_cost.py
"""
import time

import torch

from sparseflash import hopper
from sparseflash._steps import kernel_config
from sparseflash.flash import flash_forward


def per_call_us(fn, reps=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps * 1e6)
        torch.cuda.synchronize()
    return best


q = torch.randn(1, 2, 256, 128, device="cuda", dtype=torch.bfloat16)
cfg = kernel_config(128, q.device, dense=True, seq_len=256, dtype=q.dtype)   # 256: below every USE_FROM_SEQ_LEN
print("triton flash_forward", round(per_call_us(lambda: flash_forward(q, q, q, True, 0.1, cfg)), 1), "us")
print("hopper_forward", round(per_call_us(lambda: hopper.hopper_forward(q, q, q, True, 0.1)), 1), "us")
print("descriptors x3", round(per_call_us(lambda: hopper.descriptors(q, q, q, 128)), 1), "us")
print("usable", round(per_call_us(lambda: hopper.usable(q, q, q, force=True)), 1), "us")
print("torch.empty x2", round(per_call_us(lambda: (torch.empty_like(q), torch.empty(1, 2, 256, device="cuda"))), 1), "us")
