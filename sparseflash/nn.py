"""``SparseCausalSelfAttention``: what a GPT-style block needs from sparseflash.

One module, three attentions (``mode``):

* ``"dense"``: causal FlashAttention (:func:`~sparseflash.flash_attention`).
* ``"hash"``: hash-bucket attention (:func:`~sparseflash.hash_sparse_attention`), the
  paper's hashformer.  Queries and keys are bucketed by angular LSH, per head:
  each kv head has its own random rotation, drawn once at construction from
  ``seed`` and kept as a buffer (fixed, not redrawn per step, so a trained model
  sees the same buckets at evaluation); a query head uses its kv head's rotation.
  Queries are hashed from their own (normalised) vectors and keys from theirs, with
  the same rotation, so that a query and the keys it would score highly tend to
  share a bucket.  Hashing reads q and k before the rotary embedding: buckets follow
  content, not position.  No gradient flows through the bucket choice.  By default each
  query also sees the ``window = 128`` keys ending at its own, whatever their buckets
  (``hash_sparse_attention(..., window=128)``): pure hashing drops the local context a
  language model relies on and trains to a much worse loss; the union with a short exact
  window trains like dense attention at a fraction of its pairs (a 6-layer byte-level GPT,
  1000 steps at 8192 tokens: validation loss 1.470 against dense's 1.503 and pure hashing's
  2.18, with about 22% of the pairs; 128 did as well as 256 there, with fewer pairs).
  ``window=0`` is the paper's pure hashing.
* ``"qk"``: query/key dropping (:func:`~sparseflash.qk_sparse_attention`).  With
  ``qk_gate="topk"`` a learned per-head gate (a linear map of the token) scores each
  token; each head keeps the ``keep_rate`` best-scoring queries and keys
  (:func:`~sparseflash.topk_keep`).  So that the gate learns, kept outputs are
  scaled by ``sigmoid(query score)`` and kept values by ``sigmoid(key score)``: the
  scores get gradients through the tokens they keep.  Note that top-k over the
  sequence lets a token's fate depend on later tokens' scores: fine for
  training-speed studies, not for autoregressive sampling.  With
  ``qk_gate="random"`` each token is kept with probability ``keep_rate`` (the
  paper's random dropping), drawn anew each call, in ``eval()`` mode too: the
  dropping is the attention pattern, not a regulariser.

Shapes follow nanoGPT: ``x`` is ``(B, N, C)``; heads ``(B, H, N, D)`` inside.
Grouped-query attention: ``n_kv_heads`` kv heads shared by ``n_heads // n_kv_heads``
query heads each (never repeated in memory).  Everything runs on CPU through
Triton's interpreter (small sizes) and on CUDA, eager or under ``torch.compile``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._runtime import MAX_HEAD_DIM, MIN_HEAD_DIM, check_window
from .flash import flash_attention
from .hash_sparse import hash_sparse_attention
from .hashing import lsh_buckets, lsh_rotations
from .qk_sparse import qk_sparse_attention, random_keep, topk_keep

MODES = ("dense", "hash", "qk")
#: The sliding window each mode uses when ``window`` is not given: hash attention keeps an
#: exact local path by default (see the module docstring), the others have none.
DEFAULT_WINDOW = {"dense": 0, "hash": 128, "qk": 0}
QK_GATES = ("topk", "random")


def rotary(x: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary position embedding of ``x`` ``(B, H, N, D)`` (pairs of halves, as in GPT-NeoX)."""
    N, D = x.shape[-2], x.shape[-1]
    half = D // 2
    freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angle = torch.arange(N, device=x.device, dtype=torch.float32)[:, None] * freq
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., :half].float(), x[..., half:2 * half].float()
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, x[..., 2 * half:].float()], dim=-1)
    return out.to(x.dtype)


class SparseCausalSelfAttention(nn.Module):
    """Causal self-attention for GPT-style models, dense or sparse (see the module docstring).

    Args:
        embed_dim: model width ``C``.
        n_heads: query heads ``H``; head dim ``D = C // H`` (16 to 128).
        mode: ``"dense"``, ``"hash"`` or ``"qk"``.
        n_kv_heads: key/value heads (GQA/MQA); default ``n_heads``.
        n_buckets: hash buckets (even, ``mode="hash"``).
        keep_rate: fraction of queries and keys kept (``mode="qk"``).
        qk_gate: ``"topk"`` (learned gate) or ``"random"`` (``mode="qk"``).
        window: every query also sees the ``window`` most recent keys (its own included),
            whatever the sparse pattern says; ``mode="dense"`` with a window is sliding-window
            attention.  Default (None): :data:`DEFAULT_WINDOW` of the mode (128 for
            ``"hash"``, else 0); ``0``: none.
        positional: ``"rotary"`` or ``None`` (the caller adds positions elsewhere).
        bias: biases in the projections.
        seed: seed of the LSH rotations.  Give each layer its own (e.g. the layer's
            index): layers built with the same seed bucket alike.

    Shape:
        ``forward(x)``: ``x`` ``(B, N, C)`` -> ``(B, N, C)``.
    """

    def __init__(self, embed_dim: int, n_heads: int, *, mode: str = "dense", n_kv_heads: int | None = None,
                 n_buckets: int = 8, keep_rate: float = 0.5, qk_gate: str = "topk", window: int | None = None,
                 positional: str | None = "rotary", bias: bool = False, seed: int = 0):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        window = DEFAULT_WINDOW[mode] if window is None else check_window(window)
        if embed_dim < 1 or n_heads < 1:
            raise ValueError(f"embed_dim and n_heads must be positive, got {embed_dim} and {n_heads}")
        if embed_dim % n_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by n_heads ({n_heads})")
        if not MIN_HEAD_DIM <= embed_dim // n_heads <= MAX_HEAD_DIM:
            raise ValueError(f"head dim embed_dim // n_heads must be between {MIN_HEAD_DIM} and {MAX_HEAD_DIM}, got "
                             f"{embed_dim} // {n_heads} = {embed_dim // n_heads}")
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads}), which is >= 1")
        if positional not in ("rotary", None):
            raise ValueError(f"positional must be 'rotary' or None, got {positional!r}")
        if qk_gate not in QK_GATES:
            raise ValueError(f"qk_gate must be one of {QK_GATES}, got {qk_gate!r}")
        if mode == "qk" and not 0.0 < keep_rate <= 1.0:
            raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}")
        self.embed_dim, self.n_heads, self.n_kv_heads = embed_dim, n_heads, n_kv_heads
        self.head_dim = embed_dim // n_heads
        self.mode, self.n_buckets, self.keep_rate, self.qk_gate = mode, n_buckets, keep_rate, qk_gate
        self.window = window
        self.positional = positional
        self.qkv = nn.Linear(embed_dim, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias)
        self.proj = nn.Linear(n_heads * self.head_dim, embed_dim, bias=bias)
        if mode == "hash":
            self.register_buffer("rotations", lsh_rotations(self.head_dim, n_buckets, heads=n_kv_heads, seed=seed))
        if mode == "qk" and qk_gate == "topk":
            self.gate = nn.Linear(embed_dim, n_heads + n_kv_heads, bias=True)

    def extra_repr(self) -> str:
        extra = {"hash": f", n_buckets={self.n_buckets}", "qk": f", keep_rate={self.keep_rate}, "
                 f"qk_gate={self.qk_gate!r}"}.get(self.mode, "")
        return (f"{self.embed_dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, mode={self.mode!r}"
                f"{extra}, window={self.window}, positional={self.positional!r}")

    def _buckets(self, x: Tensor) -> Tensor:
        """LSH ids ``(B, heads, N)`` of ``x`` with the rotation of each head's kv head."""
        group = x.shape[1] // self.n_kv_heads
        rot = self.rotations.repeat_interleave(group, dim=0)
        return lsh_buckets(nn.functional.normalize(x.float(), dim=-1), self.n_buckets, rotations=rot)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (batch, seq_len, {self.embed_dim}), got {tuple(x.shape)}")
        B, N, C = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, N, H + 2 * Hkv, D).transpose(1, 2).split([H, Hkv, Hkv], dim=1)
        if self.mode == "hash":
            with torch.no_grad():
                q_buckets, k_buckets = self._buckets(q), self._buckets(k)
        if self.positional == "rotary":
            q, k = rotary(q), rotary(k)
        w = self.window
        if self.mode == "dense":
            y = flash_attention(q, k, v, window=w)
        elif self.mode == "hash":
            y = hash_sparse_attention(q, k, v, q_buckets, k_buckets, n_buckets=self.n_buckets, window=w)
        elif self.qk_gate == "random":
            q_keep = random_keep((B, H, N), self.keep_rate, device=x.device)
            k_keep = random_keep((B, Hkv, N), self.keep_rate, device=x.device)
            y = qk_sparse_attention(q, k, v, q_keep, k_keep, window=w)
        else:
            q_score, k_score = self.gate(x).float().transpose(1, 2).split([H, Hkv], dim=1)
            q_keep, k_keep = topk_keep(q_score, self.keep_rate), topk_keep(k_score, self.keep_rate)
            v = v * torch.sigmoid(k_score)[..., None].to(v.dtype)
            y = qk_sparse_attention(q, k, v, q_keep, k_keep, window=w) * torch.sigmoid(q_score)[..., None].to(v.dtype)
        return self.proj(y.transpose(1, 2).reshape(B, N, H * D))

