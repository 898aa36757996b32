"""Compile a Gluon kernel for sm_90 on any machine (Triton ships ptxas; no GPU needed), for the probes'
``--compile-only`` checks: shared memory, warps, wgmma instructions and ptxas's spill report."""
from __future__ import annotations

import subprocess
import tempfile

import triton


def compile_sm90(kernel, args: dict, const: dict, num_warps: int, aligned: tuple[str, ...] = ()):
    """``triton.compile`` of Gluon ``kernel`` for sm_90.  ``args``: every runtime argument by name, a
    tensor descriptor (specialised as the launcher would) or a signature string (``"*bf16"``,
    ``"i32"``, ...); ``const``: the constexpr arguments; ``aligned``: pointers taken 16-byte aligned."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    names = kernel.arg_names
    sig = {nm: a if isinstance(a, str) else native_specialize_impl(BaseBackend, a, False, True, True)[0]
           for nm, a in args.items()}
    sig.update({c: "constexpr" for c in const})
    src = GluonASTSource(kernel, {nm: sig[nm] for nm in names},
                         constexprs={(names.index(c),): v for c, v in const.items()},
                         attrs={(names.index(p),): [["tt.divisibility", 16]] for p in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))


def report(compiled) -> str:
    """One line on a compiled kernel: shared memory, warps, wgmma and their waits, ptxas's spills."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/k.ptx", "w") as f:
            f.write(ptx)
        r = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", f"{d}/k.ptx", "-o", f"{d}/k.cubin"],
                           capture_output=True, text=True)
    spills = "; ".join(ln.split(":", 1)[-1].strip() for ln in r.stderr.splitlines() if "spill" in ln)
    return (f"shared {compiled.metadata.shared} B, warps {compiled.metadata.num_warps}, "
            f"wgmma {ptx.count('wgmma.mma_async')}, wait_group {ptx.count('wgmma.wait_group')}, {spills}")


def print_compile(label: str, build) -> None:
    """Print ``label: report(build())``, or the error that compiling raised (a setting that fails to
    compile is a line, not a stop)."""
    try:
        print(f"{label}: {report(build())}")
    except Exception as e:  # noqa: BLE001
        print(f"{label}: {type(e).__name__}: {str(e)[:3000]}")
