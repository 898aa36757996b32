"""Registered PyTorch ops: how a pair of Triton kernels becomes an op that
``torch.compile`` traces, CUDA graphs capture and autograd differentiates.

Every attention in sparseflash is a *forward kernel* ``(q, k, v, ...) -> (o, lse2)``
and a *backward kernel* ``(do, q, k, v, o, lse2, ...) -> (dq, dk, dv)`` that recomputes
the tiles from the saved log-sum-exp.  :func:`attention_op` registers such a pair as
two ops, ``sparseflash::<name>_forward`` and ``sparseflash::<name>_backward`` (:func:`define_op`), with

* a *fake* implementation (output shapes and dtypes only), so that Dynamo and AOT
  autograd trace through the op without running it, and without a graph break;
* ``register_autograd``: the backward op is the forward op's derivative.

The ops are opaque to Inductor (it calls our launch functions; it neither re-compiles
nor fuses our kernels), and their arguments are tensors, ints, floats and bools only,
so a compiled graph depends on shapes, never on values: new data, same shapes, no
recompilation.  Nothing here reads a value back to the host.

Eager calls skip the dispatcher and run the same two functions through a plain
``torch.autograd.Function`` (the forward alone when no gradient is needed): outside a
trace the op machinery only costs time.

The kernel modules (:mod:`sparseflash.flash`, :mod:`sparseflash.permuted`) define their
ops with this file; it imports no kernel itself (see ``NOTES.md``, "Issue 11", for why
the ops live beside their kernels rather than in one file above them).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from ._steps import run_attention

#: Order of a kernel configuration (see :func:`sparseflash._steps.kernel_config`) as an
#: op argument: ops take ``int[]``, not dicts.
CFG_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "bwd_num_warps", "bwd_num_stages", "bwd_BLOCK",
            "bwd_STEP", "hopper")


def cfg_args(cfg: dict) -> list[int]:
    """A kernel configuration as the ``int[] cfg`` argument of an op."""
    return [int(cfg[key]) for key in CFG_KEYS]


def cfg_dict(args: Sequence[int]) -> dict:
    """Inverse of :func:`cfg_args`."""
    return dict(zip(CFG_KEYS, (int(a) for a in args)))


#: The ``sparseflash`` op namespace.
LIB = torch.library.Library("sparseflash", "FRAGMENT")


def define_op(name: str, schema: str, impl: Callable) -> torch._ops.OpOverload:
    """Define ``sparseflash::name`` with ``schema`` and ``impl`` as its CPU and CUDA kernel.

    Plain ``Library.define`` / ``impl`` rather than ``torch.library.custom_op``: the
    latter wraps every call in checks (outputs may not alias inputs) that cost about
    0.6 ms per call on the H100 host we measured, more than a sparse call's whole GPU
    time at N=4096 (NOTES.md, issue 11).  Our kernels never return an input or a view
    of one, so the check buys nothing here; ``opcheck`` in the tests verifies it.
    """
    LIB.define(name + schema)
    for key in ("CPU", "CUDA"):
        LIB.impl(name, impl, key)
    return getattr(torch.ops.sparseflash, name).default


def attention_op(
    name: str,
    extra_schema: str,
    forward: Callable[..., tuple[Tensor, Tensor]],
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]],
    lse_shape: Callable[..., tuple[int, ...]],
) -> Callable[..., Tensor]:
    """Register ``sparseflash::{name}_forward`` / ``_backward`` and return ``apply``.

    Args:
        name: op name stem.
        extra_schema: the arguments after ``q, k, v`` in PyTorch's schema language,
            e.g. ``"bool causal, float sm_scale, int[] cfg"``.
        forward: ``forward(q, k, v, *extra) -> (o, lse2)``, ``o`` like ``q`` and
            ``lse2`` float32 of shape ``lse_shape(q, k, v, *extra)``.
        backward: ``backward(q, k, v, o, lse2, do, *extra) -> (dq, dk, dv)``, each
            contiguous and shaped like its input.
        lse_shape: the shape of ``lse2`` (for the fake forward).

    Returns:
        ``apply(q, k, v, *extra) -> o``, differentiable in ``q, k, v``: the ops while
        ``torch.compile`` traces, the same two functions directly when eager.
    """
    forward_op = define_op(f"{name}_forward", f"(Tensor q, Tensor k, Tensor v, {extra_schema}) -> (Tensor, Tensor)",
                           forward)
    backward_op = define_op(
        f"{name}_backward",
        f"(Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse2, Tensor do, {extra_schema}) -> (Tensor, Tensor, Tensor)",
        backward)

    @torch.library.register_fake(f"sparseflash::{name}_forward", lib=LIB)
    def _(q, k, v, *extra):
        return q.new_empty(q.shape), q.new_empty(lse_shape(q, k, v, *extra), dtype=torch.float32)

    @torch.library.register_fake(f"sparseflash::{name}_backward", lib=LIB)
    def _(q, k, v, o, lse2, do, *extra):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def setup_context(ctx, inputs, output):
        q, k, v, *extra = inputs
        o, lse2 = output
        # Tensors go through save_for_backward (so that compiled graphs keep them);
        # the other arguments ride on ctx.
        tensor_at = [i for i, x in enumerate(extra) if isinstance(x, Tensor)]
        ctx.save_for_backward(q, k, v, o, lse2, *(extra[i] for i in tensor_at))
        ctx.tensor_at, ctx.extra = tensor_at, [None if isinstance(x, Tensor) else x for x in extra]

    def derivative(ctx, do, _dlse2):
        q, k, v, o, lse2, *saved = ctx.saved_tensors
        extra = list(ctx.extra)
        for i, t in zip(ctx.tensor_at, saved):
            extra[i] = t
        dq, dk, dv = backward_op(q, k, v, o, lse2, do.contiguous(), *extra)
        return (dq, dk, dv, *([None] * len(extra)))

    torch.library.register_autograd(f"sparseflash::{name}_forward", derivative, setup_context=setup_context, lib=LIB)

    def apply(q: Tensor, k: Tensor, v: Tensor, *extra) -> Tensor:
        if torch.compiler.is_compiling():
            return forward_op(q, k, v, *extra)[0]
        # Eager: the same launch code through a plain autograd.Function, which skips the
        # op dispatcher's Python layers (about 35 µs per fwd+bwd on our hosts; NOTES.md),
        # or with no gradient to compute, the forward alone.
        return run_attention(q, k, v, lambda q, k, v: forward(q, k, v, *extra),
                             lambda q, k, v, o, lse2, do: backward(q, k, v, o, lse2, do, *extra))

    apply.forward_op, apply.backward_op = forward_op, backward_op
    return apply
