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
