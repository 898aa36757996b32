"""Query/key dropping: each head attends with its own data-dependent subset of queries and keys.

Computation, for one (batch, head) with keep masks ``q_keep``, ``k_keep``::

    o_i = Σ_{j <= i, k_keep[j]} softmax_j(q_i · k_j · sm_scale) v_j    if q_keep[i]
    o_i = 0                                                           otherwise

(and 0 for a kept query with no kept key at or before it).  This equals
``reference.attention`` with ``reference.qk_dropping_mask(q_keep, k_keep)``.

With a sliding window ``W > 0`` every query, kept or not, also sees the ``W`` keys ending
at its own (``reference.qk_dropping_mask(q_keep, k_keep, window=W)``), computed as for
hash attention: the kept pairs with ``i - j >= W`` in the compacted layout, the band in
natural order, one softmax (:func:`sparseflash.permuted.union_forward`).

How: kept queries and kept keys are compacted to the front of their own layouts,
in original order, carrying their original positions (the one-bucket case of
:func:`sparseflash.layout.bucket_layouts`, one launch for both sides); the
position-causal kernel of :mod:`sparseflash.permuted` runs on that layout, reading
q, k, v and writing the output and gradients in token order through the
compaction index (no compacted copies are made), and no call waits for the GPU.  With a fraction ``r`` kept, only about ``r²`` of the causal tiles hold
allowed pairs, and only those are loaded.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import _runtime
from .permuted import run_layout

if TYPE_CHECKING:  # pragma: no cover
    from .tiles import TileRecord


def qk_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_keep: Tensor,
    k_keep: Tensor,
    sm_scale: float | None = None,
    *,
    window: int = 0,
    kernel_options: dict | None = None,
    tile_record: "TileRecord | None" = None,
) -> Tensor:
    """Causal attention restricted to kept queries and kept keys.

    Args:
        q: ``(B, H, N, D)``; k, v: ``(B, Hkv, N, D)``, ``Hkv`` dividing ``H`` (grouped-query
            attention), as in :func:`~sparseflash.flash_attention` (one ``N`` for all
            three: positions are shared).
        q_keep, k_keep: bool ``(B, H, N)`` / ``(B, Hkv, N)``; heads may keep different
            counts.
        sm_scale: default ``1/sqrt(D)``.
        window: also attend to the ``window`` most recent keys (the query's own included),
            kept or not, for every query: pair ``(i, j)`` allowed iff ``j <= i`` and (both
            kept or ``i - j < window``).  ``0`` (default): dropping alone.
        kernel_options, tile_record: as in :func:`~sparseflash.flash_attention`;
            recorded tiles are in the compacted layout.

    Returns:
        ``(B, H, N, D)``; without a window, dropped queries (and kept queries with no
        kept key at or before them) get 0 and pass no gradient.
    """
    _runtime.check_qkv(q, k, v, same_length=True)
    window = _runtime.check_window(window)
    _runtime.check_per_token("q_keep", q_keep, q, "bool")
    _runtime.check_per_token("k_keep", k_keep, k, "bool")
    return run_layout(q, k, v, q_keep=q_keep, k_keep=k_keep, window=window, sm_scale=sm_scale,
                      kernel_options=kernel_options, tile_record=tile_record, kind="qk")


def random_keep(
    shape: tuple[int, int, int],
    keep_rate: float,
    *,
    generator: torch.Generator | None = None,
    device=None,
) -> Tensor:
    """Bool ``(B, H, N)`` mask keeping each token independently with probability ``keep_rate``."""
    if not 0.0 <= keep_rate <= 1.0:
        raise ValueError(f"keep_rate must be in [0, 1], got {keep_rate}")
    if len(shape) != 3:
        raise ValueError(f"shape must be (batch, heads, seq_len), got {tuple(shape)}")
    u = torch.rand(shape, generator=generator, device=device if generator is None else generator.device)
    return (u < keep_rate).to(device) if device is not None else u < keep_rate


def topk_keep(scores: Tensor, keep_rate: float | None = None, *, k: int | None = None) -> Tensor:
    """Keep the ``k`` (or ``ceil(keep_rate · N)``) highest-scoring tokens of each head.

    ``scores``: ``(B, H, N)`` floating, e.g. a learned per-token gate.  Ties are broken
    by ``torch.topk``.  Returns a bool mask of the same shape with exactly ``k``
    True per (batch, head).
    """
    if scores.dim() != 3 or not scores.is_floating_point():
        raise ValueError(f"scores must be a floating (batch, heads, seq_len) tensor, got {scores.dtype} "
                         f"{tuple(scores.shape)}")
    n = scores.shape[-1]
    if (keep_rate is None) == (k is None):
        raise ValueError("give exactly one of keep_rate and k")
    if k is None:
        if not 0.0 <= keep_rate <= 1.0:
            raise ValueError(f"keep_rate must be in [0, 1], got {keep_rate}")
        k = math.ceil(round(keep_rate * n, 9))  # round first: 0.07 * 100 is 7.000000000000001
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    keep = torch.zeros_like(scores, dtype=torch.bool)
    return keep.scatter(-1, scores.topk(k, dim=-1).indices, True)
