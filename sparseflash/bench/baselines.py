"""What we compare against: naive attention, PyTorch SDPA (FlashAttention-2, cuDNN) and FlexAttention.

* ``naive``: :func:`sparseflash.reference.attention` in the input dtype
  (``float64=False``): full ``N × N`` scores with a materialised causal mask, so
  only for ``N <= --naive-max-n``.
* ``sdpa_flash`` / ``sdpa_cudnn``: ``F.scaled_dot_product_attention(is_causal=True)``
  forced to the FlashAttention-2 / cuDNN backend with ``sdpa_kernel``.
* ``flex_dense``: ``torch.compile(flex_attention)`` with a causal block mask built once.
* ``flex_kernel_<pattern>`` / ``flex_e2e_<pattern>``: FlexAttention on the *same*
  compacted (qk) or bucket-sorted (hash) layout as ours, with the mask_mod
  ``kpos[kv] <= qpos[q] & kpos >= 0 & qpos >= 0 [& kbucket[kv] == qbucket[q]]``.
  ``flex_kernel`` builds the layout and the block mask once, outside the timed
  region, and times gather + flex kernel + scatter.  ``flex_e2e`` times everything
  per step: layout (sort), ``create_block_mask`` (compiled), gather, kernel, scatter.
* ``flex_kernel_hash_<n>_w<W>`` / ``flex_e2e_hash_<n>_w<W>`` (hash buckets ∪ a sliding
  window of ``W`` keys): FlexAttention in NATURAL token order, no gather or scatter, with
  the mask_mod ``kv <= q & (qbucket[q] == kbucket[kv] | q - kv < W)``.  Sorting by bucket
  would scatter every query's window over the key blocks, so that every block holds window
  pairs; in natural order the band stays on the diagonal and only the same-bucket pairs
  spread.  ``flex_kernel`` builds the block mask once (per head, outside the timing),
  ``flex_e2e`` calls (compiled) ``create_block_mask`` in every step.
* ``flex_kernel_window_<W>`` / ``flex_e2e_window_<W>``: the sliding window alone,
  ``kv <= q & q - kv < W``, one block mask for every (batch, head) as causal.

The mask_mods read one module-level state (:data:`_FLEX`: slot positions, bucket ids,
the window), so each mask_mod is a single function object for the whole run:
torch.compile guards on it once, and new tensors of the same shape put into the state do
not recompile (a new window size ``W`` does, once: it is a Python int in the graph).
"""
from __future__ import annotations

import types
from typing import Callable

import torch
import torch.nn.functional as F

from .. import reference
from ..layout import gather_tokens, scatter_tokens
from .patterns import Pattern


def naive_fn() -> Callable:
    """Materialised ``N × N`` causal attention in the input dtype."""
    return lambda q, k, v: reference.attention(q, k, v, None, causal=True, float64=False)


def sdpa_fn(kind: str) -> Callable:
    """``kind``: ``sdpa_flash`` (FlashAttention-2 backend) or ``sdpa_cudnn`` (cuDNN backend), causal."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.FLASH_ATTENTION if kind == "sdpa_flash" else SDPBackend.CUDNN_ATTENTION

    def sdpa(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return sdpa


# --------------------------------------------------------------------------------------
# FlexAttention
# --------------------------------------------------------------------------------------

_FLEX = types.SimpleNamespace(qpos=None, kpos=None, qb=None, kb=None, window=0)
_FLEX_FNS: dict = {}


def _flex_causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def _flex_qk(b, h, q_idx, kv_idx):
    qp = _FLEX.qpos[b, h, q_idx]
    kp = _FLEX.kpos[b, h, kv_idx]
    return (kp <= qp) & (kp >= 0) & (qp >= 0)


def _flex_hash(b, h, q_idx, kv_idx):
    qp = _FLEX.qpos[b, h, q_idx]
    kp = _FLEX.kpos[b, h, kv_idx]
    same = _FLEX.qb[b, h, q_idx] == _FLEX.kb[b, h, kv_idx]
    return (kp <= qp) & (kp >= 0) & (qp >= 0) & same


def _flex_hash_window(b, h, q_idx, kv_idx):
    """Hash buckets ∪ sliding window, in natural token order (``_FLEX.qb``/``kb``: unsorted ids)."""
    same = _FLEX.qb[b, h, q_idx] == _FLEX.kb[b, h, kv_idx]
    return (kv_idx <= q_idx) & (same | (q_idx - kv_idx < _FLEX.window))


def _flex_window(b, h, q_idx, kv_idx):
    """Causal sliding window of ``_FLEX.window`` keys (the same for every batch and head)."""
    return (kv_idx <= q_idx) & (q_idx - kv_idx < _FLEX.window)


#: mask_mods that do not depend on the (batch, head): one ``(1, 1)`` block mask serves all.
_HEAD_INDEPENDENT = (_flex_causal, _flex_window)


def _flex_fns(compile_: bool):
    """``(flex_attention, create_block_mask)``, compiled once per process (or eager)."""
    key = bool(compile_)
    if key not in _FLEX_FNS:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if compile_:
            import torch._dynamo.config as dcfg

            # one graph per (N, D, mask_mod): raise the recompilation limits well above that
            for name, value in (("recompile_limit", 512), ("cache_size_limit", 512),
                                ("accumulated_recompile_limit", 4096), ("accumulated_cache_size_limit", 4096)):
                if hasattr(dcfg, name):
                    try:
                        setattr(dcfg, name, max(getattr(dcfg, name), value))
                    except Exception:  # noqa: BLE001
                        pass
            flex = torch.compile(flex_attention, dynamic=False)
            cbm = torch.compile(create_block_mask, dynamic=False)
        else:
            flex, cbm = flex_attention, create_block_mask
        _FLEX_FNS[key] = (flex, cbm)
    return _FLEX_FNS[key]


def _set_flex_state(qp, kp, qb, kb, window: int = 0) -> None:
    """Put a layout (slot positions ``qp``/``kp``, bucket ids ``qb``/``kb``, any of them None) and
    the sliding ``window`` into :data:`_FLEX`, where the mask_mods read them."""
    _FLEX.qpos, _FLEX.kpos, _FLEX.qb, _FLEX.kb = (None if t is None else t.contiguous() for t in (qp, kp, qb, kb))
    _FLEX.window = int(window)


def _clear_flex_state() -> None:
    _FLEX.qpos = _FLEX.kpos = _FLEX.qb = _FLEX.kb = None
    _FLEX.window = 0


def _block_density(bm) -> float:
    return 1.0 - bm.sparsity() / 100.0


def _rows_block_mask(mask_mod, N: int, device, max_elems: int):
    """``create_block_mask(mask_mod, 1, 1, N, N)``, built a band of query blocks at a time.

    Eager ``create_block_mask`` materialises the whole ``N × N`` bool mask (17 GB at
    N = 131072, plus temporaries).  Its block tables are computed row of blocks by row
    of blocks, so building them for query rows ``[r0, r0 + R)`` (``R`` a multiple of the
    block size, the mask_mod shifted by ``r0``) and concatenating along the query-block
    axis gives the same tables with ``R × N`` elements in memory.  Returns a list of
    per-band block masks (one when ``N × N <= max_elems``).
    """
    from torch.nn.attention.flex_attention import _DEFAULT_SPARSE_BLOCK_SIZE as BS
    from torch.nn.attention.flex_attention import create_block_mask

    rows = max(BS, (max_elems // max(N, 1)) // BS * BS)
    if rows >= N:
        return [create_block_mask(mask_mod, 1, 1, N, N, device=device)]
    return [create_block_mask(_shifted(mask_mod, r0), 1, 1, min(rows, N - r0), N, device=device)
            for r0 in range(0, N, rows)]


def _shifted(mask_mod, r0: int):
    """``mask_mod`` of the query rows ``r0, r0 + 1, ...``."""
    def shifted(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx + r0, kv_idx)
    return shifted


def prebuilt_block_mask(mask_mod, B: int, H: int, N: int, device, *, max_elems: int = 1 << 28):
    """The block mask of ``mask_mod`` over the layout now in ``_FLEX``, built outside any timing.

    Eager ``create_block_mask`` materialises the ``N × N`` mask of every (batch, head)
    at once, and the compiled one spends minutes compiling at large ``N`` (about 2 min
    at N=16384 on an H100, torch 2.11).  So: eager, one (batch, head) at a time, and
    at most ``max_elems`` mask elements at a time (bands of query blocks, see
    :func:`_rows_block_mask`; one band up to N = 16384), the block tables stacked into
    one ``BlockMask``.  It is the same block mask ``create_block_mask(mask_mod, B, H, N, N)``
    gives (checked in tests/test_bench.py).  The causal and sliding-window masks are the same
    for every (batch, head): one ``(1, 1)`` mask, as ``create_block_mask(mask_mod, None, None, N, N)``.
    """
    from torch.nn.attention.flex_attention import BlockMask

    parts = []  # per (b, h): its bands
    if mask_mod in _HEAD_INDEPENDENT:
        parts.append(_rows_block_mask(mask_mod, N, device, max_elems))
        if len(parts[0]) == 1:
            return parts[0][0]
        B = H = 1
    else:
        full = (_FLEX.qpos, _FLEX.kpos, _FLEX.qb, _FLEX.kb)
        window = _FLEX.window
        try:
            for b in range(B):
                for h in range(H):
                    _set_flex_state(*(None if t is None else t[b:b + 1, h:h + 1] for t in full), window=window)
                    parts.append(_rows_block_mask(mask_mod, N, device, max_elems))
        finally:
            _set_flex_state(*full, window=window)

    def stack(name):
        first = getattr(parts[0][0], name, None)
        if first is None:
            return None
        per_head = [torch.cat([getattr(band, name) for band in bands], 2) for bands in parts]
        return torch.cat(per_head, 0).reshape(B, H, *per_head[0].shape[2:])

    return BlockMask.from_kv_blocks(
        stack("kv_num_blocks"), stack("kv_indices"), stack("full_kv_num_blocks"), stack("full_kv_indices"),
        BLOCK_SIZE=parts[0][0].BLOCK_SIZE, mask_mod=mask_mod, seq_lengths=(N, N))


def flex_fn(kind: str, family: str, pattern: Pattern, args, B: int, H: int, N: int, device) -> tuple[Callable, dict]:
    """``fn(q, k, v)`` of a FlexAttention variant and ``extra`` (``_flex_density``: block-mask density)."""
    extra: dict = {}
    flex, cbm = _flex_fns(args.flex_compile)
    if kind == "flex_dense":
        bm = prebuilt_block_mask(_flex_causal, 1, 1, N, device)
        extra["_flex_density"] = _block_density(bm)
        return (lambda q, k, v: flex(q, k, v, block_mask=bm)), extra
    if family == "window" or pattern.window:
        return _natural_order_fn(kind, family, pattern, B, H, N, device, flex, cbm, extra)
    mask_mod = _flex_qk if family == "qk" else _flex_hash
    if kind.startswith("flex_kernel"):
        qi, qp, ki, kp, qb, kb = pattern.layout()
        _set_flex_state(qp, kp, qb, kb)
        bm = prebuilt_block_mask(mask_mod, B, H, N, device)
        extra["_flex_density"] = _block_density(bm)

        def flex_kernel(q, k, v):
            o = flex(gather_tokens(q, qi), gather_tokens(k, ki), gather_tokens(v, ki), block_mask=bm)
            return scatter_tokens(o, qi)
        return flex_kernel, extra

    def flex_e2e(q, k, v):
        qi, qp, ki, kp, qb, kb = pattern.layout()
        _set_flex_state(qp, kp, qb, kb)
        bm = cbm(mask_mod, B, H, N, N, device=device)
        o = flex(gather_tokens(q, qi), gather_tokens(k, ki), gather_tokens(v, ki), block_mask=bm)
        return scatter_tokens(o, qi)
    return flex_e2e, extra


def _natural_order_fn(kind, family, pattern: Pattern, B, H, N, device, flex, cbm, extra):
    """The window patterns: the sliding window alone (one ``(1, 1)`` block mask) or hash buckets ∪
    the window (per-head block mask over the unsorted bucket ids), no layout, no gather/scatter."""
    window = int(pattern.window)
    if family == "window":
        mask_mod, state, bh = _flex_window, (None, None, None, None), (None, None)
    else:
        mask_mod, state, bh = _flex_hash_window, (None, None, pattern.q_buckets, pattern.k_buckets), (B, H)
    if kind.startswith("flex_kernel"):
        _set_flex_state(*state, window=window)
        bm = prebuilt_block_mask(mask_mod, bh[0] or 1, bh[1] or 1, N, device)
        extra["_flex_density"] = _block_density(bm)
        return (lambda q, k, v: flex(q, k, v, block_mask=bm)), extra

    def flex_e2e(q, k, v):
        _set_flex_state(*state, window=window)
        bm = cbm(mask_mod, *bh, N, N, device=device)
        return flex(q, k, v, block_mask=bm)
    return flex_e2e, extra
