"""Helpers shared by the kernel tests (imported as ``from helpers import ...``)."""
from __future__ import annotations

import torch


def err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative Frobenius error (absolute max error where ``want`` is all zero); no NaN allowed."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape
    assert not torch.isnan(got).any(), "NaN in kernel result"
    norm = want.norm()
    if norm == 0:
        return (got - want).abs().max().item() if got.numel() else 0.0
    return ((got - want).norm() / norm).item()


def grads(fn, q, k, v, do):
    """Output and (dq, dk, dv) of ``fn`` on fresh leaves, for upstream gradient ``do``."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


# Relative error bounds vs float64 for the sparse kernels.  bfloat16 gradients: measured up
# to ~0.0096 (dq, dk at N=100 keep 0.1; the softmax backward's delta = do·o uses the
# bf16-rounded output and sum_j ds_ij = 0 makes dq, dk partly cancel), so they get 2e-2;
# outputs stay below ~0.005.
TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2}
GRAD_TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2}


def assert_close(got, want, tol, grad_tol=None, what=""):
    """``(out, dq, dk, dv)`` within ``tol`` (output) and ``grad_tol`` (gradients, default ``tol``)."""
    grad_tol = tol if grad_tol is None else grad_tol
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        e = err(a, b)
        bound = tol if name == "out" else grad_tol
        assert e <= bound, f"{what}{name}: error {e:.3g} > {bound:g}"
