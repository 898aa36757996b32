"""The kernels' layout and tile plan (sparseflash.layout, sparseflash.plan), kernels against plain PyTorch.

``bucket_layouts`` (a counting sort in two launches) must build exactly what
``reference_layout`` (a stable sort) builds, and ``tile_plan`` exactly the runs that
``reference_tile_plan`` reads off the token mask by brute force.  The reference layout
itself is checked against its definition: every token once, buckets in tile-aligned
runs, original order inside a bucket.
"""
from __future__ import annotations

import pytest
import torch

from sparseflash.layout import (
    K_PAD,
    Q_PAD,
    bucket_layouts,
    layout_length,
    reference_layout,
)
from sparseflash.plan import reference_tile_plan, tile_plan


def _inputs(kind, B, H, N, n_buckets, n_k=None):
    n_k = N if n_k is None else n_k
    if kind == "keep":
        return dict(q_keep=torch.rand(B, H, N) < 0.5, k_keep=torch.rand(B, H, n_k) < 0.5)
    if kind == "buckets":
        return dict(q_buckets=torch.randint(0, n_buckets, (B, H, N)), k_buckets=torch.randint(0, n_buckets, (B, H, n_k)))
    if kind in ("out-of-range", "overflow"):  # ids outside [0, n_buckets): dropped, or in the overflow run
        qb, kb = torch.randint(-2, n_buckets + 2, (B, H, N)), torch.randint(-2, n_buckets + 2, (B, H, n_k))
        qb[..., ::7] += 2**32  # int64 ids whose low 32 bits are in range: out of range all the same
        return dict(q_buckets=qb, k_buckets=kb)
    if kind == "both":
        return dict(q_buckets=torch.randint(0, n_buckets, (B, H, N)), k_buckets=torch.randint(0, n_buckets, (B, H, n_k)),
                    q_keep=torch.rand(B, H, N) < 0.7, k_keep=torch.rand(B, H, n_k) < 0.7)
    raise AssertionError(kind)


def _side(args, side):
    return {name[2:]: t for name, t in args.items() if name.startswith(side + "_")}


CASES = [  # (kind, N, n_k, n_buckets, block_m, block_n)
    ("keep", 1, None, 1, 16, 16),
    ("keep", 7, None, 1, 16, 32),
    ("keep", 257, None, 1, 32, 16),
    ("keep", 3000, None, 1, 64, 64),          # several chunks of the counting sort
    ("buckets", 100, None, 3, 16, 16),
    ("buckets", 257, None, 16, 16, 32),
    ("out-of-range", 200, None, 5, 16, 16),
    # hash attention's overflow run (ids mostly in range): several chunks, prefix over chunks
    ("overflow", 2100, None, 16, 64, 32),
    ("overflow", 2500, None, 64, 32, 32),    # hash attention's default budget: four steps a chunk, five chunks
    ("buckets", 300, None, 100, 16, 16),      # above 64 buckets: one step a chunk
    ("overflow", 100, None, 300, 16, 16),     # more buckets than tokens: the sort fallback
    ("both", 150, None, 4, 32, 16),
    ("overflow", 90, 130, 4, 16, 16),         # different query and key lengths
]


@pytest.mark.parametrize("kind,N,n_k,n_buckets,bm,bn", CASES)
def test_kernel_layout_and_plan_match_pytorch(seed, kind, N, n_k, n_buckets, bm, bn):
    B, H = 2, 2
    args = _inputs(kind, B, H, N, n_buckets, n_k)
    ov = kind == "overflow"
    ql, kl = bucket_layouts((B, H, N), n_buckets=n_buckets, block_m=bm, block_n=bn, n_k=n_k, overflow=ov, **args)
    rq = reference_layout((B, H, N), n_buckets=n_buckets, block=bm, pad=Q_PAD, overflow=ov, **_side(args, "q"))
    rk = reference_layout((B, H, n_k or N), n_buckets=n_buckets, block=bn, pad=K_PAD, overflow=ov, **_side(args, "k"))
    for got, want in ((ql, rq), (kl, rk)):
        for name in ("index", "pos", "bucket", "start", "count"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert (got.n_buckets, got.overflow) == (want.n_buckets, want.overflow) == (n_buckets + ov, ov)
    plan, ref_plan = tile_plan(ql, kl), reference_tile_plan(rq, rk)
    for got, want in ((plan.q_runs, ref_plan.q_runs), (plan.k_runs, ref_plan.k_runs)):
        empty = got[..., 0] == got[..., 2]
        assert torch.equal(empty, want[..., 0] == want[..., 2])
        assert torch.equal(got[~empty], want[~empty])
    assert torch.equal(plan.visited(), ref_plan.visited())


@pytest.mark.parametrize("kind,N,n_buckets,block", [("keep", 100, 1, 16), ("buckets", 257, 7, 32),
                                                     ("out-of-range", 64, 3, 16), ("both", 33, 2, 16),
                                                     ("overflow", 64, 3, 16)])
def test_reference_layout_is_what_it_says(seed, kind, N, n_buckets, block):
    """Every token once, runs tile-aligned and in order; dropped tokens after them.  With
    ``overflow``, run ``n_buckets`` holds exactly the tokens whose id is outside
    ``[0, n_buckets)``, in position order, and nothing is dropped."""
    B, H = 2, 3
    ov = kind == "overflow"
    args = _side(_inputs(kind, B, H, N, n_buckets), "q")
    lay = reference_layout((B, H, N), n_buckets=n_buckets, block=block, pad=Q_PAD, overflow=ov, **args)
    assert lay.n_slots == layout_length(N, n_buckets, block) and lay.n_slots % block == 0  # overflow run: unpadded
    if kind == "buckets":  # ids all in range: the overflow run is empty, the layout the same
        same = reference_layout((B, H, N), n_buckets=n_buckets, block=block, pad=Q_PAD, overflow=True, **args)
        assert all(torch.equal(getattr(same, n), getattr(lay, n)) for n in ("index", "pos", "bucket"))
    ids = args.get("buckets", torch.zeros(B, H, N, dtype=torch.long))
    in_range = (ids >= 0) & (ids < n_buckets)
    bucket = torch.where(in_range, ids, n_buckets)  # the run each token belongs to (n_buckets: overflow)
    kept = (in_range | ov) & args.get("keep", torch.ones(B, H, N, dtype=torch.bool))
    for b in range(B):
        for h in range(H):
            idx, pos, sb = lay.index[b, h].long(), lay.pos[b, h], lay.bucket[b, h]
            tokens = idx[idx < N]
            assert torch.equal(tokens.sort().values, torch.arange(N))          # every token exactly once
            real = sb >= 0
            assert torch.equal(real.nonzero().flatten().numel() * torch.ones(1), kept[b, h].sum() * torch.ones(1))
            assert (pos[real] == idx[real].int()).all() and (pos[~real] == Q_PAD).all()
            for c in range(lay.n_buckets):
                slots = (sb == c).nonzero().flatten()
                want = (bucket[b, h] == c) & kept[b, h]
                assert int(lay.count[b, h, c]) == int(want.sum())
                if slots.numel():
                    assert int(slots[0]) == int(lay.start[b, h, c]) and int(slots[0]) % block == 0
                    assert torch.equal(slots, slots[0] + torch.arange(slots.numel()))  # one run
                    assert torch.equal(idx[slots], want.nonzero().flatten())           # in order
            dropped = (idx < N) & ~real
            assert torch.equal(idx[dropped], (~kept[b, h]).nonzero().flatten())      # after the runs, in order


def test_plan_has_no_empty_tiles(seed):
    """Every visited tile holds an allowed pair, and every such tile is visited: the
    aligned layout leaves no tile that straddles two buckets."""
    from sparseflash.tiles import EMPTY, hash_schedule

    qb, kb = torch.randint(0, 8, (1, 2, 500)), torch.randint(0, 8, (1, 2, 500))
    s = hash_schedule(qb, kb, 16, 16)
    assert not (s.state == EMPTY).any() and not s.wrongly_skipped.any()


def test_bad_layout_args():
    with pytest.raises(ValueError, match="n_buckets"):
        reference_layout((1, 1, 4), n_buckets=0, block=16, pad=Q_PAD)


def test_counting_sort_chunks(monkeypatch):
    """The GPU's chunking (pure host arithmetic, checked here with the interpreter's switch off): up
    to 16 buckets one step of the (SUB, NB) tile a program, as measured; 32 and 64 buckets ~512
    tokens in 2 and 4 steps, so the second pass reads 16 times fewer counts at 64; above 64 one
    step (more unrolled steps spill in the sm_90 compile); too many chunks × lanes: the sort."""
    from sparseflash import _runtime
    from sparseflash.layout import MAX_KERNEL_BUCKETS, _chunking

    monkeypatch.setattr(_runtime, "INTERPRET", False)
    assert _chunking(16384, 16) == (16, 512, 512, 32)
    assert _chunking(8192, 2) == (2, 1024, 1024, 8)
    assert _chunking(16384, 32) == (32, 256, 512, 32)
    assert _chunking(16384, 64) == (64, 128, 512, 32)
    assert _chunking(8192, 100) == (128, 64, 64, 128)
    assert _chunking(4096, 256) == (256, 32, 32, 128)
    assert _chunking(8192, 256) is None and _chunking(16, MAX_KERNEL_BUCKETS + 1) is None
    for n in (1, 7, 100, 257, 4096, 65537):
        for nb in (1, 3, 16, 33, 64, 65, 200):
            got = _chunking(n, nb)
            if got is None:
                continue
            NB, sub, chunk, n_chunks = got
            assert NB >= nb and sub * NB <= 8192 and chunk % sub == 0 and chunk // sub <= 4
            assert n_chunks * chunk >= n > (n_chunks - 1) * chunk or n_chunks == 1


def test_tile_plan_refuses_layouts_it_would_misread():
    """The plan kernel reads each layout buffer whole, by offsets: a strided view (one head of a
    larger layout) or a layout without its tables is refused, not misread."""
    from dataclasses import replace

    ql, kl = (reference_layout((1, 2, 40), buckets=torch.randint(0, 3, (1, 2, 40)), n_buckets=3, block=16, pad=pad)
              for pad in (Q_PAD, K_PAD))
    one = lambda lay: replace(lay, slots=lay.slots[:, :, :1], tables=lay.tables[:, :, :1])  # noqa: E731
    with pytest.raises(ValueError, match="contiguous"):
        tile_plan(one(ql), one(kl))
    with pytest.raises(ValueError, match="no tables"):
        tile_plan(replace(ql, tables=None), kl)
    with pytest.raises(ValueError, match="int32"):
        tile_plan(replace(ql, slots=ql.slots.long()), kl)
    contiguous = lambda lay: replace(lay, slots=lay.slots[:, :, :1].contiguous(),  # noqa: E731
                                     tables=lay.tables[:, :, :1].contiguous())
    got, want = tile_plan(contiguous(ql), contiguous(kl)), reference_tile_plan(one(ql), one(kl))
    assert torch.equal(got.visited(), want.visited())


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["qk", "hash", "permuted"])
def test_cuda_graph_capture_and_replay(kind):
    """A whole fwd+bwd of each sparse call has no host synchronisation, so it captures in a
    CUDA graph; replays with new inputs of the same shape match eager calls."""
    import sparseflash as sf

    B, H, N, D = 2, 4, 1000, 64
    dev = "cuda"

    def fresh():
        q, k, v, do = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16) for _ in range(4))
        if kind == "qk":
            extra = (torch.rand(B, H, N, device=dev) < 0.4, torch.rand(B, H, N, device=dev) < 0.4)
        elif kind == "hash":
            extra = (torch.randint(0, 8, (B, H, N), device=dev), torch.randint(0, 8, (B, H, N), device=dev))
        else:
            keep = torch.rand(B, H, N, device=dev) < 0.5
            pos = torch.where(keep, torch.arange(N, device=dev), -1)
            extra = (pos, pos.clone())
        return (q, k, v, do) + extra

    def call(q, k, v, a, b):
        if kind == "qk":
            return sf.qk_sparse_attention(q, k, v, a, b)
        if kind == "hash":
            return sf.hash_sparse_attention(q, k, v, a, b, n_buckets=8)
        return sf.permuted_attention(q, k, v, a, b)

    static = [t.clone() for t in fresh()]
    leaves = [t.requires_grad_() for t in static[:3]]

    def step():
        for t in leaves:
            t.grad = None
        out = call(*leaves, static[4], static[5])
        out.backward(static[3])
        return out

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    for t in leaves:
        t.grad = None
    with torch.cuda.graph(graph):
        out = call(*leaves, static[4], static[5])
        out.backward(static[3])
    for _ in range(2):
        new = fresh()
        with torch.no_grad():
            for dst, src in zip(static, new):
                dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        q, k, v = (t.clone().requires_grad_() for t in new[:3])
        want = call(q, k, v, new[4], new[5])
        want.backward(new[3])
        assert torch.equal(out, want)
        for got, ref_grad in zip(leaves, (q, k, v)):
            assert torch.equal(got.grad, ref_grad.grad)
