"""Compile a Triton kernel for sm_90 on any machine, as a launch would: the helper of the IR readers.

``compile_sm90(kernel, types, const, divisible, warps, stages)`` gives Triton's compiled kernel
(``.asm["ttgir"]``, ``["ptx"]``, ``.metadata.shared``) for an H100/H200 without a GPU (Triton
ships ``ptxas``).  A real launch tells the compiler which pointers are 16-byte aligned and which
integers are divisible by 16; without that, loads are not known to be aligned and the software
pipeliner makes no asynchronous copies at all, so every pointer and each name in ``divisible``
is marked so.  Import it after setting ``TRITON_INTERPRET=0`` (as the readers do).
"""
from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_sm90(kernel, types: dict, const: dict, divisible, warps: int, stages: int):
    """``types``: argument name -> Triton type (``"*bf16"``, ``"fp32"``; other arguments are
    ``i32``); ``const``: the constexpr arguments' values; ``divisible``: integer arguments a launch
    would see divisible by 16."""
    names = kernel.arg_names
    sig = {n: types.get(n, "i32") for n in names}
    sig.update({k: "constexpr" for k in const})
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if sig[n].startswith("*") or n in divisible}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
