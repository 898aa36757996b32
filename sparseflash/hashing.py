"""Locality-sensitive hashing of vectors into buckets (angular LSH by random rotations).

For ``n_buckets = 2r`` draw a random Gaussian matrix ``R`` of shape ``(D, r)``, project
``y = x R`` and take ``bucket = argmax([y, -y])`` (Andoni et al. 2015's cross-polytope
LSH with a Gaussian matrix, as in Reformer and the paper's hash-sparse attention).
Two vectors at a small angle land in the same bucket with high probability, two
random vectors with probability a little above ``1/n_buckets``.  The columns of ``R``
are not normalised, so ``y_c`` is ``|R_c|`` times the cosine with direction ``R_c``:
buckets are not equally likely.  For isotropic inputs at 16 buckets (seeds 0, 1, 2)
the largest bucket held 1.8–2.8x as many vectors as the smallest at D=64 (1.4–2.1x
at D=128), and two random vectors collided with probability 0.063–0.068 rather than
0.0625.  A sparse call costs about what its largest buckets cost, so uneven buckets
cost speed.
Queries and keys must be hashed with the *same* rotations for similar ones to collide:
pass the same ``seed`` (or generator state) to both calls, or hash ``torch.cat`` of them.

On CUDA the ids come from one Triton kernel (:func:`lsh_ids`): each program reads a block of
rows once, in their own dtype, and writes their ids, where PyTorch's version writes a float32
copy, the projections and their negation before the argmax (in a compiled training step, about
0.8 ms of a GPT-2-small step at 8192 tokens on an H100).  It projects ``x / max|x|`` (the argmax
does not change with the length; it keeps the products in range) with exact float32 products (no
TF32), so ids agree with the CPU's except where two projections tie to rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _runtime
from .launch import launch
from .ops import LIB, define_op


def lsh_rotations(
    head_dim: int,
    n_buckets: int,
    *,
    heads: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Random projections ``(D, n_buckets // 2)``, or ``(heads, D, n_buckets // 2)`` per head.

    Reproducible: the same ``seed`` gives the same rotations on any device (drawn on
    the CPU, then moved).
    """
    n = _runtime.as_int(n_buckets)
    if n is None or n < 2 or n % 2:
        raise ValueError(f"n_buckets must be an even int >= 2, got {n_buckets!r}")
    n_buckets = n
    if generator is None:
        generator = torch.Generator()
        generator.manual_seed(0 if seed is None else seed)
    elif seed is not None:
        raise ValueError("give a seed or a generator, not both")
    shape = (head_dim, n_buckets // 2) if heads is None else (heads, head_dim, n_buckets // 2)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(
        device=device, dtype=dtype)


def lsh_buckets(
    x: Tensor,
    n_buckets: int,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    per_head: bool = False,
    rotations: Tensor | None = None,
) -> Tensor:
    """Bucket id of every vector of ``x`` by angular LSH.

    Args:
        x: ``(B, H, N, D)`` (queries or keys).
        n_buckets: even number of buckets, ``>= 2``.
        seed / generator: where the random rotations come from (default seed 0);
            the same seed gives the same buckets.
        per_head: draw independent rotations for each head.
        rotations: use these projections (from :func:`lsh_rotations`) instead.

    Returns:
        ``(B, H, N)`` int64 ids in ``[0, n_buckets)``.
    """
    if x.dim() != 4:
        raise ValueError(f"x must have shape (batch, heads, seq_len, head_dim), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    B, H, N, D = x.shape
    if rotations is None:
        rotations = lsh_rotations(D, n_buckets, heads=H if per_head else None, seed=seed,
                                  generator=generator, device=x.device)
    elif per_head:
        raise ValueError("give per_head or rotations, not both (per-head rotations are (heads, head_dim, "
                         "n_buckets // 2))")
    elif rotations.shape[-2:] != (D, n_buckets // 2) or rotations.dim() not in (2, 3):
        raise ValueError(f"rotations must be (head_dim, n_buckets // 2) = {(D, n_buckets // 2)} or "
                         f"(heads, head_dim, n_buckets // 2), got {tuple(rotations.shape)}")
    elif rotations.dim() == 3 and rotations.shape[0] != H:
        raise ValueError(f"per-head rotations must have x's {H} heads, got {tuple(rotations.shape)}")
    rot = rotations.to(device=x.device, dtype=torch.float32)
    if x.is_cuda and _kernel_fits(D, rot.shape[-1]):
        return lsh_ids(x, rot)
    if rot.dim() == 3:
        y = torch.einsum("bhnd,hdr->bhnr", x.float(), rot)
    else:
        y = x.float() @ rot
    return torch.cat([y, -y], dim=-1).argmax(dim=-1)


# --------------------------------------------------------------------------------------
# The fused kernel: rows in, ids out
# --------------------------------------------------------------------------------------


@triton.jit
def lsh_argmax(y, r, HALF: tl.constexpr, AXIS: tl.constexpr):
    """Bucket ids from projections ``y`` (padded past ``HALF`` columns; ``r`` their column
    index, broadcast like ``y``): ``argmax([y, -y])`` along ``AXIS``, the first index on a tie
    (as ``torch.argmax``).  The one rule of this kernel and the decode step's."""
    ok = r < HALF
    up = tl.where(ok, y, float("-inf"))
    down = tl.where(ok, -y, float("-inf"))
    first = tl.argmax(up, AXIS, tie_break_left=True)
    second = tl.argmax(down, AXIS, tie_break_left=True)
    return tl.where(tl.max(up, AXIS) >= tl.max(down, AXIS), first, HALF + second)


@triton.jit
def _lsh_kernel(X, R, OUT, sx_b, sx_h, sx_n, sr_h, H, n,
                HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK: tl.constexpr):
    """Program ``(row block, b·H + h)``: ids of ``BLOCK`` rows of head ``h``,
    ``argmax([x R_h, -x R_h])`` with the first index on a tie (as ``torch.argmax``)."""
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    r = tl.arange(0, BLOCK_R)
    # (The last dim is contiguous: rows load as whole vectors.)
    x = tl.load(X + b * sx_b + h * sx_h + rows[:, None] * sx_n + cols[None, :],
                mask=(rows[:, None] < n) & (cols[None, :] < HEAD_DIM), other=0.0).to(tl.float32)
    # Rows scaled to a largest entry of 1: the argmax is the same, and no product of a huge or
    # tiny row leaves float32's range (a row of zeros stays zeros: id 0, as torch.argmax).
    x = x / tl.maximum(tl.max(tl.abs(x), 1), 1e-30)[:, None]
    rot = tl.load(R + h * sr_h + cols[:, None] * HALF + r[None, :],
                  mask=(cols[:, None] < HEAD_DIM) & (r[None, :] < HALF), other=0.0)
    y = tl.dot(x, rot, input_precision="ieee")  # (BLOCK, BLOCK_R): exact float32 products
    tl.store(OUT + bh * n + rows, lsh_argmax(y, r[None, :], HALF, 1).to(tl.int64), mask=rows < n)


def _tiles(D: int, half: int) -> tuple[int, int, int]:
    """``(BLOCK_D, BLOCK_R, rows a program)``: rows shrink as the head dim and the projection grow,
    so that a program's float32 rows stay within 32 KB and its products within 4096 entries."""
    block_d = max(16, _runtime.next_power_of_2(D))
    block_r = max(16, _runtime.next_power_of_2(half))
    return block_d, block_r, max(16, min(128, 8192 // block_d, 4096 // block_r))


def _kernel_fits(D: int, half: int) -> bool:
    """Whether the kernel takes this shape: the rotation's float32 tile at most 64 KB (D=64: up to
    512 buckets; D=128: 256; D=256: 128)."""
    block_d, block_r, _ = _tiles(D, half)
    return D <= 256 and block_d * block_r <= 16384


def _lsh_ids(x: Tensor, rotations: Tensor) -> Tensor:
    B, H, N, D = x.shape
    half = rotations.shape[-1]
    x = x if x.stride(-1) == 1 else x.contiguous()
    rot = rotations.to(device=x.device, dtype=torch.float32).contiguous()
    out = torch.empty((B, H, N), dtype=torch.int64, device=x.device)
    block_d, block_r, block = _tiles(D, half)
    if _runtime.INTERPRET and N < block:  # (the interpreter: no programs of padding rows)
        block = 16
    launch(_lsh_kernel, (_runtime.cdiv(N, block), B * H),
        x, rot, out, x.stride(0), x.stride(1), x.stride(2), D * half if rot.dim() == 3 else 0, H, N,
        HEAD_DIM=D, HALF=half, BLOCK_D=block_d, BLOCK_R=block_r, BLOCK=block, num_warps=4,
    )
    return out


_lsh_op = define_op("lsh_ids", "(Tensor x, Tensor rotations) -> Tensor", _lsh_ids)


@torch.library.register_fake("sparseflash::lsh_ids", lib=LIB)
def _(x, rotations):
    return x.new_empty(x.shape[:3], dtype=torch.int64)


def lsh_ids(x: Tensor, rotations: Tensor) -> Tensor:
    """:func:`lsh_buckets` with given ``rotations`` in one Triton launch (a registered op, so
    ``torch.compile`` keeps it whole): what ``lsh_buckets`` runs on CUDA.

    Args:
        x: ``(B, H, N, D)`` floating point, any strides (copied if the last dim is not contiguous);
            ``D <= 256``.
        rotations: ``(D, r)`` or ``(H, D, r)`` (:func:`lsh_rotations`; used in float32), ``2r``
            buckets; ``2r`` at most 512 at ``D <= 64``, 256 at ``D <= 128``, 128 at ``D <= 256``
            (:func:`lsh_buckets` takes any count: larger ones run in PyTorch).
    Returns:
        ``(B, H, N)`` int64 ids in ``[0, 2r)``.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be floating point (batch, heads, seq_len, head_dim), got {x.dtype} "
                         f"{tuple(x.shape)}")
    D, H = x.shape[-1], x.shape[1]
    if rotations.dim() not in (2, 3) or rotations.shape[-2] != D or (rotations.dim() == 3 and rotations.shape[0] != H):
        raise ValueError(f"rotations must be ({D}, r) or ({H}, {D}, r), got {tuple(rotations.shape)}")
    if not _kernel_fits(D, rotations.shape[-1]):
        raise ValueError(f"the fused kernel takes head_dim <= 256 and at most 512 / 256 / 128 buckets at head_dim "
                         f"<= 64 / 128 / 256, got head_dim {D} and {2 * rotations.shape[-1]} buckets "
                         f"(lsh_buckets runs larger ones in PyTorch)")
    return _lsh_op(x, rotations)
