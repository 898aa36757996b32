"""The variants one configuration runs: ours (dense, query/key dropping, hash buckets, sliding
windows and hash buckets ∪ window) and the baselines.

* ``ours_dense``: :func:`sparseflash.flash_attention` (causal).
* ``ours_qk_<rate>``: :func:`sparseflash.qk_sparse_attention` with ``random_keep``
  masks of that keep rate, independent per (batch, head), for queries and for keys.
* ``ours_hash_<n>``: :func:`sparseflash.hash_sparse_attention` with ``n`` buckets and
  ``n_buckets=n`` (the bucket count is known, so the function need not read the ids'
  range back from the device).
* ``ours_hash_<n>_default`` (kind ``ours_hash_default``): the call a user writes first,
  ``hash_sparse_attention(q, k, v, q_buckets, k_buckets)``, with no optional argument (the
  layout's default bucket budget instead of ``n_buckets=n``); hash patterns without a window.
* ``ours_hash_<n>_w<W>`` (kind ``ours_hash``): the same with ``window=W``, the union of the
  buckets with a causal sliding window of ``W`` keys (``--windows``).
* ``ours_window_<W>``: :func:`sparseflash.flash_attention` with ``causal=True, window=W``.
* the baselines of :mod:`.baselines`: ``naive``, ``sdpa_flash``, ``sdpa_cudnn``,
  ``flex_dense``, ``flex_kernel_<pattern>``, ``flex_e2e_<pattern>`` (``<pattern>``:
  :attr:`Pattern.name <.patterns.Pattern.name>`, e.g. ``qk_0.3``, ``hash_16``,
  ``hash_16_w256``, ``window_256``).

Also here: why a variant is skipped (:func:`skip_reason`) and the tile fractions a
sparse row carries.
"""
from __future__ import annotations

import fnmatch
import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from ..flash import flash_attention, kernel_config
from ..hash_sparse import hash_sparse_attention
from ..qk_sparse import qk_sparse_attention
from .baselines import flex_fn, naive_fn, sdpa_fn
from .patterns import Pattern

#: Kinds of variants, in the order they run inside one configuration.
KINDS = ("sdpa_flash", "sdpa_cudnn", "ours_dense", "flex_dense", "naive",
         "ours_qk", "flex_kernel_qk", "flex_e2e_qk",
         "ours_hash", "ours_hash_default", "flex_kernel_hash", "flex_e2e_hash",
         "ours_window", "flex_kernel_window", "flex_e2e_window")


@dataclass
class Variant:
    name: str
    kind: str
    impl: str  # ours | sdpa | flex | naive
    family: str  # dense | qk | hash | window
    param: float | int | None
    pattern: Pattern | None = None

    @property
    def is_flex(self) -> bool:
        return self.impl == "flex"


def all_variants(args, patterns: list[Pattern]) -> list[Variant]:
    """Every variant of one configuration, in :data:`KINDS` order (before ``--variants`` selection)."""
    dense = Pattern("dense", None)
    out = [
        Variant("sdpa_flash", "sdpa_flash", "sdpa", "dense", None, dense),
        Variant("sdpa_cudnn", "sdpa_cudnn", "sdpa", "dense", None, dense),
        Variant("ours_dense", "ours_dense", "ours", "dense", None, dense),
        Variant("flex_dense", "flex_dense", "flex", "dense", None, dense),
        Variant("naive", "naive", "naive", "dense", None, dense),
    ]
    for fam in ("qk", "hash", "window"):
        for p in patterns:
            if p.family != fam:
                continue
            suffix = p.name  # qk_0.3, hash_16, hash_16_w256, window_256
            out.append(Variant(f"ours_{suffix}", f"ours_{fam}", "ours", fam, p.param, p))
            if fam == "hash" and not p.window:
                out.append(Variant(f"ours_{suffix}_default", "ours_hash_default", "ours", fam, p.param, p))
            out += [
                Variant(f"flex_kernel_{suffix}", f"flex_kernel_{fam}", "flex", fam, p.param, p),
                Variant(f"flex_e2e_{suffix}", f"flex_e2e_{fam}", "flex", fam, p.param, p),
            ]
    return out


def selected(v: Variant, patterns: list[str] | None) -> bool:
    """Whether ``--variants`` (names or kinds, shell patterns) selects ``v`` (all when empty)."""
    if not patterns:
        return True
    return any(fnmatch.fnmatchcase(v.name, p) or fnmatch.fnmatchcase(v.kind, p) for p in patterns)


def skip_reason(v: Variant, mode: str, args, device: torch.device, N: int) -> str | None:
    """Why this variant is not run at all here (None: run it)."""
    if v.kind == "naive" and N > args.naive_max_n:
        return f"naive only for N <= --naive-max-n={args.naive_max_n} (N x N scores)"
    flex_max_n = getattr(args, "flex_max_n", None)
    if v.is_flex and flex_max_n is not None and N > flex_max_n:
        return f"FlexAttention only for N <= --flex-max-n={flex_max_n}"
    if device.type != "cuda":
        if v.kind == "sdpa_cudnn":
            return "needs CUDA (cuDNN attention)"
        if v.is_flex:
            if args.flex_compile:
                return "needs CUDA (compiled FlexAttention); --no-flex-compile runs eager flex fwd on CPU"
            if mode != "fwd":
                return "FlexAttention has no CPU backward"
    return None


def build_fn(v: Variant, args, N: int, B: int, H: int, device) -> tuple[Callable, dict]:
    """``fn(q, k, v) -> out`` (original token order) and extra row fields (tile fractions)."""
    pat = v.pattern
    if v.kind == "naive":
        return naive_fn(), {}
    if v.kind in ("sdpa_flash", "sdpa_cudnn"):
        return sdpa_fn(v.kind), {}
    if v.kind == "ours_dense":
        return (lambda q, k, vv: flash_attention(q, k, vv, causal=True)), {}
    if v.kind == "ours_qk":
        return (lambda q, k, vv: qk_sparse_attention(q, k, vv, pat.q_keep, pat.k_keep)), {}
    if v.kind == "ours_hash":
        n, w = int(pat.param), int(pat.window)
        if w:
            return (lambda q, k, vv: hash_sparse_attention(q, k, vv, pat.q_buckets, pat.k_buckets, n_buckets=n,
                                                           window=w)), {}
        return (lambda q, k, vv: hash_sparse_attention(q, k, vv, pat.q_buckets, pat.k_buckets, n_buckets=n)), {}
    if v.kind == "ours_hash_default":
        return (lambda q, k, vv: hash_sparse_attention(q, k, vv, pat.q_buckets, pat.k_buckets)), {}
    if v.kind == "ours_window":
        w = int(pat.window)
        return (lambda q, k, vv: flash_attention(q, k, vv, causal=True, window=w)), {}
    return flex_fn(v.kind, v.family, pat, args, B, H, N, device)


# --------------------------------------------------------------------------------------
# Tile fractions
# --------------------------------------------------------------------------------------


def _tile_area(rec, prefix: str = "", config: dict | None = None) -> int:
    """Token pairs covered by the forward tiles ``rec`` recorded (``prefix``: ``"window_"`` for a
    union's band): computed tiles × ``BLOCK_M × BLOCK_N`` of the config they ran with."""
    counts = rec.maps.get(f"{prefix}fwd")
    if counts is None:
        return 0
    cfg = rec.config if config is None else config
    return int((counts > 0).sum().item()) * int(cfg["BLOCK_M"]) * int(cfg["BLOCK_N"])


def measured_tile_fraction(pattern: Pattern, q, k, v, dense_tiles_cache: dict, *,
                           default_call: bool = False) -> float | None:
    """Forward tile *area* our sparse kernel computed / that of our dense causal kernel (TileRecord).

    Areas (tiles × ``BLOCK_M × BLOCK_N``), so that kernels launched with other tile sizes (the
    dense kernel's CUDA defaults, a union's band) compare honestly; with equal tile sizes it is
    the ratio of tile counts.  A hash ∪ window union adds its two parts: the far part over the
    bucket layout (``rec.fwd``, ``rec.config``) and the band (``rec.window_fwd``,
    ``rec.window_config``).  A window alone: ``flash_attention(window=W)``'s tiles.
    ``default_call``: the hash call without ``n_buckets`` (the layout's default bucket budget),
    as ``ours_hash_<n>_default`` runs it.
    """
    from ..tiles import TileRecord

    with torch.no_grad():
        if "dense" not in dense_tiles_cache:
            rec = TileRecord()
            flash_attention(q, k, v, causal=True, tile_record=rec)
            dense_tiles_cache["dense"] = _tile_area(rec)
        rec = TileRecord()
        if pattern.family == "qk":
            qk_sparse_attention(q, k, v, pattern.q_keep, pattern.k_keep, tile_record=rec)
        elif pattern.family == "window":
            flash_attention(q, k, v, causal=True, window=int(pattern.window), tile_record=rec)
        else:
            nb = None if default_call else int(pattern.param)
            hash_sparse_attention(q, k, v, pattern.q_buckets, pattern.k_buckets, n_buckets=nb,
                                  window=int(pattern.window), tile_record=rec)
        sparse = _tile_area(rec)
        if pattern.family == "hash" and pattern.window:
            sparse += _tile_area(rec, "window_", rec.window_config)
    dense = dense_tiles_cache["dense"]
    return sparse / dense if dense else None


def _schedule_value(obj):
    frac = getattr(obj, "computed_fraction", None)
    if frac is None and isinstance(obj, dict):
        frac = obj.get("computed_fraction")
    if callable(frac):
        frac = frac()
    if isinstance(frac, torch.Tensor):
        frac = frac.float().mean().item()
    return None if frac is None else float(frac)


def schedule_tile_fraction(pattern: Pattern, N: int, head_dim: int, device, max_n: int = 4096) -> float | None:
    """``computed_fraction`` of ``sparseflash.tiles``' schedule for the first (batch, head).

    ``tiles.qk_schedule`` / ``tiles.hash_schedule`` build the full ``N × N`` token mask,
    so this runs only for ``N <= max_n`` (None above, or when the module or function
    is missing or its signature is not the one expected).  Arguments are passed by
    parameter name; the result is divided by ``flash_schedule``'s fraction when that
    exists, so that it reads as a fraction of the dense causal tiles.  Every schedule
    uses the sparse kernels' tile sizes.  A hash ∪ window union is its two parts,
    ``hash_schedule(window=W)`` (the far part) + ``flash_schedule(window=W)`` (the band);
    a window alone ``flash_schedule(window=W)``.
    """
    if N > max_n:
        return None
    try:
        from .. import tiles
    except Exception:  # noqa: BLE001
        return None
    cfg = kernel_config(head_dim, torch.device(device))
    one = (slice(0, 1), slice(0, 1))
    known = {
        "q_keep": None if pattern.q_keep is None else pattern.q_keep[one],
        "k_keep": None if pattern.k_keep is None else pattern.k_keep[one],
        "q_buckets": None if pattern.q_buckets is None else pattern.q_buckets[one],
        "k_buckets": None if pattern.k_buckets is None else pattern.k_buckets[one],
        "n": N, "N": N, "seq_len": N, "n_q": N, "n_k": N,
        "block_m": cfg["BLOCK_M"], "block_n": cfg["BLOCK_N"], "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
        "causal": True, "device": device, "batch": 1, "heads": 1, "window": 0,
    }

    def call(fn, **overrides):
        if fn is None:
            return None
        given = dict(known, **overrides)
        kwargs = {}
        params = inspect.signature(fn).parameters
        if overrides.get("window") and "window" not in params:
            return None  # a tiles module without windows: no prediction rather than a wrong one
        for name, prm in params.items():
            if prm.kind in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD):
                continue
            if name in given and given[name] is not None:
                kwargs[name] = given[name]
            elif prm.default is prm.empty:
                return None
        return _schedule_value(fn(**kwargs))

    window = int(pattern.window)
    dense_fn = getattr(tiles, "flash_schedule", None)
    try:
        with torch.no_grad():
            if pattern.family == "window":
                frac = call(dense_fn, window=window)
            else:
                frac = call(getattr(tiles, f"{pattern.family}_schedule", None), window=window)
                if frac is not None and window:
                    band = call(dense_fn, window=window)
                    frac = None if band is None else frac + band
            dense = call(dense_fn)
    except Exception:  # noqa: BLE001
        return None
    if frac is None:
        return None
    return frac / dense if dense else frac
