"""Helpers shared by the kernel tests (imported as ``from helpers import ...``)."""
from __future__ import annotations

import math

import torch

from sparseflash import reference as ref


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
# outputs stay below ~0.005.  Where a few rows with two or three keys carry all of dq (tiny
# N, random sparsity), that rounding alone costs up to a few per cent: the kernel tests add
# the measured floor of :func:`rounding_floor` to these bounds.
TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2}
GRAD_TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2}


def rounding_floor(want, out, q, k, v, do, allowed=None, sm_scale=None, causal=False):
    """Errors ``(out, dq, dk, dv)`` against ``want`` that the stored output's rounding alone causes.

    A FlashAttention backward (ours, FA2's, SDPA's) computes ``delta_i = do_i · o_i`` from
    the output ``out`` its forward stored in the input dtype.  Where a row's ``dq`` is a
    near cancellation (``sum_j dS_ij = 0``: a query with two or three keys), that rounding
    alone moves ``dq`` and ``dk`` by several per cent (SDPA's own bfloat16 math shows the
    same).  This is the exact float64 backward fed with ``out``: its errors are the floor
    below which no backward using that stored output can go.  ``want`` is the float64
    reference's ``(out, dq, dk, dv)``; k, v may have fewer heads than q (GQA).
    """
    H, M = q.shape[1], k.shape[-2]
    qd, dod = q.double(), do.double()
    kd, vd = ref.repeat_kv(k.double(), H), ref.repeat_kv(v.double(), H)
    eye = torch.eye(M, dtype=torch.float64, device=q.device).expand(*kd.shape[:2], M, M)
    p = ref.attention(qd, kd, eye, allowed, sm_scale, causal=causal)  # the probabilities
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    ds = p * (dod @ vd.transpose(-1, -2) - (dod * out.double()).sum(-1, keepdim=True))
    group_sum = lambda t: t.unflatten(1, (k.shape[1], -1)).sum(2)  # noqa: E731  (GQA: kv heads)
    dq = ds @ kd * scale
    dk = group_sum(ds.transpose(-1, -2) @ qd * scale)
    dv = group_sum(p.transpose(-1, -2) @ dod)
    return tuple(err(a, b) for a, b in zip((out, dq, dk, dv), want))


def assert_close(got, want, tol, grad_tol=None, what="", floor=None):
    """``(out, dq, dk, dv)`` within ``tol`` (output) and ``grad_tol`` (gradients, default ``tol``).

    ``floor``: the errors :func:`rounding_floor` gives for the kernel's own output, added to
    the gradient bounds, so that a backward is held to ``grad_tol`` beyond what the rounding
    of the output it stored forces (the output itself is held to ``tol``).
    """
    grad_tol = tol if grad_tol is None else grad_tol
    floor = (0.0,) * 4 if floor is None else (0.0, *floor[1:])
    for name, a, b, f in zip(("out", "dq", "dk", "dv"), got, want, floor):
        e = err(a, b)
        bound = tol if name == "out" else grad_tol + f
        why = f" (= tolerance + rounding floor {f:.3g})" if name != "out" and f else ""
        assert e <= bound, f"{what}{name}: error {e:.3g} > {bound:g}{why}"
