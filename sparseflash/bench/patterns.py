"""The inputs of one benchmark configuration: shapes, attention patterns, and their float64 ground truth.

A *pattern* is what a sparse variant is asked to compute: dense causal, query/key
dropping (``random_keep`` masks), hash buckets (random or LSH bucket ids), a causal
sliding window of ``W`` keys (family ``window``), or the union of hash buckets with
such a window (family ``hash`` with ``window=W``, named ``hash_<n>_w<W>``: pair
``(i, j)`` allowed iff ``j <= i`` and same bucket or ``i - j < W``).  The same
:class:`Pattern` object gives our kernels their masks / bucket ids, FlexAttention its
layout (:meth:`Pattern.layout`, the one the ops build; the window patterns run in
natural order) and the float64 reference its boolean mask (:meth:`Pattern.allowed`),
so every variant of a configuration is checked against the same answer.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..hashing import lsh_buckets
from ..layout import bucket_sort_layout, compact_layout
from ..qk_sparse import random_keep

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def fmt_param(x) -> str:
    """``0.3`` -> ``"0.3"``, ``16`` -> ``"16"``: the suffix of a sparse variant's name."""
    return f"{x:g}" if isinstance(x, float) else str(x)


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"1x4x65536"`` -> ``(B, H, N) = (1, 4, 65536)`` (argparse type of ``--shapes``)."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        b, h, n = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BxHxN (e.g. 1x4x65536), got {text!r}") from None
    if min(b, h, n) < 1:
        raise argparse.ArgumentTypeError(f"B, H and N must be >= 1, got {text!r}")
    return b, h, n


def dense_causal_flops(B: int, H: int, N: int, D: int, mode: str) -> float:
    """Effective FLOPs of dense causal attention: fwd 4·B·H·N²·D/2, bwd 2.5×, fwd+bwd 3.5×."""
    fwd = 4.0 * B * H * N * N * D / 2.0
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


# --------------------------------------------------------------------------------------
# Attention patterns: masks for the reference, layouts for ours and flex
# --------------------------------------------------------------------------------------


@dataclass
class Pattern:
    """One attention pattern of one configuration: dense causal, qk dropping, hash buckets, a sliding
    window (``family="window"``, ``param=W``) or hash buckets ∪ a sliding window (``family="hash"``,
    ``window=W``)."""

    family: str  # dense | qk | hash | window
    param: float | int | None
    q_keep: torch.Tensor | None = None
    k_keep: torch.Tensor | None = None
    q_buckets: torch.Tensor | None = None
    k_buckets: torch.Tensor | None = None
    window: int = 0  # W of the window family, and of a hash ∪ window union (0: none)
    seq_len: int | None = None  # N (needed by the window family, which has no tensors)
    cache: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """``dense``, ``qk_0.3``, ``hash_16``, ``hash_16_w256`` (union), ``window_256``."""
        if self.family == "dense":
            return "dense"
        base = f"{self.family}_{fmt_param(self.param)}"
        return f"{base}_w{self.window}" if self.window and self.family != "window" else base

    def allowed(self, bs, hs, i0: int, i1: int, n_k: int) -> torch.Tensor:
        """``(S, i1-i0, n_k)`` bool mask of the (batch, head) slices ``bs, hs``, query rows i0:i1
        (``(1, i1-i0, n_k)`` for the head-independent dense and window patterns: it broadcasts)."""
        dev = bs.device
        i = torch.arange(i0, i1, device=dev)[:, None]
        j = torch.arange(n_k, device=dev)[None, :]
        m = (j <= i)[None]
        band = (i - j < self.window)[None]
        if self.family == "qk":
            m = m & self.q_keep[bs, hs, i0:i1, None] & self.k_keep[bs, hs, None, :n_k]
        elif self.family == "hash":
            same = self.q_buckets[bs, hs, i0:i1, None] == self.k_buckets[bs, hs, None, :n_k]
            m = m & (same | band) if self.window else m & same
        elif self.family == "window":
            m = m & band
        return m

    def layout(self):
        """``(q_index, q_pos, k_index, k_pos, q_sorted_buckets, k_sorted_buckets)``, as the ops build it.

        (qk and pure hash patterns only: FlexAttention runs the window patterns in natural order.)"""
        if self.family == "qk":
            qi, qp = compact_layout(self.q_keep)
            ki, kp = compact_layout(self.k_keep)
            return qi, qp, ki, kp, None, None
        qi, qp, qb = bucket_sort_layout(self.q_buckets)
        ki, kp, kb = bucket_sort_layout(self.k_buckets)
        return qi, qp, ki, kp, qb, kb

    def pair_density(self) -> float:
        """Allowed (query, key) pairs / dense causal pairs ``N(N+1)/2``, over all (b, h).

        Exact: per query ``i``, the window gives ``min(W, i + 1)`` keys, and the union adds
        the keys ``j <= i - W`` of ``i``'s bucket (a one-hot cumulative count gathered at row
        ``i - W``)."""
        if self.family == "dense":
            return 1.0
        if self.family == "window":
            N = self.seq_len  # the window family has no tensors to read N off
            i = torch.arange(N, dtype=torch.float64)
            return torch.clamp(i + 1, max=self.window).sum().item() / (N * (N + 1) / 2)
        if self.family == "qk":
            per_q = torch.cumsum(self.k_keep.to(torch.int64), -1) * self.q_keep
        else:
            nb = int(max(self.q_buckets.max().item(), self.k_buckets.max().item())) + 1
            onehot = F.one_hot(self.k_buckets.long(), nb).to(torch.int32).cumsum(-2)  # (B,H,N,nb)
            qb = self.q_buckets.long()[..., None]
            W = self.window
            if W:
                N = onehot.shape[-2]
                i = torch.arange(N, device=onehot.device)
                rows = onehot.index_select(-2, (i - W).clamp(min=0))  # row i - W: keys j <= i - W
                far = rows.gather(-1, qb)[..., 0].to(torch.int64) * (i >= W)
                per_q = far + torch.clamp(i + 1, max=W)
            else:
                per_q = onehot.gather(-1, qb)[..., 0].to(torch.int64)
        B, H, N = per_q.shape
        return per_q.sum().item() / (B * H * N * (N + 1) / 2)


def window_sizes(args) -> list[int]:
    """The positive ``--windows`` values, in order, without repeats (``--windows`` / ``--windows 0``: none)."""
    return list(dict.fromkeys(int(w) for w in (getattr(args, "windows", None) or []) if int(w) > 0))


def pattern_stubs(args) -> list[Pattern]:
    """The patterns :func:`make_patterns` builds, in its order, without their tensors (names and
    families only: enough to count and select variants)."""
    pats = [Pattern("qk", float(r)) for r in args.keep_rates]
    pats += [Pattern("hash", int(n)) for n in args.buckets]
    for w in window_sizes(args):
        pats.append(Pattern("window", w, window=w))
        pats += [Pattern("hash", int(n), window=w) for n in args.buckets]
    return pats


def make_patterns(args, B, H, N, device, q, k, seed) -> list[Pattern]:
    """The sparse patterns of one configuration: one per ``--keep-rates`` and ``--buckets`` value,
    then for each ``--windows`` value ``W``: the window alone and its union with each bucket count
    (the same bucket ids as the pure hash pattern of that count, so the two compare)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    pats = []
    for rate in args.keep_rates:
        qk = random_keep((B, H, N), rate, generator=g, device=device)
        kk = random_keep((B, H, N), rate, generator=g, device=device)
        pats.append(Pattern("qk", float(rate), q_keep=qk, k_keep=kk, seq_len=N))
    hashed = []
    for n in args.buckets:
        if args.bucket_source == "lsh":
            qb = lsh_buckets(q.detach(), n, seed=seed)
            kb = lsh_buckets(k.detach(), n, seed=seed)
        else:
            qb = torch.randint(0, n, (B, H, N), generator=g, device=device)
            kb = torch.randint(0, n, (B, H, N), generator=g, device=device)
        hashed.append(Pattern("hash", int(n), q_buckets=qb, k_buckets=kb, seq_len=N))
    pats += hashed
    for w in window_sizes(args):
        pats.append(Pattern("window", w, window=w, seq_len=N))
        pats += [Pattern("hash", h.param, q_buckets=h.q_buckets, k_buckets=h.k_buckets, window=w, seq_len=N)
                 for h in hashed]
    return pats


# --------------------------------------------------------------------------------------
# Float64 reference on a few (batch, head) slices, chunk by chunk
# --------------------------------------------------------------------------------------


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖x - ref‖ / ‖ref‖`` in float64 (NaN when ``x`` is not finite)."""
    x = x.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    den = ref.norm().item()
    num = (x - ref).norm().item()
    if not math.isfinite(num):
        return float("nan")
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def check_slices(B: int, H: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (batch, head) pairs the check compares: ``(0, 0)``, ``(0, 1)``, ``(B-1, H-1)`` (those that exist)."""
    pairs = []
    for p in ((0, 0), (0, 1), (B - 1, H - 1)):
        if p[0] < B and p[1] < H and p not in pairs:
            pairs.append(p)
    bs = torch.tensor([p[0] for p in pairs], device=device)
    hs = torch.tensor([p[1] for p in pairs], device=device)
    return bs, hs


def reference_slices(pattern: Pattern, q, k, v, grad, bs, hs, need_dq: bool):
    """float64 ``(out, dq)`` of the slices ``[bs, hs]`` (``dq`` None unless ``need_dq``).

    Query rows are processed in chunks that only see keys ``< chunk end`` (causal), so
    memory stays at a few hundred MB whatever ``N``.
    """
    qs, ks, vs = (t.detach()[bs, hs].to(torch.float64) for t in (q, k, v))
    gs = grad[bs, hs].to(torch.float64)
    S, N, D = qs.shape
    scale = 1.0 / math.sqrt(D)
    chunk = int(max(16, min(N, (1 << 28) // (8 * S * N * 2))))
    outs, dqs = [], []
    for i0 in range(0, N, chunk):
        i1 = min(N, i0 + chunk)
        qc = qs[:, i0:i1].clone().requires_grad_(need_dq)
        with torch.enable_grad() if need_dq else torch.no_grad():
            allowed = pattern.allowed(bs, hs, i0, i1, i1)
            s = (qc @ ks[:, :i1].transpose(-1, -2)) * scale
            s = s.masked_fill(~allowed, float("-inf"))
            has_key = allowed.any(-1, keepdim=True)
            p = torch.softmax(s.masked_fill(~has_key, 0.0), dim=-1).masked_fill(~allowed, 0.0)
            o = p @ vs[:, :i1]
        if need_dq:
            (dq,) = torch.autograd.grad(o, qc, gs[:, i0:i1])
            dqs.append(dq)
        outs.append(o.detach())
    return torch.cat(outs, 1), (torch.cat(dqs, 1) if need_dq else None)
