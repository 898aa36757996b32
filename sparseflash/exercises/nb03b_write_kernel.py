"""Checkers of notebook 03b, write the kernel (``03b_write_the_kernel.ipynb``).

Each piece runs inside a small probe kernel or in the skeletons of :mod:`.nb03b_skeleton`,
against the float64 online softmax and :func:`sparseflash.tiles.flash_schedule`:

* :func:`check_load_tile`: piece 1 loads contiguous and strided rows, ragged ends as 0.
* :func:`check_key_tile_range`: piece 2 visits exactly the key tiles of ``flash_schedule``.
* :func:`check_softmax_step`: piece 3, the base-2 online-softmax update, on rows that see no
  key, only the first or only the last key tile.
* :func:`check_finish_row`: piece 4 gives ``out = acc / l`` and ``lse2`` (0 and ``+inf`` for an
  empty row).
* :func:`check_forward`: pieces 1-4 in :func:`~.nb03b_skeleton.forward_skeleton` match the
  reference's output and log-sum-exp, computing exactly ``flash_schedule``'s tiles.
* :func:`check_backward_step`: piece 5 gives ``p`` and ``ds`` of one tile.
* :func:`check_query_tile_start`: the optional piece starts each dK/dV loop at the first
  query tile ``flash_schedule`` computes.
* :func:`check_backward`: the pieces in :func:`~.nb03b_skeleton.backward_skeleton` match the
  reference's gradients, both loops computing exactly ``flash_schedule``'s tiles.

:func:`plot_key_tile_range` and :func:`plot_tile_record` draw the tiles the learner's kernel
visits next to ``flash_schedule``'s.
"""
from __future__ import annotations

import math

import torch
import triton
from torch import Tensor

from .. import reference, tiles
from .._steps import LOG2E, dot_precision
from ._common import _compare, _Fail, _gen, _new_seed, _randn, _run, _tol, device
from .nb03b_skeleton import (_backward_step_probe, _check_pieces, _is_jit, _is_stub, _key_range_probe, _launch,
                             _load_probe, _padded, _query_start_probe, _require_pieces, _softmax_probe,
                             run_backward, run_forward)

__all__ = [
    "check_load_tile", "check_key_tile_range", "check_softmax_step", "check_finish_row", "check_forward",
    "check_backward_step", "check_query_tile_start", "check_backward", "plot_key_tile_range", "plot_tile_record",
]


# ---- references -------------------------------------------------------------------------


def _ref_state(q, k, v, mask):
    """float64 (m2, l, acc, out, lse2) of the base-2 online softmax over all keys, for (N, D) inputs."""
    s = (q.double() @ k.double().T) / math.sqrt(q.shape[-1]) * LOG2E
    s = s.masked_fill(~mask, -math.inf)
    m = s.max(-1).values
    empty = torch.isinf(m)
    shift = torch.where(empty, torch.zeros_like(m), m)
    p = torch.exp2(s - shift[:, None])
    l = p.sum(-1)
    acc = p @ v.double()
    out = torch.where(empty[:, None], torch.zeros_like(acc), acc / torch.where(empty, 1.0, l)[:, None])
    lse2 = torch.where(empty, torch.full_like(m, math.inf), m + torch.log2(torch.where(empty, 1.0, l)))
    return m, l, acc, out, lse2


def _test_mask(n: int, block_n: int, gen) -> Tensor:
    """Causal mask with random holes, empty rows, a row that sees only the last key tile and a
    row that sees only the first one: every case of the online softmax's bookkeeping."""
    mask = reference.causal_mask(n) & (torch.rand(n, n, generator=gen) < 0.7)
    mask[[3, n // 2, n - 4]] = False                                # empty rows
    last_tile = ((n - 1) // block_n) * block_n
    mask[n - 1] = False
    mask[n - 1, last_tile:] = True                                  # sees only the last key tile
    mask[n - 3, block_n:] = False
    mask[n - 3, 0] = True                                           # sees only the first key tile
    return mask & reference.causal_mask(n)


_FWD_CASES = [(128, 32, 32, 32), (100, 16, 32, 16), (100, 32, 16, 32)]   # (N, D, BLOCK_M, BLOCK_N)


# ---- the pieces and the kernels -----------------------------------------------------------


def check_load_tile(load_tile, *, seed=None) -> bool:
    """03b · piece 1: ``load_tile(ptr, rows, cols, stride_row, n_rows)``: rows ≥ ``n_rows`` read 0."""
    _require_pieces("check_load_tile", load_tile=load_tile)
    seed = _new_seed(seed)
    g = _gen(seed)
    dev = device()

    def body():
        _check_pieces(load_tile=load_tile)
        n, d, H = 100, 32, 3
        contiguous = _padded((n, d), g, dev)
        transposed = _padded((n, H * d), g, dev).unflatten(-1, (H, d))[:, 1]   # (N, D) rows H·D apart
        cases = [("contiguous (N, D)", contiguous, 0, 32), ("contiguous, ragged end", contiguous, n - 5, 32),
                 ("contiguous, 16 rows", contiguous, 40, 16),
                 ("rows H·D apart (a (N, H, D) tensor's head 1)", transposed, 64, 32),
                 ("rows H·D apart, ragged end", transposed, n - 17, 32)]
        for name, x, row0, block in cases:
            out = torch.full((block, d), float("nan"), dtype=torch.float32, device=dev)
            what = f"load_tile on {name}, rows {row0}..{row0 + block - 1} of n_rows={n}"
            _launch(_load_probe, (1,), x, out, row0, x.stride(0), n, LOAD_TILE=load_tile, BLOCK=block, D=d,
                    what=what)
            rows = torch.arange(row0, row0 + block)
            expected = torch.zeros(block, d, dtype=torch.float64)
            valid = rows < n
            expected[valid] = x.cpu()[rows[valid]].double()
            _compare(out, expected, what, atol=0, names=(f"tile row (+{row0})", "col"),
                     hint="the offset of element (r, c) is r·stride_row + c: rows[:, None] * stride_row + "
                          "cols[None, :]",
                     nan_hint="rows past n_rows must read 0: tl.load(..., mask=rows[:, None] < n_rows, other=0.0)")
        return f"{len(cases)} tiles: contiguous and strided rows, ragged ends read as 0"

    return _run("03b · piece 1, load_tile", body, seed)


def _expected_visits(n, bm, bn) -> Tensor:
    return tiles.flash_schedule(n, n, True, bm, bn).computed[0, 0].sum(-1)


def check_key_tile_range(key_tile_range) -> bool:
    """03b · piece 2: ``key_tile_range(q_tile, n, BLOCK_M, BLOCK_N)``: key tiles ``[0, n_visit)`` a causal
    query tile must visit, no more and no fewer (compared with ``tiles.flash_schedule``)."""
    _require_pieces("check_key_tile_range", key_tile_range=key_tile_range)
    dev = device()

    def body():
        _check_pieces(key_tile_range=key_tile_range)
        cases = [(128, 32, 32), (100, 32, 16), (100, 16, 32), (128, 64, 16), (37, 16, 16), (200, 16, 64)]
        for n, bm, bn in cases:
            n_qt = triton.cdiv(n, bm)
            out = torch.full((n_qt,), -1, dtype=torch.int32, device=dev)
            _launch(_key_range_probe, (n_qt,), out, n, KEY_TILE_RANGE=key_tile_range, BLOCK_M=bm, BLOCK_N=bn,
                    what=f"key_tile_range for N={n}, {bm}×{bn} tiles")
            got, expected = out.cpu(), _expected_visits(n, bm, bn)
            for t in range(n_qt):
                g_, e_ = int(got[t]), int(expected[t])
                if g_ == e_:
                    continue
                last_q = min((t + 1) * bm, n) - 1
                where = f"N={n}, {bm}×{bn} tiles, query tile {t} (queries {t * bm}..{last_q})"
                if g_ < e_:
                    raise _Fail(f"{where}: visits {g_} key tiles, needs {e_}: key tile {e_ - 1} (keys "
                                f"{(e_ - 1) * bn}..) holds keys that query {last_q} sees",
                                "the last key a query tile sees is its last query, min((q_tile + 1)·BLOCK_M, n) - 1; "
                                "visit key tiles up to the one holding it")
                raise _Fail(f"{where}: visits {g_} key tiles, needs only {e_}: key tile {e_} starts at key "
                            f"{e_ * bn} > query {last_q}, so nothing in it is allowed",
                            "the last key a query tile sees is its last query, min((q_tile + 1)·BLOCK_M, n) - 1, "
                            "and tiles of keys after it hold no allowed pair")
        return f"{len(cases)} shapes, ragged ends and BLOCK_M ≠ BLOCK_N included: same tiles as flash_schedule"

    return _run("03b · piece 2, key_tile_range", body)


def _softmax_inputs(n, d, bn, gen, dev):
    q = _randn(n, d, gen=gen, dtype=torch.float32) * 2.0     # spread scores: the max moves between tiles
    k = _randn(n, d, gen=gen, dtype=torch.float32)
    v = _randn(n, d, gen=gen, dtype=torch.float32)
    k[-(n % bn or bn):] *= 3.0                               # large scores in the last key tile
    mask = _test_mask(n, bn, gen)
    return q, k, v, mask, tuple(t.to(dev) for t in (q, k, v, mask.to(torch.int8)))


def check_softmax_step(softmax_step, *, seed=None) -> bool:
    """03b · piece 3: ``softmax_step(acc, m_i, l_i, q, k, v, allowed, qk_scale) -> (acc, m_i, l_i)``, the
    online-softmax update in base 2, where a row that has seen no allowed key stays at ``l = 0, acc = 0``."""
    _require_pieces("check_softmax_step", softmax_step=softmax_step)
    seed = _new_seed(seed)
    g = _gen(seed)
    dev = device()

    def body():
        _check_pieces(softmax_step=softmax_step)
        worst = 0.0
        for n, d, bm, bn in _FWD_CASES:
            q, k, v, mask, (qd, kd, vd, maskd) = _softmax_inputs(n, d, bn, g, dev)
            m_, l_, acc_ = (torch.full(s, float("nan"), device=dev) for s in ((n,), (n,), (n, d)))
            what = f"N={n}, D={d}, {bm}×{bn} tiles"
            _launch(_softmax_probe, (triton.cdiv(n, bm),), qd, kd, vd, maskd, m_, l_, acc_, acc_, m_, n,
                    (1 / math.sqrt(d)) * LOG2E, STEP=softmax_step, FINISH=softmax_step, USE_MINE=False, D=d,
                    BLOCK_M=bm, BLOCK_N=bn, DOT_PRECISION="ieee", what=f"your softmax_step, {what}")
            m_ref, l_ref, acc_ref, _, _ = _ref_state(q, k, v, mask)
            empty = ~mask.any(-1)
            nan_hint = ("a row with no allowed key so far has m = -inf and s = -inf everywhere, so s - m = nan: "
                        "subtract m_shift = tl.where(m_new == float('-inf'), 0.0, m_new) instead of m_new "
                        f"(rows {torch.nonzero(empty).flatten().tolist()} here see no key at all)")
            hint = ("m' = max(m, rowmax s); alpha = 2^(m - m'); p = 2^(s - m'); l' = l·alpha + rowsum p; "
                    "acc' = acc·alpha + p v, with s = q kᵀ · qk_scale (already base 2: use tl.math.exp2) "
                    "and -inf where not allowed")
            names = ("query", "dim")
            m_got = m_.cpu().double()
            m_got = torch.where(empty.to(m_got.device), torch.full_like(m_got, -math.inf), m_got)
            _compare(m_got, m_ref, f"m after the last key tile ({what})", atol=_tol(), names=names[:1], hint=hint,
                     nan_hint=nan_hint)
            _compare(l_, l_ref, f"l after the last key tile ({what})", atol=_tol(), rtol=_tol(), names=names[:1],
                     hint=hint, nan_hint=nan_hint)
            worst = max(worst, _compare(acc_, acc_ref, f"acc after the last key tile ({what})", atol=_tol(),
                                        rtol=_tol(), names=names, hint=hint, nan_hint=nan_hint))
        return (f"max error {worst:.1e} on {len(_FWD_CASES)} shapes with empty rows, rows that see only the first "
                "or the last key tile, and a max that moves between tiles")

    return _run("03b · piece 3, softmax_step", body, seed)


def check_finish_row(finish_row, *, seed=None) -> bool:
    """03b · piece 4: ``finish_row(acc, m_i, l_i) -> (out, lse2)``: ``out = acc / l`` (0 for an empty row) and
    the base-2 log-sum-exp ``lse2 = m + log2(l)`` (``+inf`` for an empty row)."""
    _require_pieces("check_finish_row", finish_row=finish_row)
    seed = _new_seed(seed)
    g = _gen(seed)
    dev = device()

    def body():
        _check_pieces(finish_row=finish_row)
        worst = 0.0
        for n, d, bm, bn in _FWD_CASES[:2]:
            q, k, v, mask, (qd, kd, vd, maskd) = _softmax_inputs(n, d, bn, g, dev)
            m_, l_, lse_ = (torch.full((n,), float("nan"), device=dev) for _ in range(3))
            acc_, out_ = (torch.full((n, d), float("nan"), device=dev) for _ in range(2))
            what = f"N={n}, D={d}, {bm}×{bn} tiles"
            _launch(_softmax_probe, (triton.cdiv(n, bm),), qd, kd, vd, maskd, m_, l_, acc_, out_, lse_, n,
                    (1 / math.sqrt(d)) * LOG2E, STEP=finish_row, FINISH=finish_row, USE_MINE=True, D=d,
                    BLOCK_M=bm, BLOCK_N=bn, DOT_PRECISION=dot_precision(torch.float32),
                    what=f"your finish_row, {what}")
            _, _, _, out_ref, lse_ref = _ref_state(q, k, v, mask)
            empty = torch.nonzero(~mask.any(-1)).flatten().tolist()
            worst = max(worst, _compare(out_, out_ref, f"out ({what})", atol=_tol(), names=("query", "dim"),
                                        hint="out = acc / l",
                                        nan_hint=f"rows {empty} see no key: l = 0 there, and acc / 0 = nan; divide "
                                                 "by tl.where(l == 0, 1.0, l) so those rows give 0"))
            _compare(lse_, lse_ref, f"lse2 ({what})", atol=_tol(), rtol=_tol(), names=("query",),
                     hint=f"lse2 = m + log2(l) (base 2, like the scores); rows {empty} see no key and need "
                          "lse2 = +inf, so that the backward's p = 2^(s - lse2) is 0 there",
                     nan_hint=f"rows {empty} see no key (m = -inf, l = 0): give them lse2 = float('inf'), "
                              "with tl.where")
        return f"max error {worst:.1e}; empty rows give out = 0 and lse2 = +inf"

    return _run("03b · piece 4, finish_row", body, seed)


def _ref_lse2(q, k):
    """Base-2 log-sum-exp of each causal row, float64."""
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~reference.causal_mask(q.shape[-2], device=q.device), -math.inf)
    return torch.logsumexp(s, -1) / math.log(2)


def _compare_record(counts: Tensor, expected: Tensor, what: str, loop: str) -> None:
    counts = counts.cpu()
    if counts.max() > 1:
        raise _Fail(f"{what}: the {loop} computed a tile more than once, or visited tiles past the end of the "
                    "sequence (counted in the last key tile)", "there are cdiv(n, BLOCK_N) key tiles")
    got = counts > 0
    missing, extra = expected & ~got, got & ~expected
    if missing.any():
        b, h, qt, kt = torch.nonzero(missing)[0].tolist()
        raise _Fail(f"{what}: the {loop} skipped {int(missing.sum())} tile(s) that hold allowed pairs, "
                    f"e.g. query tile {qt} × key tile {kt}", "compare with tiles.flash_schedule(...).computed")
    if extra.any():
        b, h, qt, kt = torch.nonzero(extra)[0].tolist()
        raise _Fail(f"{what}: the {loop} computed {int(extra.sum())} tile(s) that hold no allowed pair, "
                    f"e.g. query tile {qt} × key tile {kt} (right output, wasted work)",
                    "compare with tiles.flash_schedule(...).computed")


def check_forward(load_tile, key_tile_range, softmax_step, finish_row, *, seed=None) -> bool:
    """03b · your forward kernel: pieces 1-4 in the skeleton ``forward_skeleton``, against ``ref.attention``
    (output and log-sum-exp) and against ``tiles.flash_schedule`` (the tiles it computed)."""
    _require_pieces("check_forward", load_tile=load_tile, key_tile_range=key_tile_range,
                    softmax_step=softmax_step, finish_row=finish_row)
    seed = _new_seed(seed)
    g = _gen(seed)
    dev = device()

    def body():
        _check_pieces(load_tile=load_tile, key_tile_range=key_tile_range, softmax_step=softmax_step,
                      finish_row=finish_row)
        worst = 0.0
        tiles_done = 0
        for n, d, bm, bn in _FWD_CASES:
            q, k, v = (_padded((1, 2, n, d), g, dev) for _ in range(3))
            rec = tiles.TileRecord()
            what = f"N={n}, D={d}, {bm}×{bn} tiles"
            o, lse2 = run_forward(q, k, v, load_tile=load_tile, key_tile_range=key_tile_range,
                                  softmax_step=softmax_step, finish_row=finish_row, block_m=bm, block_n=bn,
                                  tile_record=rec)
            _compare_record(rec.maps["fwd"], tiles.flash_schedule(n, n, True, bm, bn, batch=1, heads=2).computed,
                            what, "forward")
            worst = max(worst, _compare(o, reference.attention(q, k, v, causal=True), f"output ({what})",
                                        atol=_tol(), names=("batch", "head", "query", "dim"),
                                        hint="run check_softmax_step and check_finish_row first"))
            _compare(lse2, _ref_lse2(q, k), f"lse2 ({what})", atol=_tol(), rtol=_tol(),
                     names=("batch", "head", "query"), hint="lse2 = m + log2(l), in base 2")
            tiles_done += int((rec.maps["fwd"] > 0).sum())
        return f"max error {worst:.1e} on {len(_FWD_CASES)} shapes; {tiles_done} tiles computed, exactly " \
               "flash_schedule's"

    return _run("03b · your forward kernel", body, seed)


def check_backward_step(backward_step, *, seed=None) -> bool:
    """03b · piece 5: ``backward_step(q, k, v, do, lse2, delta, allowed, qk_scale) -> (p, ds)``:
    ``p = 2^(s - lse2)`` (0 where not allowed) and ``ds = p · (do vᵀ - delta)``."""
    _require_pieces("check_backward_step", backward_step=backward_step)
    seed = _new_seed(seed)
    g = _gen(seed)
    dev = device()

    def body():
        _check_pieces(backward_step=backward_step)
        worst = 0.0
        for n, d, bm, bn in _FWD_CASES[:2]:
            q, k, v, mask, (qd, kd, vd, maskd) = _softmax_inputs(n, d, bn, g, dev)
            do = _randn(n, d, gen=g, dtype=torch.float32)
            _, _, _, out, lse2 = _ref_state(q, k, v, mask)
            s = (q.double() @ k.double().T) / math.sqrt(d)
            p_ref = torch.softmax(s.masked_fill(~mask, -math.inf), -1).nan_to_num(0.0).masked_fill(~mask, 0.0)
            dp = do.double() @ v.double().T
            delta = (out * do.double()).sum(-1)
            ds_ref = p_ref * (dp - delta[:, None])
            P, DS = (torch.full((n, n), float("nan"), device=dev) for _ in range(2))
            what = f"N={n}, D={d}, {bm}×{bn} tiles"
            _launch(_backward_step_probe, (triton.cdiv(n, bm), triton.cdiv(n, bn)), qd, kd, vd, do.to(dev),
                    lse2.float().to(dev), delta.float().to(dev), maskd, P, DS, n, (1 / math.sqrt(d)) * LOG2E,
                    STEP=backward_step, D=d, BLOCK_M=bm, BLOCK_N=bn, what=f"your backward_step, {what}")
            empty = torch.nonzero(~mask.any(-1)).flatten().tolist()
            _compare(P, p_ref, f"p ({what})", atol=_tol(), names=("query", "key"),
                     hint="p = 2^(s - lse2[:, None]) with s = q kᵀ · qk_scale, and 0 where not allowed "
                          "(tl.where(allowed, p, 0.0))",
                     nan_hint=f"rows {empty} see no key and have lse2 = +inf: 2^(s - inf) = 0 is fine, but "
                              "masking s to -inf first gives -inf - inf... keep s finite and zero p with tl.where")
            worst = max(worst, _compare(DS, ds_ref, f"ds ({what})", atol=_tol(), rtol=_tol(), names=("query", "key"),
                                        hint="dp = do vᵀ (tl.dot(do, tl.trans(v))); ds = p · (dp - delta[:, None])"))
        return f"max error {worst:.1e}; masked pairs and empty rows give p = ds = 0"

    return _run("03b · piece 5, backward_step", body, seed)


def check_query_tile_start(query_tile_start) -> bool:
    """03b · optional piece: ``query_tile_start(k_tile, BLOCK_M, BLOCK_N)``: the first query tile the dK/dV
    loop of a key tile visits (the earlier ones hold no allowed pair)."""
    _require_pieces("check_query_tile_start", query_tile_start=query_tile_start)
    dev = device()

    def body():
        _check_pieces(query_tile_start=query_tile_start)
        cases = [(128, 32, 32), (100, 32, 16), (100, 16, 32), (128, 64, 16), (200, 16, 64)]
        for n, bm, bn in cases:
            n_kt = triton.cdiv(n, bn)
            out = torch.full((n_kt,), -1, dtype=torch.int32, device=dev)
            _launch(_query_start_probe, (n_kt,), out, QUERY_TILE_START=query_tile_start, BLOCK_M=bm, BLOCK_N=bn,
                    what=f"query_tile_start, {bm}×{bn} tiles")
            computed = tiles.flash_schedule(n, n, True, bm, bn).computed[0, 0]
            for kt in range(n_kt):
                expected = int(torch.nonzero(computed[:, kt])[0])
                if int(out[kt]) != expected:
                    raise _Fail(f"N={n}, {bm}×{bn} tiles, key tile {kt} (keys {kt * bn}..): you start at query "
                                f"tile {int(out[kt])}, expected {expected}",
                                "the first query tile holding a query ≥ the key tile's first key k_tile·BLOCK_N")
        return f"{len(cases)} shapes: same first query tiles as flash_schedule"

    return _run("03b · optional piece, query_tile_start", body)


def check_backward(load_tile, key_tile_range, backward_step, query_tile_start=None, *, seed=None) -> bool:
    """03b · your backward kernel: the skeleton ``backward_skeleton`` with your pieces, against the reference's
    gradients (float64 autograd) and ``tiles.flash_schedule`` (both loops' tiles)."""
    pieces = dict(load_tile=load_tile, key_tile_range=key_tile_range, backward_step=backward_step)
    if query_tile_start is not None:
        pieces["query_tile_start"] = query_tile_start
    _require_pieces("check_backward", **pieces)
    seed = _new_seed(seed)
    g = _gen(seed)
    dev = device()

    def body():
        _check_pieces(**pieces)
        worst = 0.0
        for n, d, bm, bn in _FWD_CASES:
            q, k, v, do = (_padded((1, 2, n, d), g, dev) for _ in range(4))
            leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
            o = reference.attention(*leaves, causal=True)
            o.backward(do.double())
            rec = tiles.TileRecord()
            what = f"N={n}, D={d}, {bm}×{bn} tiles"
            grads = run_backward(q, k, v, o.detach().float(), _ref_lse2(q, k).float(), do, **pieces,
                                 block_m=bm, block_n=bn, tile_record=rec)
            expected = tiles.flash_schedule(n, n, True, bm, bn, batch=1, heads=2).computed
            _compare_record(rec.maps["bwd_q"], expected, what, "dQ loop")
            _compare_record(rec.maps["bwd_kv"], expected, what, "dK/dV loop")
            for name, got, leaf in zip(("dq", "dk", "dv"), grads, leaves):
                worst = max(worst, _compare(got, leaf.grad, f"{name} ({what})", atol=_tol(), rtol=_tol(),
                                            names=("batch", "head", "token", "dim"),
                                            hint="run check_backward_step first"))
        return f"max error {worst:.1e} of dq, dk, dv on {len(_FWD_CASES)} shapes; both loops computed exactly " \
               "flash_schedule's tiles"

    return _run("03b · your backward kernel", body, seed)


# ---- pictures ---------------------------------------------------------------------------


def _draw_map(ax, computed: Tensor, bm: int, bn: int, n: int, title: str):
    import numpy as np

    n_qt, n_kt = computed.shape
    ax.imshow(computed.int().numpy(), cmap="Blues", vmin=0, vmax=1.4, extent=(0, n_kt * bn, n_qt * bm, 0))
    ax.plot([0, n], [0, n], "r-", lw=1)
    ax.set_xticks(np.arange(0, n_kt * bn + 1, bn))
    ax.set_yticks(np.arange(0, n_qt * bm + 1, bm))
    ax.tick_params(labelsize=7)
    ax.grid(color="0.6", lw=0.5)
    ax.set(title=title, xlabel="key position", ylabel="query position")
    ax.title.set_fontsize(9)


def plot_key_tile_range(key_tile_range, n: int = 100, block_m: int = 32, block_n: int = 16):
    """Key tiles your ``key_tile_range`` visits (left) against ``tiles.flash_schedule`` (right)."""
    import matplotlib.pyplot as plt

    expected = tiles.flash_schedule(n, n, True, block_m, block_n).computed[0, 0]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    mine = None
    if callable(key_tile_range) and _is_jit(key_tile_range) and not _is_stub(key_tile_range):
        out = torch.full((triton.cdiv(n, block_m),), -1, dtype=torch.int32, device=device())
        try:
            _launch(_key_range_probe, (len(out),), out, n, KEY_TILE_RANGE=key_tile_range, BLOCK_M=block_m,
                    BLOCK_N=block_n, what="key_tile_range")
            kt = torch.arange(expected.shape[1])
            mine = kt[None, :] < out.cpu()[:, None].clamp(min=0)
        except _Fail as f:
            print(f"(key_tile_range failed: {f.what})")
    if mine is None:
        axes[0].text(0.5, 0.5, "key_tile_range\nnot written yet", ha="center", va="center")
        axes[0].set_axis_off()
    else:
        same = "same as flash_schedule" if torch.equal(mine, expected) else "differs from flash_schedule"
        _draw_map(axes[0], mine, block_m, block_n, n, f"your key_tile_range: {int(mine.sum())} tiles ({same})")
    _draw_map(axes[1], expected, block_m, block_n, n, f"tiles.flash_schedule: {int(expected.sum())} tiles")
    fig.suptitle(f"causal tiles visited, N={n}, {block_m}×{block_n} tiles (red: the diagonal j = i)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_tile_record(record: tiles.TileRecord, n: int):
    """The tiles each loop of your kernel computed (from a ``TileRecord`` filled by :func:`run_forward`,
    :func:`run_backward` or :func:`build_attention`), batch 0, head 0."""
    import matplotlib.pyplot as plt

    bm, bn = record.config["BLOCK_M"], record.config["BLOCK_N"]
    names = [name for name in ("fwd", "bwd_kv", "bwd_q") if name in record.maps]
    fig, axes = plt.subplots(1, len(names), figsize=(4.3 * len(names), 4.2), squeeze=False)
    expected = tiles.flash_schedule(n, n, True, bm, bn).computed[0, 0]
    titles = {"fwd": "forward", "bwd_kv": "backward dK, dV", "bwd_q": "backward dQ"}
    for ax, name in zip(axes[0], names):
        counts = record.maps[name][0, 0].cpu()
        ok = "= flash_schedule" if torch.equal(counts > 0, expected) else "≠ flash_schedule"
        _draw_map(ax, counts > 0, bm, bn, n, f"{titles[name]}: {int((counts > 0).sum())} tiles ({ok})")
    fig.tight_layout()
    return fig
