"""Dense FlashAttention (sparseflash.flash) against the float64 reference.

On a machine without CUDA the kernels run through Triton's interpreter, which is
slow: the CPU cases keep B, H <= 2 and N <= 300 and pick a covering set of
(seq_len, head_dim, dtype, causal, tile shape) rather than their product.
``conftest.py`` turns on output poisoning, so any element a kernel fails to write
is NaN, and every test here asserts there is none.

Tolerances (relative Frobenius error against float64 attention on the same,
already rounded, inputs), measured on the CPU interpreter over several seeds:

- float32: ~3e-7 (exact float32 dots), so 1e-5 here (1e-3 on GPU, per the spec);
- float16: ~2e-4 .. 5e-4, so 2e-3;
- bfloat16: ~4e-3 .. 8.4e-3 (largest at N=7, D=16, where few terms average out),
  so 2e-2: 1e-2 would leave a margin of only 1.2x.  The interpreter rounds
  float32 -> bfloat16 by truncation, not to nearest, hence the bias; on an H100
  bf16 measured ~2e-3 .. 2.5e-3 at N = 1024..4097, and GPU_TOL holds it to 1e-2
  (float16 ~3e-4 there, float32 with "ieee" dots ~1e-6).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparseflash import reference as ref
from sparseflash.flash import flash_attention
from sparseflash.tiles import TileRecord

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
TOL = {f32: 1e-5, f16: 2e-3, bf16: 2e-2}
GPU_TOL = {f32: 1e-3, f16: 2e-3, bf16: 1e-2}


def _ko(bm, bn):
    return dict(BLOCK_M=bm, BLOCK_N=bn)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """``‖got − want‖ / ‖want‖`` in float64 (``‖got − want‖`` itself if ``want`` is 0)."""
    diff = (got.double() - want.double()).norm().item()
    norm = want.double().norm().item()
    return diff / norm if norm > 0 else diff


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert not torch.isnan(got).any(), f"{name}: {int(torch.isnan(got).sum())} NaN (unwritten?) elements"
    assert torch.isfinite(got).all(), f"{name}: non-finite elements"
    err = rel_err(got, want)
    if want.double().norm().item() == 0:
        # Reference exactly 0 (e.g. dq, dk with a single key): an absolute bound,
        # tol per element in RMS, on inputs of unit scale.
        bound = tol * math.sqrt(got.numel())
        assert err <= bound, f"{name}: ‖got‖ = {err:.3e} but the reference is 0 (bound {bound:.1e})"
    else:
        assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def make_inputs(B, H, N, D, dtype, M=None, device="cpu", q_scale=1.0, k_scale=1.0):
    M = N if M is None else M
    q = (torch.randn(B, H, N, D, device=device) * q_scale).to(dtype)
    k = (torch.randn(B, H, M, D, device=device) * k_scale).to(dtype)
    v = torch.randn(B, H, M, D, device=device).to(dtype)
    return q, k, v


def run_and_compare(q, k, v, causal, tol, sm_scale=None, kernel_options=None, do=None, grad_tol=None):
    """Forward + backward of flash_attention and of the float64 reference; compare all four.

    ``q, k, v`` may be arbitrary (non-contiguous) views; they are made leaves here
    without copying.  Returns the errors, for printing.
    """
    grad_tol = tol if grad_tol is None else grad_tol
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = flash_attention(q, k, v, causal=causal, sm_scale=sm_scale, kernel_options=kernel_options)
    assert out.dtype == q.dtype and out.shape == q.shape
    if do is None:
        do = torch.randn_like(out)
    out.backward(do)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = ref.attention(q64, k64, v64, sm_scale=sm_scale, causal=causal)
    want.backward(do.double())

    errs = {}
    for name, got, w, t in (
        ("out", out, want, tol),
        ("dq", q.grad, q64.grad, grad_tol),
        ("dk", k.grad, k64.grad, grad_tol),
        ("dv", v.grad, v64.grad, grad_tol),
    ):
        errs[name] = rel_err(got, w)
        print(f"{name}: rel err {errs[name]:.2e}")
        assert got.dtype == q.dtype
        assert_close(name, got, w, t)
    return errs


# ---------------------------------------------------------------------------
# Values and gradients: a covering set of shapes, dtypes, masks and tiles
# ---------------------------------------------------------------------------

# (B, H, N_q, N_k, D, dtype, causal, kernel_options)
CASES = [
    # seq_len 1 (a single key: dq = dk = 0 exactly in the reference)
    (1, 1, 1, 1, 16, f32, True, None),
    (1, 2, 1, 1, 64, bf16, False, None),
    # seq_len 7: less than one tile
    (2, 1, 7, 7, 16, f32, True, None),
    (1, 2, 7, 7, 32, f16, False, None),
    (1, 1, 7, 7, 80, bf16, True, _ko(16, 16)),
    # exactly whole tiles
    (1, 1, 64, 64, 64, f32, True, _ko(16, 16)),
    # seq_len 100
    (2, 2, 100, 100, 64, f32, True, None),
    (1, 2, 100, 100, 64, f32, False, _ko(16, 32)),
    (1, 1, 100, 100, 128, f16, True, None),
    (1, 1, 100, 100, 96, bf16, False, _ko(32, 16)),
    # seq_len 257: one key past a tile boundary
    (1, 1, 257, 257, 32, f32, True, _ko(16, 32)),
    (1, 1, 257, 257, 64, bf16, True, None),
    (1, 1, 257, 257, 80, f32, False, None),
    (1, 1, 257, 257, 96, f16, True, _ko(16, 16)),  # (B = 2: N = 7, 100, 257 x 100, the tile records)
    # seq_len 300
    (1, 1, 300, 300, 128, f32, True, _ko(32, 16)),
    (1, 1, 300, 300, 16, f16, False, None),
    (1, 1, 300, 300, 64, bf16, False, None),
    (1, 1, 300, 300, 80, f16, True, _ko(32, 16)),
    # q and k of different lengths; causal is top-left aligned (as SDPA's is_causal)
    (1, 2, 100, 37, 64, f32, False, None),
    (1, 1, 130, 257, 80, bf16, False, None),
    (1, 1, 37, 100, 32, f32, True, _ko(32, 16)),  # late keys unseen: dk = dv = 0 there
    (1, 1, 37, 100, 32, f16, True, _ko(16, 32)),
    (1, 1, 100, 37, 64, f16, True, _ko(32, 16)),  # late queries see every key
    (2, 1, 257, 100, 128, f32, True, None),
    (1, 1, 1, 50, 16, f32, True, None),  # one query: sees key 0 only
    (1, 1, 50, 1, 16, f32, True, None),
    (1, 1, 1, 50, 32, bf16, False, None),
]


def _case_id(c):
    B, H, N, M, D, dt, causal, ko = c
    s = f"B{B}H{H}-N{N}" + (f"xM{M}" if M != N else "") + f"-D{D}-{str(dt)[6:]}-{'causal' if causal else 'full'}"
    if ko:
        s += f"-bm{ko['BLOCK_M']}bn{ko['BLOCK_N']}"
    return s


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_reference(seed, case):
    B, H, N, M, D, dtype, causal, ko = case
    q, k, v = make_inputs(B, H, N, D, dtype, M=M)
    run_and_compare(q, k, v, causal, TOL[dtype], kernel_options=ko)


@pytest.mark.parametrize(
    "dtype,causal,ko", [(f32, True, _ko(16, 32)), (bf16, False, None), (f16, True, _ko(32, 16))]
)
def test_packed_noncontiguous(seed, dtype, causal, ko):
    """q, k, v sliced out of one packed (B, N, 3, H, D) tensor, as (B, H, N, D) views;
    the output gradient is a non-contiguous view too."""
    B, N, H, D = 2, 70, 2, 32
    qkv = torch.randn(B, N, 3, H, D).to(dtype)
    q, k, v = (qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3))
    assert not q.is_contiguous() and q.stride(-1) == 1
    do = torch.randn(B, N, H, D).to(dtype).permute(0, 2, 1, 3)
    run_and_compare(q, k, v, causal, TOL[dtype], kernel_options=ko, do=do)


def test_last_dim_strided(seed):
    """Inputs whose last dimension is not contiguous (stride(-1) != 1)."""
    B, H, N, D = 1, 2, 45, 48
    q, k, v = (torch.randn(B, H, D, N).transpose(-1, -2) for _ in range(3))
    assert q.stride(-1) != 1
    run_and_compare(q, k, v, True, TOL[f32], kernel_options=_ko(16, 16))


def test_sum_backward_broadcast_grad(seed):
    """``out.sum().backward()`` hands the kernel an expanded (stride 0) gradient."""
    q, k, v = make_inputs(1, 1, 40, 32, f32)
    do = torch.ones(1, 1, 1, 1).expand(1, 1, 40, 32)
    run_and_compare(q, k, v, True, TOL[f32], kernel_options=_ko(16, 16), do=do)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2")  # masked-out p, interpreter only
@pytest.mark.parametrize(
    "dtype,causal,q_scale,k_scale,tol",
    [
        (f32, True, 100.0, 1.0, 1e-4),  # logits ~ N(0, 100²): exp overflows float32 without max-subtraction
        (f32, False, 10.0, 10.0, 1e-4),
        (f16, True, 30.0, 3.0, 1e-2),  # measured ~2e-3 on the gradients
        (bf16, False, 30.0, 1.0, None),
    ],
)
def test_large_logits(seed, dtype, causal, q_scale, k_scale, tol):
    """Very peaked softmax stays finite and matches.  Gradients are ill-conditioned
    here (ds = p (dp - delta) cancels), so their tolerance grows with the logits;
    in bfloat16 dq and dk reach ~5e-2 (delta comes from the bf16-rounded output, as
    in FlashAttention-2), so there only out and dv are held to the usual bound."""
    q, k, v = make_inputs(1, 2, 90, 64, dtype, q_scale=q_scale, k_scale=k_scale)
    if tol is None:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out = flash_attention(q, k, v, causal=causal)
        do = torch.randn_like(out)
        out.backward(do)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        want = ref.attention(q64, k64, v64, causal=causal)
        want.backward(do.double())
        assert_close("out", out, want, TOL[dtype])
        assert_close("dv", v.grad, v64.grad, TOL[dtype])
        assert_close("dq", q.grad, q64.grad, 0.2)
        assert_close("dk", k.grad, k64.grad, 0.2)
    else:
        run_and_compare(q, k, v, causal, TOL[dtype], grad_tol=tol)


@pytest.mark.parametrize("dtype,causal,sm_scale", [(f32, True, 0.3), (f16, False, 0.02), (bf16, True, 1.0), (f32, True, -0.4), (f32, False, 0.0)])
def test_custom_sm_scale(seed, dtype, causal, sm_scale):
    q, k, v = make_inputs(1, 2, 60, 32, dtype)
    run_and_compare(q, k, v, causal, TOL[dtype], sm_scale=sm_scale, kernel_options=_ko(16, 32))


def test_default_causal_is_true(seed):
    q, k, v = make_inputs(1, 1, 20, 16, f32)
    out = flash_attention(q, k, v)
    torch.testing.assert_close(out.double(), ref.attention(q, k, v, causal=True), rtol=1e-5, atol=1e-6)


def test_matches_sdpa_cpu(seed):
    q, k, v = make_inputs(1, 2, 50, 64, f32)
    out = flash_attention(q, k, v, causal=True, kernel_options=_ko(16, 16))
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert rel_err(out, want) <= TOL[f32]


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def _t(*shape, dtype=f32, device="cpu"):
    return torch.randn(*shape, device=device).to(dtype) if device != "meta" else torch.empty(
        *shape, dtype=dtype, device="meta"
    )


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (_t(8, 16, 16), _t(1, 1, 8, 16), _t(1, 1, 8, 16)), r"q must have shape \(batch, heads, seq_len, head_dim\)"),
        (lambda: (_t(1, 1, 8, 16), _t(1, 1, 1, 8, 16), _t(1, 1, 8, 16)), r"k must have shape"),
        (lambda: (_t(1, 1, 8, 16), _t(2, 1, 8, 16), _t(2, 1, 8, 16)), r"batch and heads must match"),
        (lambda: (_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 1, 8, 16)), r"batch and heads must match"),
        (lambda: (_t(1, 1, 8, 16), _t(1, 1, 8, 32), _t(1, 1, 8, 32)), r"share head_dim 16"),
        (lambda: (_t(1, 1, 8, 16), _t(1, 1, 8, 16), _t(1, 1, 8, 32)), r"share head_dim 16"),
        (lambda: (_t(1, 1, 8, 16), _t(1, 1, 8, 16), _t(1, 1, 9, 16)), r"k and v must have the same seq_len, got 8 and 9"),
        (lambda: (_t(1, 1, 0, 16), _t(1, 1, 8, 16), _t(1, 1, 8, 16)), r"seq_len must be at least 1"),
        (lambda: tuple(_t(1, 1, 8, 16, dtype=torch.float64) for _ in range(3)), r"float16, bfloat16 or float32, got torch.float64"),
        (lambda: tuple(torch.ones(1, 1, 8, 16, dtype=torch.int32) for _ in range(3)), r"float16, bfloat16 or float32, got torch.int32"),
        (lambda: (_t(1, 1, 8, 16), _t(1, 1, 8, 16, dtype=f16), _t(1, 1, 8, 16)), r"share a dtype"),
        (lambda: tuple(_t(1, 1, 8, 8) for _ in range(3)), r"head_dim must be between 16 and 128, got 8"),
        (lambda: tuple(_t(1, 1, 8, 256) for _ in range(3)), r"head_dim must be between 16 and 128, got 256"),
        (lambda: (_t(1, 1, 8, 16), _t(1, 1, 8, 16, device="meta"), _t(1, 1, 8, 16)), r"one device"),
        (lambda: tuple(_t(1, 1, 8, 16, device="meta") for _ in range(3)), r"expected CUDA tensors"),
        (lambda: ([[0.0] * 16], _t(1, 1, 8, 16), _t(1, 1, 8, 16)), r"q must be a torch.Tensor"),
        (lambda: tuple(_t(1, 0, 8, 16) for _ in range(3)), r"q needs at least one head"),
    ],
    ids=[
        "q-rank3", "k-rank5", "batch", "heads", "head_dim-k", "head_dim-v", "kv-length", "empty-seq",
        "float64", "int32", "mixed-dtype", "head_dim-8", "head_dim-256", "devices", "meta", "not-a-tensor",
        "no-heads",
    ],
)
def test_bad_input_raises(make, match):
    q, k, v = make()
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v)


@pytest.mark.parametrize(
    "ko,match",
    [
        (dict(BLOCK_K=16), r"unknown kernel_options \['BLOCK_K'\]"),
        (dict(BLOCK_M=24), r"BLOCK_M must be a power of two >= 16, got 24"),
        (dict(BLOCK_N=8), r"BLOCK_N must be a power of two >= 16, got 8"),
        (dict(BLOCK_M=0), r"BLOCK_M must be a power of two"),
        (dict(bwd_BLOCK=32), r"set both bwd_BLOCK and bwd_STEP"),
        (dict(bwd_BLOCK=32, bwd_STEP=12), r"bwd_STEP must be a power of two >= 16 \(or 0\), got 12"),
        (dict(BLOCK_M=32.0), r"kernel_options values must be ints, got \{'BLOCK_M': 32.0\}"),
        (dict(num_warps=0), r"num_warps must be at least 1, got 0"),
    ],
)
def test_bad_kernel_options(ko, match):
    q, k, v = (_t(1, 1, 8, 16) for _ in range(3))
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, kernel_options=ko)


@pytest.mark.parametrize("sm_scale", [float("nan"), float("inf")])
def test_bad_sm_scale(sm_scale):
    q, k, v = (_t(1, 1, 8, 16) for _ in range(3))
    with pytest.raises(ValueError, match=r"sm_scale must be a finite number"):
        flash_attention(q, k, v, sm_scale=sm_scale)


@pytest.mark.parametrize("sm_scale", ["0.5", True])
def test_sm_scale_must_be_a_number(sm_scale):
    q, k, v = (_t(1, 1, 8, 16) for _ in range(3))
    with pytest.raises(ValueError, match=r"sm_scale must be a number"):
        flash_attention(q, k, v, sm_scale=sm_scale)


# The backward may tile differently from the forward (bwd_BLOCK keys per dK/dV program and
# queries per dQ program, bwd_STEP at a time): awkward lengths, rectangular, GQA, ragged D.
@pytest.mark.parametrize(
    "n_q,n_k,D,h_kv,dtype,causal,ko",
    [
        (100, 100, 16, 2, f32, True, dict(BLOCK_M=32, BLOCK_N=32, bwd_BLOCK=64, bwd_STEP=16)),
        (257, 257, 24, 1, bf16, True, dict(BLOCK_M=16, BLOCK_N=32, bwd_BLOCK=32, bwd_STEP=16)),
        (7, 7, 32, 2, f32, True, dict(bwd_BLOCK=16, bwd_STEP=16)),
        (100, 37, 16, 2, f32, True, dict(bwd_BLOCK=64, bwd_STEP=32)),
        (37, 100, 16, 1, f16, False, dict(bwd_BLOCK=16, bwd_STEP=32)),
    ],
)
def test_backward_own_tiles(seed, n_q, n_k, D, h_kv, dtype, causal, ko):
    q = torch.randn(1, 2, n_q, D, dtype=dtype)
    k, v = (torch.randn(1, h_kv, n_k, D, dtype=dtype) for _ in range(2))
    run_and_compare(q, k, v, causal, TOL[dtype], kernel_options=ko)


def test_backward_in_two_launches(seed, monkeypatch):
    """The backward kernel's two parts as two launches (``parts=1``: dK/dV alone, then
    ``parts=2``: dQ alone with its tiles last first), as tools/dense_bwd_split_probe.py runs
    them, each part with its own tiles: the fused backward's gradients at an awkward length."""
    import importlib
    from pathlib import Path

    from sparseflash._steps import kernel_config
    from sparseflash.flash import flash_backward, flash_forward

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "tools"))
    probe = importlib.import_module("dense_bwd_split_probe")
    q, k, v, do = (torch.randn(1, 2, 100, 32) for _ in range(4))
    scale = 1 / math.sqrt(32)
    cfg = kernel_config(32, q.device, None, dense=True)
    o, lse2 = flash_forward(q, k, v, True, scale, cfg)
    want = flash_backward(q, k, v, o, lse2, do, True, scale, cfg)
    got = probe.split_backward(q, k, v, o, lse2, do, probe._parse("32x16x4x1"), probe._parse("16x32x4x1"))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_backward_parts_must_be_known():
    from sparseflash._steps import kernel_config
    from sparseflash.flash import flash_backward

    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="parts must be 1"):
        flash_backward(q, q, q, q, q[..., 0], q, True, 0.25, kernel_config(16, q.device, None, dense=True), parts=0)


# ---------------------------------------------------------------------------
# Which tiles each pass computes
# ---------------------------------------------------------------------------


def expected_tiles(B, H, n_q, n_k, bm, bn, causal):
    """1 where (query tile t, key tile kt) holds an allowed pair, else 0."""
    n_qt, n_kt = -(-n_q // bm), -(-n_k // bn)
    if not causal:
        return torch.ones(B, H, n_qt, n_kt, dtype=torch.int32)
    t = torch.arange(n_qt)[:, None]
    kt = torch.arange(n_kt)[None, :]
    last_row = torch.clamp((t + 1) * bm, max=n_q) - 1
    return (kt * bn <= last_row).to(torch.int32).expand(B, H, n_qt, n_kt)


@pytest.mark.parametrize(
    "N,bm,bn,causal,B",
    [
        (100, 16, 32, True, 2),
        (100, 32, 16, True, 2),
        (257, 16, 16, True, 1),  # 17 x 17 tiles: one batch (the others have two)
        (64, 32, 32, True, 2),
        (33, 32, 16, True, 2),
        (100, 16, 32, False, 2),
    ],
)
def test_tile_record(seed, N, bm, bn, causal, B):
    H = 1
    q, k, v = (t.requires_grad_() for t in make_inputs(B, H, N, 16, f32))
    rec = TileRecord()
    o = flash_attention(q, k, v, causal=causal, kernel_options=_ko(bm, bn), tile_record=rec)
    o.sum().backward()
    assert rec.kind == "flash"
    assert rec.config["BLOCK_M"] == bm and rec.config["BLOCK_N"] == bn
    want = expected_tiles(B, H, N, N, bm, bn, causal)
    assert set(rec.maps) == {"fwd", "bwd_kv", "bwd_q"}
    for name in ("fwd", "bwd_kv", "bwd_q"):
        got = rec.maps[name]
        assert got.dtype == torch.int32
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert torch.equal(got, want), f"{name}:\n{got[0, 0]}\nexpected\n{want[0, 0]}"
    assert torch.equal(rec.fwd, rec.maps["fwd"])  # attribute access
    for t in (o, q.grad, k.grad, v.grad):
        assert not torch.isnan(t).any()


@pytest.mark.parametrize("n_q,n_k,bm,bn", [(100, 37, 16, 32), (37, 100, 16, 32), (37, 100, 32, 16)])
def test_tile_record_rectangular(seed, n_q, n_k, bm, bn):
    """Causal with n_q != n_k: forward and dQ pass visit exactly the tiles holding
    an allowed pair; the dK/dV pass may visit more, but never fewer."""
    q, k, v = (t.requires_grad_() for t in make_inputs(1, 1, n_q, 16, f32, M=n_k))
    rec = TileRecord()
    flash_attention(q, k, v, causal=True, kernel_options=_ko(bm, bn), tile_record=rec).sum().backward()
    want = expected_tiles(1, 1, n_q, n_k, bm, bn, True)
    assert torch.equal(rec.maps["fwd"], want), f"fwd:\n{rec.maps['fwd'][0, 0]}\nexpected\n{want[0, 0]}"
    assert torch.equal(rec.maps["bwd_q"], want), f"bwd_q:\n{rec.maps['bwd_q'][0, 0]}\nexpected\n{want[0, 0]}"
    assert torch.equal(rec.maps["bwd_kv"], want), f"bwd_kv:\n{rec.maps['bwd_kv'][0, 0]}\nexpected\n{want[0, 0]}"


def test_tile_record_rectangular_bwd_kv_exact(seed):
    q, k, v = (t.requires_grad_() for t in make_inputs(1, 1, 37, 16, f32, M=100))
    rec = TileRecord()
    flash_attention(q, k, v, causal=True, kernel_options=_ko(32, 16), tile_record=rec).sum().backward()
    assert torch.equal(rec.maps["bwd_kv"], expected_tiles(1, 1, 37, 100, 32, 16, True))


def test_no_record_by_default(seed):
    q, k, v = make_inputs(1, 1, 20, 16, f32)
    rec = TileRecord()
    flash_attention(q, k, v, tile_record=rec)
    assert set(rec.maps) == {"fwd"}  # no backward was run


# ---------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ---------------------------------------------------------------------------


@pytest.fixture
def ieee_fp32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 dots then use "ieee"
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _gpu_compare(B, H, N, D, dtype, causal, tol, kernel_options=None, M=None):
    q, k, v = (t.requires_grad_() for t in make_inputs(B, H, N, D, dtype, M=M, device="cuda"))
    out = flash_attention(q, k, v, causal=causal, kernel_options=kernel_options)
    do = torch.randn_like(out)
    out.backward(do)
    got = (out, q.grad, k.grad, v.grad)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = ref.attention(q64, k64, v64, causal=causal)
    want.backward(do.double())
    want = (want.detach(), q64.grad, k64.grad, v64.grad)
    del q64, k64, v64

    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    sdpa = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
    sdpa.backward(do)
    sdpa = (sdpa.detach(), qs.grad, ks.grad, vs.grad)

    for name, g, w, s in zip(("out", "dq", "dk", "dv"), got, want, sdpa):
        e_ref, e_sdpa, e_sdpa_ref = rel_err(g, w), rel_err(g, s), rel_err(s, w)
        print(f"{name}: vs float64 {e_ref:.2e}, vs SDPA {e_sdpa:.2e} (SDPA vs float64 {e_sdpa_ref:.2e})")
        assert g.dtype == dtype
        assert_close(name, g, w, tol)
        if w.norm().item() == 0:
            continue  # e.g. dq with one key: both are rounding noise around 0, bounded above
        assert e_sdpa <= 2 * tol, f"{name}: relative difference from SDPA {e_sdpa:.2e} > {2 * tol:.1e}"


# A covering set rather than the product: every (dtype, head_dim, causal) pair and
# every length appears; each new combination costs a Triton compile (~10 s).
GPU_CASES = [
    (1024, 64, bf16, True), (1024, 128, f16, False), (1024, 128, f32, True), (1024, 64, f32, False),
    (4096, 128, bf16, True), (4096, 64, f16, True), (4096, 64, bf16, False), (4096, 128, f32, False),
    (4097, 64, bf16, True), (4097, 128, bf16, False), (4097, 128, f16, True), (4097, 64, f32, True),
    (4097, 64, f16, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "N,D,dtype,causal", GPU_CASES,
    ids=[f"N{n}-D{d}-{str(t)[6:]}-{'causal' if c else 'full'}" for n, d, t, c in GPU_CASES],
)
def test_gpu_matches_reference(seed, ieee_fp32, N, D, dtype, causal):
    _gpu_compare(1, 2, N, D, dtype, causal, GPU_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize(
    "N,M,D,dtype,causal,ko",
    [
        (1000, 1000, 80, bf16, True, None),
        (777, 2049, 96, f16, True, None),
        (2049, 777, 64, bf16, True, None),
        (1500, 3000, 64, f32, False, None),
        (1025, 1025, 64, bf16, True, _ko(64, 32)),
        (1025, 1025, 128, f16, True, _ko(32, 64)),
        (1, 1, 64, f32, True, None),
        (1000, 1000, 64, bf16, True, dict(BLOCK_M=128, BLOCK_N=64, bwd_BLOCK=128, bwd_STEP=32, bwd_num_stages=1)),
        (2049, 777, 128, f16, True, dict(BLOCK_M=128, BLOCK_N=128, bwd_BLOCK=64, bwd_STEP=64, num_warps=8)),
        (777, 2049, 96, bf16, True, dict(bwd_BLOCK=128, bwd_STEP=64, bwd_num_warps=8)),
    ],
)
def test_gpu_shapes(seed, ieee_fp32, N, M, D, dtype, causal, ko):
    _gpu_compare(2, 2, N, D, dtype, causal, GPU_TOL[dtype], kernel_options=ko, M=M)


@pytest.mark.gpu
def test_gpu_tf32(seed):
    """With allow_tf32, float32 dots use TF32 (10-bit mantissa): looser, but close."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        _gpu_compare(1, 2, 1024, 64, f32, True, 1e-2)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.gpu
def test_gpu_packed_noncontiguous(seed, ieee_fp32):
    B, N, H, D = 2, 1500, 4, 64
    qkv = torch.randn(B, N, 3, H, D, device="cuda").to(bf16)
    q, k, v = (qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3))
    run_and_compare(q, k, v, True, GPU_TOL[bf16])


@pytest.mark.gpu
def test_gpu_tile_record(seed):
    B, H, N = 1, 2, 1000
    q, k, v = (t.requires_grad_() for t in make_inputs(B, H, N, 64, bf16, device="cuda"))
    rec = TileRecord()
    flash_attention(q, k, v, causal=True, tile_record=rec).sum().backward()
    bm, bn = rec.config["BLOCK_M"], rec.config["BLOCK_N"]
    want = expected_tiles(B, H, N, N, bm, bn, True).cuda()
    for name in ("fwd", "bwd_kv", "bwd_q"):
        assert torch.equal(rec.maps[name], want), name


@pytest.mark.gpu
def test_gpu_cpu_tensors_rejected():
    """With a GPU present the interpreter is off, so CPU tensors are refused clearly."""
    from sparseflash import _runtime

    if _runtime.INTERPRET:
        pytest.skip("TRITON_INTERPRET is set")
    q, k, v = make_inputs(1, 1, 8, 16, f32)
    with pytest.raises(ValueError, match="interpreter is off"):
        flash_attention(q, k, v)


@pytest.mark.gpu
def test_gpu_refuses_backward_configs_that_computed_wrong_gradients():
    q, k, v = (torch.randn(1, 1, 64, 64, device="cuda", dtype=bf16) for _ in range(3))
    with pytest.raises(ValueError, match=r"bwd_STEP=32 \(< 64\) with bwd_num_stages=2"):
        flash_attention(q, k, v, kernel_options=dict(bwd_BLOCK=128, bwd_STEP=32, bwd_num_stages=2))


def test_input_check_fast_path_accepts_only_what_the_checks_accept():
    """``check_qkv``'s one-expression fast path never lets through what its step-by-step checks
    (each with its error) refuse: every combination of a few shapes, dtypes and flags."""
    import itertools

    from sparseflash import _runtime

    shapes = [(1, 2, 8, 16), (1, 1, 8, 16), (2, 2, 8, 16), (1, 2, 9, 16), (1, 2, 8, 32), (1, 0, 8, 16),
              (1, 4, 8, 16), (1, 3, 8, 16), (1, 2, 0, 16), (1, 2, 8, 8), (1, 2, 8)]
    dtypes = [torch.float32, f16, torch.float64]

    def outcome(check, *args):
        try:
            check(*args)
        except ValueError as e:
            return str(e)
        return None

    for (sq, sk, sv), dt, same in itertools.product(itertools.product(shapes, repeat=3), dtypes, (False, True)):
        q, k, v = torch.zeros(sq, dtype=dt), torch.zeros(sk, dtype=f16 if dt == f16 else torch.float32), torch.zeros(sv)
        fast = outcome(_runtime.check_qkv, q, k, v, same)
        slow = outcome(_runtime._check_qkv_each, q, k, v, same)
        assert fast == slow, (sq, sk, sv, dt, same)
