"""Ground truth: attention written the obvious way, for tests and for reading.

Everything here materialises the full ``(N, N)`` score matrix, so it is only for
small sizes. The kernels in :mod:`sparseflash.flash`, :mod:`sparseflash.qk_sparse`
and :mod:`sparseflash.hash_sparse` are judged against :func:`attention` with the
masks built below.

Convention for an empty row (a query that may attend to no key): its output is 0
and it passes no gradient, instead of the NaN that ``softmax`` of all ``-inf``
would give.

Grouped-query attention: k, v (and the key-side masks and buckets) may have ``Hkv``
heads for ``Hq`` query heads, ``Hkv`` dividing ``Hq``; query head ``h`` uses kv head
``h // (Hq // Hkv)``.  Here they are simply repeated to ``Hq`` heads (the kernels never
copy them); the gradients of k and v then sum over each group, as they should.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def repeat_kv(x: Tensor, n_q_heads: int) -> Tensor:
    """``x`` ``(B, Hkv, ...)`` repeated to ``(B, Hq, ...)``: query head ``h`` gets kv head
    ``h // (Hq // Hkv)`` (heads grouped contiguously, as SDPA's ``enable_gqa=True``)."""
    n_kv = x.shape[1]
    if n_kv == n_q_heads:
        return x
    if n_kv == 0 or n_q_heads % n_kv:
        raise ValueError(f"{n_kv} kv heads do not divide {n_q_heads} query heads")
    return x.repeat_interleave(n_q_heads // n_kv, dim=1)


def _key_side(k_side: Tensor, q_side: Tensor) -> Tensor:
    """A key-side ``(B, Hkv, N)`` tensor repeated to the query side's heads (other shapes,
    and one kv head, broadcast as they are)."""
    if q_side.dim() == k_side.dim() == 3 and k_side.shape[1] not in (1, q_side.shape[1]):
        return repeat_kv(k_side, q_side.shape[1])
    return k_side


def causal_mask(n_q: int, n_k: int | None = None, device=None) -> Tensor:
    """``(n_q, n_k)`` bool, True where key position ``j <= i`` (query position)."""
    n_k = n_q if n_k is None else n_k
    i = torch.arange(n_q, device=device)[:, None]
    j = torch.arange(n_k, device=device)[None, :]
    return j <= i


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    allowed: Tensor | None = None,
    sm_scale: float | None = None,
    *,
    causal: bool = False,
    float64: bool = True,
) -> Tensor:
    """Naive attention ``softmax(q kᵀ · scale + mask) v``.

    Args:
        q: ``(B, H, N, D)`` queries.  k, v: ``(B, Hkv, M, D)`` keys and values, ``Hkv``
            dividing ``H`` (grouped-query attention; see the module docstring).
        allowed: bool mask broadcastable to ``(B, H, N, M)``; True = may attend.
        sm_scale: score scale, default ``1/sqrt(D)``.
        causal: also require key position <= query position.
        float64: compute in float64 (the default, for ground truth); the result
            is returned in float64 too.

    Returns:
        ``(B, H, N, D)``. Rows with no allowed key are 0 and get zero gradient.
    """
    if float64:
        q, k, v = q.double(), k.double(), v.double()
    if q.dim() == k.dim() == 4:
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    scores = (q @ k.transpose(-1, -2)) * scale
    mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device)
    if causal:
        mask = causal_mask(q.shape[-2], k.shape[-2], device=q.device)
    if allowed is not None:
        mask = mask & allowed.to(q.device)
    mask = mask.expand_as(scores)
    scores = scores.masked_fill(~mask, float("-inf"))
    # An all-masked row would give softmax(-inf, ..., -inf) = NaN; give it one
    # finite dummy score instead and zero its probabilities afterwards, so its
    # output is 0 and no gradient flows through it.
    has_key = mask.any(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1)
    probs = probs.masked_fill(~mask, 0.0)
    return probs @ v


def window_mask(n_q: int, n_k: int | None = None, window: int = 0, device=None) -> Tensor:
    """``(n_q, n_k)`` bool, True where ``0 <= i - j < window`` (a causal sliding window of
    ``window`` keys, the query's own included); ``window = 0`` means no window: all False."""
    n_k = n_q if n_k is None else n_k
    i = torch.arange(n_q, device=device)[:, None]
    j = torch.arange(n_k, device=device)[None, :]
    return (j <= i) & (i - j < window)


def qk_dropping_mask(q_keep: Tensor, k_keep: Tensor, window: int = 0) -> Tensor:
    """``(B, H, N, N)`` mask of query/key dropping, with an optional sliding window.

    Query i may attend key j iff ``j <= i`` and both ``q_keep[..., i]`` and
    ``k_keep[..., j]`` are True, or ``i - j < window``.  ``q_keep``: bool ``(B, H, N)``;
    ``k_keep``: bool ``(B, Hkv, N)``, ``Hkv`` dividing ``H`` (the kv heads of grouped-query
    attention).
    """
    n = q_keep.shape[-1]
    k_keep = _key_side(k_keep, q_keep)
    kept = causal_mask(n, device=q_keep.device) & q_keep[..., :, None] & k_keep[..., None, :]
    return kept | window_mask(n, window=window, device=q_keep.device)


def hash_mask(q_buckets: Tensor, k_buckets: Tensor, window: int = 0) -> Tensor:
    """``(B, H, N, N)`` mask of hash-bucket attention, with an optional sliding window.

    Query i may attend key j iff ``j <= i`` and (``q_buckets[..., i] == k_buckets[..., j]``
    or ``i - j < window``).  Buckets: integer ``(B, H, N)`` for the queries,
    ``(B, Hkv, N)`` for the keys (``Hkv`` dividing ``H``: the kv heads of grouped-query
    attention).
    """
    n = q_buckets.shape[-1]
    k_buckets = _key_side(k_buckets, q_buckets)
    same = q_buckets[..., :, None] == k_buckets[..., None, :]
    return (causal_mask(n, device=q_buckets.device) & same) | window_mask(n, window=window, device=q_buckets.device)


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_len,
    key_index: Tensor | None = None,
    n_keys: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Float64 decode attention: one query per (sequence, head) against a KV cache.

    q ``(B, H, 1, D)``; k_cache, v_cache ``(B, Hkv, S, D)``, ``Hkv`` dividing ``H``;
    ``cache_len``: an int or ``(B,)`` integer tensor, the valid rows ``[0, cache_len)`` of
    each sequence's cache.  Without ``key_index`` the query attends to every valid row.
    With ``key_index`` ``(B, H, L)`` it attends to the rows listed there: entry ``i`` is used
    iff ``i < n_keys[b, h]`` (``n_keys`` ``(B, H)``, default ``L``) and ``0 <= index <
    cache_len``; a row listed twice counts twice.  Returns ``(B, H, 1, D)`` float64, 0 where
    no key is allowed.
    """
    B, H, _, D = q.shape
    S = k_cache.shape[2]
    q = q.double()
    k, v = repeat_kv(k_cache.double(), H), repeat_kv(v_cache.double(), H)
    lens = torch.as_tensor(cache_len, device=q.device).reshape(-1).expand(B)[:, None, None]
    if key_index is None:
        keys = torch.arange(S, device=q.device).expand(B, H, S)
        valid = keys < lens
    else:
        keys = key_index.to(q.device).long()
        L = keys.shape[-1]
        count = torch.full((B, H), L, device=q.device) if n_keys is None else n_keys.to(q.device)
        valid = (torch.arange(L, device=q.device) < count[..., None]) & (keys >= 0) & (keys < lens)
        keys = keys.clamp(0, S - 1)
    gather = lambda x: x.gather(2, keys[..., None].expand(*keys.shape, D))  # noqa: E731
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    scores = (gather(k) * q).sum(-1) * scale
    # As in attention(): a finite dummy score for a row with no key, zeroed afterwards.
    has_key = valid.any(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~valid, float("-inf")).masked_fill(~has_key, 0.0), dim=-1)
    probs = probs.masked_fill(~valid, 0.0)
    return (probs[..., None] * gather(v)).sum(2, keepdim=True)


def decode_append(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, position: int,
                  rotary: bool, rotations: Tensor | None, buckets: Tensor | None = None,
                  bucket_rows: Tensor | None = None, bucket_count: Tensor | None = None) -> tuple:
    """One decode step around a layer's attention (:mod:`sparseflash.decode_append`), the obvious
    way, on copies: returns ``(q_out, q_buckets, k_cache, v_cache, buckets, bucket_rows,
    bucket_count)``.  ``q`` ``(B, H, 1, D)``, ``k``, ``v`` ``(B, Hkv, 1, D)``; with ``rotary``,
    ``q_out`` and the cached key are :func:`sparseflash.rotary.rotary` at ``position`` (the
    package's float32 embedding, which the full forward uses); ``v`` and the key go to row
    ``position``; with ``rotations`` (``(Hkv, D, n_buckets / 2)``) the buckets of ``q`` and ``k``
    (before rotary) are ``argmax([x̂ R, -x̂ R])`` in float64 (``x̂`` the unit vector, query head
    ``h`` with kv head ``h // (H / Hkv)``'s ``R``) and ``position`` joins the key's bucket's list."""
    from .rotary import rotary as rotary_embedding

    B, Hkv = k.shape[:2]
    H = q.shape[1]
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    q_out = rotary_embedding(q, offset=position) if rotary else q
    k_cache[:, :, position] = (rotary_embedding(k, offset=position) if rotary else k)[:, :, 0]
    v_cache[:, :, position] = v[:, :, 0]
    if rotations is None:
        return q_out, None, k_cache, v_cache, buckets, bucket_rows, bucket_count
    buckets, bucket_rows, bucket_count = (t.clone() for t in (buckets, bucket_rows, bucket_count))

    def bucket(x, heads):
        x = x[:, :, 0].double()
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        y = torch.einsum("bhd,hdr->bhr", x, repeat_kv(rotations[None].double(), heads)[0])
        return torch.cat([y, -y], dim=-1).argmax(dim=-1)

    kb, qb = bucket(k, Hkv), bucket(q, H)
    for b in range(B):
        for j in range(Hkv):
            u = int(kb[b, j])
            buckets[b, j, position] = u
            bucket_rows[b, j, u, bucket_count[b, j, u]] = position
            bucket_count[b, j, u] += 1
    return q_out, qb, k_cache, v_cache, buckets, bucket_rows, bucket_count
