"""FlashAttention-3's forward schedule in Gluon (``sparseflash/hopper.py``): does it bring the causal
forward to cuDNN's speed?  (CUDA, sm_90 only; the FlashAttention-2-order Gluon kernel it is compared
with is ``gluon_fwd_probe.py``'s.)

    PYTHONPATH=. python tools/gluon_fa3_probe.py [--out gluon_fa3_probe.json]
    PYTHONPATH=. python tools/gluon_fa3_probe.py --compile-only      # any machine: sm_90 compiles

Times :func:`sparseflash.hopper.hopper_forward` at several launch settings (keys per tile, ring
depth, ping-pong between the two consumer warpgroups) at B=2, H=12, bf16, N 4k/8k/16k, D 64/128,
beside SDPA cuDNN / flash, our Triton kernel and the best FlashAttention-2-order Gluon kernel, each
with ``max_diff`` from cuDNN's output (and ``lse_diff`` from the Triton kernel's log-sum-exp).
"""
from __future__ import annotations

import argparse
import sys

import torch

from gluon_fwd_probe import gluon_attention
from sparseflash import hopper

#: (BLOCK_N, STAGES, WARPGROUPS, PINGPONG) timed at each head dim (shared memory: with 128-key tiles,
#: two consumers and three stages D=128 takes 224 KB, at the 227 KB limit; three consumers with
#: 128-key tiles spill registers at 160 a thread, so they take 64-key tiles).
SETTINGS = {64: [(128, 3, 2, True), (64, 4, 3, True), (64, 6, 3, True), (64, 4, 3, False)],
            128: [(128, 3, 2, True), (128, 3, 2, False), (64, 4, 3, True), (64, 3, 3, True)]}


def _compile_only() -> int:
    """sm_90 compiles of every setting, causal, bf16, 4-D descriptors (no GPU needed: Triton ships ptxas)."""
    from _sm90 import compile_sm90, print_compile  # tools/_sm90.py

    for D in (64, 128):
        for block_n, stages, warpgroups, pingpong in SETTINGS[D]:
            q = torch.empty(1, 2, 256, D, dtype=torch.bfloat16)
            args = dict(zip(("q_desc", "k_desc", "v_desc"), hopper.descriptors(q, q, q, block_n)), O="*bf16",
                        LSE="*fp32", H="i32", n_q="i32", n_k="i32", qk_scale="fp32", so_b="i32", so_h="i32",
                        so_n="i32")
            const = dict(GROUP=1, HEAD_DIM=D, BLOCK_N=block_n, STAGES=stages, WARPGROUPS=warpgroups, CAUSAL=True,
                         PINGPONG=pingpong)
            print_compile(f"D={D} BLOCK_N={block_n} stages={stages} warpgroups={warpgroups} pingpong={pingpong}",
                          lambda: compile_sm90(hopper._hopper_fwd_kernel, args, const, 4, aligned=("O",)))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gluon_fa3_probe.json")
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384])
    args = p.parse_args()
    if args.compile_only:
        return _compile_only()
    from _rows import probe_writer, time_cases  # tools/_rows.py

    import sparseflash as sf
    from sparseflash._steps import kernel_config
    from sparseflash.flash import flash_forward
    from torch.nn.attention import SDPBackend, sdpa_kernel

    triton_only = {"hopper": 0}     # kernel_options that keep the Triton forward at every length
    put = probe_writer(args.out)
    for D in (64, 128):
        for N in args.seq_lens:
            torch.manual_seed(0)
            q, k, v = (torch.randn(2, 12, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            flops = 2 * 2 * 12 * N * N * D   # causal: half of 4·N²·D per head
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            lse_want = flash_forward(q, k, v, True, D ** -0.5, kernel_config(D, q.device, triton_only, dense=True,
                                                                            seq_len=N, dtype=q.dtype))[1]

            def sdpa(backend):
                def run():
                    with sdpa_kernel([backend]):
                        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                return run
            cases = {"sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
                     "ours_triton": lambda: sf.flash_attention(q, k, v, causal=True, kernel_options=triton_only),
                     "ours_dense": lambda: sf.flash_attention(q, k, v, causal=True),   # the package's choice
                     "gluon_fa2_n128_s2": lambda: gluon_attention(q, k, v, block_n=128, stages=2)}
            for block_n, stages, warpgroups, pingpong in SETTINGS[D]:
                cfg = dict(BLOCK_N=block_n, STAGES=stages, WARPGROUPS=warpgroups, PINGPONG=pingpong)
                cases[f"fa3_n{block_n}_s{stages}_wg{warpgroups}{'_pingpong' if pingpong else ''}"] = (
                    lambda cfg=cfg: hopper.hopper_forward(q, k, v, True, D ** -0.5, cfg))
            def check(name, got):
                diffs = {}
                if isinstance(got, tuple):     # (o, lse2) from the package's kernels
                    diffs["lse_diff"] = (got[1] - lse_want).abs().max().item()
                    got = got[0]
                diffs["max_diff"] = (got.float() - want.float()).abs().max().item()
                return diffs
            time_cases(put, {"D": D, "N": N}, cases, flops, check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
