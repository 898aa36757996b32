"""Hash-bucket attention: a query attends only to earlier keys in its own bucket.

Computation, for one (batch, head) with bucket ids ``qb``, ``kb``::

    o_i = Σ_{j <= i, kb[j] == qb[i]} softmax_j(q_i · k_j · sm_scale) v_j

(0 for a query with no such key).  This equals ``reference.attention`` with
``reference.hash_mask(q_buckets, k_buckets)``.

How: queries and keys are each sorted by bucket, stably, so inside a bucket the
original order survives (:func:`sparseflash.permuted.bucket_sort_layout`); the
position-causal kernel of :mod:`sparseflash.permuted` runs on the sorted tensors
with the extra "same bucket" test, reading and writing q, k, v, the output and
the gradients in token order through the sort index (no sorted copies are made).  In sorted order the
allowed pairs sit in diagonal blocks, one per bucket, so with ``n`` buckets of
similar size only about ``1/n`` of the causal tiles are loaded.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import _runtime
from .permuted import bucket_sort_layout, run_permuted

if TYPE_CHECKING:  # pragma: no cover
    from .tiles import TileRecord


def check_buckets(q_buckets: Tensor, k_buckets: Tensor, q: Tensor, n_buckets: int | None) -> None:
    """Integer ``(B, H, N)`` ids in ``[0, n_buckets)``; raise ``ValueError`` otherwise.

    The range check reads four numbers back from the device: one synchronisation.
    """
    _runtime.check_per_token("q_buckets", q_buckets, q, "int")
    _runtime.check_per_token("k_buckets", k_buckets, q, "int")
    if q_buckets.numel() == 0:
        return
    q_lo, k_lo, q_hi, k_hi = torch.stack(
        [q_buckets.min(), k_buckets.min(), q_buckets.max(), k_buckets.max()]).tolist()
    for name, lo, hi in (("q_buckets", q_lo, q_hi), ("k_buckets", k_lo, k_hi)):
        if lo < 0:
            raise ValueError(f"{name} must be >= 0, got a bucket id {lo}")
        if hi >= 2**31 - 1:
            raise ValueError(f"{name} must fit in int32, got a bucket id {hi}")
        if n_buckets is not None and hi >= n_buckets:
            raise ValueError(f"{name} must be < n_buckets={n_buckets}, got a bucket id {hi}")


def hash_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_buckets: Tensor,
    k_buckets: Tensor,
    sm_scale: float | None = None,
    *,
    n_buckets: int | None = None,
    kernel_options: dict | None = None,
    tile_record: "TileRecord | None" = None,
) -> Tensor:
    """Causal attention inside hash buckets.

    Args:
        q, k, v: ``(B, H, N, D)`` as in :func:`~sparseflash.flash_attention`.
        q_buckets, k_buckets: integer ``(B, H, N)`` bucket ids ``>= 0`` (e.g. from
            :func:`~sparseflash.lsh_buckets`); queries and keys may be bucketed
            differently.
        sm_scale: default ``1/sqrt(D)``.
        n_buckets: if given, ids must be ``< n_buckets``.
        kernel_options, tile_record: as in :func:`~sparseflash.flash_attention`;
            recorded tiles are in the sorted layout.

    Returns:
        ``(B, H, N, D)``; a query with no earlier key in its bucket gets 0.
    """
    _runtime.check_qkv(q, k, v, same_length=True)
    check_buckets(q_buckets, k_buckets, q, n_buckets)
    q_index, q_pos, q_sorted = bucket_sort_layout(q_buckets)
    k_index, k_pos, k_sorted = bucket_sort_layout(k_buckets)
    return run_permuted(q, k, v, q_pos, k_pos, q_sorted, k_sorted, sm_scale, kernel_options, tile_record,
                        "hash", q_index, k_index)
