"""One decode step's work around the attention of a layer, in one launch.

At each generated token a layer rotates its new query and key (rotary embedding), writes the key
and value into its cache and, with hash attention, buckets the new query and key heads by LSH and
appends the key's row to its bucket's row list (:class:`~sparseflash.nn.KVCache`).  In PyTorch
that is a few dozen small launches per layer (the rotary table and rotation, normalise, rotate,
argmax, row copies, a gather and two scatters), more GPU time than the layer's attention itself at
batch 1.  Here it is one: program ``(b, j)`` does sequence ``b``, kv head ``j`` and its query heads.

With ``p`` the position (a Python int, or the cache's device position), ``θ`` the rotary
frequencies, ``R_j`` the kv head's ``(D, n_buckets / 2)`` rotation and ``x̂ = x / max(‖x‖, 1e-12)``::

    rot(x)[:h]         = x[:h] cos(pθ) - x[h:2h] sin(pθ),   rot(x)[h:2h] = x[:h] sin(pθ) + x[h:2h] cos(pθ)
    bucket(x)          = argmax([x̂ R_j, -x̂ R_j])          (first index of the maximum)
    k_cache[b, j, p]   = rot(k),   v_cache[b, j, p] = v,   q_out[b, h] = rot(q[b, h])
    u                  = bucket(k[b, j]),   buckets[b, j, p] = u
    rows[b, j, u, c]   = p,   count[b, j, u] = c + 1,   c = count[b, j, u]
    q_buckets[b, h]    = bucket(q[b, h])                  for the query heads h of kv head j

(``h = D // 2``; an odd last channel is not rotated), as :func:`sparseflash.rotary.rotary` and
:func:`sparseflash.hashing.lsh_buckets` of the normalised vectors compute them: buckets from the
vectors before rotary, each head with its kv head's rotation.  The rotation is computed in float32,
where the compiler may fuse a product into a sum (PyTorch's separate kernels round each: the last
bit may differ).  (Not ``enable_fp_fusion=False``: compiled for sm_90 that also takes the fused
multiply-adds out of ``cos`` and ``sin``, whose argument reduction at large angles relies on
them.)  A program owns its kv head's
bucket lists and counts, so no two programs write the same entry.  A position outside the cache
writes nothing to it (the caller grows the storage before: its Python length says when).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _runtime
from .launch import launch
from .hashing import lsh_argmax


@triton.jit
def _lsh_id(x, rot, HALF: tl.constexpr, BLOCK_R: tl.constexpr):
    """Bucket of the ``(BLOCK_D,)`` float32 vector ``x`` under ``rot`` ``(BLOCK_D, BLOCK_R)``:
    argmax of ``[x̂ R, -x̂ R]``, the first index on a tie (as ``torch.argmax``)."""
    x = x / tl.maximum(tl.sqrt(tl.sum(x * x, 0)), 1e-12)
    y = tl.sum(x[:, None] * rot, 0)
    return lsh_argmax(y, tl.arange(0, BLOCK_R), HALF, 0)


@triton.jit
def _rotate(X, x, cols, col_ok, cos, sin, HALF_D: tl.constexpr, ROTARY: tl.constexpr):
    """``x``, the float32 row at ``X`` (``cols``), rotated by the angles whose ``cos``, ``sin``
    are given per column (each half reads its partner half; columns past ``2·HALF_D`` pass)."""
    if ROTARY:
        first = cols < HALF_D
        paired = cols < 2 * HALF_D
        partner = tl.load(X + tl.where(first, cols + HALF_D, cols - HALF_D), mask=col_ok & paired,
                          other=0.0).to(tl.float32)
        x = tl.where(first, x * cos - partner * sin, tl.where(paired, partner * sin + x * cos, x))
    return x


@triton.jit
def _append_step_kernel(
    Q, K, V, KC, VC, QO, POS, FREQ, R, BUCKETS, ROWS, COUNT, QB,
    sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, skc_b, skc_h, skc_n, svc_b, svc_h, svc_n, sqo_b, sqo_h,
    Hkv, S, pos_value,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr, HALF: tl.constexpr,
    BLOCK_R: tl.constexpr, HASH: tl.constexpr, POS_TENSOR: tl.constexpr, ROTARY: tl.constexpr,
):
    """Program ``b·Hkv + j``: the step of sequence ``b``, kv head ``j`` (see the module docstring)."""
    pid = tl.program_id(0)
    b = (pid // Hkv).to(tl.int64)
    j = (pid % Hkv).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < HEAD_DIM
    if POS_TENSOR:
        p = tl.load(POS).to(tl.int64)
    else:
        p = tl.full([], pos_value, tl.int64)
    inside = (p >= 0) & (p < S)
    p_cols = p + tl.zeros([BLOCK_D], tl.int64)  # (a row mask built on vectors, not a scalar broadcast)
    row_ok = col_ok & (p_cols >= 0) & (p_cols < S)
    cos = tl.zeros([BLOCK_D], tl.float32)
    sin = tl.zeros([BLOCK_D], tl.float32)
    if ROTARY:  # the angles p·θ_i, column i reading θ of its index within its half
        fi = tl.where(cols < HEAD_DIM // 2, cols, cols - HEAD_DIM // 2)
        angle = p.to(tl.float32) * tl.load(FREQ + fi, mask=col_ok & (cols < 2 * (HEAD_DIM // 2)), other=0.0)
        cos = tl.cos(angle)
        sin = tl.sin(angle)
    kraw = tl.load(K + b * sk_b + j * sk_h + cols, mask=col_ok, other=0.0).to(tl.float32)
    k = _rotate(K + b * sk_b + j * sk_h, kraw, cols, col_ok, cos, sin, HEAD_DIM // 2, ROTARY)
    v = tl.load(V + b * sv_b + j * sv_h + cols, mask=col_ok, other=0.0)
    tl.store(KC + b * skc_b + j * skc_h + p * skc_n + cols, k.to(KC.dtype.element_ty), mask=row_ok)
    tl.store(VC + b * svc_b + j * svc_h + p * svc_n + cols, v.to(VC.dtype.element_ty), mask=row_ok)
    if HASH:
        r = tl.arange(0, BLOCK_R)
        rot = tl.load(R + j * HEAD_DIM * HALF + cols[:, None] * HALF + r[None, :],
                      mask=col_ok[:, None] & (r < HALF)[None, :], other=0.0).to(tl.float32)
        u = _lsh_id(kraw, rot, HALF, BLOCK_R).to(tl.int64)  # (the key before rotary)
        head = b * Hkv + j  # (buckets, rows and counts are contiguous: made by the cache)
        tl.store(BUCKETS + head * S + p, u.to(tl.int32), mask=inside)
        count = tl.load(COUNT + head * 2 * HALF + u)
        room = inside & (count >= 0) & (count < S)  # (a list never holds more than S rows: never past its end)
        tl.store(ROWS + (head * 2 * HALF + u) * S + count, p.to(tl.int32), mask=room)
        tl.store(COUNT + head * 2 * HALF + u, count + 1, mask=room)
    if ROTARY or HASH:
        for g in range(GROUP):  # the query heads of kv head j: rotated, bucketed (before rotary)
            h = j * GROUP + g
            qraw = tl.load(Q + b * sq_b + h * sq_h + cols, mask=col_ok, other=0.0).to(tl.float32)
            if ROTARY:
                qo = _rotate(Q + b * sq_b + h * sq_h, qraw, cols, col_ok, cos, sin, HEAD_DIM // 2, ROTARY)
                tl.store(QO + b * sqo_b + h * sqo_h + cols, qo.to(QO.dtype.element_ty), mask=col_ok)
            if HASH:
                tl.store(QB + b * Hkv * GROUP + h, _lsh_id(qraw, rot, HALF, BLOCK_R).to(tl.int32))


def _rows(name: str, t: Tensor, B: int, heads: int, D: int) -> Tensor:
    """``t`` ``(B, heads, 1, D)`` with a contiguous last dim (a copy only if it is not)."""
    if not isinstance(t, Tensor) or tuple(t.shape) != (B, heads, 1, D):
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be ({B}, {heads}, 1, {D}) (batch, heads, one token, head_dim), got {got}")
    return t if t.stride(-1) == 1 else t.contiguous()


def append_step(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, position: int | Tensor, *,
                rotary_freq: Tensor | None = None, rotations: Tensor | None = None, buckets: Tensor | None = None,
                bucket_rows: Tensor | None = None, bucket_count: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """One token's step around a layer's attention, in one launch: with ``rotary_freq`` the
    rotary embedding of ``q`` and ``k`` at ``position``; ``k`` (rotated) and ``v`` written at row
    ``position`` of the caches; with ``rotations`` the LSH buckets of ``q`` and ``k`` (before
    rotary) and the key's row appended to its bucket's list.

    Args:
        q: ``(B, H, 1, D)`` the token's query heads, ``H`` a multiple of ``Hkv`` (query head ``h``
            goes with kv head ``h // (H / Hkv)``).
        k, v: ``(B, Hkv, 1, D)`` its key and value.
        k_cache, v_cache: ``(B, Hkv, S, D)``, written in place at row ``position``.
        position: the row and the rotary position, an int or a one-element integer tensor on the
            device (read there); a row outside ``[0, S)`` writes nothing to the caches.
        rotary_freq: ``(D // 2,)`` float32, :func:`sparseflash.rotary.rotary_freq`; None: no
            rotary embedding.
        rotations: ``(Hkv, D, n_buckets / 2)``, one LSH rotation per kv head; None: no buckets.
        buckets: ``(B, Hkv, S)`` int32, each row's bucket; ``bucket_rows`` ``(B, Hkv, n_buckets,
            S)`` int32, each bucket's rows in order, the first ``bucket_count`` ``(B, Hkv,
            n_buckets)`` int32 of them valid; all contiguous, updated in place (with ``rotations``).

    Returns:
        ``(q_out, q_buckets)``: ``q_out`` ``(B, H, 1, D)`` the rotated query (``q`` itself without
        ``rotary_freq``) and ``q_buckets`` ``(B, H)`` int32 (None without ``rotations``).
    """
    B, Hkv, S, D = k_cache.shape
    if v_cache.shape != k_cache.shape or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError(f"k_cache and v_cache must share a shape (B, Hkv, S, D) with contiguous rows, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    H = q.shape[1] if isinstance(q, Tensor) and q.dim() == 4 else -1
    if H < Hkv or H % Hkv:
        raise ValueError(f"q must be (B, H, 1, D) with H a multiple of {Hkv}, got "
                         f"{tuple(q.shape) if isinstance(q, Tensor) else q!r}")
    q, k, v = _rows("q", q, B, H, D), _rows("k", k, B, Hkv, D), _rows("v", v, B, Hkv, D)
    pos_tensor = isinstance(position, Tensor)
    if pos_tensor and (position.numel() != 1 or position.device != k.device or position.is_floating_point()):
        raise ValueError(f"position must be an int or a one-element integer tensor on {k.device}, "
                         f"got {tuple(position.shape)} {position.dtype} on {position.device}")
    rotary = rotary_freq is not None
    if rotary and (tuple(rotary_freq.shape) != (D // 2,) or rotary_freq.dtype != torch.float32):
        raise ValueError(f"rotary_freq must be float32 ({D // 2},), got {tuple(rotary_freq.shape)} {rotary_freq.dtype}")
    hashing = rotations is not None
    if hashing:
        if buckets is None or bucket_rows is None or bucket_count is None:
            raise ValueError("with rotations, give buckets, bucket_rows and bucket_count")
        nb = bucket_count.shape[-1]
        if tuple(rotations.shape) != (Hkv, D, nb // 2):
            raise ValueError(f"rotations must be (Hkv, D, n_buckets / 2) = {(Hkv, D, nb // 2)}, got "
                             f"{tuple(rotations.shape)}")
        for name, t, shape in (("buckets", buckets, (B, Hkv, S)), ("bucket_rows", bucket_rows, (B, Hkv, nb, S)),
                               ("bucket_count", bucket_count, (B, Hkv, nb))):
            if tuple(t.shape) != shape or t.dtype != torch.int32 or not t.is_contiguous():
                raise ValueError(f"{name} must be a contiguous int32 {shape}, got {tuple(t.shape)} {t.dtype}")
        rotations = rotations.contiguous()
        q_buckets = torch.empty(B, H, dtype=torch.int32, device=k.device)
    else:
        q_buckets = None
    q_out = torch.empty_like(q) if rotary else q
    dummy = k  # (pointers the kernel does not read without HASH / POS_TENSOR / ROTARY)
    launch(_append_step_kernel, (B * Hkv,),
        q, k, v, k_cache, v_cache, q_out, position if pos_tensor else dummy, rotary_freq if rotary else dummy,
        rotations if hashing else dummy, buckets if hashing else dummy, bucket_rows if hashing else dummy,
        bucket_count if hashing else dummy, q_buckets if hashing else dummy,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), q_out.stride(0), q_out.stride(1),
        Hkv, S, 0 if pos_tensor else int(position),
        HEAD_DIM=D, BLOCK_D=max(16, _runtime.next_power_of_2(D)), GROUP=H // Hkv,
        HALF=(bucket_count.shape[-1] // 2) if hashing else 1,
        BLOCK_R=max(16, _runtime.next_power_of_2(bucket_count.shape[-1] // 2)) if hashing else 16,
        HASH=hashing, POS_TENSOR=pos_tensor, ROTARY=rotary,
        num_warps=4 if hashing and D * (bucket_count.shape[-1] // 2) > 1024 else 1,  # (the rotation tile)
    )
    return q_out, q_buckets
