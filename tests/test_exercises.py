"""The notebooks' checkers (sparseflash.exercises): each passes on its solution in
notebooks/solutions/, fails (without raising) on typical wrong answers, reports an
unfinished stub as not attempted, and raises only on misuse."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

import sparseflash  # noqa: F401  (first: picks Triton's interpreter without a GPU)
import triton
import triton.language as tl
from sparseflash import _runtime, exercises as ex
from sparseflash.tiles import TileRecord

SOLUTIONS = Path(__file__).resolve().parent.parent / "notebooks" / "solutions"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"sparseflash_solution_{name}", SOLUTIONS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ex01, ex02, ex03, ex03b, ex08 = (_load(n) for n in ("ex01", "ex02", "ex03", "ex03b", "ex08"))


def passes(capsys, check, *args, **kwargs):
    ok = check(*args, **kwargs)
    out = capsys.readouterr().out
    assert ok is True and out.startswith("✓"), out
    return out


def fails(capsys, check, *args, contains=None, **kwargs):
    ok = check(*args, **kwargs)
    out = capsys.readouterr().out
    assert ok is False and out.startswith("✗"), out
    if contains:
        assert contains in out, out
    return out


def not_attempted(capsys, check, *args, **kwargs):
    ok = check(*args, **kwargs)
    out = capsys.readouterr().out
    assert ok is False and "not attempted yet" in out, out


def _stub(*args, **kwargs):
    raise NotImplementedError


# ======================================================================================
# Every checker passes on its solution
# ======================================================================================

SOLVED = [
    ("check_sliding_window_mask", lambda: (ex01.sliding_window_mask,)),
    ("check_window_pairs", lambda: (ex01.window_pairs,)),
    ("check_peak_memory", lambda: (ex01.peak_bytes,)),
    ("check_stable_softmax", lambda: (ex01.stable_softmax,)),
    ("check_float16_exp_overflow", lambda: (ex01.float16_exp_overflow,)),
    ("check_bf16_error", lambda: (ex01.bf16_error,)),
    ("check_merge", lambda: (ex02.merge,)),
    ("check_fp16_online_stats", lambda: (ex02.online_softmax_stats_fp16,)),
    ("check_tiled_macs", lambda: (ex02.tiled_macs,)),
    ("check_needs_mask", lambda: (ex02.needs_mask,)),
    ("check_window_tiles", lambda: (ex02.window_tiles,)),
    ("check_hash_setting", lambda: (ex02.hash_setting,)),
    ("check_scores_computed", lambda: (ex03.scores_computed,)),
    ("check_window_attention", lambda: (ex03.window_attention,)),
    ("check_empty_row", lambda: (ex03.empty_row,)),
    ("check_kernel_bf16_error", lambda: (ex03.kernel_bf16_error,)),
    ("check_tile_products", lambda: (ex03.tile_products,)),
    ("check_load_tile", lambda: (ex03b.load_tile,)),
    ("check_key_tile_range", lambda: (ex03b.key_tile_range,)),
    ("check_softmax_step", lambda: (ex03b.softmax_step,)),
    ("check_finish_row", lambda: (ex03b.finish_row,)),
    ("check_forward", lambda: (ex03b.load_tile, ex03b.key_tile_range, ex03b.softmax_step, ex03b.finish_row)),
    ("check_backward_step", lambda: (ex03b.backward_step,)),
    ("check_query_tile_start", lambda: (ex03b.query_tile_start,)),
    ("check_backward", lambda: (ex03b.load_tile, ex03b.key_tile_range, ex03b.backward_step)),
    ("check_backward", lambda: (ex03b.load_tile, ex03b.key_tile_range, ex03b.backward_step,
                                ex03b.query_tile_start)),
    ("check_top2_key_slots", lambda: (ex08.top2_key_slots,)),
]


def test_every_checker_has_a_solution_case():
    checkers = {name for name in ex.__all__ if name.startswith("check_")}
    assert checkers == {name for name, _ in SOLVED}


@pytest.mark.parametrize("name,args", SOLVED, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SOLVED)])
def test_solution_passes(capsys, name, args):
    passes(capsys, getattr(ex, name), *args())


def test_seeded_checkers_replay(capsys, seed):
    capsys.readouterr()                                    # the seed fixture's line
    passes(capsys, ex.check_stable_softmax, ex01.stable_softmax, seed=seed)
    passes(capsys, ex.check_softmax_step, ex03b.softmax_step, seed=seed)


# ======================================================================================
# Notebook 01: wrong answers
# ======================================================================================


def test_01_wrong_answers(capsys):
    def window_off_by_one(n, w):
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        return (j <= i) & (j >= i - w)                         # w + 1 keys

    out = fails(capsys, ex.check_sliding_window_mask, window_off_by_one, contains="expected False, got True")
    assert "X" in out                                          # the picture of the wrong entries
    fails(capsys, ex.check_sliding_window_mask, lambda n, w: window_off_by_one(n, w).int(), contains="bool")
    fails(capsys, ex.check_window_pairs, lambda n, w: n * w)
    fails(capsys, ex.check_peak_memory, lambda n, requires_grad=False: 1000.0, contains="N^0.00")

    def softmax_by_hand(x):                                    # the notebook's starter: overflows
        e = torch.exp(x)
        return e / e.sum(dim=-1, keepdim=True)

    fails(capsys, ex.check_stable_softmax, softmax_by_hand, contains="subtract each row's max")
    fails(capsys, ex.check_stable_softmax, lambda x: torch.exp(x - x.max()) / torch.exp(x - x.max()).sum())
    fails(capsys, ex.check_float16_exp_overflow, math.log(torch.finfo(torch.float32).max))

    def bf16_error_in_float32(n):
        q, k, v = (torch.randn(1, 4, n, 64) for _ in range(3))
        return (ex._naive_attention(q, k, v, True).double()
                - sparseflash.reference.attention(q, k, v, causal=True)).abs().max().item()

    fails(capsys, ex.check_bf16_error, bf16_error_in_float32)


# ======================================================================================
# Notebook 02: wrong answers
# ======================================================================================


def test_02_wrong_answers(capsys):
    fails(capsys, ex.check_merge, lambda m1, l1, m2, l2: (torch.maximum(m1, m2), l1 + l2), contains="rescale")

    def merge_without_empty_rule(m1, l1, m2, l2):
        m = torch.maximum(m1, m2)
        return m, l1 * torch.exp(m1 - m) + l2 * torch.exp(m2 - m)

    fails(capsys, ex.check_merge, merge_without_empty_rule, contains="-inf")

    def stats_in_float16(x, chunk):                             # the notebook's loop, all in float16
        m = torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype)
        l = torch.zeros(x.shape[:-1], dtype=x.dtype)
        for start in range(0, x.shape[-1], chunk):
            xc = x[..., start:start + chunk]
            m_new = torch.maximum(m, xc.max(-1).values)
            l = l * torch.exp(m - m_new) + torch.exp(xc - m_new[..., None]).sum(-1)
            m = m_new
        return m, l

    fails(capsys, ex.check_fp16_online_stats, stats_in_float16, contains="float32")

    def macs_full_tiles(N, D, bm, bn):                          # ignores ragged tiles
        return sum(2 * bm * bn * D for qt in range(-(-N // bm)) for kt in range(-(-N // bn))
                   if kt * bn <= min((qt + 1) * bm, N) - 1)

    fails(capsys, ex.check_tiled_macs, macs_full_tiles)
    fails(capsys, ex.check_needs_mask, lambda rows, cols: bool(cols[0] > rows[0]))

    def causal_tiles_only(N, w, bm, bn):                        # forgets the window
        qt = torch.arange(-(-N // bm))[:, None]
        kt = torch.arange(-(-N // bn))[None, :]
        return kt * bn <= torch.clamp((qt + 1) * bm, max=N) - 1

    fails(capsys, ex.check_window_tiles, causal_tiles_only, contains="no allowed pair")
    fails(capsys, ex.check_window_tiles, lambda N, w, bm, bn: causal_tiles_only(N, w, bm, bn) & False,
          contains="skips")
    fails(capsys, ex.check_hash_setting, dict(seq_len=128, block=64, n_buckets=2, seed=0))


# ======================================================================================
# Notebook 03: wrong answers
# ======================================================================================


def test_03_wrong_answers(capsys):
    fails(capsys, ex.check_scores_computed, lambda N, bm, bn: N * N // 2)

    def ignores_the_window(q, k, v, window, tile_record=None):
        return sparseflash.flash_attention(q, k, v, causal=True, tile_record=tile_record)

    fails(capsys, ex.check_window_attention, ignores_the_window, contains="values wrong")

    def visits_every_causal_tile(q, k, v, window, tile_record=None):
        out = ex03.window_attention(q, k, v, window)
        if tile_record is not None:
            sparseflash.flash_attention(q, k, v, causal=True, tile_record=tile_record)
        return out

    fails(capsys, ex.check_window_attention, visits_every_causal_tile, contains="no allowed pair")
    fails(capsys, ex.check_empty_row, dict(m=-math.inf, l=0.0, acc=0.0, lse2=0.0), contains="lse2")
    fails(capsys, ex.check_empty_row, dict(m=0.0, l=0.0, acc=0.0, lse2=math.inf), contains="m = 0.0")
    fails(capsys, ex.check_kernel_bf16_error, lambda n: 0.0)
    fails(capsys, ex.check_tile_products, dict(atomic=5, two_loops=5), contains="two_loops")


# ======================================================================================
# Notebook 03b: wrong pieces
# ======================================================================================


@triton.jit
def load_tile_without_mask(ptr, rows, cols, stride_row, n_rows):
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :])


@triton.jit
def load_tile_ignoring_stride(ptr, rows, cols, stride_row, n_rows):
    return tl.load(ptr + rows[:, None] * 32 + cols[None, :], mask=rows[:, None] < n_rows, other=0.0)


@triton.jit
def load_tile_far_out(ptr, rows, cols, stride_row, n_rows):
    return tl.load(ptr + rows[:, None] * stride_row * 1000 + cols[None, :], mask=rows[:, None] >= 0, other=0.0)


@triton.jit
def key_tile_range_misses_diagonal(q_tile, n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    return (tl.minimum((q_tile + 1) * BLOCK_M, n) - 1) // BLOCK_N


@triton.jit
def key_tile_range_every_tile(q_tile, n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    return tl.cdiv(n, BLOCK_N) + 0 * q_tile


@triton.jit
def key_tile_range_past_the_end(q_tile, n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    return tl.cdiv(n, BLOCK_N) + 2 + 0 * q_tile


@triton.jit
def softmax_step_without_empty_rule(acc, m_i, l_i, q, k, v, allowed, qk_scale):
    s = tl.where(allowed, tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    return acc * alpha[:, None] + tl.dot(p, v), m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def softmax_step_without_rescale(acc, m_i, l_i, q, k, v, allowed, qk_scale):
    s = tl.where(allowed, tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    return acc + tl.dot(p, v), m_new, l_i * alpha + tl.sum(p, 1)   # acc not rescaled


@triton.jit
def softmax_step_natural_exp(acc, m_i, l_i, q, k, v, allowed, qk_scale):
    s = tl.where(allowed, tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_shift[:, None])
    alpha = tl.exp(m_i - m_shift)
    return acc * alpha[:, None] + tl.dot(p, v), m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def finish_row_without_empty_rule(acc, m_i, l_i):
    return acc / l_i[:, None], m_i + tl.math.log2(l_i)


@triton.jit
def finish_row_natural_log(acc, m_i, l_i):
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    return out, tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))


@triton.jit
def backward_step_wrong_ds(q, k, v, do, lse2, delta, allowed, qk_scale):
    s = tl.dot(q, tl.trans(k)) * qk_scale
    p = tl.where(allowed, tl.math.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v))
    return p, p * dp - delta[:, None]


@triton.jit
def backward_step_without_mask(q, k, v, do, lse2, delta, allowed, qk_scale):
    s = tl.dot(q, tl.trans(k)) * qk_scale
    p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v))
    return p, p * (dp - delta[:, None])


@triton.jit
def query_tile_start_one_late(k_tile, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    return (k_tile * BLOCK_N) // BLOCK_M + 1


@triton.jit
def load_tile_one_dimensional(ptr, rows, cols, stride_row, n_rows):
    return tl.load(ptr + rows * stride_row, mask=rows < n_rows, other=0.0)   # a row of numbers, not a tile


@triton.jit
def load_tile_stub(ptr, rows, cols, stride_row, n_rows):
    raise NotImplementedError  # your code here


@triton.jit
def softmax_step_stub(acc, m_i, l_i, q, k, v, allowed, qk_scale):
    raise NotImplementedError


def test_03b_wrong_load_tile(capsys):
    fails(capsys, ex.check_load_tile, load_tile_without_mask, contains="mask=rows[:, None] < n_rows")
    fails(capsys, ex.check_load_tile, load_tile_ignoring_stride, contains="stride_row")
    fails(capsys, ex.check_forward, load_tile_without_mask, ex03b.key_tile_range, ex03b.softmax_step,
          ex03b.finish_row)


@pytest.mark.skipif(not _runtime.INTERPRET, reason="the memory guard is the interpreter's")
def test_03b_out_of_bounds_load_fails_instead_of_crashing(capsys):
    fails(capsys, ex.check_load_tile, load_tile_far_out, contains="outside every tensor")


def test_03b_wrong_key_tile_range(capsys):
    fails(capsys, ex.check_key_tile_range, key_tile_range_misses_diagonal, contains="needs")
    fails(capsys, ex.check_key_tile_range, key_tile_range_every_tile, contains="needs only")
    fails(capsys, ex.check_forward, ex03b.load_tile, key_tile_range_misses_diagonal, ex03b.softmax_step,
          ex03b.finish_row, contains="skipped")
    # Visiting every tile gives the right output: only the tile record catches it.
    fails(capsys, ex.check_forward, ex03b.load_tile, key_tile_range_every_tile, ex03b.softmax_step,
          ex03b.finish_row, contains="no allowed pair")
    fails(capsys, ex.check_forward, ex03b.load_tile, key_tile_range_past_the_end, ex03b.softmax_step,
          ex03b.finish_row, contains="past the end")


def test_03b_wrong_softmax_step(capsys):
    fails(capsys, ex.check_softmax_step, softmax_step_without_empty_rule, contains="m_shift")
    fails(capsys, ex.check_softmax_step, softmax_step_without_rescale)
    fails(capsys, ex.check_softmax_step, softmax_step_natural_exp, contains="exp2")
    fails(capsys, ex.check_forward, ex03b.load_tile, ex03b.key_tile_range, softmax_step_without_rescale,
          ex03b.finish_row, contains="output")


def test_03b_wrong_finish_row(capsys):
    fails(capsys, ex.check_finish_row, finish_row_without_empty_rule)
    fails(capsys, ex.check_finish_row, finish_row_natural_log, contains="lse2")


def test_03b_wrong_backward(capsys):
    fails(capsys, ex.check_backward_step, backward_step_wrong_ds, contains="ds")
    fails(capsys, ex.check_backward_step, backward_step_without_mask, contains="p (")
    fails(capsys, ex.check_query_tile_start, query_tile_start_one_late)
    fails(capsys, ex.check_backward, ex03b.load_tile, ex03b.key_tile_range, backward_step_wrong_ds)
    fails(capsys, ex.check_backward, ex03b.load_tile, ex03b.key_tile_range, ex03b.backward_step,
          query_tile_start_one_late, contains="dK/dV loop skipped")


# ======================================================================================
# Stubs, errors and misuse
# ======================================================================================


def test_stubs_are_not_attempted(capsys):
    for check in (ex.check_sliding_window_mask, ex.check_stable_softmax, ex.check_merge, ex.check_tiled_macs,
                  ex.check_scores_computed, ex.check_window_attention, ex.check_peak_memory):
        not_attempted(capsys, check, _stub)
    for check in (ex.check_float16_exp_overflow, ex.check_hash_setting, ex.check_empty_row,
                  ex.check_tile_products):
        not_attempted(capsys, check, None)
    not_attempted(capsys, ex.check_load_tile, load_tile_stub)
    not_attempted(capsys, ex.check_softmax_step, softmax_step_stub)
    not_attempted(capsys, ex.check_forward, load_tile_stub, ex03b.key_tile_range, softmax_step_stub,
                  ex03b.finish_row)


def test_errors_in_answers_fail_without_raising(capsys):
    def broken(*args, **kwargs):
        raise ValueError("oops")

    out = fails(capsys, ex.check_sliding_window_mask, broken, contains="ValueError")
    fails(capsys, ex.check_merge, lambda *a: "not a pair")
    fails(capsys, ex.check_stable_softmax, lambda x: [1, 2])

    def plain_python(ptr, rows, cols, stride_row, n_rows):
        return None

    fails(capsys, ex.check_load_tile, plain_python, contains="@triton.jit")
    fails(capsys, ex.check_load_tile, load_tile_one_dimensional)


def test_misuse_raises():
    with pytest.raises(TypeError):
        ex.check_sliding_window_mask(42)
    with pytest.raises(TypeError):
        ex.check_hash_setting(dict(seq_len=128, tiles=16))
    with pytest.raises(TypeError):
        ex.check_hash_setting([128, 16])
    with pytest.raises(TypeError):
        ex.check_empty_row("inf")
    with pytest.raises(TypeError):
        ex.check_float16_exp_overflow("11")
    with pytest.raises(TypeError):
        ex.check_forward(ex03b.load_tile, 1, ex03b.softmax_step, ex03b.finish_row)


# ======================================================================================
# The 03b assembly, end to end
# ======================================================================================


def test_build_attention_matches_the_reference(seed):
    attention = ex.build_attention(ex03b.load_tile, ex03b.key_tile_range, ex03b.softmax_step, ex03b.finish_row,
                                   ex03b.backward_step)
    dev = ex.device()
    q, k, v = (torch.randn(2, 2, 80, 32, device=dev, requires_grad=True) for _ in range(3))
    rec = TileRecord()
    out = attention(q, k, v, block_m=32, block_n=16, tile_record=rec)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    truth = sparseflash.reference.attention(*leaves, causal=True)
    truth.backward(do.double())
    tol = 1e-4 if dev.type == "cpu" else 3e-2
    assert (out.double() - truth).abs().max() < tol
    for g, leaf in zip(grads, leaves):
        assert (g.double() - leaf.grad).abs().max() < tol
    assert set(rec.maps) == {"fwd", "bwd_kv", "bwd_q"}
    expected = sparseflash.tiles.flash_schedule(80, 80, True, 32, 16, batch=2, heads=2).computed
    for counts in rec.maps.values():
        assert torch.equal(counts > 0, expected) and counts.max() == 1


def test_build_attention_with_a_broken_piece_raises_readably():
    attention = ex.build_attention(ex03b.load_tile, ex03b.key_tile_range, ex03b.softmax_step, ex03b.finish_row,
                                   ex03b.backward_step)
    q = torch.randn(1, 1, 32, 16, device=ex.device())
    assert attention(q, q, q).shape == q.shape
    broken = ex.build_attention(load_tile_one_dimensional, ex03b.key_tile_range, ex03b.softmax_step,
                                ex03b.finish_row, ex03b.backward_step)
    with pytest.raises(RuntimeError, match="your forward kernel"):
        broken(q, q, q)


def test_peak_memory_counts_a_score_matrix():
    q = torch.randn(1, 1, 256, 64)
    score = 256 * 256 * 4
    assert score <= ex.peak_memory(lambda: q @ q.transpose(-1, -2)) <= score + 2 * q.numel() * 4   # + a copy of kᵀ


def test_pictures(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ex.plot_key_tile_range(ex03b.key_tile_range)
    ex.plot_key_tile_range(load_tile_stub)              # not written yet: still draws the schedule
    rec = TileRecord()
    q = torch.randn(1, 1, 64, 16, device=ex.device(), requires_grad=True)
    attention = ex.build_attention(ex03b.load_tile, ex03b.key_tile_range, ex03b.softmax_step, ex03b.finish_row,
                                   ex03b.backward_step)
    attention(q, q, q, tile_record=rec).sum().backward()
    fig = ex.plot_tile_record(rec, 64)
    assert len(fig.axes) == 3
    plt.close("all")


# ======================================================================================
# Notebook 08: wrong answers
# ======================================================================================


def test_08_wrong_answers(capsys):
    def top1_only(k_logits):                                       # forgets the second expert
        B, H, N, _ = k_logits.shape
        i = torch.arange(N).expand(B, H, N)
        return i, i.clone(), k_logits.argmax(-1)

    fails(capsys, ex.check_top2_key_slots, top1_only, contains="miss")

    def experts_first(k_logits):                                   # slots grouped by copy: positions restart
        B, H, N, _ = k_logits.shape
        i = torch.arange(N).repeat(2).expand(B, H, 2 * N)
        return i, i.clone(), k_logits.topk(2, dim=-1).indices.transpose(-1, -2).flatten(-2)

    fails(capsys, ex.check_top2_key_slots, experts_first, contains="ascend")

    def same_bucket_twice(k_logits):                               # the best expert twice: key counted twice
        k_index, k_pos, k_buckets = ex08.top2_key_slots(k_logits)
        k_buckets = k_buckets.clone()
        k_buckets[..., 1::2] = k_buckets[..., 0::2]
        return k_index, k_pos, k_buckets

    fails(capsys, ex.check_top2_key_slots, same_bucket_twice, contains="more than once")

    def positions_of_slots(k_logits):                              # slot numbers instead of token positions
        k_index, _, k_buckets = ex08.top2_key_slots(k_logits)
        return k_index, torch.arange(k_index.shape[-1]).expand_as(k_index), k_buckets

    fails(capsys, ex.check_top2_key_slots, positions_of_slots, contains="k_pos")
    not_attempted(capsys, ex.check_top2_key_slots, _stub)
    with pytest.raises(TypeError):
        ex.check_top2_key_slots(None)


def test_every_name_comes_from_its_notebook_module():
    """The package re-exports each notebook module's public names, and only those."""
    import importlib
    import pkgutil

    exported = set()
    for info in pkgutil.iter_modules(ex.__path__):
        if info.name.startswith("nb"):
            module = importlib.import_module(f"{ex.__name__}.{info.name}")
            for name in module.__all__:
                assert getattr(ex, name) is getattr(module, name), name
            exported |= set(module.__all__)
    assert exported | {"device"} == set(ex.__all__)


def test_the_library_does_not_import_the_checkers():
    """Imports go downwards: the checkers use the library, never the other way round."""
    import ast

    root = Path(sparseflash.__file__).parent
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.parts[0] == "exercises" or rel == Path("train", "exercises.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any("exercises" in n.split(".") for n in names), f"{rel} imports the checkers"
