"""Pair density of a model's attention: allowed (query, key) pairs over causal pairs.

For one layer and head, with ``N`` tokens, the density is ``#{(i, j): j <= i, allowed(i, j)} /
(N (N + 1) / 2)``: 1 for dense attention, about ``1 / n_buckets`` for balanced hash buckets (more
when training piles tokens into few buckets), ``W / N`` and a bit for a window of ``W`` keys.
:func:`pair_density` averages it over every attention layer and head of a model on a sample, from
the patterns the layers would use on it: the LSH ids of their own queries and keys (``hash``), the
top-k gate's or random keep sets (``qk``).  It is exact and never builds an ``N x N`` mask (see
:meth:`sparseflash.bench.patterns.Pattern.pair_density`).
"""
from __future__ import annotations

import statistics

import torch
from torch import Tensor, nn

from ..bench.patterns import Pattern
from ..nn import SparseCausalSelfAttention
from ..qk_sparse import random_keep, topk_keep


def layer_pattern(m: SparseCausalSelfAttention, x: Tensor) -> Pattern:
    """The :class:`Pattern` layer ``m`` uses on its input ``x`` ``(B, N, C)`` (kv heads repeated
    over their query heads, so the pattern has one slice per query head)."""
    B, N, _ = x.shape
    H, Hkv, D = m.n_heads, m.n_kv_heads, m.head_dim
    q, k, _v = m.qkv(x).view(B, N, H + 2 * Hkv, D).transpose(1, 2).split([H, Hkv, Hkv], dim=1)
    group = H // Hkv
    if m.mode == "hash":
        qb, kb = m._buckets(q), m._buckets(k)
        return Pattern("hash", m.n_buckets, q_buckets=qb, k_buckets=kb.repeat_interleave(group, dim=1),
                       window=m.window, seq_len=N)
    if m.mode == "qk":
        if m.window:
            raise ValueError(f"pair_density does not count qk ∪ a window (window={m.window})")
        if m.qk_gate == "random":
            q_keep = random_keep((B, H, N), m.keep_rate, device=x.device)
            k_keep = random_keep((B, Hkv, N), m.keep_rate, device=x.device)
        else:
            q_score, k_score = m.gate(x).float().transpose(1, 2).split([H, Hkv], dim=1)
            q_keep, k_keep = topk_keep(q_score, m.keep_rate), topk_keep(k_score, m.keep_rate)
        return Pattern("qk", m.keep_rate, q_keep=q_keep, k_keep=k_keep.repeat_interleave(group, dim=1), seq_len=N)
    if m.window:
        return Pattern("window", m.window, window=m.window, seq_len=N)
    return Pattern("dense", None, seq_len=N)


@torch.no_grad()
def pair_density(model: nn.Module, tokens: Tensor) -> float:
    """Mean pair density over every :class:`~sparseflash.nn.SparseCausalSelfAttention` of
    ``model`` on ``tokens`` ``(B, N)`` (one forward pass; each layer sees its real input).

    Raises:
        ValueError: if ``model`` has no such layer.
    """
    dens: list[float] = []

    def hook(m: SparseCausalSelfAttention, args):
        dens.append(layer_pattern(m, args[0]).pair_density())

    hooks = [mod.register_forward_pre_hook(hook) for mod in model.modules()
             if isinstance(mod, SparseCausalSelfAttention)]
    if not hooks:
        raise ValueError("model has no SparseCausalSelfAttention layer to count pairs of")
    try:
        model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return statistics.mean(dens)
