"""Which tiles a kernel computes: recorded by the kernel (:class:`TileRecord`), and
predicted in PyTorch from the inputs (:func:`flash_schedule`, :func:`qk_schedule`,
:func:`hash_schedule`, each a :class:`TileSchedule`).

The predictions use the kernels' own rules (``flash._dense_key_range`` for dense,
the :class:`~sparseflash.plan.TilePlan` of the same tile-aligned bucket layout for
the sparse kinds, built in plain PyTorch), and split the computed tiles by the
token-level masks of :mod:`sparseflash.reference`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .layout import K_PAD, Q_PAD, bucket_budget, reference_layout
from .plan import reference_tile_plan


class TileRecord:
    """Counts of computed ``(query tile, key tile)`` pairs, written by the kernels.

    Pass one as ``tile_record=`` to any attention function; after the forward (and
    the backward, if run) it holds int32 tensors ``(B, H, n_q_tiles, n_k_tiles)``:

    - ``fwd``: the forward pass,
    - ``bwd_kv``: the backward's dK/dV loop (a key tile walking query tiles),
    - ``bwd_q``: the backward's dQ loop (a query tile walking key tiles),

    each entry the number of times that pair was computed (0 = skipped).  For the
    sparse variants the tiles are in the kernel's (compacted or sorted) layout.
    Recording is a compile-time switch: kernels launched without a record carry no
    trace of it.
    """

    def __init__(self) -> None:
        self.kind: str | None = None
        self.config: dict = {}
        self.maps: dict[str, Tensor] = {}

    def start(self, kind: str, config: dict) -> None:
        self.kind, self.config, self.maps = kind, dict(config), {}
        self.window, self.window_config = 0, {}

    def buffer(self, name: str, shape, device) -> Tensor:
        self.maps[name] = torch.zeros(shape, dtype=torch.int32, device=device)
        return self.maps[name]

    def __getattr__(self, name: str) -> Tensor:
        maps = self.__dict__.get("maps", {})
        if name in maps:
            return maps[name]
        raise AttributeError(name)


# --------------------------------------------------------------------------------------
# Predicted schedules
# --------------------------------------------------------------------------------------

#: Tile states in :attr:`TileSchedule.state`.
SKIPPED, PARTIAL, FULL, EMPTY = 0, 1, 2, 3
STATE_NAMES = {
    SKIPPED: "skipped",
    PARTIAL: "computed, partly masked",
    FULL: "computed, no pair masked",
    EMPTY: "computed, every pair masked",
}

#: Default tile size of the kernels on the CPU interpreter (``flash.kernel_config``).
CPU_BLOCK = 32


@dataclass
class TileSchedule:
    """Which ``(query tile, key tile)`` pairs a kernel computes, predicted in PyTorch.

    Built by :func:`flash_schedule`, :func:`qk_schedule` and :func:`hash_schedule`.
    Tiles are in the kernel's layout: original order for ``"flash"``, kept tokens
    compacted to the front for ``"qk"``, tokens sorted by bucket for ``"hash"``.

    Attributes:
        kind: ``"flash"``, ``"qk"`` or ``"hash"`` (as ``TileRecord.kind``).
        state: int8 ``(B, H, n_q_tiles, n_k_tiles)``: :data:`SKIPPED` (0),
            :data:`PARTIAL` (1, computed, some pairs masked), :data:`FULL` (2,
            computed, all ``block_m × block_n`` slot pairs allowed: no mask needed),
            :data:`EMPTY` (3, computed although no pair is allowed: the price of a
            tile rule that looks only at per-tile summaries, e.g. hash tiles whose
            bucket ranges overlap without a same-bucket causal pair).  Slots past the
            end of the sequence and padding slots of a compacted layout count as
            masked, so ragged edge tiles are PARTIAL.
        allowed_count: int32, same shape: allowed token pairs in each tile.
        mask: bool ``(B, H, n_q, n_k)``, the token-level mask in *original*
            coordinates (``reference.causal_mask`` / ``qk_dropping_mask`` / ``hash_mask``);
            a property, built on first use for ``"flash"`` (whose tile counts are
            computed in closed form, so long dense schedules stay cheap).
        q_index, k_index: int64 ``(B, H, N)``: layout slot ``a`` holds original token
            ``q_index[..., a]`` (the identity for ``"flash"``).
        q_pos, k_pos: int32 ``(B, H, N)``: original position of each slot, ``-1`` for
            the padding slots of a compacted layout.
        q_buckets, k_buckets: bucket id of each slot (``"hash"`` only, else None): the layout's
            ``bucket``, so the overflow run's slots carry its index (``n_buckets``) rather
            than their ids, and padding -1.
        block_m, block_n: tile sizes (query, key), as the kernel's ``BLOCK_M``, ``BLOCK_N``.
        causal: False only for non-causal dense attention.
        window: the sliding window.  For ``"flash"`` the tiles of ``flash_attention(window=W)``
            (the diagonal band); for ``"qk"`` and ``"hash"`` the union's *far part* only
            (the pattern's pairs with ``i - j >= W``, in the layout of query positions
            ``i - W``): the union's band is ``flash_schedule(N, window=W)``.
    """

    kind: str
    state: Tensor
    allowed_count: Tensor
    q_index: Tensor
    k_index: Tensor
    q_pos: Tensor
    k_pos: Tensor
    block_m: int
    block_n: int
    causal: bool = True
    q_buckets: Tensor | None = None
    k_buckets: Tensor | None = None
    _mask: Tensor | None = field(default=None, repr=False)
    n_q_tokens: int | None = None
    n_k_tokens: int | None = None
    window: int = 0

    @property
    def mask(self) -> Tensor:
        """bool ``(B, H, n_q, n_k)``: the token-level mask in original coordinates
        (built on first use for ``"flash"``, where it is the same for every head)."""
        if self._mask is None:
            m = reference.causal_mask(self.n_q, self.n_k, device=self.state.device) if self.causal else \
                torch.ones(self.n_q, self.n_k, dtype=torch.bool, device=self.state.device)
            self._mask = m.expand(*self.state.shape[:2], self.n_q, self.n_k)
        return self._mask

    # ---- shapes ----
    @property
    def n_q(self) -> int:
        """Query tokens (the layout may hold more slots: padding to tile boundaries)."""
        return self.q_index.shape[-1] if self.n_q_tokens is None else self.n_q_tokens

    @property
    def n_k(self) -> int:
        """Key tokens."""
        return self.k_index.shape[-1] if self.n_k_tokens is None else self.n_k_tokens

    @property
    def n_q_slots(self) -> int:
        """Query slots of the layout: tokens, plus padding to tile boundaries for the sparse kinds."""
        return self.q_index.shape[-1]

    @property
    def n_k_slots(self) -> int:
        return self.k_index.shape[-1]

    @property
    def n_tiles(self) -> tuple[int, int]:
        """``(n_q_tiles, n_k_tiles)``."""
        return self.state.shape[-2], self.state.shape[-1]

    # ---- what is computed ----
    @property
    def computed(self) -> Tensor:
        """bool ``(B, H, n_q_tiles, n_k_tiles)``: tiles the kernel loads (each pass once)."""
        return self.state != SKIPPED

    @property
    def wrongly_skipped(self) -> Tensor:
        """bool, same shape: skipped tiles that hold an allowed pair (must be all False)."""
        return (self.state == SKIPPED) & (self.allowed_count > 0)

    def counts(self) -> dict[str, int]:
        """Number of tiles in each state, over all batches and heads."""
        return {name: int((self.state == code).sum()) for code, name in STATE_NAMES.items()}

    @property
    def dense_causal_tiles(self) -> int:
        """Tiles per (batch, head) that dense causal FlashAttention computes for these sizes."""
        return dense_causal_tile_count(self.n_q, self.n_k, self.block_m, self.block_n)

    @property
    def computed_per_head(self) -> Tensor:
        """int64 ``(B, H)``: computed tiles of each head."""
        return self.computed.sum((-2, -1))

    @property
    def computed_fraction(self) -> float:
        """Computed tiles / tiles of the dense *causal* grid, averaged over (batch, head).

        The denominator is what :func:`~sparseflash.flash_attention` with
        ``causal=True`` computes for the same ``N`` and tile sizes, so 1.0 for dense
        causal, about 2 for dense non-causal, about ``r²`` for query/key dropping
        with keep rate ``r`` and about ``1/n_buckets`` for hashing with balanced
        buckets (more where tiles straddle buckets).  See :attr:`grid_fraction`
        for the fraction of the whole tile grid instead.
        """
        per_head = self.computed_per_head.double().mean().item()
        return per_head / max(self.dense_causal_tiles, 1)

    @property
    def grid_fraction(self) -> float:
        """Computed tiles / all ``n_q_tiles × n_k_tiles`` tiles (dense causal: → 1/2)."""
        n_qt, n_kt = self.n_tiles
        return self.computed_per_head.double().mean().item() / max(n_qt * n_kt, 1)

    @property
    def ideal_speedup(self) -> float:
        """Dense causal computed tiles / this schedule's computed tiles (``1 / computed_fraction``).

        The speed-up over dense causal FlashAttention if time were proportional to
        computed tiles (``inf`` when nothing is computed).
        """
        f = self.computed_fraction
        return math.inf if f == 0 else 1.0 / f

    # ---- coordinates ----
    def layout_mask(self) -> Tensor:
        """bool ``(B, H, n_q, n_k)``: the token-level mask in the kernel's layout
        (``mask[q_index[a], k_index[b]]``, False for padding slots)."""
        return _to_layout(self.mask, self.q_index, self.k_index, self.q_pos, self.k_pos)

    def q_tile_of_token(self) -> Tensor:
        """int64 ``(B, H, n_q)``: the layout query tile each original query falls in."""
        return _inverse(self.q_index, self.n_q) // self.block_m

    def k_tile_of_token(self) -> Tensor:
        """int64 ``(B, H, n_k)``: the layout key tile each original key falls in."""
        return _inverse(self.k_index, self.n_k) // self.block_n

    def state_of_pairs(self, b: int = 0, h: int = 0) -> Tensor:
        """int8 ``(n_q, n_k)``: for each original pair ``(i, j)``, the state of the
        layout tile that pair falls in (how the kernel's tiles look in original coordinates)."""
        tq = self.q_tile_of_token()[b, h]
        tk = self.k_tile_of_token()[b, h]
        return self.state[b, h][tq[:, None], tk[None, :]]

    def summary(self) -> str:
        """One line: kind, sizes, computed tiles and fractions."""
        n_qt, n_kt = self.n_tiles
        per_head = self.computed_per_head.double().mean().item()
        return (f"{self.kind}: N={self.n_q}, tiles {self.block_m}×{self.block_n} ({n_qt}×{n_kt} grid), "
                f"{per_head:g} tiles computed per head = {self.computed_fraction:.3f} of dense causal "
                f"(ideal speed-up {self.ideal_speedup:.2f}×)")


def dense_causal_tile_count(n_q: int, n_k: int, block_m: int, block_n: int) -> int:
    """Tiles dense causal FlashAttention computes for one (batch, head)."""
    return int(_dense_computed(n_q, n_k, True, block_m, block_n).sum())


def _dense_computed(n_q, n_k, causal, block_m, block_n, device=None) -> Tensor:
    n_qt, n_kt = -(-n_q // block_m), -(-n_k // block_n)
    if not causal:
        return torch.ones(n_qt, n_kt, dtype=torch.bool, device=device)
    t = torch.arange(n_qt, device=device)
    kt = torch.arange(n_kt, device=device)
    last_query = torch.clamp((t + 1) * block_m, max=n_q) - 1
    return kt[None, :] * block_n <= last_query[:, None]


def _inverse(index: Tensor, n: int | None = None) -> Tensor:
    """Slot of each of the ``n`` tokens, from ``index`` (slot -> token, ``n`` for padding)."""
    n = index.shape[-1] if n is None else n
    index = index.long()
    src = torch.arange(index.shape[-1], device=index.device).expand_as(index)
    out = torch.empty((*index.shape[:-1], n + 1), dtype=torch.long, device=index.device)
    return out.scatter_(-1, index.clamp(max=n), src)[..., :n]


def _to_layout(mask, q_index, k_index, q_pos, k_pos) -> Tensor:
    q_index = q_index.long().clamp(max=mask.shape[-2] - 1)
    k_index = k_index.long().clamp(max=mask.shape[-1] - 1)
    rows = mask.gather(-2, q_index[..., :, None].expand(*q_index.shape, mask.shape[-1]))
    lay = rows.gather(-1, k_index[..., None, :].expand(*rows.shape[:-1], k_index.shape[-1]))
    return lay & (q_pos >= 0)[..., :, None] & (k_pos >= 0)[..., None, :]


def _tile_counts(layout_mask: Tensor, block_m: int, block_n: int) -> Tensor:
    """int32 ``(B, H, n_q_tiles, n_k_tiles)``: allowed pairs per tile (vectorised)."""
    n_q, n_k = layout_mask.shape[-2:]
    pad_q, pad_k = (-n_q) % block_m, (-n_k) % block_n
    m = F.pad(layout_mask.to(torch.int32), (0, pad_k, 0, pad_q))
    m = m.unflatten(-1, (-1, block_n)).unflatten(-3, (-1, block_m))  # (.., nqt, BM, nkt, BN)
    return m.sum((-3, -1), dtype=torch.int32)


def _dense_counts(n_q, n_k, causal, block_m, block_n, device=None) -> Tensor:
    """int32 ``(n_q_tiles, n_k_tiles)``: allowed pairs per tile of the (non-)causal mask,
    counted in closed form row by row (no ``N × N`` mask, so large ``N`` stays cheap)."""
    k_lo = torch.arange(0, n_k, block_n, device=device)
    k_hi = torch.clamp(k_lo + block_n, max=n_k)
    i = torch.arange(n_q, device=device)[:, None]
    if causal:  # keys k_lo <= j <= min(i, k_hi - 1)
        per_row = (torch.minimum(i, k_hi - 1) - k_lo + 1).clamp(min=0)
    else:
        per_row = (k_hi - k_lo).expand(n_q, -1)
    per_row = F.pad(per_row, (0, 0, 0, (-n_q) % block_m))
    return per_row.unflatten(0, (-1, block_m)).sum(1).to(torch.int32)


def _states(computed: Tensor, counts: Tensor, block_m: int, block_n: int) -> Tensor:
    state = torch.full(counts.shape, SKIPPED, dtype=torch.int8, device=counts.device)
    state[computed & (counts == 0)] = EMPTY
    state[computed & (counts > 0)] = PARTIAL
    state[computed & (counts == block_m * block_n)] = FULL
    return state


def _as_bhn(x: Tensor, name: str) -> Tensor:
    """Accept ``(N,)``, ``(H, N)`` or ``(B, H, N)``; return ``(B, H, N)``."""
    if x.dim() > 3 or x.dim() == 0:
        raise ValueError(f"{name} must be (N,), (H, N) or (B, H, N), got shape {tuple(x.shape)}")
    while x.dim() < 3:
        x = x.unsqueeze(0)
    return x


def _blocks(block_m, block_n):
    block_m = CPU_BLOCK if block_m is None else int(block_m)
    block_n = block_m if block_n is None else int(block_n)
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        if b < 1:
            raise ValueError(f"{name} must be >= 1, got {b}")
    return block_m, block_n


def flash_schedule(n_q: int, n_k: int | None = None, causal: bool = True, block_m: int | None = None,
                   block_n: int | None = None, *, window: int = 0, batch: int = 1, heads: int = 1,
                   device=None) -> TileSchedule:
    """Tiles of dense FlashAttention (:func:`~sparseflash.flash_attention`).

    Causal: query tile ``t`` computes key tile ``kt`` iff
    ``kt · block_n <= min((t + 1) · block_m, n_q) - 1`` (the key tile starts at or
    before the tile's last query); non-causal: every tile.  With a ``window`` the kernel
    visits exactly the tiles that hold a pair ``0 <= i - j < window`` (a diagonal band).
    ``n_k`` defaults to ``n_q``; ``block_m`` defaults to 32 (the CPU interpreter's tile)
    and ``block_n`` to ``block_m``.  ``state`` is ``(batch, heads, ·, ·)``, the same for
    every head.
    """
    n_k = n_q if n_k is None else n_k
    block_m, block_n = _blocks(block_m, block_n)
    mask = None
    if window:
        mask = reference.window_mask(n_q, n_k, window, device=device)
        counts = _tile_counts(mask, block_m, block_n)
        computed = counts > 0
        mask = mask.expand(batch, heads, n_q, n_k)
    else:
        computed = _dense_computed(n_q, n_k, causal, block_m, block_n, device)
        counts = _dense_counts(n_q, n_k, causal, block_m, block_n, device)
    state = _states(computed, counts, block_m, block_n)
    shape = (batch, heads)
    q_index = torch.arange(n_q, device=device).expand(*shape, n_q)
    k_index = torch.arange(n_k, device=device).expand(*shape, n_k)
    return TileSchedule(
        kind="flash", state=state.expand(*shape, *state.shape), allowed_count=counts.expand(*shape, *counts.shape),
        q_index=q_index, k_index=k_index,
        q_pos=q_index.to(torch.int32), k_pos=k_index.to(torch.int32),
        block_m=block_m, block_n=block_n, causal=bool(causal), _mask=mask, window=int(window),
    )


def _permuted_schedule(kind, mask, shape, q_args, k_args, n_buckets, block_m, block_n, window=0, overflow=False):
    # The kernels' layout and tile plan, built in plain PyTorch (the tests check that
    # the kernels build the same)...  With a window, the far part: queries at i - window.
    if window:
        mask = mask & ~reference.window_mask(shape[-1], window=window, device=mask.device)
    ql = reference_layout(shape, n_buckets=n_buckets, block=block_m, pad=Q_PAD, shift=window, overflow=overflow,
                          **q_args)
    kl = reference_layout(shape, n_buckets=n_buckets, block=block_n, pad=K_PAD, overflow=overflow, **k_args)
    computed = reference_tile_plan(ql, kl).visited()
    # ...and the FULL / PARTIAL / EMPTY split from the token-level mask in layout order.
    q_pos = ql.pos
    k_pos = torch.where(kl.pos == K_PAD, Q_PAD, kl.pos)
    counts = _tile_counts(_to_layout(mask, ql.index, kl.index, q_pos, k_pos), block_m, block_n)
    buckets = dict(q_buckets=ql.bucket, k_buckets=kl.bucket) if kind == "hash" else {}
    return TileSchedule(
        kind=kind, state=_states(computed, counts, block_m, block_n), allowed_count=counts, _mask=mask,
        q_index=ql.index.long(), k_index=kl.index.long(), q_pos=q_pos, k_pos=k_pos, block_m=block_m,
        block_n=block_n, n_q_tokens=shape[-1], n_k_tokens=shape[-1], window=int(window), **buckets,
    )


def qk_schedule(q_keep: Tensor, k_keep: Tensor, block_m: int | None = None,
                block_n: int | None = None, *, window: int = 0) -> TileSchedule:
    """Tiles of query/key dropping (:func:`~sparseflash.qk_sparse_attention`).

    ``q_keep``, ``k_keep``: bool ``(B, H, N)`` (or ``(N,)``, ``(H, N)``).  The layout is
    the kernels' (:func:`~sparseflash.layout.reference_layout` with one bucket: kept
    tokens first, padded to a whole tile, then the dropped ones); tiles are computed
    by the :class:`~sparseflash.plan.TilePlan` (``kmin(S) <= qmax(T)``).  With a
    ``window``: the union's far part (see :class:`TileSchedule`).
    """
    q_keep, k_keep = _as_bhn(q_keep, "q_keep").bool(), _as_bhn(k_keep, "k_keep").bool()
    q_keep, k_keep = torch.broadcast_tensors(q_keep, k_keep)
    block_m, block_n = _blocks(block_m, block_n)
    mask = reference.qk_dropping_mask(q_keep, k_keep)
    return _permuted_schedule("qk", mask, tuple(q_keep.shape), dict(keep=q_keep), dict(keep=k_keep), 1,
                              block_m, block_n, window)


def hash_schedule(q_buckets: Tensor, k_buckets: Tensor, block_m: int | None = None,
                  block_n: int | None = None, *, window: int = 0, n_buckets: int | None = None) -> TileSchedule:
    """Tiles of hash-bucket attention (:func:`~sparseflash.hash_sparse_attention` with this
    ``n_buckets``).

    ``q_buckets``, ``k_buckets``: integer ``(B, H, N)`` (or ``(N,)``, ``(H, N)``) ids, any
    values (labels).  ``n_buckets``: the call's; None here (unlike the call, whose default
    is 64) means the largest id + 1, read off the ids, so that every id ``>= 0`` has a run
    of its own and the layout is no longer than it needs to be: to compare with a
    ``TileRecord`` of a call without ``n_buckets``, pass
    ``n_buckets=sparseflash.layout.DEFAULT_BUCKETS``.  The layout is the kernels'
    (:func:`~sparseflash.layout.reference_layout`: tokens by bucket, each bucket's run
    starting on a tile boundary, ids outside ``[0, n_buckets)`` in the overflow run after
    them); tiles are computed by the :class:`~sparseflash.plan.TilePlan` (same run and
    ``kmin(S) <= qmax(T)``), so no computed tile is EMPTY except in the overflow run (whose
    tiles mix ids).  With a ``window``: the union's far part, the same-bucket pairs with
    ``i - j >= window`` (the band is ``flash_schedule(N, window=window)``).
    """
    q_buckets, k_buckets = _as_bhn(q_buckets, "q_buckets"), _as_bhn(k_buckets, "k_buckets")
    q_buckets, k_buckets = torch.broadcast_tensors(q_buckets, k_buckets)
    block_m, block_n = _blocks(block_m, block_n)
    mask = reference.hash_mask(q_buckets, k_buckets)
    if n_buckets is None:
        top = int(torch.maximum(q_buckets.max(), k_buckets.max())) if q_buckets.numel() else 0
        n_buckets = max(top + 1, 1)
    return _permuted_schedule("hash", mask, tuple(q_buckets.shape), dict(buckets=q_buckets),
                              dict(buckets=k_buckets), bucket_budget(n_buckets), block_m, block_n, window,
                              overflow=True)


# --------------------------------------------------------------------------------------
# Example inputs (for pictures, the explorer and the notebooks)
# --------------------------------------------------------------------------------------

KINDS = ("dense", "qk", "hash")


def example_inputs(kind: str, seq_len: int, *, keep_rate: float = 0.5, n_buckets: int = 4,
                   seed: int = 0, buckets: str = "random", heads: int = 1) -> dict:
    """Random sparsity inputs of one kind, reproducible from ``seed``: ``{}`` for
    ``"dense"``, ``{"q_keep", "k_keep"}`` (each token kept with probability
    ``keep_rate``) for ``"qk"``, ``{"q_buckets", "k_buckets"}`` for ``"hash"``.

    Hash buckets: ``buckets="random"`` draws independent uniform ids in
    ``[0, n_buckets)``; ``buckets="lsh"`` hashes random Gaussian queries and keys
    (``D = 16``) with :func:`sparseflash.lsh_buckets` and shared rotations
    (``n_buckets`` rounded up to even).  Shapes are ``(1, heads, seq_len)``.
    """
    g = torch.Generator().manual_seed(int(seed))
    shape = (1, heads, seq_len)
    if kind in ("dense", "flash"):
        return {}
    if kind == "qk":
        return {"q_keep": torch.rand(shape, generator=g) < keep_rate,
                "k_keep": torch.rand(shape, generator=g) < keep_rate}
    if kind == "hash":
        if buckets == "random":
            return {"q_buckets": torch.randint(0, n_buckets, shape, generator=g),
                    "k_buckets": torch.randint(0, n_buckets, shape, generator=g)}
        if buckets == "lsh":
            from .hashing import lsh_buckets

            nb = max(2, n_buckets + n_buckets % 2)
            q, k = torch.randn(*shape, 16, generator=g), torch.randn(*shape, 16, generator=g)
            return {"q_buckets": lsh_buckets(q, nb, seed=seed), "k_buckets": lsh_buckets(k, nb, seed=seed)}
        raise ValueError(f"buckets must be 'random' or 'lsh', got {buckets!r}")
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def schedule_for(kind: str, seq_len: int, block: int = 16, *, keep_rate: float = 0.5, n_buckets: int = 4,
                 seed: int = 0, buckets: str = "random", causal: bool = True) -> TileSchedule:
    """The :class:`TileSchedule` of one random example (see :func:`example_inputs`),
    with square tiles of ``block`` tokens."""
    inputs = example_inputs(kind, seq_len, keep_rate=keep_rate, n_buckets=n_buckets, seed=seed, buckets=buckets)
    if kind in ("dense", "flash"):
        return flash_schedule(seq_len, seq_len, causal, block, block)
    if kind == "qk":
        return qk_schedule(inputs["q_keep"], inputs["k_keep"], block, block)
    return hash_schedule(inputs["q_buckets"], inputs["k_buckets"], block, block)
