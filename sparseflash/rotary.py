"""Rotary position embedding (GPT-NeoX style: the two halves of each head's vector rotate).

For a vector ``x`` at position ``p`` with halves ``x1, x2`` (``half = D // 2``), and
``θ_i = base^(-i / half)``:

    rotary(x)[..., :half]       = x1 cos(p θ) - x2 sin(p θ)
    rotary(x)[..., half:2half]  = x1 sin(p θ) + x2 cos(p θ)

(an odd last channel passes through).  The angles depend only on ``(p, i)``, so their
cosines and sines form an ``(N, half)`` table, which :func:`rotary_table` computes once per
call as a registered op.  Why an op: written as plain tensor code, ``torch.compile`` fuses
the table into the elementwise rotation and so recomputes ``pow``, ``cos`` and ``sin`` for
every batch and head element (B·H times the table, forward and again in backward). On an
H200 that cost about 10 ms of a 12-layer GPT-2-small step at 8192 tokens, more than
SDPA's attention forward.  An op's output is a buffer the compiler cannot inline, so the
rotation itself is a cheap memory-bound kernel.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .ops import LIB, define_op


def rotary_freq(half: int, base: float = 10000.0, device: torch.device | str | None = None) -> Tensor:
    """``(half,)`` float32: the frequencies ``θ_i = base^(-i / half)``, exactly as every table
    here computes them (the one-launch decode step reads them too)."""
    return base ** (-torch.arange(half, device=device, dtype=torch.float32) / half)


def _table(positions: Tensor, half: int, base: float) -> tuple[Tensor, Tensor]:
    # float32 as the embedding has always been computed (decode steps and full forwards agree).
    freq = rotary_freq(half, base, positions.device)
    angle = positions.to(torch.float32)[:, None] * freq
    return angle.cos(), angle.sin()


_table_op = define_op("rotary_table", "(Tensor positions, int half, float base) -> (Tensor, Tensor)", _table)


@torch.library.register_fake("sparseflash::rotary_table", lib=LIB)
def _(positions, half, base):
    shape = (positions.shape[0], half)
    return (positions.new_empty(shape, dtype=torch.float32), positions.new_empty(shape, dtype=torch.float32))


def rotary_table(n: int, half: int, *, base: float = 10000.0, offset: int | Tensor = 0,
                 device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """``(cos, sin)``, each ``(n, half)`` float32: the angles ``p θ_i`` of positions
    ``offset`` to ``offset + n - 1``.  ``offset`` may be a one-element integer tensor (read on
    the device, never on the host: a step captured in a CUDA graph replays at the position
    the tensor holds then)."""
    if isinstance(offset, Tensor):
        if offset.numel() != 1 or offset.is_floating_point() or offset.dtype == torch.bool:
            raise ValueError(f"offset must be an int or a one-element integer tensor, got {offset.dtype} "
                             f"of shape {tuple(offset.shape)}")
        positions = offset.reshape(1).long() + torch.arange(n, device=offset.device)
    else:
        positions = torch.arange(offset, offset + n, device=device)
    return _table_op(positions, half, float(base))


def rotary(x: Tensor, base: float = 10000.0, *, offset: int = 0) -> Tensor:
    """Rotary position embedding of ``x`` ``(B, H, N, D)`` (pairs of halves, as in GPT-NeoX).

    ``offset``: position of the first of the ``N`` vectors (``offset`` to ``offset + N - 1``);
    0 by default; an int or a one-element integer tensor on ``x``'s device.  There is no largest position.  Returns a tensor like ``x``, computed in
    float32.
    """
    if x.dim() < 2:
        raise ValueError(f"x must be (..., seq_len, head_dim), got shape {tuple(x.shape)}")
    N, D = x.shape[-2], x.shape[-1]
    half = D // 2
    cos, sin = rotary_table(N, half, base=base, offset=offset, device=x.device)
    x1, x2 = x[..., :half].float(), x[..., half:2 * half].float()
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, x[..., 2 * half:].float()], dim=-1)
    return out.to(x.dtype)
