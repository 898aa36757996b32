"""Layouts: where each token sits when a sparse kernel runs, and which tiles it visits.

Query/key dropping and hash buckets both reorder tokens before attention.  This
module holds those permutations and the per-tile summaries built from them; it
imports no kernel, so the kernels (:mod:`sparseflash.permuted`) and the pictures
(:mod:`sparseflash.tiles`) both build on it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from dataclasses import dataclass
from torch import Tensor

INT32_MAX = 2**31 - 1
PAD = -1  #: position of a padding slot


# --------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------


def compact_layout(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Kept tokens first, in their original order, then padding.

    Args:
        keep: bool ``(B, H, N)``.
    Returns:
        ``(index, pos)``, both ``(B, H, N)``: slot ``a`` holds token ``index[a]``;
        ``pos[a]`` is that original position (int32) for kept tokens and ``-1`` for
        the padding slots after them.  ``index`` is a full permutation, so the
        padding slots hold the dropped tokens (ignored by the kernel) and a scatter
        through ``index`` writes every position once.  The length stays ``N`` for
        every head (no host synchronisation, one shape whatever the keep rate);
        tiles made only of padding are never visited.
    """
    # A stable partition by counting, not sorting: kept token i goes to slot
    # (kept before it), dropped token i to n_kept + (dropped before it).
    kept_upto = keep.cumsum(-1, dtype=torch.int32)
    n_kept = kept_upto[..., -1:]
    i = torch.arange(keep.shape[-1], device=keep.device, dtype=torch.int32)
    slot = torch.where(keep, kept_upto - 1, n_kept + i - kept_upto)
    order = torch.empty_like(slot).scatter_(-1, slot.long(), i.expand_as(slot))
    pos = torch.where(i < n_kept, order, PAD)
    return order.long(), pos


def bucket_sort_layout(buckets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens sorted by bucket, stably (so by position inside a bucket).

    Returns ``(index, pos, sorted_buckets)``, each ``(B, H, N)``; ``pos`` is int32.
    """
    sorted_buckets, order = torch.sort(buckets, dim=-1, stable=True)
    return order, order.to(torch.int32), sorted_buckets.to(torch.int32)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, h, index[b, h, a], :]`` for ``x`` ``(B, H, N, D)``: into the layout."""
    return x.gather(2, index[..., None].expand(*index.shape, x.shape[-1]))


def scatter_tokens(x: Tensor, index: Tensor) -> Tensor:
    """Inverse of :func:`gather_tokens` for a full permutation ``index``: back to positions."""
    return torch.zeros_like(x).scatter(2, index[..., None].expand_as(x), x)


# --------------------------------------------------------------------------------------
# Tile tables
# --------------------------------------------------------------------------------------


def _per_tile(x: Tensor, block: int, fill: int, reduce: str) -> Tensor:
    pad = (-x.shape[-1]) % block
    x = F.pad(x, (0, pad), value=fill).unflatten(-1, (-1, block))
    return x.amax(-1) if reduce == "max" else x.amin(-1)


@dataclass
class TileStats:
    """Per-tile summaries of a permuted layout, ``(B, H, n_tiles)`` int32 each.

    ``qmax`` largest query position of a query tile (-1: only padding);
    ``kmin`` smallest key position of a key tile (INT32_MAX: only padding);
    ``qb_lo, qb_hi, kb_lo, kb_hi`` bucket ranges over real tokens (None without buckets).
    """

    qmax: Tensor
    kmin: Tensor
    qb_lo: Tensor | None = None
    qb_hi: Tensor | None = None
    kb_lo: Tensor | None = None
    kb_hi: Tensor | None = None

    @classmethod
    def of(cls, q_pos, k_pos, q_buckets, k_buckets, block_m: int, block_n: int) -> "TileStats":
        qmax = _per_tile(q_pos, block_m, PAD, "max")
        kmin = _per_tile(torch.where(k_pos < 0, INT32_MAX, k_pos), block_n, INT32_MAX, "min")
        if q_buckets is None:
            return cls(qmax.int(), kmin.int())
        # Bucket ranges over real tokens; a tile of padding gets an empty range
        # placed at +inf, which keeps the ranges sorted for the binary searches.
        qb_lo = _per_tile(torch.where(q_pos >= 0, q_buckets, INT32_MAX), block_m, INT32_MAX, "min")
        qb_hi = _per_tile(torch.where(q_pos >= 0, q_buckets, -1), block_m, -1, "max")
        kb_lo = _per_tile(torch.where(k_pos >= 0, k_buckets, INT32_MAX), block_n, INT32_MAX, "min")
        kb_hi = _per_tile(torch.where(k_pos >= 0, k_buckets, -1), block_n, -1, "max")
        qb_hi = torch.where(qmax >= 0, qb_hi, INT32_MAX)
        kb_hi = torch.where(kmin < INT32_MAX, kb_hi, INT32_MAX)
        return cls(qmax.int(), kmin.int(), qb_lo.int(), qb_hi.int(), kb_lo.int(), kb_hi.int())

    def visited(self) -> Tensor:
        """``(B, H, n_q_tiles, n_k_tiles)`` bool: the tile-skipping rule, pair by pair.

        Quadratic in tiles: for pictures and tests, never used by the kernels.
        """
        ok = self.kmin[..., None, :] <= self.qmax[..., :, None]
        if self.qb_lo is not None:
            ok &= (self.kb_lo[..., None, :] <= self.qb_hi[..., :, None]) & (
                self.kb_hi[..., None, :] >= self.qb_lo[..., :, None]
            )
        return ok


def tile_tables(stats: TileStats) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Runs of tiles each kernel loop walks, by binary search over the sorted layout.

    Returns int32 ``(B, H, ·)`` tensors ``k_lo, k_hi`` (per query tile: key tiles
    ``[k_lo, k_hi)`` may hold allowed pairs) and ``q_lo, q_hi`` (per key tile, for the
    backward).  Inside a run the kernels still test ``kmin <= qmax`` per tile.
    """
    search = torch.searchsorted
    n_qt, n_kt = stats.qmax.shape[-1], stats.kmin.shape[-1]
    q_real = stats.qmax >= 0
    k_real = stats.kmin < INT32_MAX
    if stats.qb_lo is None:
        # Positions ascend through the layout, so the key tiles a query tile sees
        # are a prefix, and the query tiles a key tile meets run to the last real one.
        k_lo = torch.zeros_like(stats.qmax)
        k_hi = search(stats.kmin, stats.qmax, right=True)
        q_lo = search(torch.where(q_real, stats.qmax, INT32_MAX), stats.kmin)
        q_hi = q_real.sum(-1, keepdim=True, dtype=torch.int32).expand(*stats.kmin.shape)
    else:
        # Buckets ascend through the layout: overlapping tiles form one run.
        k_lo = search(stats.kb_hi, stats.qb_lo)
        k_hi = search(stats.kb_lo, stats.qb_hi, right=True)
        q_lo = search(stats.qb_hi, stats.kb_lo)
        q_hi = search(stats.qb_lo, stats.kb_hi, right=True)
    k_hi = torch.where(q_real, torch.maximum(k_hi, k_lo), k_lo).clamp(max=n_kt)
    q_hi = torch.where(k_real, torch.maximum(q_hi, q_lo), q_lo).clamp(max=n_qt)
    return (k_lo.int().contiguous(), k_hi.int().contiguous(), q_lo.int().contiguous(), q_hi.int().contiguous())
