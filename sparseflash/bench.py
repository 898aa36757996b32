"""Benchmark harness: dense and sparse causal attention, ours against PyTorch's kernels.

Run ``python -m sparseflash.bench --help`` for the flags.  Typical H100 run::

    python -m sparseflash.bench --head-dim 64 128 --out results/h100.json --resume --time-budget 420

What is timed (one row per variant × sequence length × head dim × mode):

* ``naive``: :func:`sparseflash.reference.attention` in the input dtype
  (``float64=False``), the full ``N × N`` scores with a materialised causal mask
  (only for ``N <= --naive-max-n``).
* ``sdpa_flash`` / ``sdpa_cudnn``: ``F.scaled_dot_product_attention(is_causal=True)``
  forced to the FlashAttention-2 / cuDNN backend with ``sdpa_kernel``.
* ``ours_dense``: :func:`sparseflash.flash_attention` (causal).
* ``flex_dense``: ``torch.compile(flex_attention)`` with a causal block mask, built
  once outside the timed region.
* ``ours_qk_<rate>``: :func:`sparseflash.qk_sparse_attention` with ``random_keep``
  masks of that keep rate, independent per (batch, head), for queries and for keys.
* ``ours_hash_<n>``: :func:`sparseflash.hash_sparse_attention` with ``n`` buckets:
  uniform random ids per token (``--bucket-source random``, the paper's balanced
  case) or :func:`sparseflash.lsh_buckets` of the random q and k (``lsh``).
* ``flex_kernel_<pattern>`` / ``flex_e2e_<pattern>``: FlexAttention on the *same*
  compacted (qk) or bucket-sorted (hash) layout as ours, with the mask_mod
  ``kpos[kv] <= qpos[q] & kpos >= 0 & qpos >= 0 [& kbucket[kv] == qbucket[q]]``.
  ``flex_kernel`` builds the layout and the block mask once, outside the timed
  region, and times gather + flex kernel + scatter.  ``flex_e2e`` times everything
  per step: layout (sort), ``create_block_mask`` (compiled), gather, kernel, scatter.

End to end: our sparse rows include everything a user pays (the public functions
compact or sort, gather, build their tile tables, run the kernel and scatter back).
Generating the masks / bucket ids themselves is excluded: the model provides them.

Modes: ``fwd`` (under ``torch.no_grad``), ``fwd+bwd`` (forward then
``out.backward(grad)`` with a fixed random ``grad``), ``bwd`` (only
``out.backward(grad, retain_graph=True)`` of one retained forward graph).

Timing: one untimed call (the correctness check) and then
``triton.testing.do_bench(fn, warmup, rep, grad_to_none=[q, k, v], return_mode="median")``
on CUDA.  On CPU (smoke tests only; our kernels then run in Triton's interpreter)
the median of ``time.perf_counter`` wall-clock times, marked ``timer: cpu-wallclock``.
Small problems are host-bound (the GPU idles between launches and ``ms`` measures
Python and launch overhead); ``--kernel-time`` also records ``kernel_ms``, the GPU
busy time of one call from ``torch.profiler``.

Correctness: before a variant is timed its output (and ``dq`` when a backward mode
is asked for) on the full-size inputs is compared with a float64 reference on a few
(batch, head) slices (``(0, 0)``, ``(0, 1)``, ``(B-1, H-1)``), computed query chunk by
query chunk so that it fits in memory at any ``N``.  Relative error
``‖x - ref‖ / ‖ref‖`` must be below ``--tol`` (default 2e-2 for bf16/fp16, 2e-3 for
fp32) and finite, else the variant is not timed and its rows carry the error.

FLOPs: every row uses the *effective* FLOPs of the dense causal problem, so that
TFLOP/s compare directly (a sparse variant that is 3× faster shows 3× the TFLOP/s):
``fwd = 4·B·H·N²·D / 2`` (two ``N×N×D`` matmuls, half of them causal),
``bwd = 2.5 · fwd`` (five matmuls), ``fwd+bwd = 3.5 · fwd``.

Output: a JSON file ``{"meta": {...}, "rows": [...]}`` and a CSV of the rows beside
it, both rewritten after every variant (so a run cut short keeps what it measured).
See :data:`ROW_FIELDS` and ``results/README.md`` for the fields.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import fnmatch
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import _runtime  # noqa: F401  (first: may turn on Triton's interpreter)
from . import reference
from .flash import flash_attention, kernel_config
from .hash_sparse import hash_sparse_attention
from .hashing import lsh_buckets
from .layout import bucket_sort_layout, compact_layout, gather_tokens, scatter_tokens
from .qk_sparse import qk_sparse_attention, random_keep

SCHEMA = "sparseflash.bench/1"
MODES = ("fwd", "fwd+bwd", "bwd")
BASELINES = ("sdpa_flash", "sdpa_cudnn", "ours_dense")  # ratio columns, plus flex_kernel

#: Kinds of variants, in the order they run inside one configuration.
KINDS = ("sdpa_flash", "sdpa_cudnn", "ours_dense", "flex_dense", "naive",
         "ours_qk", "flex_kernel_qk", "flex_e2e_qk",
         "ours_hash", "flex_kernel_hash", "flex_e2e_hash")

#: Columns of a row (CSV order).  ``None`` in JSON / empty in CSV = not applicable or not measured.
ROW_FIELDS = {
    "variant": "full name, e.g. ours_qk_0.3, flex_kernel_hash_16, sdpa_flash",
    "kind": "variant without its parameter: one of " + ", ".join(KINDS),
    "impl": "ours | sdpa | flex | naive",
    "family": "dense | qk | hash (the attention pattern)",
    "param": "keep rate (qk), number of buckets (hash), null (dense)",
    "seq_len": "N", "B": "batch", "H": "heads", "D": "head dim", "dtype": "bf16 | fp16 | fp32",
    "device": "GPU (or CPU) name, as meta.device",
    "mode": "fwd | fwd+bwd | bwd",
    "status": "ok | error | skipped",
    "error": "why the row has no time (error message or skip reason); null when ok",
    "ms": "median time in milliseconds",
    "timer": "triton.do_bench | cpu-wallclock",
    "kernel_ms": "GPU busy time per call (sum of kernel durations, torch.profiler; --kernel-time only): "
                 "ms / kernel_ms >> 1 means launch- or host-bound",
    "tflops": "effective dense-causal FLOPs / time, in TFLOP/s (same FLOP count for every variant)",
    "check_rel_err": "relative error of the output against the float64 reference",
    "check_rel_err_dq": "relative error of dq (backward modes only)",
    "pair_density": "allowed (query, key) pairs / dense causal pairs, for this pattern",
    "computed_tile_fraction": "tiles computed / tiles the same implementation computes for dense causal "
                              "(ours: forward TileRecord of the kernel; flex: block-mask blocks)",
    "schedule_tile_fraction": "the same predicted by sparseflash.tiles' schedules for the first (batch, head) "
                              "(N <= 4096 only: they build the N×N mask)",
    "speedup_vs_sdpa_flash": "ms(sdpa_flash) / ms, same seq_len, D and mode in the same run (>1: faster)",
    "speedup_vs_sdpa_cudnn": "ms(sdpa_cudnn) / ms",
    "speedup_vs_ours_dense": "ms(ours_dense) / ms",
    "speedup_vs_flex_kernel": "ms(flex kernel of the same pattern: flex_kernel_<family>_<param>, or flex_dense "
                              "for dense rows) / ms",
    "tile_efficiency": "sparse rows: ms(dense of the same impl) × computed_tile_fraction / ms; 1 = time "
                       "shrinks exactly with the computed tiles, < 1 = overheads (layout, gathers, tables)",
    "config": "B{B}_H{H}_D{D}_N{N}_{dtype}: the unit of --resume",
    "setup_s": "seconds spent building the variant and checking it (includes compilation)",
    "time_s": "seconds spent timing this row",
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def _fmt_param(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _clean(x):
    """JSON-safe: NaN / inf floats become None; tensors become Python numbers."""
    if isinstance(x, torch.Tensor):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _err(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip()
    return msg if len(msg) <= 600 else msg[:600] + " ..."


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dense_causal_flops(B: int, H: int, N: int, D: int, mode: str) -> float:
    """Effective FLOPs of dense causal attention: fwd 4·B·H·N²·D/2, bwd 2.5×, fwd+bwd 3.5×."""
    fwd = 4.0 * B * H * N * N * D / 2.0
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    den = ref.norm().item()
    num = (x - ref).norm().item()
    if not math.isfinite(num):
        return float("nan")
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


# --------------------------------------------------------------------------------------
# Attention patterns: masks for the reference, layouts for ours and flex
# --------------------------------------------------------------------------------------


@dataclass
class Pattern:
    """One attention pattern of one configuration: dense causal, qk dropping or hash buckets."""

    family: str  # dense | qk | hash
    param: float | int | None
    q_keep: torch.Tensor | None = None
    k_keep: torch.Tensor | None = None
    q_buckets: torch.Tensor | None = None
    k_buckets: torch.Tensor | None = None
    cache: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return "dense" if self.family == "dense" else f"{self.family}_{_fmt_param(self.param)}"

    def allowed(self, bs, hs, i0: int, i1: int, n_k: int) -> torch.Tensor:
        """``(S, i1-i0, n_k)`` bool mask of the (batch, head) slices ``bs, hs``, query rows i0:i1."""
        dev = bs.device
        i = torch.arange(i0, i1, device=dev)[:, None]
        j = torch.arange(n_k, device=dev)[None, :]
        m = (j <= i)[None]
        if self.family == "qk":
            m = m & self.q_keep[bs, hs, i0:i1, None] & self.k_keep[bs, hs, None, :n_k]
        elif self.family == "hash":
            m = m & (self.q_buckets[bs, hs, i0:i1, None] == self.k_buckets[bs, hs, None, :n_k])
        return m

    def layout(self):
        """``(q_index, q_pos, k_index, k_pos, q_sorted_buckets, k_sorted_buckets)``, as the ops build it."""
        if self.family == "qk":
            qi, qp = compact_layout(self.q_keep)
            ki, kp = compact_layout(self.k_keep)
            return qi, qp, ki, kp, None, None
        qi, qp, qb = bucket_sort_layout(self.q_buckets)
        ki, kp, kb = bucket_sort_layout(self.k_buckets)
        return qi, qp, ki, kp, qb, kb

    def pair_density(self) -> float:
        """Allowed (query, key) pairs / dense causal pairs ``N(N+1)/2``, over all (b, h)."""
        if self.family == "dense":
            return 1.0
        if self.family == "qk":
            per_q = torch.cumsum(self.k_keep.to(torch.int64), -1) * self.q_keep
        else:
            nb = int(max(self.q_buckets.max().item(), self.k_buckets.max().item())) + 1
            onehot = F.one_hot(self.k_buckets.long(), nb).to(torch.int32).cumsum(-2)  # (B,H,N,nb)
            per_q = onehot.gather(-1, self.q_buckets.long()[..., None])[..., 0].to(torch.int64)
        B, H, N = per_q.shape
        return per_q.sum().item() / (B * H * N * (N + 1) / 2)


def make_patterns(args, B, H, N, device, q, k, seed) -> list[Pattern]:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    pats = []
    for rate in args.keep_rates:
        qk = random_keep((B, H, N), rate, generator=g, device=device)
        kk = random_keep((B, H, N), rate, generator=g, device=device)
        pats.append(Pattern("qk", float(rate), q_keep=qk, k_keep=kk))
    for n in args.buckets:
        if args.bucket_source == "lsh":
            qb = lsh_buckets(q.detach(), n, seed=seed)
            kb = lsh_buckets(k.detach(), n, seed=seed)
        else:
            qb = torch.randint(0, n, (B, H, N), generator=g, device=device)
            kb = torch.randint(0, n, (B, H, N), generator=g, device=device)
        pats.append(Pattern("hash", int(n), q_buckets=qb, k_buckets=kb))
    return pats


# --------------------------------------------------------------------------------------
# Float64 reference on a few (batch, head) slices, chunk by chunk
# --------------------------------------------------------------------------------------


def check_slices(B: int, H: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = []
    for p in ((0, 0), (0, 1), (B - 1, H - 1)):
        if p[0] < B and p[1] < H and p not in pairs:
            pairs.append(p)
    bs = torch.tensor([p[0] for p in pairs], device=device)
    hs = torch.tensor([p[1] for p in pairs], device=device)
    return bs, hs


def reference_slices(pattern: Pattern, q, k, v, grad, bs, hs, need_dq: bool):
    """float64 ``(out, dq)`` of the slices ``[bs, hs]`` (``dq`` None unless ``need_dq``).

    Query rows are processed in chunks that only see keys ``< chunk end`` (causal), so
    memory stays at a few hundred MB whatever ``N``.
    """
    qs, ks, vs = (t.detach()[bs, hs].to(torch.float64) for t in (q, k, v))
    gs = grad[bs, hs].to(torch.float64)
    S, N, D = qs.shape
    scale = 1.0 / math.sqrt(D)
    chunk = int(max(16, min(N, (1 << 28) // (8 * S * N * 2))))
    outs, dqs = [], []
    for i0 in range(0, N, chunk):
        i1 = min(N, i0 + chunk)
        qc = qs[:, i0:i1].clone().requires_grad_(need_dq)
        with torch.enable_grad() if need_dq else torch.no_grad():
            allowed = pattern.allowed(bs, hs, i0, i1, i1)
            s = (qc @ ks[:, :i1].transpose(-1, -2)) * scale
            s = s.masked_fill(~allowed, float("-inf"))
            has_key = allowed.any(-1, keepdim=True)
            p = torch.softmax(s.masked_fill(~has_key, 0.0), dim=-1).masked_fill(~allowed, 0.0)
            o = p @ vs[:, :i1]
        if need_dq:
            (dq,) = torch.autograd.grad(o, qc, gs[:, i0:i1])
            dqs.append(dq)
        outs.append(o.detach())
    return torch.cat(outs, 1), (torch.cat(dqs, 1) if need_dq else None)


# --------------------------------------------------------------------------------------
# FlexAttention: mask_mods reading one module-level state, so each mask_mod is a single
# function object for the whole run (torch.compile guards on it once; new tensors of
# the same shape put into the state do not recompile).
# --------------------------------------------------------------------------------------

_FLEX = types.SimpleNamespace(qpos=None, kpos=None, qb=None, kb=None)
_FLEX_FNS: dict = {}


def _flex_causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def _flex_qk(b, h, q_idx, kv_idx):
    qp = _FLEX.qpos[b, h, q_idx]
    kp = _FLEX.kpos[b, h, kv_idx]
    return (kp <= qp) & (kp >= 0) & (qp >= 0)


def _flex_hash(b, h, q_idx, kv_idx):
    qp = _FLEX.qpos[b, h, q_idx]
    kp = _FLEX.kpos[b, h, kv_idx]
    same = _FLEX.qb[b, h, q_idx] == _FLEX.kb[b, h, kv_idx]
    return (kp <= qp) & (kp >= 0) & (qp >= 0) & same


def _flex_fns(compile_: bool):
    """``(flex_attention, create_block_mask)``, compiled once per process (or eager)."""
    key = bool(compile_)
    if key not in _FLEX_FNS:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if compile_:
            import torch._dynamo.config as dcfg

            # one graph per (N, D, mask_mod): raise the recompilation limits well above that
            for name, value in (("recompile_limit", 512), ("cache_size_limit", 512),
                                ("accumulated_recompile_limit", 4096), ("accumulated_cache_size_limit", 4096)):
                if hasattr(dcfg, name):
                    try:
                        setattr(dcfg, name, max(getattr(dcfg, name), value))
                    except Exception:  # noqa: BLE001
                        pass
            flex = torch.compile(flex_attention, dynamic=False)
            cbm = torch.compile(create_block_mask, dynamic=False)
        else:
            flex, cbm = flex_attention, create_block_mask
        _FLEX_FNS[key] = (flex, cbm)
    return _FLEX_FNS[key]


def _set_flex_state(qp, kp, qb, kb) -> None:
    _FLEX.qpos, _FLEX.kpos = qp.contiguous(), kp.contiguous()
    _FLEX.qb = None if qb is None else qb.contiguous()
    _FLEX.kb = None if kb is None else kb.contiguous()


def _block_density(bm) -> float:
    return 1.0 - bm.sparsity() / 100.0


def prebuilt_block_mask(mask_mod, B: int, H: int, N: int, device):
    """The block mask of ``mask_mod`` over the layout now in ``_FLEX``, built outside any timing.

    Eager ``create_block_mask`` materialises the ``N × N`` mask of every (batch, head)
    at once, and the compiled one spends minutes compiling at large ``N`` (about 2 min
    at N=16384 on an H100, torch 2.11).  So: eager, one (batch, head) at a time (one
    ``N × N`` bool mask in memory), and the per-head block tables stacked into one
    ``BlockMask``.  It is the same block mask ``create_block_mask(mask_mod, B, H, N, N)``
    gives (checked in tests/test_bench.py).
    """
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    if mask_mod is _flex_causal:
        return create_block_mask(_flex_causal, None, None, N, N, device=device)
    full = (_FLEX.qpos, _FLEX.kpos, _FLEX.qb, _FLEX.kb)
    parts = []
    try:
        for b in range(B):
            for h in range(H):
                _set_flex_state(*(None if t is None else t[b:b + 1, h:h + 1] for t in full))
                parts.append(create_block_mask(mask_mod, 1, 1, N, N, device=device))
    finally:
        _set_flex_state(*full)

    def stack(name):
        first = getattr(parts[0], name, None)
        if first is None:
            return None
        return torch.cat([getattr(p, name) for p in parts], 0).reshape(B, H, *first.shape[2:])

    return BlockMask.from_kv_blocks(
        stack("kv_num_blocks"), stack("kv_indices"), stack("full_kv_num_blocks"), stack("full_kv_indices"),
        BLOCK_SIZE=parts[0].BLOCK_SIZE, mask_mod=mask_mod, seq_lengths=(N, N))


# --------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    kind: str
    impl: str
    family: str
    param: float | int | None
    pattern: Pattern | None = None

    @property
    def is_flex(self) -> bool:
        return self.impl == "flex"


def all_variants(args, patterns: list[Pattern]) -> list[Variant]:
    dense = Pattern("dense", None)
    out = [
        Variant("sdpa_flash", "sdpa_flash", "sdpa", "dense", None, dense),
        Variant("sdpa_cudnn", "sdpa_cudnn", "sdpa", "dense", None, dense),
        Variant("ours_dense", "ours_dense", "ours", "dense", None, dense),
        Variant("flex_dense", "flex_dense", "flex", "dense", None, dense),
        Variant("naive", "naive", "naive", "dense", None, dense),
    ]
    for fam in ("qk", "hash"):
        for p in patterns:
            if p.family != fam:
                continue
            suffix = f"{fam}_{_fmt_param(p.param)}"
            out += [
                Variant(f"ours_{suffix}", f"ours_{fam}", "ours", fam, p.param, p),
                Variant(f"flex_kernel_{suffix}", f"flex_kernel_{fam}", "flex", fam, p.param, p),
                Variant(f"flex_e2e_{suffix}", f"flex_e2e_{fam}", "flex", fam, p.param, p),
            ]
    return out


def selected(v: Variant, patterns: list[str] | None) -> bool:
    if not patterns:
        return True
    return any(fnmatch.fnmatchcase(v.name, p) or fnmatch.fnmatchcase(v.kind, p) for p in patterns)


def skip_reason(v: Variant, mode: str, args, device: torch.device, N: int) -> str | None:
    """Why this variant is not run at all here (None: run it)."""
    if v.kind == "naive" and N > args.naive_max_n:
        return f"naive only for N <= --naive-max-n={args.naive_max_n}"
    if device.type != "cuda":
        if v.kind == "sdpa_cudnn":
            return "needs CUDA (cuDNN attention)"
        if v.is_flex:
            if args.flex_compile:
                return "needs CUDA (compiled FlexAttention); --no-flex-compile runs eager flex fwd on CPU"
            if mode != "fwd":
                return "FlexAttention has no CPU backward"
    return None


def build_fn(v: Variant, args, N: int, B: int, H: int, device) -> tuple[Callable, dict]:
    """``fn(q, k, v) -> out`` (original token order) and extra row fields (tile fractions)."""
    extra: dict = {}
    pat = v.pattern
    if v.kind == "naive":
        return (lambda q, k, vv: reference.attention(q, k, vv, None, causal=True, float64=False)), extra
    if v.kind in ("sdpa_flash", "sdpa_cudnn"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = SDPBackend.FLASH_ATTENTION if v.kind == "sdpa_flash" else SDPBackend.CUDNN_ATTENTION

        def sdpa(q, k, vv):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, vv, is_causal=True)
        return sdpa, extra
    if v.kind == "ours_dense":
        return (lambda q, k, vv: flash_attention(q, k, vv, causal=True)), extra
    if v.kind == "ours_qk":
        return (lambda q, k, vv: qk_sparse_attention(q, k, vv, pat.q_keep, pat.k_keep)), extra
    if v.kind == "ours_hash":
        return (lambda q, k, vv: hash_sparse_attention(q, k, vv, pat.q_buckets, pat.k_buckets)), extra

    # ---- FlexAttention ----
    flex, cbm = _flex_fns(args.flex_compile)
    if v.kind == "flex_dense":
        bm = prebuilt_block_mask(_flex_causal, 1, 1, N, device)
        extra["_flex_density"] = _block_density(bm)
        return (lambda q, k, vv: flex(q, k, vv, block_mask=bm)), extra
    mask_mod = _flex_qk if v.family == "qk" else _flex_hash
    if v.kind.startswith("flex_kernel"):
        qi, qp, ki, kp, qb, kb = pat.layout()
        _set_flex_state(qp, kp, qb, kb)
        bm = prebuilt_block_mask(mask_mod, B, H, N, device)
        extra["_flex_density"] = _block_density(bm)

        def flex_kernel(q, k, vv):
            o = flex(gather_tokens(q, qi), gather_tokens(k, ki), gather_tokens(vv, ki), block_mask=bm)
            return scatter_tokens(o, qi)
        return flex_kernel, extra

    def flex_e2e(q, k, vv):
        qi, qp, ki, kp, qb, kb = pat.layout()
        _set_flex_state(qp, kp, qb, kb)
        bm = cbm(mask_mod, B, H, N, N, device=device)
        o = flex(gather_tokens(q, qi), gather_tokens(k, ki), gather_tokens(vv, ki), block_mask=bm)
        return scatter_tokens(o, qi)
    return flex_e2e, extra


# --------------------------------------------------------------------------------------
# Tile fractions
# --------------------------------------------------------------------------------------


def measured_tile_fraction(pattern: Pattern, q, k, v, dense_tiles_cache: dict) -> float | None:
    """Forward tiles our sparse kernel computed / tiles our dense causal kernel computed (TileRecord)."""
    from .tiles import TileRecord

    with torch.no_grad():
        if "dense" not in dense_tiles_cache:
            rec = TileRecord()
            flash_attention(q, k, v, causal=True, tile_record=rec)
            dense_tiles_cache["dense"] = int((rec.fwd > 0).sum().item())
        rec = TileRecord()
        if pattern.family == "qk":
            qk_sparse_attention(q, k, v, pattern.q_keep, pattern.k_keep, tile_record=rec)
        else:
            hash_sparse_attention(q, k, v, pattern.q_buckets, pattern.k_buckets, tile_record=rec)
        sparse = int((rec.fwd > 0).sum().item())
    dense = dense_tiles_cache["dense"]
    return sparse / dense if dense else None


def _schedule_value(obj):
    frac = getattr(obj, "computed_fraction", None)
    if frac is None and isinstance(obj, dict):
        frac = obj.get("computed_fraction")
    if callable(frac):
        frac = frac()
    if isinstance(frac, torch.Tensor):
        frac = frac.float().mean().item()
    return None if frac is None else float(frac)


def schedule_tile_fraction(pattern: Pattern, N: int, head_dim: int, device, max_n: int = 4096) -> float | None:
    """``computed_fraction`` of ``sparseflash.tiles``' schedule for the first (batch, head).

    ``tiles.qk_schedule`` / ``tiles.hash_schedule`` build the full ``N × N`` token mask,
    so this runs only for ``N <= max_n`` (None above, or when the module or function
    is missing or its signature is not the one expected).  Arguments are passed by
    parameter name; the result is divided by ``flash_schedule``'s fraction when that
    exists, so that it reads as a fraction of the dense causal tiles.
    """
    import inspect

    if N > max_n:
        return None
    try:
        from . import tiles
    except Exception:  # noqa: BLE001
        return None
    cfg = kernel_config(head_dim, torch.device(device))
    one = (slice(0, 1), slice(0, 1))
    known = {
        "q_keep": None if pattern.q_keep is None else pattern.q_keep[one],
        "k_keep": None if pattern.k_keep is None else pattern.k_keep[one],
        "q_buckets": None if pattern.q_buckets is None else pattern.q_buckets[one],
        "k_buckets": None if pattern.k_buckets is None else pattern.k_buckets[one],
        "n": N, "N": N, "seq_len": N, "n_q": N, "n_k": N,
        "block_m": cfg["BLOCK_M"], "block_n": cfg["BLOCK_N"], "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
        "causal": True, "device": device, "batch": 1, "heads": 1,
    }

    def call(fn):
        kwargs = {}
        for name, prm in inspect.signature(fn).parameters.items():
            if prm.kind in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD):
                continue
            if name in known and known[name] is not None:
                kwargs[name] = known[name]
            elif prm.default is prm.empty:
                return None
        return _schedule_value(fn(**kwargs))

    fn = getattr(tiles, f"{pattern.family}_schedule", None)
    if fn is None:
        return None
    try:
        with torch.no_grad():
            frac = call(fn)
            dense_fn = getattr(tiles, "flash_schedule", None)
            dense = call(dense_fn) if dense_fn is not None else None
    except Exception:  # noqa: BLE001
        return None
    if frac is None:
        return None
    return frac / dense if dense else frac


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def _clear_grads(ts):
    for t in ts or ():
        t.grad = None


def measure(step: Callable, device: torch.device, warmup: float, rep: float, grads) -> tuple[float, str]:
    """Median ms of ``step``: triton's do_bench on CUDA, wall clock on CPU."""
    if device.type == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(step, warmup=warmup, rep=rep, grad_to_none=grads, return_mode="median")
        return float(ms), "triton.do_bench"
    # CPU: for smoke tests only.  Warm up for `warmup` ms, then time at least 3 and at
    # most 50 calls or until `rep` ms have passed.
    t_end = time.perf_counter() + warmup / 1e3
    while time.perf_counter() < t_end:
        _clear_grads(grads)
        step()
    times = []
    t_end = time.perf_counter() + rep / 1e3
    while len(times) < 3 or (len(times) < 50 and time.perf_counter() < t_end):
        _clear_grads(grads)
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), "cpu-wallclock"


def kernel_ms(step: Callable, device: torch.device, grads, reps: int = 3) -> float | None:
    """GPU busy time of one ``step``: the durations of its device kernels (and memsets /
    copies), summed, from ``torch.profiler``; averaged over ``reps`` calls.

    ``ms`` from do_bench is the wall time between two events on the GPU's stream: when the
    host cannot launch work as fast as the GPU runs it (small problems, many small
    kernels, Python overhead, host synchronisations) the GPU idles in between and ``ms``
    measures the host.  ``kernel_ms`` does not count those gaps, so ``ms / kernel_ms``
    well above 1 means launch-bound.  None on CPU or if the profiler fails.
    """
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            _clear_grads(grads)
            step()
        torch.cuda.synchronize(device)
    total_us = 0.0
    n = 0
    for evt in prof.events():
        if getattr(evt, "device_type", None) == DeviceType.CUDA:
            total_us += evt.time_range.elapsed_us()
            n += 1
    return total_us / reps / 1e3 if n else None


def time_mode(fn, mode: str, q, k, v, grad, device, args) -> tuple[float, str, float | None]:
    """``(ms, timer, kernel_ms)`` of one variant in one mode (kernel_ms only with --kernel-time)."""
    qkv = [q, k, v]
    _clear_grads(qkv)
    out = None
    if mode == "fwd":
        qd, kd, vd = q.detach(), k.detach(), v.detach()  # (FlexAttention on CPU rejects requires_grad)
        step, grads = (lambda: fn(qd, kd, vd)), None
        ctx = torch.no_grad
    elif mode == "fwd+bwd":
        def step():
            fn(q, k, v).backward(grad)
        grads, ctx = qkv, torch.enable_grad
    else:  # bwd: one retained forward graph, backward only
        out = fn(q, k, v)
        step, grads, ctx = (lambda: out.backward(grad, retain_graph=True)), qkv, torch.enable_grad
    try:
        with ctx():
            step()  # untimed warm-up of exactly this call
            _sync(device)
            ms, timer = measure(step, device, args.warmup, args.rep, grads)
            k_ms = None
            if args.kernel_time:
                try:
                    k_ms = kernel_ms(step, device, grads)
                except Exception:  # noqa: BLE001  (a profiler problem must not cost the row)
                    k_ms = None
        return ms, timer, k_ms
    finally:
        del out
        _clear_grads(qkv)


# --------------------------------------------------------------------------------------
# Results file
# --------------------------------------------------------------------------------------


def add_ratios(rows: list[dict]) -> None:
    """Fill speedup_* and tile_efficiency from rows of the same configuration and mode."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["config"], r["mode"]), {})[r["variant"]] = r
    for by_name in groups.values():
        def ms_of(name):
            r = by_name.get(name)
            return r["ms"] if r is not None and r.get("status") == "ok" and r.get("ms") else None

        for r in by_name.values():
            ms = r.get("ms") if r.get("status") == "ok" else None
            for base in BASELINES:
                b = ms_of(base)
                r[f"speedup_vs_{base}"] = (b / ms) if (b and ms) else None
            flex_name = "flex_dense" if r["family"] == "dense" else f"flex_kernel_{r['family']}_{_fmt_param(r['param'])}"
            b = ms_of(flex_name)
            r["speedup_vs_flex_kernel"] = (b / ms) if (b and ms) else None
            eff = None
            frac = r.get("computed_tile_fraction")
            if ms and frac is not None and r["family"] != "dense":
                dense = {"ours": "ours_dense", "flex": "flex_dense"}.get(r.get("impl"))
                d = ms_of(dense) if dense else None
                if d:
                    eff = d * frac / ms
            r["tile_efficiency"] = eff


def _ordered_fields(rows: list[dict]) -> list[str]:
    names = list(ROW_FIELDS)
    for r in rows:
        for key in r:
            if key not in names and not key.startswith("_"):
                names.append(key)
    return names


def write_results(path: Path, meta: dict, rows: list[dict]) -> None:
    add_ratios(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = _ordered_fields(rows)  # every row gets every key (None where not applicable)
    clean_rows = [{k: _clean(r.get(k)) for k in fields} for r in rows]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": clean_rows}, f, indent=1, default=str)
    os.replace(tmp, path)
    csv_path = path.with_suffix(".csv")
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_ordered_fields(clean_rows), extrasaction="ignore")
        w.writeheader()
        for r in clean_rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    os.replace(tmp, csv_path)


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def make_meta(args, device: torch.device) -> dict:
    import triton

    from . import __version__

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        dev_name = torch.cuda.get_device_name(index)
        dev_info = {"name": dev_name, "index": index}
        try:
            props = torch.cuda.get_device_properties(index)
            dev_info.update(capability=list(torch.cuda.get_device_capability(index)),
                            total_memory_gb=round(props.total_memory / 2**30, 1),
                            multiprocessors=props.multi_processor_count)
        except Exception:  # noqa: BLE001
            pass
    else:
        dev_name = platform.processor() or platform.machine()
        dev_info = {"name": dev_name, "cores": os.cpu_count()}
    return {
        "schema": SCHEMA,
        "device": dev_name,
        "device_info": dev_info,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "sparseflash": __version__,
        "git_commit": _git_commit(),
        "host": socket.gethostname(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": [sys.executable, "-m", "sparseflash.bench", *sys.argv[1:]],
        "config": {k: v for k, v in vars(args).items()},
        "interpreter": bool(_runtime.INTERPRET),
        "complete": False,
        "completed_configs": [],
        "fields": ROW_FIELDS,
        "notes": [
            "FLOPs: every row counts the dense causal problem (fwd 4*B*H*N^2*D/2, bwd 2.5x, fwd+bwd 3.5x), "
            "so TFLOP/s is an effective rate, comparable across variants.",
            "Sparse rows are end to end: our public functions include compaction/sort, gathers, tile tables "
            "and the scatter back; generating keep masks / bucket ids is excluded (the model provides them).",
            "flex_kernel_*: layout and block mask built once outside the timed region; gather + kernel + "
            "scatter timed. flex_e2e_*: layout + compiled create_block_mask + gather + kernel + scatter timed.",
            "Keep masks: random_keep per (batch, head), independently for queries and keys. Buckets: "
            + ("uniform random ids per token (the balanced case)" if args.bucket_source == "random"
               else "lsh_buckets of the random q and k (seed fixed)") + ".",
            "Ratios compare rows of the same config (B, H, D, N, dtype) and mode, measured back to back "
            "in one process.",
        ],
    }


# --------------------------------------------------------------------------------------
# Main loop
# --------------------------------------------------------------------------------------


def config_key(B, H, D, N, dtype) -> str:
    return f"B{B}_H{H}_D{D}_N{N}_{dtype}"


def run_config(args, device, B, H, D, N, rows: list[dict], flush: Callable, pbar, log, dev_name: str = "") -> None:
    """Check and time every selected variant × mode of one (B, H, D, N) configuration."""
    dtype = DTYPES[args.dtype]
    key = config_key(B, H, D, N, args.dtype)
    seed = args.seed + 1009 * N + D
    torch.manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(3))
    for t in (q, k, v):
        t.requires_grad_(True)
    grad = torch.randn(B, H, N, D, device=device, dtype=dtype)
    patterns = make_patterns(args, B, H, N, device, q, k, seed)
    variants = [x for x in all_variants(args, patterns) if selected(x, args.variants)]
    bs, hs = check_slices(B, H, device)
    tol = args.tol if args.tol is not None else (2e-3 if dtype == torch.float32 else 2e-2)
    ref_cache: dict = {}
    dense_tiles: dict = {}
    need_bwd = any(m != "fwd" for m in args.modes)

    for var in variants:
        base = dict(variant=var.name, kind=var.kind, impl=var.impl, family=var.family, param=var.param,
                    seq_len=N, B=B, H=H, D=D, dtype=args.dtype, device=dev_name, config=key)
        pat = var.pattern
        info: dict = {}
        try:
            info["pair_density"] = pat.cache.setdefault("density", pat.pair_density())
        except Exception as e:  # noqa: BLE001
            log(f"[{key} {var.name}] pair density: {_err(e)}")
        run_modes = []
        for mode in args.modes:
            reason = skip_reason(var, mode, args, device, N)
            if reason is not None:
                rows.append(dict(base, mode=mode, status="skipped", error=reason, ms=None, **info))
                pbar.update(1)
            else:
                run_modes.append(mode)
        if not run_modes:
            flush()
            continue

        fn = None
        t_setup = time.perf_counter()
        try:
            # ---- build (flex: block masks; may compile) and tile fractions ----
            fn, extra = build_fn(var, args, N, B, H, device)
            if var.family != "dense":
                if var.impl == "ours":
                    try:
                        info["computed_tile_fraction"] = pat.cache.setdefault(
                            "tiles", measured_tile_fraction(pat, q, k, v, dense_tiles))
                    except Exception as e:  # noqa: BLE001
                        log(f"[{key} {var.name}] tile record: {_err(e)}")
                    frac = schedule_tile_fraction(pat, N, D, device)
                    if frac is not None:
                        info["schedule_tile_fraction"] = frac
                elif "_flex_density" in extra and "flex_dense_density" in ref_cache:
                    info["computed_tile_fraction"] = extra["_flex_density"] / ref_cache["flex_dense_density"]
            elif var.kind == "flex_dense" and "_flex_density" in extra:
                ref_cache["flex_dense_density"] = extra["_flex_density"]

            # ---- correctness on the full-size inputs (also the first, untimed call) ----
            errs = {"o": None, "dq": None}
            check_grad = need_bwd and any(m != "fwd" for m in run_modes)
            if args.check:
                _clear_grads((q, k, v))
                if check_grad:
                    out = fn(q, k, v)
                    out.backward(grad)
                    dq = q.grad[bs, hs]
                else:
                    with torch.no_grad():
                        out = fn(q.detach(), k.detach(), v.detach())
                    dq = None
                out_s = out.detach()[bs, hs]
                del out
                _clear_grads((q, k, v))
                rkey = (pat.name, check_grad)
                if rkey not in ref_cache:
                    ref_cache[rkey] = reference_slices(pat, q, k, v, grad, bs, hs, check_grad)
                ref_o, ref_dq = ref_cache[rkey]
                errs["o"] = rel_err(out_s, ref_o)
                if dq is not None:
                    errs["dq"] = rel_err(dq, ref_dq)
        except Exception as e:  # noqa: BLE001
            msg = _err(e)
            log(f"[{key} {var.name}] build/check failed: {msg}\n" + traceback.format_exc(limit=6))
            for mode in run_modes:
                rows.append(dict(base, mode=mode, status="error", error=msg, ms=None, **info))
                pbar.update(1)
            flush()
            del fn
            _free(device)
            continue

        info["setup_s"] = round(time.perf_counter() - t_setup, 2)
        for mode in run_modes:
            t_mode = time.perf_counter()
            row = dict(base, mode=mode, **info)
            row["check_rel_err"] = errs["o"]
            if mode != "fwd":
                row["check_rel_err_dq"] = errs["dq"]
            bad = [(n, e) for n, e in (("out", errs["o"]), ("dq", errs["dq"] if mode != "fwd" else None))
                   if args.check and e is not None and not (e < tol)]
            if bad:
                row.update(status="error", ms=None,
                           error="check failed: " + ", ".join(f"rel err of {n} {e:.3g} >= tol {tol:g}" for n, e in bad))
                log(f"[{key} {var.name} {mode}] {row['error']}")
            else:
                try:
                    ms, timer, k_ms = time_mode(fn, mode, q, k, v, grad, device, args)
                    row.update(status="ok", error=None, ms=ms, timer=timer, kernel_ms=k_ms,
                               tflops=dense_causal_flops(B, H, N, D, mode) / (ms * 1e-3) / 1e12)
                except Exception as e:  # noqa: BLE001
                    msg = _err(e)
                    log(f"[{key} {var.name} {mode}] timing failed: {msg}\n" + traceback.format_exc(limit=6))
                    row.update(status="error", ms=None, error=msg)
                    _free(device)
            row["time_s"] = round(time.perf_counter() - t_mode, 2)
            rows.append(row)
            pbar.update(1)
            flush()
        del fn
        _clear_grads((q, k, v))
    del q, k, v, grad, patterns, variants, ref_cache
    _FLEX.qpos = _FLEX.kpos = _FLEX.qb = _FLEX.kb = None
    _free(device)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001
            pass
        torch.cuda.empty_cache()


def summary_table(rows: list[dict]) -> str:
    """Per (D, dtype, mode): speedup vs sdpa_flash (or ours_dense when absent) by N, and tile efficiency."""
    lines = []
    keys = sorted({(r["D"], r["dtype"], r["mode"]) for r in rows}, key=lambda t: (t[0], t[1], MODES.index(t[2])))
    for D, dt, mode in keys:
        sub = [r for r in rows if (r["D"], r["dtype"], r["mode"]) == (D, dt, mode)]
        ns = sorted({r["seq_len"] for r in sub})
        names = list(dict.fromkeys(r["variant"] for r in sub))
        ok_names = [n for n in names if any(r["variant"] == n and r.get("status") == "ok" for r in sub)]
        base = next((b for b in ("sdpa_flash", "ours_dense", "flex_dense") if b in ok_names),
                    ok_names[0] if ok_names else "sdpa_flash")
        base_ms = {r["seq_len"]: r["ms"] for r in sub if r["variant"] == base and r.get("status") == "ok"}
        B, H = sub[0]["B"], sub[0]["H"]
        lines.append(f"\n{dt} B={B} H={H} D={D} {mode}: speedup vs {base} (>1 faster; eff = tile_efficiency)")
        lines.append(f"{'variant':<22}" + "".join(f"{'N=' + str(n):>10}" for n in ns) + "   eff@N=" + str(ns[-1]))
        for name in names:
            cells, eff = [], ""
            for n in ns:
                r = next((r for r in sub if r["variant"] == name and r["seq_len"] == n), None)
                if r is None:
                    cells.append("-")
                elif r.get("status") == "skipped":
                    cells.append("skip")
                elif r.get("status") != "ok":
                    cells.append("ERR")
                else:
                    x = base_ms[n] / r["ms"] if (base_ms.get(n) and r.get("ms")) else None
                    cells.append(("?" if x is None else f"{x:.2f}x" if x >= 0.1 else f"{x:.2g}x"))
                if n == ns[-1] and r is not None and r.get("tile_efficiency") is not None:
                    eff = f"{r['tile_efficiency']:.2f}"
            lines.append(f"{name:<22}" + "".join(f"{c:>10}" for c in cells) + f"   {eff}")
    errs = [r for r in rows if r.get("status") == "error"]
    if errs:
        lines.append(f"\n{len(errs)} row(s) with errors, e.g. {errs[0]['variant']} N={errs[0]['seq_len']} "
                     f"{errs[0]['mode']}: {errs[0]['error'][:200]}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sparseflash.bench",
        description="Time dense and sparse causal attention (ours, SDPA FlashAttention-2 / cuDNN, "
                    "FlexAttention, naive) after checking each against a float64 reference; "
                    "write JSON + CSV and print ratio tables.",
        epilog="Example (H100): python -m sparseflash.bench --head-dim 64 128 --out results/h100.json "
               "--resume --time-budget 420   (repeat the same command until it prints COMPLETE). "
               "Variants: " + ", ".join(KINDS) + " (with _<rate> / _<buckets> suffixes for the sparse ones).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384],
                   help="sequence lengths N")
    p.add_argument("--batch", type=int, default=2, help="batch size B")
    p.add_argument("--heads", type=int, default=12, help="heads H")
    p.add_argument("--head-dim", type=int, nargs="+", default=[64], help="head dims D (one run each)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="input dtype")
    p.add_argument("--modes", nargs="+", choices=MODES, default=["fwd", "fwd+bwd"],
                   help="fwd (no_grad forward), fwd+bwd (forward + backward), bwd (backward of a retained graph)")
    p.add_argument("--keep-rates", type=float, nargs="+", default=[0.3, 0.5],
                   help="query/key keep rates of the qk-dropping variants")
    p.add_argument("--buckets", type=int, nargs="+", default=[8, 16], help="bucket counts of the hash variants")
    p.add_argument("--bucket-source", choices=["random", "lsh"], default="random",
                   help="random: uniform random bucket ids (balanced, the paper's setting); "
                        "lsh: sparseflash.lsh_buckets of the random q and k")
    p.add_argument("--variants", nargs="+", default=None, metavar="PATTERN",
                   help="run only these variants: names or kinds, shell patterns allowed "
                        "(e.g. ours_dense 'sdpa_*' 'ours_qk*' flex_kernel_hash_16); default: all")
    p.add_argument("--out", type=Path, default=Path("results/h100.json"),
                   help="JSON output (a .csv with the same rows is written beside it)")
    p.add_argument("--warmup", type=float, default=25, help="warm-up time in ms (do_bench's warmup)")
    p.add_argument("--rep", type=float, default=100, help="measuring time in ms (do_bench's rep)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="check output (and dq) against a float64 reference before timing; a failing "
                        "variant is not timed")
    p.add_argument("--tol", type=float, default=None,
                   help="relative-error tolerance of the check (default 2e-2 for bf16/fp16, 2e-3 for fp32)")
    p.add_argument("--kernel-time", action=argparse.BooleanOptionalAction, default=False,
                   help="also record kernel_ms, the GPU busy time of one call (torch.profiler), to tell "
                        "launch-bound rows (ms >> kernel_ms) from kernel-bound ones")
    p.add_argument("--naive-max-n", type=int, default=4096, help="run the naive variant only up to this N")
    p.add_argument("--flex-compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile FlexAttention and create_block_mask (without it flex runs eager: "
                        "slow, for testing the harness only; on CPU that is the only way flex runs, fwd only)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: N=64 128, B=1, H=2, D=16, buckets 2 4, warmup 1 ms, rep 5 ms "
                        "(for those of these flags not given)")
    p.add_argument("--device", default=None,
                   help="cuda, cuda:N or cpu; default cuda if available, else cpu (cpu: our kernels in "
                        "Triton's interpreter, wall-clock timer; for smoke tests)")
    p.add_argument("--seed", type=int, default=0, help="base seed of inputs, masks and buckets")
    p.add_argument("--resume", action="store_true",
                   help="keep the configurations already completed in --out and run only the others "
                        "(use the same flags)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no new configuration after this many seconds (the file stays resumable)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:  # tiny sizes, for every one of these flags left at its default
        quick = dict(seq_lens=[64, 128], batch=1, heads=2, head_dim=[16], buckets=[2, 4], warmup=1.0, rep=5.0)
        for name, value in quick.items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device.index)
    from tqdm.auto import tqdm

    out = Path(args.out)
    meta = make_meta(args, device)
    rows: list[dict] = []
    if args.resume and out.exists():
        try:
            old = json.loads(out.read_text())
            old_meta = old["meta"]
            if old_meta.get("device") != meta["device"] or old_meta.get("torch") != meta["torch"]:
                print(f"error: --resume: {out} was measured on {old_meta.get('device')} with torch "
                      f"{old_meta.get('torch')}, this is {meta['device']} with torch {meta['torch']}; "
                      "use another --out", file=sys.stderr)
                return 2
            done = set(old_meta.get("completed_configs", []))
            rows = [r for r in old["rows"] if r.get("config") in done]
            meta["completed_configs"] = sorted(done)
            meta["previous_invocations"] = old_meta.get("previous_invocations", []) + [
                {k: old_meta.get(k) for k in ("date", "argv", "wall_s", "completed_configs", "git_commit")}]
            print(f"resuming {out}: {len(done)} configuration(s) done, {len(rows)} rows kept", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"warning: cannot resume from {out} ({_err(e)}); starting afresh", file=sys.stderr)
    # N-major: both head dims of one N run back to back, so that work compiled per N
    # (FlexAttention's compiled create_block_mask) is shared by them in one process.
    configs = [(D, N) for N in args.seq_lens for D in args.head_dim]
    todo = [(D, N) for D, N in configs
            if config_key(args.batch, args.heads, D, N, args.dtype) not in meta["completed_configs"]]

    print(f"sparseflash.bench on {meta['device']} | torch {meta['torch']} triton {meta['triton']} "
          f"cuda {meta['cuda']} | B={args.batch} H={args.heads} D={args.head_dim} {args.dtype} "
          f"N={args.seq_lens} modes={args.modes} -> {out}", flush=True)
    n_var = len([x for x in all_variants(args, [Pattern("qk", float(r)) for r in args.keep_rates]
                                         + [Pattern("hash", int(n)) for n in args.buckets])
                 if selected(x, args.variants)])
    if n_var == 0:
        print(f"error: --variants {args.variants} selects nothing; kinds: {', '.join(KINDS)}", file=sys.stderr)
        return 2
    pbar = tqdm(total=len(todo) * n_var * len(args.modes), desc="bench", unit="row",
                disable=args.no_progress, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 10.0)

    def log(msg: str) -> None:
        tqdm.write(msg, file=sys.stderr)

    def flush() -> None:
        try:
            write_results(out, meta, rows)
        except Exception as e:  # noqa: BLE001
            log(f"warning: could not write {out}: {_err(e)}")

    t_start = time.perf_counter()
    last_duration = 0.0
    stopped = False
    try:
        for D, N in todo:
            elapsed = time.perf_counter() - t_start
            if args.time_budget is not None and elapsed + 1.5 * last_duration > args.time_budget:
                stopped = True
                log(f"time budget: {elapsed:.0f}s used, stopping before D={D} N={N}")
                break
            t0 = time.perf_counter()
            pbar.set_postfix_str(f"D={D} N={N}")
            key = config_key(args.batch, args.heads, D, N, args.dtype)
            rows[:] = [r for r in rows if r.get("config") != key]
            try:
                run_config(args, device, args.batch, args.heads, D, N, rows, flush, pbar, log, meta["device"])
                meta["completed_configs"] = sorted(set(meta["completed_configs"]) | {key})
            except Exception as e:  # noqa: BLE001  (anything outside the per-variant guards)
                log(f"[{key}] configuration failed: {_err(e)}\n" + traceback.format_exc(limit=8))
                _free(device)
            flush()
            last_duration = time.perf_counter() - t0
    except KeyboardInterrupt:
        stopped = True
        log("interrupted: results so far are saved")
    finally:
        pbar.close()
        want = {config_key(args.batch, args.heads, D, N, args.dtype) for D, N in configs}
        meta["complete"] = want <= set(meta["completed_configs"])
        meta["wall_s"] = round(time.perf_counter() - t_start, 1)
        flush()
    print(summary_table(rows))
    state = "COMPLETE" if meta["complete"] else "INCOMPLETE (run again with --resume to continue)"
    print(f"\n{state}: {len(rows)} rows -> {out} and {out.with_suffix('.csv')} ({meta['wall_s']} s)", flush=True)
    return 0 if (meta["complete"] or stopped) else 1


if __name__ == "__main__":
    sys.exit(main())
