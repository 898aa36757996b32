"""FlexAttention interop: a sparseflash pattern as FlexAttention's ``BlockMask``.

So that users can check one library against the other (and time them on the same
pattern), :func:`flex_pattern` builds the sparseflash layout and tile plan of a
hash-bucket or query/key-dropping pattern and turns the plan into a
``torch.nn.attention.flex_attention.BlockMask`` over the *layout's* slot order:

* query tile ``T`` visits key tiles ``[lo, full)`` as FlexAttention's *full* blocks
  (no mask evaluated) and ``[full, hi)`` as its *partial* blocks, where the
  ``mask_mod`` applies sparseflash's rule: same bucket (in hash attention's overflow run,
  equal ids), and the key's position at or before the query's (padding and dropped slots
  have no bucket);
* :meth:`FlexPattern.attention` gathers q, k, v into slot order, runs
  ``flex_attention`` with that mask, and scatters the output back to token order.

Both libraries then compute exactly the same (query tile, key tile) pairs, so
``flex_pattern(...).attention(q, k, v)`` equals :func:`~sparseflash.hash_sparse_attention`
(or :func:`~sparseflash.qk_sparse_attention`) up to rounding.  Tiles are 128 × 128,
FlexAttention's default block size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .layout import Layout, bucket_budget, bucket_layouts
from .plan import TilePlan, tile_plan

FLEX_BLOCK = 128


@dataclass
class FlexPattern:
    """A sparseflash pattern in FlexAttention's terms (build it with :func:`flex_pattern`).

    Attributes:
        q_layout, k_layout: the sparseflash layouts (slot order) with 128-slot tiles.
        plan: their :class:`~sparseflash.plan.TilePlan`.
        block_mask: the ``BlockMask`` over slots, ``(B, Hq, Lq, Lk)``.
    """

    q_layout: Layout
    k_layout: Layout
    plan: TilePlan
    block_mask: object

    @staticmethod
    def _gather(x: Tensor, index: Tensor) -> Tensor:
        """``x`` (B, H, N, D) in slot order (B, H, L, D); padding slots (index N) get 0."""
        padded = torch.cat([x, x.new_zeros(x.shape[:2] + (1, x.shape[3]))], dim=2)
        return padded.gather(2, index.long()[..., None].expand(-1, -1, -1, x.shape[3]))

    def attention(self, q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, *,
                  kernel=None) -> Tensor:
        """The pattern's attention by FlexAttention: ``(B, Hq, N, D)`` in token order.

        ``kernel`` defaults to ``torch.nn.attention.flex_attention.flex_attention``
        (eager: a reference implementation); pass a compiled one for speed.
        """
        from torch.nn.attention.flex_attention import flex_attention

        kernel = flex_attention if kernel is None else kernel
        qs = self._gather(q, self.q_layout.index)
        ks, vs = self._gather(k, self.k_layout.index), self._gather(v, self.k_layout.index)
        os = kernel(qs, ks, vs, block_mask=self.block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        # Slot -> token: every token has exactly one slot; padding slots (index N) fall off the end.
        B, H, N, D = q.shape
        out = os.new_zeros(B, H, N + 1, D)
        out.scatter_(2, self.q_layout.index.long()[..., None].expand(-1, -1, -1, D), os)
        return out[:, :, :N]


def flex_pattern(shape: tuple[int, int, int], *, q_buckets: Tensor | None = None, k_buckets: Tensor | None = None,
                 q_keep: Tensor | None = None, k_keep: Tensor | None = None, n_buckets: int | None = None,
                 device=None) -> FlexPattern:
    """The sparseflash pattern of a hash or query/key-dropping call as a :class:`FlexPattern`.

    Args:
        shape: the queries' ``(B, Hq, N)``.
        q_buckets, k_buckets: integer bucket ids (hash attention), ``(B, Hq, N)`` /
            ``(B, Hkv, N)``: labels of any value, as in :func:`~sparseflash.hash_sparse_attention`
            (ids outside ``[0, n_buckets)`` share the overflow run, where the ``mask_mod``
            compares the ids).
        q_keep, k_keep: bool keep masks (query/key dropping), same shapes.
        n_buckets: with buckets, as in :func:`~sparseflash.hash_sparse_attention` (None: 64);
            ignored without (one bucket).

    Returns:
        A :class:`FlexPattern`; ``.block_mask`` is the ``BlockMask``, ``.attention(q, k, v)``
        runs FlexAttention on it.
    """
    from torch.nn.attention.flex_attention import BlockMask

    B, Hq, N = shape
    hashed = q_buckets is not None
    ql, kl = bucket_layouts(shape, q_buckets=q_buckets, k_buckets=k_buckets, q_keep=q_keep, k_keep=k_keep,
                            n_buckets=bucket_budget(n_buckets) if hashed else 1, block_m=FLEX_BLOCK,
                            block_n=FLEX_BLOCK, overflow=hashed, device=device)
    plan = tile_plan(ql, kl)
    lo, full, hi = plan.q_runs.unbind(-1)
    n_kt = kl.n_tiles
    i = torch.arange(n_kt, device=lo.device, dtype=torch.int32)

    def indices(first, count):
        # FlexAttention reads the first `count` entries of each row; the rest may hold anything in range.
        return torch.where(i < count[..., None], first[..., None] + i, 0).to(torch.int32).contiguous()

    group = Hq // kl.index.shape[1]
    q_pos, q_bucket, k_pos, k_bucket = ql.pos, ql.bucket, kl.pos, kl.bucket
    if hashed:
        # Each slot's original id (padding slots, index N, read 0: they have no bucket anyway).
        def slot_ids(ids, index):
            return torch.nn.functional.pad(ids.long(), (0, 1)).gather(-1, index.long())

        q_id, k_id = slot_ids(q_buckets, ql.index), slot_ids(k_buckets, kl.index)

    def mask_mod(b, h, q_idx, kv_idx):
        hk = h // group
        same = (q_bucket[b, h, q_idx] == k_bucket[b, hk, kv_idx]) & (q_bucket[b, h, q_idx] >= 0)
        if hashed:  # a no-op inside a bucket's run; the overflow run mixes ids
            same = same & (q_id[b, h, q_idx] == k_id[b, hk, kv_idx])
        return same & (k_pos[b, hk, kv_idx] <= q_pos[b, h, q_idx])

    block_mask = BlockMask.from_kv_blocks(
        (hi - full).int().contiguous(), indices(full, hi - full),
        (full - lo).int().contiguous(), indices(lo, full - lo),
        BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(ql.n_slots, kl.n_slots))
    return FlexPattern(ql, kl, plan, block_mask)
