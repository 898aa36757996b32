"""Checkers of notebook 02, online softmax and tiling (``02_online_softmax_and_tiling.ipynb``).

* :func:`check_merge`: ``merge(m1, l1, m2, l2) -> (m, l)`` combines the softmax statistics
  (running max, running sum) of two halves of a row, empty halves and empty rows included.
* :func:`check_fp16_online_stats`: ``online_softmax_stats_fp16(x, chunk)`` computes ``(m, l)``
  of float16 rows chunk by chunk, accurate to 1e-4 (the sum kept in float32).
* :func:`check_tiled_macs`: ``tiled_macs(N, D, block_m, block_n)`` counts the multiply-adds of
  causal tiled attention, ragged tiles included and skipped tiles not.
* :func:`check_needs_mask`: ``needs_mask(rows, cols)`` tells the computed causal tiles that
  need the mask from the full ones.
* :func:`check_window_tiles`: ``window_tiles(N, w, block_m, block_n)`` marks exactly the tiles
  holding an allowed pair of the sliding window.
* :func:`check_hash_setting`: a setting of the hash explorer whose kernel computes at most a
  quarter of the dense causal tiles.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import tiles
from ._common import (_as_number, _as_tensor, _call, _compare, _Fail, _gen, _new_seed, _NotAttempted, _randn,
                      _require_callable, _run, _tile_any, _window_mask)

__all__ = [
    "check_merge", "check_fp16_online_stats", "check_tiled_macs", "check_needs_mask", "check_window_tiles",
    "check_hash_setting",
]


def _stats(x: Tensor):
    """(m, l) of each row of float64 x, with (-inf, 0) for a row of only -inf."""
    m = x.max(-1).values
    shift = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    return m, torch.exp(x - shift[..., None]).sum(-1)


def check_merge(merge, *, seed=None) -> bool:
    """02 · exercise 1: ``merge(m1, l1, m2, l2) -> (m, l)``: the stats of a row from those of its halves."""
    _require_callable(merge, "merge", "check_merge")
    seed = _new_seed(seed)
    g = _gen(seed)

    def body():
        rows, length = 6, 40
        x = _randn(rows, length, gen=g) * 4
        x[1, 25:] += 20.0                                 # the max in the second half
        split = [int(s) for s in torch.randint(1, length, (rows,), generator=g)]
        x[2, :split[2]] = -math.inf                       # an empty first half
        x[3, split[3]:] = -math.inf                       # an empty second half
        x[4, :] = -math.inf                               # an empty row: merge of two empty halves
        m1, l1, m2, l2 = (torch.empty(rows, dtype=torch.float64) for _ in range(4))
        for r, s in enumerate(split):
            m1[r], l1[r] = _stats(x[r, :s])
            m2[r], l2[r] = _stats(x[r, s:])
        m_true, l_true = _stats(x)
        got = _call(merge, m1.clone(), l1.clone(), m2.clone(), l2.clone(), what="merge(m1, l1, m2, l2)")
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise _Fail("merge should return the pair (m, l)")
        names = ("row",)
        hint = "m = max(m1, m2); each sum was relative to its own max, so rescale: l = l1·e^(m1-m) + l2·e^(m2-m)"
        nan_hint = ("a half that saw nothing has m = -inf and l = 0; when both are empty, m1 - m = -inf - (-inf) "
                    "is nan: shift by 0 instead of m when m = -inf (torch.where), so the row stays (-inf, 0)")
        _compare(got[0], m_true, "m (running max)", atol=1e-12, names=names, hint=hint, nan_hint=nan_hint)
        err = _compare(got[1], l_true, "l (running sum)", atol=0, rtol=1e-9, names=names, hint=hint,
                       nan_hint=nan_hint)
        return f"{rows} rows split at random points, empty halves and an empty row included; max rel. error {err:.0e}"

    return _run("02 · exercise 1, merge", body, seed)


def check_fp16_online_stats(online_softmax_stats_fp16, *, seed=None) -> bool:
    """02 · exercise 2: ``online_softmax_stats_fp16(x, chunk) -> (m, l)`` for float16 ``x``, accurate to 1e-4."""
    _require_callable(online_softmax_stats_fp16, "online_softmax_stats_fp16", "check_fp16_online_stats")
    seed = _new_seed(seed)
    g = _gen(seed)

    def body():
        x = (_randn(2, 16384, gen=g) * 3).half()
        m_true, l_true = _stats(x.double())
        worst = 0.0
        for chunk in (1, 16, 256, 16384):
            what = f"online_softmax_stats_fp16(x, chunk={chunk}) on 2 float16 rows of 16384 logits"
            got = _call(online_softmax_stats_fp16, x.clone(), chunk, what=what)
            if not isinstance(got, (tuple, list)) or len(got) < 2:
                raise _Fail(f"{what} should return (m, l)")
            _compare(got[0], m_true, what + ": m", atol=0, hint="m is the max of the row, exactly")
            l_got = _as_tensor(got[1], what).double().cpu()
            rel = ((l_got - l_true).abs() / l_true).max().item() if l_got.shape == l_true.shape else math.inf
            if not rel <= 1e-4:
                raise _Fail(f"{what}: l has relative error {rel:.1e} against float64 (need ≤ 1e-4)",
                            "keep m and l in float32 (convert each chunk with .float() before exp and sum): a "
                            "float16 running sum stops growing once it is ~2048× the terms added to it")
            worst = max(worst, rel)
        return f"chunks 1, 16, 256, 16384: max relative error of l {worst:.1e}"

    return _run("02 · exercise 2, online_softmax_stats_fp16", body, seed)


def _tiled_macs_expected(n, d, bm, bn):
    total = 0
    for qt in range(-(-n // bm)):
        r0, r1 = qt * bm, min((qt + 1) * bm, n) - 1
        for kt in range(-(-n // bn)):
            c0, c1 = kt * bn, min((kt + 1) * bn, n) - 1
            if c0 <= r1:
                total += 2 * (r1 - r0 + 1) * (c1 - c0 + 1) * d
    return total


def check_tiled_macs(tiled_macs) -> bool:
    """02 · exercise 3: ``tiled_macs(N, D, block_m, block_n)``, multiply-adds of the two matrix products
    of causal ``tiled_attention``."""
    _require_callable(tiled_macs, "tiled_macs", "check_tiled_macs")

    def body():
        cases = [(200, 32, 32, 16), (200, 32, 16, 16), (64, 16, 16, 16), (100, 8, 32, 32), (37, 4, 8, 16)]
        for n, d, bm, bn in cases:
            what = f"tiled_macs(N={n}, D={d}, block_m={bm}, block_n={bn})"
            got = _call(tiled_macs, n, d, bm, bn, what=what)
            expected = _tiled_macs_expected(n, d, bm, bn)
            if _as_number(got, what) != expected:
                raise _Fail(f"{what} = {got}, expected {expected} (naive: 2·N²·D = {2 * n * n * d})",
                            "per computed tile, q kᵀ and p v each cost len(rows)·len(cols)·D multiply-adds, with "
                            "the real (ragged) tile sizes; skipped tiles cost nothing")
        fr = ", ".join(f"{bm}×{bn}: {_tiled_macs_expected(n, d, bm, bn) / (2 * n * n * d):.3f}"
                       for n, d, bm, bn in cases[:2])
        return f"{len(cases)} shapes; fraction of naive work at N=200: {fr} (→ ½ as N grows)"

    return _run("02 · exercise 3, tiled_macs", body)


def check_needs_mask(needs_mask) -> bool:
    """02 · exercise 4: ``needs_mask(rows, cols)``: does this computed causal tile need the mask?"""
    _require_callable(needs_mask, "needs_mask", "check_needs_mask")

    def body():
        checked = full = 0
        for n, bm, bn in [(200, 32, 16), (128, 16, 32), (64, 16, 16), (100, 32, 32)]:
            for qt in range(-(-n // bm)):
                rows = torch.arange(qt * bm, min((qt + 1) * bm, n))
                for kt in range(-(-n // bn)):
                    cols = torch.arange(kt * bn, min((kt + 1) * bn, n))
                    if cols[0] > rows[-1]:
                        continue                                  # skipped tile
                    what = f"needs_mask(rows={int(rows[0])}..{int(rows[-1])}, cols={int(cols[0])}..{int(cols[-1])})"
                    got = _call(needs_mask, rows.clone(), cols.clone(), what=what)
                    try:
                        got = bool(got)
                    except Exception:
                        raise _Fail(f"{what} should return True or False, got {type(got).__name__}") from None
                    expected = bool(cols[-1] > rows[0])
                    if got != expected:
                        why = (f"key {int(cols[-1])} comes after query {int(rows[0])}" if expected else
                               f"every key (≤ {int(cols[-1])}) is at or before every query (≥ {int(rows[0])})")
                        raise _Fail(f"{what} = {got}, expected {expected}: {why} (N={n}, {bm}×{bn} tiles)",
                                    "a tile needs no mask when its last key is at or before its first query")
                    checked += 1
                    full += not expected
        return f"{checked} computed tiles of 4 shapes, {full} of them full (no mask needed)"

    return _run("02 · exercise 4, needs_mask", body)


def check_window_tiles(window_tiles) -> bool:
    """02 · exercise 5: ``window_tiles(N, w, block_m, block_n)`` -> bool ``(n_q_tiles, n_k_tiles)``: the
    tiles a sliding-window kernel must compute (exactly those holding an allowed pair)."""
    _require_callable(window_tiles, "window_tiles", "check_window_tiles")

    def body():
        for n, w, bm, bn in [(256, 64, 32, 32), (200, 50, 32, 16), (100, 1, 16, 16), (128, 300, 32, 32),
                             (96, 17, 16, 32)]:
            what = f"window_tiles(N={n}, w={w}, block_m={bm}, block_n={bn})"
            got = _as_tensor(_call(window_tiles, n, w, bm, bn, what=what), what)
            expected = _tile_any(_window_mask(n, w), bm, bn)
            if tuple(got.shape) != tuple(expected.shape):
                raise _Fail(f"{what}: expected shape {tuple(expected.shape)} (query tiles, key tiles), "
                            f"got {tuple(got.shape)}")
            got = got.bool().cpu()
            missing, extra = expected & ~got, got & ~expected
            hint = ("tile (rows r0..r1, keys c0..c1) holds an allowed pair iff c0 <= r1 (causal) "
                    "and c1 > r0 - w (inside the window of its first query)")
            if missing.any():
                qt, kt = torch.nonzero(missing)[0].tolist()
                raise _Fail(f"{what} skips {int(missing.sum())} tile(s) that hold allowed pairs, e.g. query tile "
                            f"{qt} × key tile {kt} (queries {qt * bm}.., keys {kt * bn}..{min((kt + 1) * bn, n) - 1}"
                            "): the output would be wrong", hint)
            if extra.any():
                qt, kt = torch.nonzero(extra)[0].tolist()
                raise _Fail(f"{what} computes {int(extra.sum())} tile(s) with no allowed pair, e.g. query tile {qt}"
                            f" × key tile {kt}: correct, but wasted work", hint)
        counts = []
        for n in (1024, 2048, 4096):
            got = _as_tensor(_call(window_tiles, n, 128, 64, 64, what=f"window_tiles({n}, 128, 64, 64)"), "")
            counts.append(f"N={n}: {int(got.sum())}")
        return "5 shapes; computed 64×64 tiles at w=128: " + ", ".join(counts) + " (linear in N)"

    return _run("02 · exercise 5, window_tiles", body)


def check_hash_setting(setting) -> bool:
    """02 · exercise 6: a hash setting ``dict(seq_len=, block=, n_buckets=, seed=)`` of the explorer
    (random bucket ids) where the kernel computes at most a quarter of the dense causal tiles."""
    keys = {"seq_len", "block", "n_buckets", "seed"}
    if setting is not None:
        if not isinstance(setting, dict):
            raise TypeError(f"check_hash_setting expects a dict like dict(seq_len=256, block=16, n_buckets=4, "
                            f"seed=0), got {type(setting).__name__}")
        unknown = set(setting) - keys
        if unknown:
            raise TypeError(f"check_hash_setting: unknown keys {sorted(unknown)}; expected {sorted(keys)}")

    def body():
        if setting is None:
            raise _NotAttempted
        s = {"seq_len": 128, "block": 16, "n_buckets": 4, "seed": 0, **setting}
        try:
            seq_len, block, n_buckets, seed = (int(s[k]) for k in ("seq_len", "block", "n_buckets", "seed"))
        except Exception:
            raise _Fail("seq_len, block, n_buckets and seed must be integers") from None
        if not (1 <= seq_len <= 4096 and block in (16, 32, 64) and 1 <= n_buckets <= 64):
            raise _Fail("stay in the explorer's range: seq_len up to 512 (4096 at most here), block 16, 32 or 64, "
                        "n_buckets from 1 to 16")
        sched = tiles.schedule_for("hash", seq_len, block, n_buckets=n_buckets, seed=seed)
        frac = sched.computed_fraction
        desc = f"hash, N={seq_len}, {block}×{block} tiles, {n_buckets} buckets, seed {seed}"
        if frac > 0.25:
            raise _Fail(f"{desc}: the kernel computes {frac:.2f} of the dense causal tiles (ideal speed-up "
                        f"{sched.ideal_speedup:.1f}×); need at most 0.25",
                        "more buckets make each bucket smaller, but a tile cannot skip less than itself: buckets "
                        "must stay several tiles long (longer sequences, smaller tiles)")
        return f"{desc}: {frac:.2f} of the dense causal tiles, ideal speed-up {sched.ideal_speedup:.1f}×"

    return _run("02 · exercise 6, a hash setting with a 4× ideal speed-up", body)
