"""Hash-bucket attention: a query attends only to earlier keys in its own bucket.

Computation, for one (batch, head) with bucket ids ``qb``, ``kb``::

    o_i = Σ_{j <= i, kb[j] == qb[i]} softmax_j(q_i · k_j · sm_scale) v_j

(0 for a query with no such key).  This equals ``reference.attention`` with
``reference.hash_mask(q_buckets, k_buckets)``.

With a sliding window ``W > 0`` a query also sees the ``W`` keys ending at its own,
whatever their buckets (``j <= i`` and (same bucket or ``i - j < W``), each pair once):
``reference.hash_mask(q_buckets, k_buckets, window=W)``.  Hashing alone loses the local
context that language models rely on (a query whose own key landed in another bucket may
see nothing); the window restores it exactly.  The union is split into two disjoint
parts, each tiled where it is dense: the same-bucket pairs with ``i - j >= W`` in the
bucket layout (queries placed at position ``i - W``, so the tile plan skips everything
inside the band), and the band ``0 <= i - j < W`` in natural order (the dense kernel's
diagonal band of tiles), both folded into one online softmax
(:func:`sparseflash.permuted.union_forward`).

How: queries and keys are each placed by bucket, in original order inside a bucket,
every bucket's run starting on a tile boundary (:func:`sparseflash.layout.bucket_layouts`,
a counting sort in one launch); the position-causal kernel of :mod:`sparseflash.permuted`
then visits, for each query tile, only the key tiles of its own bucket that start at or
before its last query, reading and writing q, k, v, the output and the gradients in
token order through the layout (no sorted copies are made).  With ``n`` buckets of
similar size about ``1/n`` of the causal tiles are loaded, and no tile straddles two
buckets.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import _runtime
from .layout import MAX_DIRECT_BUCKETS, dense_bucket_ids
from .permuted import run_layout

if TYPE_CHECKING:  # pragma: no cover
    from .tiles import TileRecord


def hash_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_buckets: Tensor,
    k_buckets: Tensor,
    sm_scale: float | None = None,
    *,
    n_buckets: int | None = None,
    window: int = 0,
    validate: bool = False,
    kernel_options: dict | None = None,
    tile_record: "TileRecord | None" = None,
) -> Tensor:
    """Causal attention inside hash buckets.

    Args:
        q: ``(B, H, N, D)``; k, v: ``(B, Hkv, N, D)``, ``Hkv`` dividing ``H`` (grouped-query
            attention), as in :func:`~sparseflash.flash_attention`.
        q_buckets, k_buckets: integer ``(B, H, N)`` / ``(B, Hkv, N)`` bucket ids (e.g. from
            :func:`~sparseflash.lsh_buckets`); queries and keys may be bucketed
            differently.
        sm_scale: default ``1/sqrt(D)``.
        n_buckets: ids lie in ``[0, n_buckets)``.  Pass it (at most 65536 under
            ``torch.compile``): then a call never waits for the GPU, and a token whose
            id is outside the range takes part in nothing (output 0, no gradient),
            unless ``validate`` is on.  Without it the number is read off the ids (one
            host synchronisation), which must then be ``>= 0`` (``ValueError``).
        window: also attend to the ``window`` most recent keys (the query's own included),
            whatever their bucket: pair ``(i, j)`` allowed iff ``j <= i`` and (same bucket or
            ``i - j < window``).  ``0`` (default) is pure hashing, as in the paper.
        validate: check on the host that every id is in range (or ``>= 0`` without
            ``n_buckets``) and raise ``ValueError`` otherwise; one synchronisation.
        kernel_options, tile_record: as in :func:`~sparseflash.flash_attention`;
            recorded tiles are in the bucket layout.

    Returns:
        ``(B, H, N, D)``; a query with no earlier key in its bucket (and no window) gets 0.
    """
    _runtime.check_qkv(q, k, v, same_length=True)
    window = _runtime.check_window(window)
    _runtime.check_per_token("q_buckets", q_buckets, q, "int")
    _runtime.check_per_token("k_buckets", k_buckets, k, "int")
    n_buckets = _runtime.check_n_buckets(n_buckets)
    top = None
    if torch.compiler.is_compiling():
        _runtime.check_compilable_buckets("hash_sparse_attention", n_buckets, validate, MAX_DIRECT_BUCKETS)
    if validate or n_buckets is None:
        top = _runtime.check_bucket_range(q_buckets, k_buckets, n_buckets)
    if n_buckets is None or n_buckets > MAX_DIRECT_BUCKETS:
        # Ids read off the device (the range check's one sync); huge id ranges are renumbered densely.
        q_buckets, k_buckets, n_buckets = dense_bucket_ids(q_buckets, k_buckets, n_buckets, top=top)
    return run_layout(q, k, v, q_buckets=q_buckets, k_buckets=k_buckets, n_buckets=n_buckets, window=window,
                      sm_scale=sm_scale, kernel_options=kernel_options, tile_record=tile_record, kind="hash")
