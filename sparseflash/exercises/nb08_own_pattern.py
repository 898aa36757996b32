"""Checkers of notebook 08, your own pattern (``08_your_own_pattern.ipynb``).

* :func:`check_top2_key_slots`: ``top2_key_slots(k_logits) -> (k_index, k_pos, k_buckets)``
  puts each key in the buckets of its two best experts, one slot per bucket, positions
  ascending along each bucket, so that ``permuted_attention`` on these slots allows exactly
  the pairs the router says and matches the reference.
"""
from __future__ import annotations

import torch

from .. import reference
from ._common import _as_tensor, _call, _compare, _Fail, _gen, _new_seed, _randn, _require_callable, _run, _tol, device

__all__ = ["check_top2_key_slots"]


def _slots_mask(q_pos, q_buckets, k_index, k_pos, k_buckets, n_k: int):
    """What ``permuted_attention`` computes for these slots, in token coordinates: ``(allowed, copies)``,
    ``(B, H, n_q, n_k)`` bool and int (how many key slots of token ``j`` query ``i`` attends)."""
    ok = (k_pos[..., None, :] <= q_pos[..., :, None]) & (k_pos[..., None, :] >= 0)
    ok &= k_buckets[..., None, :] == q_buckets[..., :, None]
    copies = torch.zeros(*ok.shape[:-1], n_k, dtype=torch.int64)
    copies.scatter_add_(-1, k_index[..., None, :].expand_as(ok).long(), ok.long())
    return copies > 0, copies


def check_top2_key_slots(top2_key_slots, *, seed=None) -> bool:
    """08 · exercise 1: ``top2_key_slots(k_logits) -> (k_index, k_pos, k_buckets)``: each key joins the
    buckets of its two best experts (a learned router with top-2 keys), as key slots for
    ``permuted_attention`` (queries join their best expert's bucket, in token order)."""
    _require_callable(top2_key_slots, "top2_key_slots", "check_top2_key_slots")
    seed = _new_seed(seed)

    def body():
        from ..permuted import permuted_attention

        gen = _gen(seed)
        B, H, N, E, D = 1, 2, 48, 4, 16
        q_logits = torch.randn(B, H, N, E, generator=gen)
        k_logits = torch.randn(B, H, N, E, generator=gen)
        what = f"top2_key_slots(k_logits of shape {(B, H, N, E)})"
        got = _call(top2_key_slots, k_logits.clone(), what=what)
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            raise _Fail(f"{what} should return three tensors (k_index, k_pos, k_buckets), got {type(got).__name__}")
        k_index, k_pos, k_buckets = (_as_tensor(t, what) for t in got)
        shape = tuple(k_index.shape)
        if len(shape) != 3 or shape[:2] != (B, H) or tuple(k_pos.shape) != shape or tuple(k_buckets.shape) != shape:
            raise _Fail(f"{what}: k_index, k_pos and k_buckets should share one shape (B, H, S) with B, H = {B}, {H}; "
                        f"got {tuple(k_index.shape)}, {tuple(k_pos.shape)}, {tuple(k_buckets.shape)}")
        if any(t.dtype == torch.bool or t.is_floating_point() for t in (k_index, k_pos, k_buckets)):
            raise _Fail(f"{what}: the three tensors should hold integers")
        k_index, k_pos, k_buckets = (t.cpu().long() for t in (k_index, k_pos, k_buckets))
        if bool(((k_index < 0) | (k_index >= N)).any()):
            raise _Fail(f"{what}: k_index holds {int(k_index.min())}..{int(k_index.max())}; tokens are 0..{N - 1}")
        real = k_pos >= 0
        if not torch.equal(k_pos[real], k_index[real]):
            raise _Fail(f"{what}: a real key slot's k_pos must be its token's position k_index "
                        "(positions are the causal coordinate)", "k_pos = k_index")
        pos = torch.arange(N).expand(B, H, N)
        q_buckets = q_logits.argmax(-1)
        top2 = k_logits.topk(2, dim=-1).indices
        expected = reference.causal_mask(N) & (top2[..., None, :, :] == q_buckets[..., :, None, None]).any(-1)
        allowed, copies = _slots_mask(pos, q_buckets, k_index, k_pos, k_buckets, N)
        if bool((copies > 1).any()):
            b, h, i, j = (int(x) for x in (copies > 1).nonzero()[0])
            raise _Fail(f"query {i} (head {h}) would attend key {j} through {int(copies[b, h, i, j])} slots: its "
                        "softmax would count that key more than once", "give each key one slot per bucket it joins")
        missing, extra = expected & ~allowed, allowed & ~expected
        for bad, word in ((missing, "miss"), (extra, "allow")):
            if bool(bad.any()):
                b, h, i, j = (int(x) for x in bad.nonzero()[0])
                raise _Fail(f"head {h}: the slots {word} the pair query {i} (expert {int(q_buckets[b, h, i])}) × key "
                            f"{j} (top-2 experts {top2[b, h, j].tolist()}); {int(bad.sum())} such pairs",
                            "key j must sit in the buckets of its two best experts, k_logits.topk(2).indices")
        # Real positions must ascend along the slots of each bucket (permuted_attention's contract).
        for b in range(B):
            for h in range(H):
                for e in k_buckets[b, h].unique().tolist():
                    p = k_pos[b, h][(k_buckets[b, h] == e) & real[b, h]]
                    if bool((p[1:] < p[:-1]).any()):
                        raise _Fail(f"head {h}, bucket {e}: key positions {p.tolist()[:8]}... do not ascend along "
                                    "the slots", "order the slots by token: slot 2j and 2j + 1 hold key j")
        dev = device()
        x = [_randn(B, H, N, D, gen=gen) for _ in range(3)]
        def slots(t):  # (B, H, N, D) -> (B, H, S, D): the key of each slot
            return t.gather(2, k_index[..., None].expand(*k_index.shape, D))

        out = permuted_attention(x[0].float().to(dev), slots(x[1]).float().to(dev), slots(x[2]).float().to(dev),
                                 pos.to(dev), k_pos.to(dev), q_buckets.to(dev), k_buckets.to(dev), n_buckets=E)
        truth = reference.attention(*x, allowed=expected)
        err = _compare(out, truth, "permuted_attention on your slots", atol=_tol(), rtol=_tol())
        n_pairs = int(expected.sum())
        return (f"{shape[-1]} key slots for {N} keys, {n_pairs} allowed pairs ({n_pairs / (H * N * (N + 1) / 2):.0%} "
                f"of causal) as the router says; permuted_attention on them matches the reference (max error {err:.1e})")

    return _run("08 · exercise 1, top2_key_slots", body, seed)
