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
