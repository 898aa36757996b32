"""The variants one configuration runs: ours (dense, query/key dropping, hash buckets) and the baselines.

* ``ours_dense``: :func:`sparseflash.flash_attention` (causal).
* ``ours_qk_<rate>``: :func:`sparseflash.qk_sparse_attention` with ``random_keep``
  masks of that keep rate, independent per (batch, head), for queries and for keys.
* ``ours_hash_<n>``: :func:`sparseflash.hash_sparse_attention` with ``n`` buckets and
  ``n_buckets=n`` (the bucket count is known, so the function need not read the ids'
  range back from the device).
* the baselines of :mod:`.baselines`: ``naive``, ``sdpa_flash``, ``sdpa_cudnn``,
  ``flex_dense``, ``flex_kernel_<pattern>``, ``flex_e2e_<pattern>``.

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
from .patterns import Pattern, fmt_param

#: Kinds of variants, in the order they run inside one configuration.
KINDS = ("sdpa_flash", "sdpa_cudnn", "ours_dense", "flex_dense", "naive",
         "ours_qk", "flex_kernel_qk", "flex_e2e_qk",
         "ours_hash", "flex_kernel_hash", "flex_e2e_hash")


@dataclass
class Variant:
    name: str
    kind: str
    impl: str  # ours | sdpa | flex | naive
    family: str  # dense | qk | hash
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
    for fam in ("qk", "hash"):
        for p in patterns:
            if p.family != fam:
                continue
            suffix = f"{fam}_{fmt_param(p.param)}"
            out += [
                Variant(f"ours_{suffix}", f"ours_{fam}", "ours", fam, p.param, p),
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
        n = int(pat.param)
        return (lambda q, k, vv: hash_sparse_attention(q, k, vv, pat.q_buckets, pat.k_buckets, n_buckets=n)), {}
    return flex_fn(v.kind, v.family, pat, args, B, H, N, device)


# --------------------------------------------------------------------------------------
# Tile fractions
# --------------------------------------------------------------------------------------


def measured_tile_fraction(pattern: Pattern, q, k, v, dense_tiles_cache: dict) -> float | None:
    """Forward tiles our sparse kernel computed / tiles our dense causal kernel computed (TileRecord)."""
    from ..tiles import TileRecord

    with torch.no_grad():
        if "dense" not in dense_tiles_cache:
            rec = TileRecord()
            flash_attention(q, k, v, causal=True, tile_record=rec)
            dense_tiles_cache["dense"] = int((rec.fwd > 0).sum().item())
        rec = TileRecord()
        if pattern.family == "qk":
            qk_sparse_attention(q, k, v, pattern.q_keep, pattern.k_keep, tile_record=rec)
        else:
            hash_sparse_attention(q, k, v, pattern.q_buckets, pattern.k_buckets, n_buckets=int(pattern.param),
                                  tile_record=rec)
        sparse = int((rec.fwd > 0).sum().item())
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
    exists, so that it reads as a fraction of the dense causal tiles.
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
        "causal": True, "device": device, "batch": 1, "heads": 1,
    }

    def call(fn):
        kwargs = {}
        for name, prm in inspect.signature(fn).parameters.items():
            if prm.kind in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD):
                continue
            if name in known and known[name] is not None:
                kwargs[name] = known[name]
            elif prm.default is prm.empty:
                return None
        return _schedule_value(fn(**kwargs))

    fn = getattr(tiles, f"{pattern.family}_schedule", None)
    if fn is None:
        return None
    try:
        with torch.no_grad():
            frac = call(fn)
            dense_fn = getattr(tiles, "flash_schedule", None)
            dense = call(dense_fn) if dense_fn is not None else None
    except Exception:  # noqa: BLE001
        return None
    if frac is None:
        return None
    return frac / dense if dense else frac
