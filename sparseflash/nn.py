"""``SparseCausalSelfAttention``: what a GPT-style block needs from sparseflash.

One module, three attentions (``mode``):

* ``"dense"``: causal FlashAttention (:func:`~sparseflash.flash_attention`).
* ``"hash"``: hash-bucket attention (:func:`~sparseflash.hash_sparse_attention`), the
  paper's hashformer.  Queries and keys are bucketed by angular LSH, per head:
  each kv head has its own random rotation, drawn once at construction from
  ``seed`` and kept as a buffer (fixed, not redrawn per step, so a trained model
  sees the same buckets at evaluation); a query head uses its kv head's rotation.
  Queries are hashed from their own directions and keys from theirs, with
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

Decoding one token at a time (``forward(x, cache=...)``, see :class:`KVCache`): the first
call with an empty cache runs the ordinary forward over the prompt and records every key and
value (after rotary) and, in ``"hash"`` mode, an index of the cached rows by bucket; each
later call takes one new token at the next position and attends over the cache with exactly
the pattern the forward would give it (``"dense"``: every earlier key, or the window;
``"hash"``: the keys of its bucket and the window).  On CUDA that step is the Triton decode
kernel (:func:`~sparseflash.decode_attention`; ``"hash"``: the window tail and the bucket's
row list, read in place: ``O(window + bucket size)`` work, no mask over the cache, no host
synchronisation); elsewhere plain PyTorch in float32 (:meth:`KVCache.attend`).  ``"qk"``
cannot be decoded this way (the top-k gate ranks all tokens of a sequence, later ones
included; random dropping is redrawn per call).

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
from .rotary import rotary, rotary_freq

MODES = ("dense", "hash", "qk")
#: The sliding window each mode uses when ``window`` is not given: hash attention keeps an
#: exact local path by default (see the module docstring), the others have none.
DEFAULT_WINDOW = {"dense": 0, "hash": 128, "qk": 0}
QK_GATES = ("topk", "random")


class KVCache:
    """What one attention layer keeps of the tokens so far, to decode the next ones.

    ``k``, ``v``: ``(B, Hkv, capacity, D)`` keys (after rotary) and values.  Rows ``[0, length)``
    are filled.  ``capacity``: rows to allocate at the first append (at least the prompt's
    length; the storage grows, doubling, if more are appended).  Pass a fresh, empty cache
    per layer to :meth:`SparseCausalSelfAttention.forward`; keep it between calls.

    In ``"hash"`` mode (keys appended with their buckets) the cache also keeps an index of
    its rows by bucket, so that a decode step finds the keys of its query's bucket without
    comparing buckets over the whole cache:

    * ``buckets``: ``(B, Hkv, capacity)`` int32, each row's bucket;
    * ``bucket_rows``: ``(B, Hkv, n_buckets, capacity)`` int32: for sequence ``b``, kv head
      ``j`` and bucket ``u``, the rows of bucket ``u`` in the order they were appended
      (ascending), in the first ``bucket_count[b, j, u]`` entries (the rest is unused);
    * ``bucket_count``: ``(B, Hkv, n_buckets)`` int32.

    Appending one token writes one entry and one count per (sequence, kv head), on the
    device, no host synchronisation; a prompt is indexed at once (a stable sort by bucket).
    Where the cache attends with the kernel, a layer's one-token step writes its rows, buckets
    its new query and key and indexes the key in a single launch (:meth:`append_step`).
    Each bucket's row list is sized for the worst case (every row in one bucket), so it never
    overflows and needs no check: ``4 · n_buckets`` bytes per (row, kv head), against
    ``2 · D · 2`` for bfloat16 keys and values (25% more at ``n_buckets = 16``, ``D = 64``).

    ``kernel``: how :meth:`attend` computes: ``None`` (default): the Triton kernel
    :func:`sparseflash.decode_attention` on CUDA, plain PyTorch (float32, a mask) elsewhere;
    ``True``: the kernel everywhere (on CPU tensors through Triton's interpreter: slow, for
    tests at tiny sizes); ``False``: plain PyTorch.

    ``device_position=True``: the cache also keeps its length on the device, :attr:`position`
    (a ``(1,)`` int64 tensor), and a one-token step reads only that: the new row is written
    at ``position`` (``index_copy_``), the bucket index appends ``position``, the kernel reads
    the length from it and the layer's rotary embedding its offset; then ``position`` grows by
    one, on the device.  Nothing in such a step depends on a Python number that changes from
    token to token, so the step can be captured once in a CUDA graph and replayed for every
    new token (:meth:`~sparseflash.train.model.GPT.generate` with ``cuda_graph=True``).  The
    storage must not grow after capture: give ``capacity`` for the whole generation.  Attends
    with the kernel only (the PyTorch path slices by the Python length).
    """

    def __init__(self, capacity: int = 0, *, kernel: bool | None = None, device_position: bool = False):
        self.capacity = capacity
        self.kernel = kernel
        self.device_position = device_position
        #: ``(1,)`` int64 on the cache's device: the length, with ``device_position=True`` (else None)
        self.position: Tensor | None = None
        self.length = 0
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.buckets: Tensor | None = None
        self.n_buckets: int | None = None
        self.bucket_rows: Tensor | None = None
        self.bucket_count: Tensor | None = None

    def __len__(self) -> int:
        return self.length

    def append(self, k: Tensor, v: Tensor, buckets: Tensor | None = None, *, n_buckets: int | None = None) -> None:
        """Add ``N`` tokens: ``k``, ``v`` ``(B, Hkv, N, D)``; in ``"hash"`` mode ``buckets``
        ``(B, Hkv, N)``, ids in ``[0, n_buckets)`` (``n_buckets`` given at the first append)."""
        if (buckets is None) != (self.bucket_rows is None) and self.length:
            raise ValueError("append buckets to a cache of bucketed keys, and only to one: this cache was filled "
                             + ("without" if self.bucket_rows is None else "with") + " buckets")
        if buckets is not None:
            if self.n_buckets is None:
                if n_buckets is None or n_buckets < 1:
                    raise ValueError(f"the first append of bucketed keys needs n_buckets >= 1, got {n_buckets!r}")
                self.n_buckets = int(n_buckets)
            elif n_buckets is not None and n_buckets != self.n_buckets:
                raise ValueError(f"this cache indexes {self.n_buckets} buckets, got n_buckets={n_buckets}")
            if tuple(buckets.shape) != (*k.shape[:3],):
                raise ValueError(f"buckets must be (B, Hkv, N) = {tuple(k.shape[:3])}, got {tuple(buckets.shape)}")
        start, end = self.length, self.length + k.shape[2]
        if self.k is None or end > self.k.shape[2]:
            size = max(end, self.capacity, 2 * (self.k.shape[2] if self.k is not None else 0))
            self.k, self.v = self._grow(self.k, k, size), self._grow(self.v, v, size)
            if buckets is not None:
                self.buckets = self._grow(self.buckets, buckets.to(torch.int32), size)
                rows = buckets.new_zeros((*k.shape[:2], self.n_buckets, size), dtype=torch.int32)
                if self.bucket_rows is not None:  # entries past a bucket's count are unused: copy all
                    rows[..., :self.bucket_rows.shape[-1]] = self.bucket_rows
                else:
                    self.bucket_count = buckets.new_zeros((*k.shape[:2], self.n_buckets), dtype=torch.int32)
                self.bucket_rows = rows
        if self.device_position and self.position is None:
            self.position = torch.zeros(1, dtype=torch.long, device=k.device)
        if self.device_position and k.shape[2] == 1:  # a step: the row at the device position
            at = self.position
            self.k.index_copy_(2, at, k)
            self.v.index_copy_(2, at, v)
            if buckets is not None:
                self.buckets.index_copy_(2, at, buckets.to(torch.int32))
                self._index(buckets.long(), at.to(torch.int32))
            self.position += 1
        else:
            self.k[:, :, start:end] = k
            self.v[:, :, start:end] = v
            if buckets is not None:
                self.buckets[:, :, start:end] = buckets
                self._index(buckets.long(), start)
            if self.position is not None:
                self.position.fill_(end)
        self.length = end

    def _uses_kernel(self, q: Tensor, kernel: bool | None = None) -> bool:
        """Whether :meth:`attend` computes with the kernel: ``kernel`` if given, else the
        cache's :attr:`kernel`, else on CUDA or with a device position."""
        use_kernel = self.kernel if kernel is None else kernel
        return bool(q.is_cuda or self.position is not None) if use_kernel is None else bool(use_kernel)

    def one_launch(self, q: Tensor, hashed: bool) -> bool:
        """Whether the next one-token step can go through :meth:`append_step`: the cache attends
        with the kernel (as :meth:`attend` decides for ``q``), its storage has room for the row
        (it grows only in :meth:`append`), and it holds buckets exactly when ``hashed``."""
        return self._uses_kernel(q) and self.k is not None and self.length < self.k.shape[2] \
            and (self.bucket_rows is not None) == hashed and (self.position is not None) == self.device_position

    def append_step(self, q: Tensor, k: Tensor, v: Tensor, *, rotary_freq: Tensor | None = None,
                    rotations: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Append one token in one launch (:func:`sparseflash.decode_append.append_step`): ``k``,
        ``v`` ``(B, Hkv, 1, D)`` at the next row, ``k`` after the rotary embedding at that position
        with ``rotary_freq`` (:func:`sparseflash.rotary.rotary_freq`), and with ``rotations``
        ``(Hkv, D, n_buckets / 2)`` indexed under its LSH bucket (of ``k`` before rotary).
        Returns ``q`` ``(B, H, 1, D)`` rotated (or as given) and its buckets ``(B, H)`` int32
        (None without ``rotations``).  The same state as :meth:`append` given the rotated key and
        those buckets.  Only where :meth:`one_launch` says so."""
        from .decode_append import append_step

        at = self.position if self.position is not None else self.length
        out = append_step(q, k, v, self.k, self.v, at, rotary_freq=rotary_freq, rotations=rotations,
                          buckets=self.buckets, bucket_rows=self.bucket_rows, bucket_count=self.bucket_count)
        if self.position is not None:
            self.position += 1
        self.length += 1
        return out

    def _grow(self, old: Tensor | None, new: Tensor, size: int) -> Tensor:
        out = new.new_zeros((*new.shape[:2], size, *new.shape[3:]))
        if old is not None:
            out[:, :, :self.length] = old[:, :, :self.length]
        return out

    def _index(self, kb: Tensor, start) -> None:
        """Append rows ``start + t`` (bucket ``kb[..., t]``, ``kb`` ``(B, Hkv, N)`` int64) to their
        buckets' row lists: the entry at slot ``bucket_count`` of each, then the counts.
        ``start``: an int, or (one token) a one-element int32 tensor, the device position."""
        B, Hkv, N = kb.shape
        cap = self.bucket_rows.shape[-1]
        flat = self.bucket_rows.view(B, Hkv, -1)  # list u of (b, j) is flat[b, j, u·cap : (u+1)·cap]
        if N == 1:  # a decode step: two scatters
            slot = self.bucket_count.gather(-1, kb)
            if isinstance(start, Tensor):
                start = start.expand(slot.shape)
            flat.scatter_(-1, kb * cap + slot, start)
            self.bucket_count.scatter_(-1, kb, slot + 1)
            return
        # A prompt: sort by bucket (stable, so each bucket's rows stay ascending); a row's slot
        # is the bucket's count so far plus its rank among this prompt's rows of the bucket.
        sorted_kb, order = torch.sort(kb, dim=-1, stable=True)
        counts = torch.zeros(B, Hkv, self.n_buckets, dtype=torch.long, device=kb.device)
        counts.scatter_add_(-1, kb, torch.ones_like(kb))
        first = counts.cumsum(-1) - counts  # where each bucket starts in sorted order
        rank = torch.arange(N, device=kb.device) - first.gather(-1, sorted_kb)
        slot = self.bucket_count.long().gather(-1, sorted_kb) + rank
        flat.scatter_(-1, sorted_kb * cap + slot, (order + start).to(torch.int32))
        self.bucket_count += counts.to(torch.int32)

    def allowed(self, n_heads: int, window: int = 0, q_buckets: Tensor | None = None) -> Tensor | None:
        """The keys a new query may attend to, as a mask ``(B, n_heads, length)``, or None for all.

        Query head ``h`` reads kv head ``h // (n_heads / Hkv)``.  ``window = W > 0``: the rows
        ``[length - W, length)``; ``q_buckets`` ``(B, n_heads)``: also the rows of that bucket
        (from :attr:`bucket_rows`; an id outside ``[0, n_buckets)`` adds none).  This is the
        reference (PyTorch) form of what :meth:`attend` gives the kernel; it costs ``O(length)``.
        """
        L = self.length
        if q_buckets is None and not window:
            return None
        B, Hkv = self.k.shape[:2]
        device = self.k.device
        win_start = max(L - window, 0) if window else L
        mask = torch.zeros(B, n_heads, L + 1, dtype=torch.bool, device=device)
        mask[..., win_start:L] = True
        if q_buckets is not None:
            if self.bucket_rows is None:
                raise ValueError("q_buckets given, but this cache holds no bucket index (append keys with buckets)")
            qb = q_buckets.long()
            ok = (qb >= 0) & (qb < self.n_buckets)
            qb = qb.clamp(0, self.n_buckets - 1)
            bi = torch.arange(B, device=device)[:, None]
            hk = (torch.arange(n_heads, device=device) // (n_heads // Hkv))[None, :]
            rows = self.bucket_rows[bi, hk, qb].long()  # (B, n_heads, capacity)
            count = torch.where(ok, self.bucket_count[bi, hk, qb], 0)
            valid = (torch.arange(rows.shape[-1], device=device) < count[..., None]) & (rows < win_start)
            mask.scatter_(-1, torch.where(valid, rows, L), True)
        return mask[..., :L]

    def attend(self, q: Tensor, *, window: int = 0, q_buckets: Tensor | None = None,
               kernel: bool | None = None) -> Tensor:
        """Attention of one new query per head over the cache (its own key already appended).

        ``q`` ``(B, H, 1, D)``; the keys: every row (``window = 0``, no ``q_buckets``), the
        ``window`` most recent rows, and with ``q_buckets`` ``(B, H)`` also the rows of the
        query's bucket: "same bucket or ``i - j < W``", each row once.  ``kernel``: as the
        cache's :attr:`kernel` (which it overrides).  With the kernel the bucket case reads the
        bucket's row list in place (:func:`~sparseflash.decode_attention` with ``list_id``):
        ``O(window + bucket size)`` work and no host synchronisation; without it, a mask from
        :meth:`allowed` and :func:`_decode_attend`.  Returns ``(B, H, 1, D)`` in q's dtype.
        """
        use_kernel = self._uses_kernel(q, kernel)
        if q_buckets is not None and self.bucket_rows is None:
            raise ValueError("q_buckets given, but this cache holds no bucket index (append keys with buckets)")
        if self.position is not None and not use_kernel:
            raise ValueError("a cache with device_position=True attends with the kernel only (kernel=False given)")
        if use_kernel:
            from .decode import decode_attention  # (decode imports nothing from here; kept lazy all the same)

            # the length the kernel reads: the device position (read on the device) or the Python int
            length = self.position.expand(q.shape[0]) if self.position is not None else self.length
            if q_buckets is None:
                return decode_attention(q, self.k, self.v, length, window=window)
            return decode_attention(q, self.k, self.v, length, key_index=self.bucket_rows,
                                    n_keys=self.bucket_count, list_id=q_buckets, window=window)
        return _decode_attend(q, self.k, self.v, self.length, self.allowed(q.shape[1], window, q_buckets))


def _decode_attend(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_len: int, allowed=None) -> Tensor:
    """Attention of one new query per head over the first ``cache_len`` cached keys (PyTorch, float32).

    ``q`` ``(B, H, 1, D)``; ``k_cache``, ``v_cache`` ``(B, Hkv, S, D)`` (``S >= cache_len``,
    ``Hkv`` dividing ``H``; query head ``h`` reads kv head ``h // (H // Hkv)``).  ``allowed``:
    None (every key), a bool mask ``(B, H, cache_len)`` of the keys each query may attend, or a
    pair ``(key_index (B, H, L) int, n_keys (B, H))`` listing them (the first ``n_keys`` entries
    of each row).  Masked softmax in float32, scale ``1/sqrt(D)``; a query with no allowed key
    gets 0.  Returns ``(B, H, 1, D)`` in ``q``'s dtype.  The reference of
    :func:`sparseflash.decode_attention`, which :meth:`KVCache.attend` uses instead on CUDA.
    """
    B, H, _, D = q.shape
    Hkv = k_cache.shape[1]
    g = H // Hkv
    if isinstance(allowed, (tuple, list)):
        key_index, n_keys = allowed
        valid = torch.arange(key_index.shape[-1], device=q.device) < n_keys[..., None]
        mask = torch.zeros(B, H, cache_len + 1, dtype=torch.bool, device=q.device)
        mask.scatter_(-1, torch.where(valid, key_index.long(), cache_len), True)
        allowed = mask[..., :cache_len]
    k = k_cache[:, :, :cache_len].float()
    v = v_cache[:, :, :cache_len].float()
    qg = q.float().view(B, Hkv, g, D)
    scores = torch.einsum("bkgd,bkld->bkgl", qg, k) * D ** -0.5
    if allowed is None:
        p = torch.softmax(scores, dim=-1) if cache_len else scores
        y = torch.einsum("bkgl,bkld->bkgd", p, v)
        return y.reshape(B, H, 1, D).to(q.dtype)
    mask = allowed.view(B, Hkv, g, cache_len)
    scores = scores.masked_fill(~mask, float("-inf"))
    top = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)  # empty rows: no NaN
    p = torch.exp(scores - top) * mask
    denom = p.sum(-1, keepdim=True)
    y = torch.einsum("bkgl,bkld->bkgd", p, v) / denom.clamp_min(1e-30)
    return y.reshape(B, H, 1, D).to(q.dtype)


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
        ``forward(x, cache=KVCache())``: the same output, recording the keys for decoding;
        then ``forward(x1, cache=that_cache)`` with ``x1`` ``(B, 1, C)``, the next token,
        returns its output (``"dense"`` and ``"hash"`` modes; ``"qk"`` raises ``ValueError``).
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
        return lsh_buckets(x, self.n_buckets, rotations=rot)

    def _rotary_freq(self, device: torch.device) -> Tensor | None:
        """The rotary frequencies (float32, whatever the module's dtype), kept per device; None
        without rotary."""
        if self.positional != "rotary":
            return None
        cached = getattr(self, "_freq", None)
        if cached is None or cached.device != device:
            self._freq = cached = rotary_freq(self.head_dim // 2, device=device)
        return cached

    def _decode_buckets(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`_buckets` of a decode step's ``q`` ``(B, H, 1, D)`` and ``k`` ``(B, Hkv, 1, D)``
        in one LSH call (one token: the step is launch-bound, so half the launches matter)."""
        rot = self.rotations
        key = (rot.device, rot.data_ptr(), rot._version)
        if getattr(self, "_qk_rot_key", None) != key:  # the rotations of [query heads, kv heads], once
            group = self.n_heads // self.n_kv_heads
            self._qk_rot = torch.cat([rot.repeat_interleave(group, dim=0), rot], dim=0)
            self._qk_rot_key = key
        ids = lsh_buckets(torch.cat([q, k], dim=1), self.n_buckets, rotations=self._qk_rot)
        return ids[:, :self.n_heads], ids[:, self.n_heads:]

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (batch, seq_len, {self.embed_dim}), got {tuple(x.shape)}")
        if cache is not None:
            if self.mode == "qk":
                raise ValueError("mode 'qk' cannot decode with a cache: its keep sets are chosen over the whole "
                                 "sequence (top-k gate) or redrawn at every call (random)")
            if len(cache):
                return self._decode(x, cache)
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
        if cache is not None:
            if self.mode == "hash":
                cache.append(k, v, k_buckets, n_buckets=self.n_buckets)
            else:
                cache.append(k, v)
        return self.proj(y.transpose(1, 2).reshape(B, N, H * D))

    def _decode(self, x: Tensor, cache: KVCache) -> Tensor:
        """Output of one new token ``x`` ``(B, 1, C)`` at position ``len(cache)``; appends it to ``cache``."""
        B, N, C = x.shape
        if N != 1:
            raise ValueError(f"with a filled cache, x must be one token (batch, 1, {C}), got {tuple(x.shape)}")
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, 1, H + 2 * Hkv, D).transpose(1, 2).split([H, Hkv, Hkv], dim=1)
        hashed = self.mode == "hash"
        # With the kernel, rotary, the cache's rows, the LSH buckets and the bucket index are one
        # launch: at small batch the step is bound by its launches, not by their work.
        if cache.one_launch(q, hashed):
            with torch.no_grad():
                q, qb = cache.append_step(q, k, v, rotary_freq=self._rotary_freq(q.device),
                                          rotations=self.rotations if hashed else None)
            y = cache.attend(q, window=self.window, q_buckets=qb)
            return self.proj(y.transpose(1, 2).reshape(B, 1, H * D))
        if hashed:
            with torch.no_grad():
                q_buckets, k_buckets = self._decode_buckets(q, k)
        # the new token's position: the cache's device position if it keeps one (a step that a
        # CUDA graph can replay), else its Python length
        pos = cache.position if cache.position is not None else len(cache)
        if self.positional == "rotary":  # one call for both (same position): the step is launch-bound
            q, k = rotary(torch.cat([q, k], dim=1), offset=pos).split([H, Hkv], dim=1)
        if hashed:
            cache.append(k, v, k_buckets, n_buckets=self.n_buckets)
            y = cache.attend(q, window=self.window, q_buckets=q_buckets[..., 0])
        else:
            cache.append(k, v)
            y = cache.attend(q, window=self.window)
        return self.proj(y.transpose(1, 2).reshape(B, 1, H * D))

