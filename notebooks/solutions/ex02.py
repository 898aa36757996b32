"""Solutions to the exercises of notebook 02 (online softmax and tiling).

Each function has the name its checker in ``sparseflash.exercises`` expects.
"""
import math

import torch

__all__ = ["merge", "online_softmax_stats_fp16", "tiled_macs", "needs_mask", "window_tiles",
           "hash_setting"]


# Exercise 1: both sums are rescaled to the common max.  Each half can be computed by a
# different GPU block (split-K, Flash-Decoding) and merged afterwards, in any order: merge is
# associative.  An empty half (-inf, 0) must not turn the result into nan.
def merge(m1, l1, m2, l2):
    m = torch.maximum(m1, m2)
    shift = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    return m, l1 * torch.exp(m1 - shift) + l2 * torch.exp(m2 - shift)


# Exercise 2: in float16, the running sum has 11 bits: once l is ~2048 times larger than the
# terms being added, they round away; chunk = 1 adds one term at a time and loses the most,
# a single chunk sums with torch's pairwise reduction and loses the least.  Keeping m and l
# in float32 fixes every chunk size.
def online_softmax_stats_fp16(x, chunk):
    m = torch.full(x.shape[:-1], float("-inf"))
    l = torch.zeros(x.shape[:-1])
    for start in range(0, x.shape[-1], chunk):
        xc = x[..., start:start + chunk].float()
        m_new = torch.maximum(m, xc.max(-1).values)
        l = l * torch.exp(m - m_new) + torch.exp(xc - m_new[..., None]).sum(-1)
        m = m_new
    return m, l


# Exercise 3: 0.59 of the naive work for 32×16 tiles at N = 200, 0.57 for 16×16: the
# diagonal tiles are computed whole, so finer tiles come closer to ½.
def tiled_macs(N, D, block_m, block_n):
    total = 0
    for qt in range(math.ceil(N / block_m)):
        rows = range(qt * block_m, min((qt + 1) * block_m, N))
        for kt in range(math.ceil(N / block_n)):
            cols = range(kt * block_n, min((kt + 1) * block_n, N))
            if cols[0] > rows[-1]:
                continue
            total += 2 * len(rows) * len(cols) * D     # q kᵀ and p v
    return total


# Exercise 4: every pair (i, j) of the tile is allowed iff the last key is at or before the first query.
def needs_mask(rows, cols):
    return bool(cols[-1] > rows[0])


# Exercise 5: a tile holds an allowed pair iff its first key is at or before its last query
# (causal) and its last key is after first_query - w (window).  Each query tile then visits
# about (w + block) / block_n key tiles, a constant: the cost grows like N·w, not N².
def window_tiles(N, w, block_m, block_n):
    qt = torch.arange(math.ceil(N / block_m))[:, None]
    kt = torch.arange(math.ceil(N / block_n))[None, :]
    first_q, last_q = qt * block_m, torch.clamp((qt + 1) * block_m, max=N) - 1
    first_k, last_k = kt * block_n, torch.clamp((kt + 1) * block_n, max=N) - 1
    return (first_k <= last_q) & (last_k > first_q - w)


# Exercise 6: 16 buckets of ~32 tokens, in 16×16 tiles: about 0.15-0.2 of the dense causal tiles.
# With 64×64 tiles each bucket is shorter than one tile, and a tile cannot skip less than itself:
# the fraction climbs back towards 1/2 and more.  Large tiles hurt when buckets are small.
hash_setting = dict(seq_len=512, block=16, n_buckets=16, seed=0)
