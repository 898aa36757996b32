"""Hash-bucket attention: a query attends only to earlier keys with its own bucket id.

Computation, for one (batch, head) with bucket ids ``qb``, ``kb``::

    o_i = Σ_{j <= i, kb[j] == qb[i]} softmax_j(q_i · k_j · sm_scale) v_j

(0 for a query with no such key).  This equals ``reference.attention`` with
``reference.hash_mask(q_buckets, k_buckets)``.  Ids are labels, compared exactly as the
integers they are (any integer dtype; negative, huge, int64 ``2**32 + 1`` is not 1), so
every call is exact whatever the ids; ``n_buckets`` only says which ids are fast.

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
buckets.  Ids in ``[0, n_buckets)`` (default ``[0, 64)``) get such runs; every other id
shares one more run, the *overflow run*, in position order, where the kernels compare
the ids in every tile (none is mask-free): those tokens cost about dense causal attention
among themselves, and ids in range are as fast as if it were not there.  Nothing is read
back to the host (unless ``validate=True``), so a call never waits for the GPU, captures
in a CUDA graph, and traces under ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import _runtime
from .layout import DEFAULT_BUCKETS, MAX_DIRECT_BUCKETS, bucket_budget
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
    """Causal attention inside hash buckets: pair ``(i, j)`` allowed iff ``j <= i`` and
    ``q_buckets[i] == k_buckets[j]`` (or ``i - j < window``).

    Args:
        q: ``(B, H, N, D)``; k, v: ``(B, Hkv, N, D)``, ``Hkv`` dividing ``H`` (grouped-query
            attention), as in :func:`~sparseflash.flash_attention`.
        q_buckets, k_buckets: integer ``(B, H, N)`` / ``(B, Hkv, N)`` bucket ids (e.g. from
            :func:`~sparseflash.lsh_buckets`), of any integer dtype and value: labels,
            compared exactly (negative ids are labels too; int64 ``2**32 + 1`` is not 1).
            Queries and keys may be bucketed differently.
        sm_scale: default ``1/sqrt(D)``.
        n_buckets: a hint, not a bound: ids in ``[0, n_buckets)`` (default
            ``[0, 64)``, :data:`~sparseflash.layout.DEFAULT_BUCKETS`; at most 65536 are used,
            :data:`~sparseflash.layout.MAX_DIRECT_BUCKETS`) each get a tile-aligned run and
            the tile-skipping fast path.  Other ids are still exact, but share one overflow
            run whose tiles are all computed and masked: about dense speed among those
            tokens.  A larger ``n_buckets`` also lengthens the layout (up to ``block - 1``
            padding slots per run).  The result never depends on it.
        window: also attend to the ``window`` most recent keys (the query's own included),
            whatever their bucket: pair ``(i, j)`` allowed iff ``j <= i`` and (same bucket or
            ``i - j < window``).  ``0`` (default) is pure hashing, as in the paper.
        validate: a performance check, off by default: raise ``ValueError`` if an id lies
            outside ``[0, n_buckets)`` (default ``[0, 64)``), i.e. some token would leave
            the fast path.  It reads four numbers back to the host (one synchronisation),
            so it is refused under ``torch.compile``.
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
    budget = bucket_budget(n_buckets)
    if validate:
        if torch.compiler.is_compiling():
            raise ValueError("under torch.compile, hash_sparse_attention needs validate=False: the check reads ids "
                             "back to the host (ids need no check for correctness; check them outside the compiled "
                             "region if you want to know they take the fast path)")
        _runtime.check_fast_path_ids(q_buckets, k_buckets, budget, n_buckets, DEFAULT_BUCKETS, MAX_DIRECT_BUCKETS)
    return run_layout(q, k, v, q_buckets=q_buckets, k_buckets=k_buckets, n_buckets=budget, overflow=True,
                      window=window, sm_scale=sm_scale, kernel_options=kernel_options, tile_record=tile_record,
                      kind="hash")
