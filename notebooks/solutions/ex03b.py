"""Solutions to notebook 03b (write the kernel): the five @triton.jit pieces.

``exercises.check_forward(load_tile, key_tile_range, softmax_step, finish_row)`` and
``exercises.check_backward(load_tile, key_tile_range, backward_step)`` assemble them.
"""
import sparseflash  # noqa: F401  (first: turns on Triton's interpreter when there is no GPU)
import triton
import triton.language as tl

__all__ = ["load_tile", "key_tile_range", "softmax_step", "finish_row", "backward_step", "query_tile_start"]


@triton.jit
def load_tile(ptr, rows, cols, stride_row, n_rows):
    offsets = rows[:, None] * stride_row + cols[None, :]
    return tl.load(ptr + offsets, mask=rows[:, None] < n_rows, other=0.0)


@triton.jit
def key_tile_range(q_tile, n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    last_query = tl.minimum((q_tile + 1) * BLOCK_M, n) - 1
    return last_query // BLOCK_N + 1


@triton.jit
def softmax_step(acc, m_i, l_i, q, k, v, allowed, qk_scale):
    s = tl.dot(q, tl.trans(k)) * qk_scale
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)     # empty so far: shift by 0, not -inf
    p = tl.math.exp2(s - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p, v)
    return acc, m_new, l_i


@triton.jit
def finish_row(acc, m_i, l_i):
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    return out, lse2


@triton.jit
def backward_step(q, k, v, do, lse2, delta, allowed, qk_scale):
    s = tl.dot(q, tl.trans(k)) * qk_scale
    p = tl.where(allowed, tl.math.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    return p, ds


@triton.jit
def query_tile_start(k_tile, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    return (k_tile * BLOCK_N) // BLOCK_M
