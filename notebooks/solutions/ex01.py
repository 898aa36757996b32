"""Solutions to the exercises of notebook 01 (naive attention).

Each function has the name its checker in ``sparseflash.exercises`` expects, e.g.
``exercises.check_sliding_window_mask(sliding_window_mask)``.
"""
import math

import torch

import sparseflash.reference as ref
from sparseflash import exercises

__all__ = ["sliding_window_mask", "window_pairs", "peak_bytes", "stable_softmax", "float16_exp_overflow",
           "bf16_error"]


def _naive_attention(q, k, v, causal=False):
    # notebook 01's naive_attention
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


# Exercise 1: query i sees keys i - w < j <= i.
def sliding_window_mask(n, w):
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return (j <= i) & (j > i - w)


# Exercise 1b: row i has min(i + 1, w) allowed keys.  For n <= w that is n(n+1)/2 (causal);
# for n > w, w(w+1)/2 for the first w rows and w for each of the other n - w: about n·w,
# linear in n.  A kernel that skips empty tiles computes about N·w / (tile area) tiles: O(N·w).
def window_pairs(n, w):
    if n <= w:
        return n * (n + 1) // 2
    return w * (w + 1) // 2 + (n - w) * w


# Exercise 2: about 2.5 score-sized tensors are alive at the forward's peak (q kᵀ and its
# scaled copy, plus the bool masks); with the backward, P is saved for it and the gradient
# of the scores adds more (about 3.5).
def peak_bytes(n, requires_grad=False):
    q, k, v = (torch.randn(1, 1, n, 64, requires_grad=requires_grad) for _ in range(3))
    if requires_grad:
        return exercises.peak_memory(lambda: _naive_attention(q, k, v, causal=True).sum().backward())
    return exercises.peak_memory(_naive_attention, q, k, v, causal=True)


# Exercise 3: softmax(x) = softmax(x - c) for any c, since e^(x-c) / Σ e^(x-c) = e^x / Σ e^x;
# with c = max(x) every exponent is <= 0, so exp never overflows and the max term is 1.
def stable_softmax(x):
    e = torch.exp(x - x.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


# Exercise 3b: float16's largest finite value is 65504, so exp overflows from ln(65504) ≈ 11.09.
float16_exp_overflow = math.log(torch.finfo(torch.float16).max)


# Exercise 4: the error stays around 1e-2 for all N (bfloat16 keeps 8 bits: relative steps of
# 2^-8 ≈ 4e-3).  Rounding the scores and p to bfloat16 costs the most: an error of ε·|s| in a
# score becomes a relative error of ε·|s| in its probability.
def bf16_error(n):
    q, k, v = (torch.randn(1, 4, n, 64).bfloat16() for _ in range(3))
    out = _naive_attention(q, k, v, causal=True)
    return (out.double() - ref.attention(q, k, v, causal=True)).abs().max().item()
