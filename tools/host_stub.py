"""Host time of eager calls with every Triton launch stubbed out: the Python and PyTorch work around
the launches, on any machine (CPU tensors, the interpreter's launcher replaced by a no-op).

    PYTHONPATH=. python tools/host_stub.py [--reps 100] [ROW ...]     # --profile ROW: cProfile one row
    PYTHONPATH=/tmp/t36:. python tools/host_stub.py --launch-path      # with Triton's launch path

``--launch-path`` turns every kernel into a ``JITFunction`` on a faked sm_90 device and runs each
launch through Triton's launch path (``sparseflash.launch``'s direct call, or with ``--no-direct``
Triton's own ``JITFunction.run``: the binder that specialises every argument, the cache key, the
global-value check), stopping before the driver call, so the Python part of a real launch is in the
row too.  Run it with
the Triton the GPU has on ``PYTHONPATH`` (3.6: ``pip install --target /tmp/t36 triton==3.6.0
--no-deps``): the launch path differs between versions.

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
from sparseflash import launch  # noqa: E402

LAUNCHES = [0]


def _stub(self, *args, **kwargs):
    LAUNCHES[0] += 1
    return _FakeKernel()


class _FakeKernel:
    """What ``JITFunction.run`` finds in its cache: a compiled kernel whose launch does nothing."""
    function = packed_metadata = None

    def launch_metadata(self, *args):
        return None

    def run(self, *args):
        LAUNCHES[0] += 1


def _launch_path_stub() -> None:
    """Every sparseflash kernel as a ``JITFunction`` on a faked sm_90 device whose compiled kernel's
    launch does nothing: a call runs Triton's launch path (``JITFunction.run``, or the direct launch
    of ``sparseflash.launch``) up to the driver call."""
    import sys

    import triton.runtime.jit as jit
    from triton.backends.compiler import GPUTarget

    class Active:  # the driver's few calls before a launch, for one sm_90 device
        get_current_device = staticmethod(lambda: 0)
        get_current_stream = staticmethod(lambda device: 0)
        get_current_target = staticmethod(lambda: GPUTarget("cuda", 90, 32))

    jit.driver = type("Driver", (), {"active": Active()})()

    def fake_compile(jf):
        def compile(key, *args, **kwargs):
            kernel = jf.device_caches[0][0][key] = _FakeKernel()
            return kernel
        return compile

    for name, module in list(sys.modules.items()):
        if not name.startswith("sparseflash"):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, interpreter.InterpretedFunction):
                jf = jit.JITFunction(value.fn, **value.kwargs)
                jf._do_compile = fake_compile(jf)
                setattr(module, attr, jf)


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
    p.add_argument("--launch-path", action="store_true",
                   help="run each launch through Triton's launch path (faked sm_90 device, no driver call)")
    p.add_argument("--no-direct", action="store_true",
                   help="with --launch-path: every launch through JITFunction.run (sparseflash.launch off)")
    args = p.parse_args()
    unknown = sorted(set(args.rows) - set(rows))
    if unknown:
        p.error(f"unknown rows {unknown}; expected some of {list(rows)}")
    if args.launch_path:
        _launch_path_stub()
        launch.ENABLED = not args.no_direct
    else:
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
