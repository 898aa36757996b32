"""Where the fused LSH kernel's time goes: its launch settings, a variant without ``tl.dot``, and
PyTorch's path, on the training step's shape.

    PYTHONPATH=. python tools/lsh_probe.py --out lsh_probe.json

In a compiled GPT-2-small step at 8192 tokens (H100) ``_lsh_kernel`` took 31 µs a call for 25 MB
of bf16 rows, where a memory-bound kernel would take about 8.  Rows, each checked against the
package's ids (``mismatch``: the fraction that differ, near-ties only):

* ``kernel BxW``: the package's kernel with ``BLOCK`` rows a program and ``W`` warps;
* ``rows BxW``: the same ids without ``tl.dot``: one row reduction per projection column, the
  argmax kept as a running maximum (no shared memory for the product's operands);
* ``torch``: the model's path before the kernel (float32 copy, matmul, argmax), eager and compiled;
* ``loop BxIxS``: the package's steps over ``I`` row blocks of ``B`` rows a program, the loads
  pipelined ``S`` deep (``tl.range``), the rotation loaded once: is a program's latency the bound?
* ``tf32 BxW``: the package's kernel with TF32 products (ids may differ at near-ties): is the exact
  float32 product (FMA, operands through shared memory) the bound?
* ``load only BxW``: the rows read and each row's largest entry stored, no projection: the floor of
  this access pattern.

Inputs: ``(2, 12, 8192, 64)`` bf16, contiguous and as the model's strided view of its fused
q/k/v projection (rows ``36·64`` elements apart); 16 buckets, one rotation per head.
``TRITON_INTERPRET=1 ... --device cpu`` runs tiny shapes through the interpreter (a smoke test; times are NaN).
"""
from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl

from sparseflash import _runtime
from sparseflash.hashing import _lsh_kernel, lsh_argmax, lsh_ids, lsh_rotations

from _rows import bench_ms, error_text, row_writer  # tools/_rows.py (the script's own folder is on sys.path)


@triton.jit
def _load_rows(X, bh, H, rows, cols, sx_b, sx_h, sx_n, n, HEAD_DIM: tl.constexpr):
    """Rows ``rows`` of head ``bh`` of ``X`` in float32 (zeros past ``n`` and ``HEAD_DIM``), as the
    package kernel reads them."""
    b = bh // H
    h = bh % H
    return tl.load(X + b * sx_b + h * sx_h + rows[:, None] * sx_n + cols[None, :],
                   mask=(rows[:, None] < n) & (cols[None, :] < HEAD_DIM), other=0.0).to(tl.float32)


@triton.jit
def _lsh_rows_kernel(X, R, OUT, sx_b, sx_h, sx_n, sr_h, H, n,
                     HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
    """The package kernel's ids, each projection a row reduction (no ``tl.dot``)."""
    bh = tl.program_id(1).to(tl.int64)
    h = bh % H
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    x = _load_rows(X, bh, H, rows, cols, sx_b, sx_h, sx_n, n, HEAD_DIM)
    x = x / tl.maximum(tl.max(tl.abs(x), 1), 1e-30)[:, None]
    best_up = tl.full([BLOCK], float("-inf"), tl.float32)
    best_down = tl.full([BLOCK], float("-inf"), tl.float32)
    arg_up = tl.zeros([BLOCK], tl.int32)
    arg_down = tl.zeros([BLOCK], tl.int32)
    for r in tl.static_range(HALF):
        col = tl.load(R + h * sr_h + cols * HALF + r, mask=cols < HEAD_DIM, other=0.0)
        y = tl.sum(x * col[None, :], 1)
        arg_up = tl.where(y > best_up, r, arg_up)        # strict: the first index on a tie
        best_up = tl.maximum(best_up, y)
        arg_down = tl.where(-y > best_down, r, arg_down)
        best_down = tl.maximum(best_down, -y)
    ids = tl.where(best_up >= best_down, arg_up, HALF + arg_down)
    tl.store(OUT + bh * n + rows, ids.to(tl.int64), mask=rows < n)


@triton.jit
def _lsh_loop_kernel(X, R, OUT, sx_b, sx_h, sx_n, sr_h, H, n,
                     HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK: tl.constexpr, ITERS: tl.constexpr, STAGES: tl.constexpr, PRECISION: tl.constexpr):
    """The package kernel's steps over ``ITERS`` row blocks a program, loads pipelined ``STAGES``
    deep, products at ``PRECISION`` (the package's is ``"ieee"``)."""
    bh = tl.program_id(1).to(tl.int64)
    h = bh % H
    cols = tl.arange(0, BLOCK_D)
    r = tl.arange(0, BLOCK_R)
    rot = tl.load(R + h * sr_h + cols[:, None] * HALF + r[None, :],
                  mask=(cols[:, None] < HEAD_DIM) & (r[None, :] < HALF), other=0.0)
    for i in tl.range(0, ITERS, num_stages=STAGES):
        rows = (tl.program_id(0) * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        x = _load_rows(X, bh, H, rows, cols, sx_b, sx_h, sx_n, n, HEAD_DIM)
        x = x / tl.maximum(tl.max(tl.abs(x), 1), 1e-30)[:, None]
        y = tl.dot(x, rot, input_precision=PRECISION)
        tl.store(OUT + bh * n + rows, lsh_argmax(y, r[None, :], HALF, 1).to(tl.int64), mask=rows < n)


@triton.jit
def _load_only_kernel(X, R, OUT, sx_b, sx_h, sx_n, sr_h, H, n,
                      HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
    """Rows in, each row's largest entry's sign out (int64): the same reads and writes, no projection."""
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = _load_rows(X, bh, H, rows, tl.arange(0, BLOCK_D), sx_b, sx_h, sx_n, n, HEAD_DIM)
    tl.store(OUT + bh * n + rows, (tl.max(x, 1) > 0).to(tl.int64), mask=rows < n)


def _launch(kernel, x, rot, block, warps, iters=1, **extra):
    B, H, N, D = x.shape
    half = rot.shape[-1]
    out = torch.empty((B, H, N), dtype=torch.int64, device=x.device)
    kernel[(_runtime.cdiv(N, block * iters), B * H)](
        x, rot, out, x.stride(0), x.stride(1), x.stride(2), D * half, H, N,
        HEAD_DIM=D, HALF=half, BLOCK_D=max(16, _runtime.next_power_of_2(D)), BLOCK=block, num_warps=warps, **extra)
    return out


def _torch_ids(x, rot):
    y = torch.einsum("bhnd,hdr->bhnr", x.float(), rot)
    return torch.cat([y, -y], dim=-1).argmax(dim=-1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="lsh_probe.json")
    args = p.parse_args()
    cpu = args.device == "cpu"
    B, H, N, D, n_buckets = (1, 2, 100, 64, 16) if cpu else (2, 12, 8192, 64, 16)
    doc = {"meta": {"device": "cpu" if cpu else torch.cuda.get_device_name(), "torch": torch.__version__,
                    "triton": triton.__version__, "argv": sys.argv, "shape": [B, H, N, D], "n_buckets": n_buckets},
           "rows": []}
    put = row_writer(doc, args.out)
    torch.manual_seed(0)
    rot = lsh_rotations(D, n_buckets, heads=H, seed=0, device=args.device)
    fused = torch.randn(B, N, 3 * H, D, device=args.device, dtype=torch.bfloat16)
    inputs = {"contiguous": fused[:, :, :H].transpose(1, 2).contiguous(),
              "model_view": fused.transpose(1, 2)[:, :H]}
    settings = [(32, 4), (32, 8)] if cpu else [(32, 2), (32, 4), (64, 4), (128, 4), (128, 8), (256, 8)]
    compiled = None if cpu else torch.compile(_torch_ids)
    for layout, x in inputs.items():
        want = lsh_ids(x, rot)
        mb = x.numel() * x.element_size() / 2**20
        cases = [(f"kernel {b}x{w}", lambda b=b, w=w: _launch(_lsh_kernel, x, rot, b, w, BLOCK_R=16))
                 for b, w in settings]
        cases += [(f"rows {b}x{w}", lambda b=b, w=w: _launch(_lsh_rows_kernel, x, rot, b, w)) for b, w in settings]
        loops = [(32, 2, 2)] if cpu else [(b, i, s) for b in (64, 128) for i in (2, 4, 8) for s in (2, 3)]
        cases += [(f"loop {b}x{i}x{s}", lambda b=b, i=i, s=s: _launch(_lsh_loop_kernel, x, rot, b, 4, iters=i, BLOCK_R=16,
                                                                        ITERS=i, STAGES=s, PRECISION="ieee"))
                  for b, i, s in loops]
        # One row block a program: the package kernel's steps with TF32 products.
        cases += [(f"tf32 {b}x{w}", lambda b=b, w=w: _launch(_lsh_loop_kernel, x, rot, b, w, BLOCK_R=16, ITERS=1,
                                                             STAGES=1, PRECISION="tf32"))
                  for b, w in settings[:4]]
        cases += [(f"load only {b}x{w}", lambda b=b, w=w: _launch(_load_only_kernel, x, rot, b, w))
                  for b, w in settings[:4]]
        cases += [("torch eager", lambda: _torch_ids(x, rot))]
        if compiled is not None:
            cases += [("torch compiled", lambda: compiled(x, rot))]
        for name, fn in cases:
            row = {"input": layout, "variant": name, "MB": round(mb, 1)}
            try:
                got = fn()
                row["mismatch"] = (got != want).float().mean().item()
                row["us"] = bench_ms(fn, args.device) * 1e3
                row["GB_per_s"] = mb / 1024 / (row["us"] * 1e-6)
            except Exception as e:  # noqa: BLE001  (a setting that does not compile is a row, not a stop)
                row["error"] = error_text(e)
            put(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
