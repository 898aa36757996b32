"""Shared by the sweep and probe tools: rows written to a JSON file as they are measured, a row's
time, its error text and its check against a reference."""
from __future__ import annotations

import json
import os


def bench_ms(fn, device: str) -> float:
    """``triton.testing.do_bench``'s median in ms on CUDA; on the CPU the call runs once and the
    time is NaN (so a tool can be tried under the interpreter)."""
    if device == "cpu":
        fn()
        return float("nan")
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100)


def max_diff(got, want) -> float:
    """Largest absolute difference over pairs of tensors (a configuration's outputs or gradients
    against the reference ones)."""
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(got, want))


def error_text(e: Exception) -> str:
    """A row's ``error``: the exception's type and the first line of its message."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def row_writer(doc: dict, path: str):
    """``put(row)``: append ``row`` to ``doc["rows"]``, print it, and rewrite ``path`` atomically,
    so a cut-off run keeps every row it measured."""
    def put(row: dict) -> None:
        doc["rows"].append(row)
        print(json.dumps(row), flush=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
    return put


def probe_writer(path: str, **meta):
    """``row_writer`` of a new document whose meta names the GPU, torch, triton and the command line
    (and ``meta``'s own fields)."""
    import sys

    import torch
    import triton

    doc = {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                    "argv": sys.argv, **meta}, "rows": []}
    return row_writer(doc, path)


def time_cases(put, base: dict, cases: dict, flops: float, check=None, no_grad: bool = True) -> None:
    """One row a case (``base`` plus ``variant``): one call, ``check(name, result)``'s fields (its
    differences from a reference), then the call's ``do_bench`` time and TFLOP/s for ``flops``, all
    under ``torch.no_grad()`` unless ``no_grad`` is false.  A case that raises is a row with its
    error, not a stop."""
    import contextlib

    import torch

    for name, fn in cases.items():
        row = dict(base, variant=name)
        try:
            with torch.no_grad() if no_grad else contextlib.nullcontext():
                got = fn()
                if check is not None:
                    row.update(check(name, got))
                row["ms"] = bench_ms(fn, "cuda")
            row["tflops"] = flops / row["ms"] / 1e9
        except Exception as e:  # noqa: BLE001  (a setting that fails is a row, not a stop)
            row["error"] = error_text(e)
        put(row)
