"""Angular LSH (sparseflash.hashing): ids, reproducibility, locality."""
from __future__ import annotations

import pytest
import torch

from sparseflash import lsh_buckets
from sparseflash.hashing import lsh_rotations


@pytest.mark.parametrize("n_buckets", [2, 4, 8, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_ids_shape_dtype_range(seed, n_buckets, dtype):
    B, H, N, D = 2, 3, 257, 32
    x = torch.randn(B, H, N, D).to(dtype)
    ids = lsh_buckets(x, n_buckets, seed=seed)
    assert ids.shape == (B, H, N)
    assert ids.dtype == torch.int64
    assert ids.min() >= 0 and ids.max() < n_buckets
    per_head = lsh_buckets(x, n_buckets, seed=seed, per_head=True)
    assert per_head.shape == (B, H, N) and per_head.dtype == torch.int64
    assert per_head.min() >= 0 and per_head.max() < n_buckets


def test_all_buckets_used(seed):
    """Random vectors spread over every bucket, roughly evenly."""
    x = torch.randn(1, 1, 8000, 64)
    ids = lsh_buckets(x, 8, seed=seed)
    counts = torch.bincount(ids.flatten(), minlength=8)
    assert (counts > 0).all()
    assert counts.max() < 3 * 8000 / 8, counts


def test_same_seed_same_ids(seed):
    x = torch.randn(2, 2, 100, 64)
    a = lsh_buckets(x, 16, seed=123)
    b = lsh_buckets(x.clone(), 16, seed=123)
    assert torch.equal(a, b)
    # the default seed (0) is fixed too
    assert torch.equal(lsh_buckets(x, 16), lsh_buckets(x, 16, seed=0))


def test_different_seeds_differ(seed):
    x = torch.randn(2, 2, 100, 64)
    a = lsh_buckets(x, 16, seed=1)
    b = lsh_buckets(x, 16, seed=2)
    assert not torch.equal(a, b)
    assert (a == b).float().mean() < 0.5


def test_does_not_touch_global_rng(seed):
    x = torch.randn(1, 2, 50, 32)
    state = torch.get_rng_state()
    lsh_buckets(x, 8, seed=5)
    lsh_buckets(x, 8)
    assert torch.equal(state, torch.get_rng_state())


def test_generator(seed):
    x = torch.randn(2, 2, 100, 64)
    g = torch.Generator().manual_seed(42)
    a = lsh_buckets(x, 8, generator=g)
    assert torch.equal(a, lsh_buckets(x, 8, seed=42))  # a generator seeded like seed= gives the same ids
    b = lsh_buckets(x, 8, generator=g)  # the generator has advanced: new rotations
    assert not torch.equal(a, b)
    g2 = torch.Generator().manual_seed(42)
    assert torch.equal(lsh_buckets(x, 8, generator=g2), a)
    assert torch.equal(lsh_buckets(x, 8, generator=g2), b)
    with pytest.raises(ValueError):
        lsh_buckets(x, 8, seed=1, generator=torch.Generator())


def test_queries_and_keys_share_rotations(seed):
    """Hashing q and k separately with one seed == hashing their concatenation."""
    q, k = torch.randn(1, 2, 60, 32), torch.randn(1, 2, 40, 32)
    both = lsh_buckets(torch.cat([q, k], dim=2), 8, seed=9)
    assert torch.equal(lsh_buckets(q, 8, seed=9), both[:, :, :60])
    assert torch.equal(lsh_buckets(k, 8, seed=9), both[:, :, 60:])


def test_per_head(seed):
    B, H, N, D = 2, 4, 200, 32
    x = torch.randn(1, 1, N, D).expand(B, H, N, D)  # the same vectors in every head
    shared = lsh_buckets(x, 8, seed=3)
    assert all(torch.equal(shared[b, h], shared[0, 0]) for b in range(B) for h in range(H))
    ids = lsh_buckets(x, 8, seed=3, per_head=True)
    for h in range(1, H):
        assert not torch.equal(ids[0, h], ids[0, 0]), f"head {h} hashed like head 0"
        assert (ids[0, h] == ids[0, 0]).float().mean() < 0.5
    # batches share each head's rotation
    assert torch.equal(ids[0], ids[1])
    assert torch.equal(ids, lsh_buckets(x, 8, seed=3, per_head=True))
    # per-head rotations are one draw of shape (H, D, n_buckets // 2)
    rot = lsh_rotations(D, 8, heads=H, seed=3)
    assert rot.shape == (H, D, 4)
    assert not torch.equal(rot[0], rot[1])
    assert torch.equal(lsh_buckets(x, 8, rotations=rot), ids)


def test_explicit_rotations(seed):
    x = torch.randn(1, 2, 100, 32)
    rot = lsh_rotations(32, 8, seed=11)
    assert rot.shape == (32, 4) and rot.dtype == torch.float32
    assert torch.equal(lsh_buckets(x, 8, rotations=rot), lsh_buckets(x, 8, seed=11))
    # the definition: argmax over [x R, -x R]
    y = x @ rot
    assert torch.equal(lsh_buckets(x, 8, rotations=rot), torch.cat([y, -y], -1).argmax(-1))
    with pytest.raises(ValueError):
        lsh_buckets(x, 8, rotations=lsh_rotations(16, 8))
    with pytest.raises(ValueError):
        lsh_buckets(x, 8, rotations=lsh_rotations(32, 16))


def test_rotations_reproducible():
    a = lsh_rotations(64, 16, seed=7)
    assert torch.equal(a, lsh_rotations(64, 16, seed=7))
    assert not torch.equal(a, lsh_rotations(64, 16, seed=8))
    assert lsh_rotations(64, 16, seed=7, dtype=torch.float64).dtype == torch.float64


def test_scale_invariant(seed):
    """Angular hashing: positive rescaling of a vector keeps its bucket."""
    x = torch.randn(1, 2, 300, 32)
    scale = torch.rand(1, 2, 300, 1) * 10 + 0.1
    assert torch.equal(lsh_buckets(x, 16, seed=1), lsh_buckets(x * scale, 16, seed=1))


def test_locality(seed):
    """Nearby vectors collide far more often than random pairs (n_buckets = 8)."""
    n_pairs, D, n_buckets = 2000, 64, 8
    x = torch.randn(1, 1, n_pairs, D)
    near = x + 0.05 * torch.randn_like(x) * x.abs()
    far = torch.randn(1, 1, n_pairs, D)
    p_near = (lsh_buckets(x, n_buckets, seed=seed) == lsh_buckets(near, n_buckets, seed=seed)).float().mean()
    p_far = (lsh_buckets(x, n_buckets, seed=seed) == lsh_buckets(far, n_buckets, seed=seed)).float().mean()
    assert p_near > 0.8, f"P(collide | perturbed) = {p_near:.3f}"
    assert p_far < 2 / n_buckets, f"P(collide | random) = {p_far:.3f}"


def test_locality_per_head(seed):
    n_pairs, D, n_buckets = 1000, 32, 8
    x = torch.randn(1, 2, n_pairs, D)
    near = x + 0.05 * torch.randn_like(x) * x.abs()
    a = lsh_buckets(x, n_buckets, seed=seed, per_head=True)
    b = lsh_buckets(near, n_buckets, seed=seed, per_head=True)
    assert ((a == b).float().mean(-1) > 0.8).all()


@pytest.mark.parametrize("n_buckets", [0, 1, 3, 7, -2, 4.0, "4", True])
def test_bad_n_buckets(n_buckets):
    x = torch.randn(1, 1, 10, 16)
    with pytest.raises(ValueError):
        lsh_buckets(x, n_buckets)
    with pytest.raises(ValueError):
        lsh_rotations(16, n_buckets)


@pytest.mark.parametrize("x", [torch.randn(10, 16), torch.randn(1, 10, 16), torch.randn(1, 1, 1, 10, 16),
                               torch.randint(0, 5, (1, 1, 10, 16))])
def test_bad_x(x):
    with pytest.raises(ValueError):
        lsh_buckets(x, 4)


def test_bad_rotations():
    x = torch.randn(1, 2, 10, 16)
    with pytest.raises(ValueError, match="x's 2 heads"):
        lsh_buckets(x, 4, rotations=lsh_rotations(16, 4, heads=3))
    with pytest.raises(ValueError, match="per_head or rotations"):
        lsh_buckets(x, 4, rotations=lsh_rotations(16, 4, heads=2), per_head=True)
    with pytest.raises(ValueError, match="rotations must be"):
        lsh_buckets(x, 4, rotations=torch.randn(1, 2, 16, 2))


# ---------------------------------------------------------------------------
# The fused kernel (lsh_ids: what lsh_buckets runs on CUDA), here under the interpreter
# ---------------------------------------------------------------------------


def _reference_ids(x, rot):
    """float64 ids and the gap between the two largest entries of ``[y, -y]`` (where the
    kernel's float32 products may round to the other side of a near tie)."""
    y = torch.einsum("bhnd,hdr->bhnr", x.double(), rot.double() if rot.dim() == 3 else rot.double()[None])
    both = torch.cat([y, -y], -1)
    top2 = both.topk(2, dim=-1).values
    return both.argmax(-1), (top2[..., 0] - top2[..., 1]) / y.abs().amax(-1).clamp_min(1e-30)


@pytest.mark.parametrize("N", [1, 7, 100, 257])
@pytest.mark.parametrize("D, n_buckets", [(16, 4), (64, 16), (80, 8), (128, 64), (32, 512)])
@pytest.mark.parametrize("dtype, per_head", [(torch.float32, False), (torch.bfloat16, True)])
def test_kernel_ids_match_reference(N, D, n_buckets, dtype, per_head):
    from sparseflash.hashing import lsh_ids

    torch.manual_seed(N * D + n_buckets)
    x = torch.randn(2, 3, N, D).to(dtype)
    rot = lsh_rotations(D, n_buckets, heads=3 if per_head else None, seed=1)
    got = lsh_ids(x, rot)
    want, gap = _reference_ids(x, rot)
    assert got.shape == (2, 3, N) and got.dtype == torch.int64
    assert ((got >= 0) & (got < n_buckets)).all()
    clear = gap > 1e-5
    assert clear.float().mean() > 0.99
    assert torch.equal(got[clear], want[clear])
    # The CPU's own path (a float32 matmul) agrees the same way.
    assert torch.equal(lsh_buckets(x, n_buckets, rotations=rot)[clear], want[clear])


@pytest.mark.parametrize("per_head", [False, True])
def test_kernel_ids_match_reference_float16(per_head):
    test_kernel_ids_match_reference(100, 64, 16, torch.float16, per_head)


def test_kernel_reads_any_strides_and_scales():
    from sparseflash.hashing import lsh_ids

    torch.manual_seed(0)
    base = torch.randn(2, 50, 3, 32)             # (B, N, H, D): a transposed view, as a model's q
    x = base.transpose(1, 2)
    rot = lsh_rotations(32, 16, seed=3)
    got = lsh_ids(x, rot)
    assert torch.equal(got, lsh_ids(x.contiguous(), rot))
    assert torch.equal(got, lsh_ids(1e-20 * x, rot)) and torch.equal(got, lsh_ids(1e20 * x, rot))
    zero = lsh_ids(torch.zeros(1, 1, 5, 32), rot)
    assert torch.equal(zero, torch.zeros_like(zero))  # as torch.argmax of all zeros: the first id


def test_kernel_bad_input():
    from sparseflash.hashing import lsh_ids

    with pytest.raises(ValueError, match="floating point"):
        lsh_ids(torch.zeros(1, 1, 4, 16, dtype=torch.long), lsh_rotations(16, 4))
    with pytest.raises(ValueError, match="rotations must be"):
        lsh_ids(torch.zeros(1, 2, 4, 16), lsh_rotations(8, 4))
    with pytest.raises(ValueError, match="rotations must be"):
        lsh_ids(torch.zeros(1, 2, 4, 16), lsh_rotations(16, 4, heads=3))
    with pytest.raises(ValueError, match="at most 512 / 256 / 128 buckets"):
        lsh_ids(torch.zeros(1, 1, 4, 128), lsh_rotations(128, 512))
    with pytest.raises(ValueError, match="head_dim <= 256"):
        lsh_ids(torch.zeros(1, 1, 4, 272), lsh_rotations(272, 4))


def test_kernel_takes_the_shapes_it_fits():
    from sparseflash.hashing import _kernel_fits, _tiles

    assert [_kernel_fits(64, r) for r in (1, 8, 256, 257)] == [True, True, True, False]
    assert [_kernel_fits(128, r) for r in (128, 129)] == [True, False]
    assert [_kernel_fits(256, r) for r in (64, 65)] == [True, False] and not _kernel_fits(257, 1)
    for D, r in ((16, 1), (64, 8), (64, 256), (128, 128), (256, 64)):
        block_d, block_r, rows = _tiles(D, r)
        assert rows * block_d <= 8192 and rows * block_r <= 4096 and rows >= 16


def test_kernel_op_traces_whole():
    from sparseflash.hashing import lsh_ids

    torch._dynamo.reset()
    graphs = []

    def recorder(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x, rot = torch.randn(1, 2, 40, 16), lsh_rotations(16, 8, heads=2)
    f = torch.compile(lambda x: lsh_ids(x, rot), backend=recorder, fullgraph=True)
    assert torch.equal(f(x), lsh_ids(x, rot))
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert any("lsh_ids" in t for t in targets), targets
    torch.library.opcheck(torch.ops.sparseflash.lsh_ids.default, (x, rot))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernel_matches_cpu(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 12, 4099, 64).to(dtype)
    rot = lsh_rotations(64, 16, heads=12, seed=0)
    got = lsh_buckets(x.cuda(), 16, rotations=rot.cuda()).cpu()
    want, gap = _reference_ids(x, rot)
    clear = gap > 1e-5
    assert clear.float().mean() > 0.99 and torch.equal(got[clear], want[clear])
    assert (got == want).float().mean() > 0.999
