"""Checkers of notebook 03, FlashAttention in Triton (``03_flash_attention_in_triton.ipynb``).

* :func:`check_scores_computed`: ``scores_computed(N, bm, bn)`` counts the scores the causal
  forward computes (visited tiles × bm × bn), as :func:`sparseflash.tiles.flash_schedule` does.
* :func:`check_window_attention`: ``window_attention(q, k, v, window, tile_record=None)``, a
  sliding-window Triton kernel, matches the reference and visits exactly the tiles holding an
  allowed pair.
* :func:`check_empty_row`: the state ``m, l, acc`` of a query row that sees no key, and the
  ``lse2`` the forward stores for it.
* :func:`check_kernel_bf16_error`: ``kernel_bf16_error(n)`` measures ``flash_attention``'s
  relative error in bfloat16 (within 3× of the same measurement made by the checker).
* :func:`check_tile_products`: tile matrix products per tile pair in the backward, with an
  atomic dQ and with two loops.
"""
from __future__ import annotations

import math

import torch

from .. import reference, tiles
from ._common import (_as_number, _call, _compare, _error_near_typical, _Fail, _gen, _new_seed, _NotAttempted,
                      _randn, _require_callable, _run, _tile_any, _tol, _window_mask, device)

__all__ = [
    "check_scores_computed", "check_window_attention", "check_empty_row", "check_kernel_bf16_error",
    "check_tile_products",
]


def check_scores_computed(scores_computed) -> bool:
    """03 · exercise 1: ``scores_computed(N, bm, bn)``: scores the forward computes (visited tiles × bm × bn,
    read off a ``TileRecord``)."""
    _require_callable(scores_computed, "scores_computed", "check_scores_computed")

    def body():
        rows = []
        for n, bm, bn in [(256, 16, 16), (256, 32, 64), (200, 64, 32), (128, 16, 64)]:
            what = f"scores_computed(N={n}, bm={bm}, bn={bn})"
            got = _call(scores_computed, n, bm, bn, what=what)
            expected = int(tiles.flash_schedule(n, n, True, bm, bn).computed.sum()) * bm * bn
            if _as_number(got, what) != expected:
                raise _Fail(f"{what} = {got}, expected {expected}",
                            "run flash_attention with kernel_options={'BLOCK_M': bm, 'BLOCK_N': bn} and "
                            "tile_record=rec; count the tiles with rec.maps['fwd'][0, 0] > 0 and multiply by bm·bn")
            rows.append(f"{bm}×{bn} at N={n}: {expected / (n * (n + 1) / 2):.2f}× the allowed pairs")
        return "; ".join(rows)

    return _run("03 · exercise 1, scores_computed", body)


def check_window_attention(window_attention, *, seed=None) -> bool:
    """03 · exercise 2: ``window_attention(q, k, v, window, tile_record=None)``: sliding-window causal
    attention in Triton (query i sees keys i - window < j <= i), visiting only the tiles that hold an
    allowed pair (recorded in ``tile_record.maps['fwd']``)."""
    _require_callable(window_attention, "window_attention", "check_window_attention")
    seed = _new_seed(seed)
    g = _gen(seed)
    dev = device()

    def body():
        worst = 0.0
        for n, w in [(128, 1), (100, 16), (128, 40), (100, 1000)]:
            q, k, v = (_randn(1, 2, n, 32, gen=g, dtype=torch.float32, device_=dev) for _ in range(3))
            what = f"window_attention(q, k, v, window={w}) with N={n}, D=32, float32"
            out = _call(window_attention, q, k, v, w, what=what)
            truth = reference.attention(q, k, v, allowed=_window_mask(n, w, dev))
            worst = max(worst, _compare(out, truth, what, atol=_tol(), names=("batch", "head", "query", "dim"),
                                        hint="allowed = (key <= query) & (key > query - WINDOW); the loop must "
                                             "start at the key tile of key max(first query - WINDOW + 1, 0)",
                                        nan_hint="nan: a key tile with nothing allowed for a row must leave it "
                                                 "unchanged (online_softmax_step does, with MASKED=True)"))
        visited = []
        for n, w in [(128, 40), (100, 16)]:
            q, k, v = (_randn(1, 1, n, 32, gen=g, dtype=torch.float32, device_=dev) for _ in range(3))
            rec = tiles.TileRecord()
            _call(window_attention, q, k, v, w, tile_record=rec, what=f"window_attention(..., tile_record=rec)")
            if "fwd" not in rec.maps:
                raise _Fail("tile_record.maps['fwd'] is missing after the call",
                            "in your launch: rec.start('window', cfg); buf = rec.buffer('fwd', (B, H, n_q_tiles, "
                            "n_k_tiles), q.device); pass buf and RECORD=True, and call record_tile in the loop")
            counts = rec.maps["fwd"][0, 0].cpu()
            n_qt, n_kt = counts.shape
            bm = rec.config.get("BLOCK_M") or next((b for b in (16, 32, 64, 128) if -(-n // b) == n_qt), None)
            bn = rec.config.get("BLOCK_N") or next((b for b in (16, 32, 64, 128) if -(-n // b) == n_kt), None)
            if bm is None or bn is None:
                raise _Fail(f"cannot tell the tile sizes from tile_record.maps['fwd'] of shape {tuple(counts.shape)}",
                            "call tile_record.start('window', {'BLOCK_M': bm, 'BLOCK_N': bn}) in your launch")
            expected = _tile_any(_window_mask(n, w), bm, bn)
            got = counts > 0
            if tuple(got.shape) != tuple(expected.shape) or not torch.equal(got, expected):
                extra = int((got & ~expected).sum()) if got.shape == expected.shape else -1
                raise _Fail(f"N={n}, window={w}, {bm}×{bn} tiles: your kernel visited {int(got.sum())} tiles, the "
                            f"window needs exactly {int(expected.sum())}" +
                            (f" ({extra} visited tiles hold no allowed pair)" if extra > 0 else ""),
                            "start the key loop at (max(q_tile·BLOCK_M - WINDOW + 1, 0)) // BLOCK_N; end it as the "
                            "causal loop does")
            visited.append(f"N={n}, W={w}: {int(got.sum())} tiles (dense causal: "
                           f"{tiles.dense_causal_tile_count(n, n, bm, bn)})")
        return f"max error {worst:.1e} on 4 (N, window) pairs; " + "; ".join(visited)

    return _run("03 · exercise 2, window_attention", body, seed)


def check_empty_row(answers) -> bool:
    """03 · exercise 3: ``dict(m=, l=, acc=, lse2=)``: the state of a query row that sees no key, after the
    loop (m, l, acc: one number each, acc stands for every entry) and the lse2 the forward stores."""
    keys = ("m", "l", "acc", "lse2")
    if answers is not None and not isinstance(answers, dict):
        raise TypeError(f"check_empty_row expects a dict like dict(m=..., l=..., acc=..., lse2=...), "
                        f"got {type(answers).__name__}")
    if answers is not None and set(answers) - set(keys):
        raise TypeError(f"check_empty_row: unknown keys {sorted(set(answers) - set(keys))}; expected {keys}")

    def body():
        if answers is None or all(answers.get(k) is None for k in keys):
            raise _NotAttempted
        expected = {"m": -math.inf, "l": 0.0, "acc": 0.0, "lse2": math.inf}
        hints = {
            "m": "m starts at -inf and only a score that is allowed can raise it",
            "l": "nothing was ever added to l",
            "acc": "nothing was ever added to acc (p is 0 everywhere: m_shift = 0 keeps 2^(-inf - 0) = 0)",
            "lse2": "the backward computes p = 2^(s - lse2): which lse2 makes p = 0 for every score s?",
        }
        for key in keys:
            if answers.get(key) is None:
                raise _Fail(f"{key} is missing", hints[key])
            try:
                got = float(answers[key])
            except Exception:
                raise _Fail(f"{key} should be a number (use float('inf') or math.inf for infinity)") from None
            if got != expected[key]:
                raise _Fail(f"{key} = {got}, expected {expected[key]}", hints[key])
        return ("m = -inf, l = 0, acc = 0: out = 0 (not 0/0 = nan); lse2 = +inf makes p = 0 and no gradient; "
                "lse2 = 0 would give p = 2^s ≠ 0 and -inf would give p = inf")

    return _run("03 · exercise 3, the empty row", body)


def check_kernel_bf16_error(kernel_bf16_error, *, seed=None) -> bool:
    """03 · exercise 4: ``kernel_bf16_error(n)``: relative error (Frobenius) of ``flash_attention(causal=True)``
    in bfloat16 for ``(1, 2, n, 64)`` inputs, against ``ref.attention`` of the same inputs."""
    _require_callable(kernel_bf16_error, "kernel_bf16_error", "check_kernel_bf16_error")
    seed = _new_seed(seed)
    g = _gen(seed)
    dev = device()

    def measure(n):
        from ..flash import flash_attention

        q, k, v = (_randn(1, 2, n, 64, gen=g, dtype=torch.bfloat16, device_=dev) for _ in range(3))
        truth = reference.attention(q, k, v, causal=True)
        out = flash_attention(q, k, v, causal=True)
        return ((out.double() - truth).norm() / truth.norm()).item()

    def body():
        return _error_near_typical(
            kernel_bf16_error, "kernel_bf16_error", (64, 128) if dev.type == "cpu" else (512, 2048), measure,
            "flash_attention in bfloat16 has relative errors",
            "rel_err(flash_attention(q, k, v, causal=True), ref.attention(q, k, v, causal=True)) "
            "with q, k, v of shape (1, 2, n, 64) in torch.bfloat16 on `device`",
        )

    return _run("03 · exercise 4, kernel_bf16_error", body, seed)


def check_tile_products(answers) -> bool:
    """03 · exercise 5: ``dict(atomic=, two_loops=)``: tile matrix products per (query tile, key tile) pair
    in the backward with an atomic dQ and in sparseflash's two-loop backward."""
    if answers is not None and not isinstance(answers, dict):
        raise TypeError(f"check_tile_products expects dict(atomic=..., two_loops=...), got {type(answers).__name__}")

    def body():
        if answers is None or all(v is None for v in answers.values()):
            raise _NotAttempted
        products = "s = q kᵀ, dp = do vᵀ, dv += pᵀ do, dk += dsᵀ q, dq += ds k"
        for key, expected, hint in [
            ("atomic", 5, f"one loop computes all of: {products}"),
            ("two_loops", 7, "the dK/dV loop computes s, dp, dv, dk; the dQ loop recomputes s and dp, then dq"),
        ]:
            got = answers.get(key)
            if got is None:
                raise _Fail(f"{key} is missing", hint)
            if got != expected:
                raise _Fail(f"{key} = {got}, expected {expected}", hint)
        return "5 products with atomics, 7 with two loops: 40% more products, but no atomics and bitwise " \
               "reproducible dQ"

    return _run("03 · exercise 5, tile products", body)
