"""``python -m sparseflash.bench.decode``: the time of one generated token against a KV cache.

Two scopes:

* ``layer``: one attention call.  One new query per (sequence, head), ``q`` ``(B, H, 1, D)``,
  against a full cache of ``context`` keys and values ``(B, Hkv, context, D)`` (random), the
  query's own key being the last row.  Rows, by ``attention``:

  - ``sdpa``: ``F.scaled_dot_product_attention(q, k, v)`` over the whole cache (PyTorch's own
    choice of backend), the baseline of ``speedup_vs_sdpa``;
  - ``dense``: our split-KV decode kernel over the whole cache
    (:meth:`sparseflash.nn.KVCache.attend`, i.e. :func:`sparseflash.decode_attention`);
  - ``hash``: the same kernel over "same bucket or among the ``window`` most recent keys",
    reading the bucket's row list of the cache's bucket index in place (``list_id`` mode);
    bucket ids uniform at random (balanced buckets), for the keys and the queries;
  - ``flex_dense`` / ``flex_hash``: compiled FlexAttention with one query (its decoding path),
    no mask / the block mask of the same hash ∪ window pattern, built once outside the
    timing.  CUDA only; a row that fails records the error and the run goes on.

  Before timing, each row's output on the first sequence is checked against a float64
  masked softmax (``check_rel_err``; above ``--tol`` the row is not timed).

* ``model``: one decode step of a whole model, :class:`sparseflash.train.model.GPT` with
  random weights (``--model-layers`` x ``--model-width``, ``--heads`` heads, in ``--dtype``):
  embedding, every block (qkv, hashing, rotary, cache append, attention, MLP) and the head,
  for ``attention`` ``sdpa``, ``dense`` and ``hash`` (the model's own LSH buckets ∪ the
  window).  The caches are filled with random keys and values (bucketed by each layer's own
  rotations), not by a prefill, which would cost far more than the steps measured.  Each timed
  call first puts the caches back to ``context`` rows (a Python assignment, plus for ``hash``
  one small copy restoring the bucket counts), so every call decodes the same position.

Timing: :func:`sparseflash.bench.timing.measure`: ``triton.testing.do_bench`` medians after
warm-up on CUDA, wall clock on CPU (``--quick``, our kernels in Triton's interpreter; not GPU
timings).  Output: ``{"meta", "rows"}`` JSON (and CSV beside it), default
``results/decode_<device>.json`` (``decode_h200.json`` on an H200); an existing file is moved
to a timestamped backup, never overwritten.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import platform
import socket
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import _runtime
from .results import _clean, _err, _git_commit, backup_path, device_name, device_slug
from .timing import _free, measure, open_device

SCHEMA = "sparseflash.bench.decode/1"
ATTENTIONS = ("sdpa", "dense", "hash", "flex_dense", "flex_hash")
MODEL_ATTENTIONS = ("sdpa", "dense", "hash")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

ROW_FIELDS = {
    "scope": "layer (one attention call) | model (one decode step of the whole GPT)",
    "attention": "sdpa | dense | hash | flex_dense | flex_hash (see the module docstring)",
    "n_buckets": "hash buckets of hash / flex_hash rows, else null",
    "window": "sliding window W of hash rows (same bucket or among the W most recent keys), else 0",
    "context": "cached tokens the new query attends over (its own included)",
    "batch": "sequences decoded together",
    "ms_per_token": "median ms of one call (layer) or one decode step (model): the time per generated token "
                    "of each sequence, all batch sequences at once; on CUDA the replay of the call captured in a "
                    "CUDA graph (GPU time, no host launch cost; --no-graphs: eager calls)",
    "ms_per_token_eager": "median ms of the same call made eagerly from Python, host launch cost included "
                          "(CUDA; null when --no-graphs, where ms_per_token is that)",
    "graph_error": "why the call could not be captured in a CUDA graph (then ms_per_token is the eager time and "
                   "timer says so); absent when it could",
    "speedup_vs_sdpa": "ms_per_token(sdpa) / ms_per_token, same scope, context and batch (>1: faster)",
    "status": "ok | error | skipped",
    "error": "why the row has no time; null when ok",
    "timer": "triton.do_bench, cuda-graph replay | triton.do_bench (eager, --no-graphs) | interpreter-wallclock | "
             "cpu-wallclock (CPU: not GPU timings)",
    "check_rel_err": "layer rows: relative error of the first sequence's output against float64",
    "keys_read": "layer rows: keys a query attends to, averaged over (sequence, head)",
    "setup_s": "seconds to build the inputs, check and compile (first call)",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sparseflash.bench.decode",
        description="Time one decode step (one new token per sequence against a KV cache): SDPA over the "
                    "full cache, our dense decode kernel, our hash ∪ window decode, FlexAttention; one "
                    "attention call (scope layer) and a whole small GPT's step (scope model).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 65536, 131072],
                   help="cached tokens per sequence")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="sequences per step")
    p.add_argument("--scopes", nargs="+", choices=["layer", "model"], default=["layer", "model"])
    p.add_argument("--attentions", nargs="+", choices=ATTENTIONS, default=list(ATTENTIONS),
                   help="rows to run (model scope: sdpa, dense and hash only)")
    p.add_argument("--heads", type=int, default=8, help="query heads H (layer and model)")
    p.add_argument("--kv-heads", type=int, default=None, help="kv heads (GQA); default --heads")
    p.add_argument("--head-dim", type=int, default=64, help="head dim D of the layer rows (model: width / heads)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--buckets", type=int, default=16, help="hash buckets")
    p.add_argument("--window", type=int, default=256, help="sliding window of the hash rows")
    p.add_argument("--model-layers", type=int, default=6)
    p.add_argument("--model-width", type=int, default=512)
    p.add_argument("--flex", action=argparse.BooleanOptionalAction, default=True,
                   help="FlexAttention rows (compiled; CUDA only; each (context, batch) compiles anew)")
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA: time each call as the replay of a captured CUDA graph (ms_per_token, the GPU's time, "
                        "as a generation loop that replays its step pays) and also eagerly (ms_per_token_eager)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="check layer rows against float64 before timing them")
    p.add_argument("--tol", type=float, default=None, help="check tolerance (default 2e-2, 2e-3 for fp32)")
    p.add_argument("--warmup", type=float, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=float, default=100, help="do_bench measuring time, ms")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (CSV beside it); default results/decode_<device>.json, e.g. "
                        "results/decode_h200.json (results/quick/... with --quick). An existing file is moved "
                        "to <name>.bak-<UTC time>")
    p.add_argument("--quick", action="store_true",
                   help="smoke test on any device: context 40, batch 1, 2 heads, D=16, 4 buckets, window 8, "
                        "a 1-layer 32-wide model, warm-up 1 ms, rep 5 ms (for the flags left at their defaults)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu; default cuda if available")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (rows are printed anyway)")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        quick = dict(contexts=[40], batches=[1], heads=2, head_dim=16, buckets=4, window=8, model_layers=1,
                     model_width=32, warmup=1.0, rep=5.0)
        for name, value in quick.items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    args.kv_heads = args.heads if args.kv_heads is None else args.kv_heads
    for name in ("contexts", "batches"):
        if min(getattr(args, name)) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.heads < 1 or args.kv_heads < 1 or args.heads % args.kv_heads:
        p.error(f"--heads ({args.heads}) must be a positive multiple of --kv-heads ({args.kv_heads})")
    if args.buckets < 2 or args.buckets % 2:
        p.error(f"--buckets must be even and >= 2 (LSH buckets come in pairs), got {args.buckets}")
    if args.window < 0:
        p.error(f"--window must be >= 0, got {args.window}")
    if args.model_width % args.heads:
        p.error(f"--model-width ({args.model_width}) must be divisible by --heads ({args.heads})")
    return args


# --------------------------------------------------------------------------------------
# Layer scope
# --------------------------------------------------------------------------------------

#: What the FlexAttention mask_mod reads (one function object, so that torch.compile guards once).
_FLEX = types.SimpleNamespace(kb=None, qb=None, start=0, group=1)


def _flex_hash_window(b, h, q_idx, kv_idx):
    return (kv_idx >= _FLEX.start) | (_FLEX.kb[b, h // _FLEX.group, kv_idx] == _FLEX.qb[b, h])


def _reference(q, k, v, allowed) -> torch.Tensor:
    """Float64 attention of ``q`` ``(1, H, 1, D)`` over ``k``, ``v`` ``(1, Hkv, L, D)``, keys
    ``allowed`` ``(1, H, L)`` (None: all); a query with no key gets 0."""
    H, Hkv = q.shape[1], k.shape[1]
    k, v = (t.double().repeat_interleave(H // Hkv, dim=1) for t in (k, v))
    s = (q.double() @ k.transpose(-1, -2))[:, :, 0] / math.sqrt(q.shape[-1])
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p[..., None] * v).sum(-2, keepdim=True)


def _rel_err(got, want) -> float:
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def _time_row(row: dict, fn, args, device, interpreted: bool) -> None:
    """``ms_per_token`` of ``fn`` (CUDA graph replay with ``--graphs`` on CUDA) and, with graphs,
    ``ms_per_token_eager`` of the same call made from Python."""
    graphs = args.graphs and device.type == "cuda"
    eager = measure(fn, device, args.warmup, args.rep, None, interpreted)
    row["ms_per_token"], row["timer"] = eager
    if graphs:
        row["ms_per_token_eager"] = eager[0]
        try:
            row["ms_per_token"], row["timer"] = measure(fn, device, args.warmup, args.rep, None, interpreted,
                                                        graph=True)
        except Exception as e:  # noqa: BLE001  (a call that cannot be captured keeps its eager time, labelled)
            row["graph_error"] = _err(e)
            torch.cuda.synchronize(device)


def layer_rows(args, device, context: int, batch: int, emit) -> None:
    """Every selected attention at one (context, batch): build, check, time, ``emit(row)``."""
    from ..nn import KVCache

    dtype = DTYPES[args.dtype]
    B, H, Hkv, D, L = batch, args.heads, args.kv_heads, args.head_dim, context
    nb, W = args.buckets, args.window
    g = torch.Generator(device=device).manual_seed(args.seed + 7919 * context + batch)
    t0 = time.perf_counter()
    q = torch.randn(B, H, 1, D, device=device, dtype=dtype, generator=g)
    kb = torch.randint(0, nb, (B, Hkv, L), device=device, generator=g)
    qb = torch.randint(0, nb, (B, H), device=device, generator=g)
    cache = KVCache(L, kernel=True)
    cache.append(torch.randn(B, Hkv, L, D, device=device, dtype=dtype, generator=g),
                 torch.randn(B, Hkv, L, D, device=device, dtype=dtype, generator=g), kb, n_buckets=nb)
    k, v = cache.k, cache.v
    gqa = {"enable_gqa": True} if Hkv != H else {}
    interpreted = device.type != "cuda" and bool(_runtime.INTERPRET)
    # The hash ∪ window keys, computed independently of the cache's bucket index (check only).
    j = torch.arange(L, device=device)
    hk = torch.arange(H, device=device) // (H // Hkv)
    hash_mask = (kb[:1, hk] == qb[:1, :, None]) | (j >= L - W)
    setup = time.perf_counter() - t0

    fns = {}
    if "sdpa" in args.attentions:
        fns["sdpa"] = (lambda: F.scaled_dot_product_attention(q, k, v, **gqa), None, False)
    if "dense" in args.attentions:
        fns["dense"] = (lambda: cache.attend(q), None, interpreted)
    if "hash" in args.attentions:
        fns["hash"] = (lambda: cache.attend(q, window=W, q_buckets=qb), hash_mask, interpreted)
    for name in ("flex_dense", "flex_hash"):
        if name in args.attentions:
            fns[name] = None  # built below (CUDA only)

    tol = args.tol if args.tol is not None else (2e-3 if dtype == torch.float32 else 2e-2)
    ref_dense = None
    for name, spec in fns.items():
        is_hash = name.endswith("hash")
        row = dict(scope="layer", attention=name, n_buckets=nb if is_hash else None, window=W if is_hash else 0,
                   context=context, batch=batch, ms_per_token=None, ms_per_token_eager=None, status="ok", error=None,
                   timer=None, check_rel_err=None, keys_read=None)
        t1 = time.perf_counter()
        try:
            if spec is None:  # FlexAttention
                if device.type != "cuda" or not args.flex:
                    row.update(status="skipped", error="FlexAttention decoding is timed on CUDA only (compiled)"
                               if args.flex else "--no-flex")
                    emit(row)
                    continue
                from .baselines import _flex_fns

                flex, cbm = _flex_fns(True)
                if is_hash:
                    _FLEX.kb, _FLEX.qb, _FLEX.start, _FLEX.group = kb.contiguous(), qb.contiguous(), L - W, H // Hkv
                    mask = cbm(_flex_hash_window, B, H, 1, L, device=device)
                    spec = (lambda: flex(q, k, v, block_mask=mask, **gqa), hash_mask, False)
                else:
                    spec = (lambda: flex(q, k, v, **gqa), None, False)
            fn, allowed, interp = spec
            with torch.no_grad():
                out = fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if args.check:
                    if allowed is None:
                        if ref_dense is None:
                            ref_dense = _reference(q[:1], k[:1], v[:1], None)
                        want = ref_dense
                    else:
                        want = _reference(q[:1], k[:1], v[:1], allowed)
                    row["check_rel_err"] = _rel_err(out[:1], want)
                del out
            row["keys_read"] = float(allowed.sum(-1).double().mean()) if allowed is not None else float(L)
            row["setup_s"] = round(setup + time.perf_counter() - t1, 2)
            if args.check and not row["check_rel_err"] < tol:
                row.update(status="error", error=f"check failed: rel err {row['check_rel_err']:.3g} >= tol {tol:g}")
            else:
                with torch.no_grad():
                    _time_row(row, fn, args, device, interp)
        except Exception as e:  # noqa: BLE001  (one failing row, e.g. Flex, must not cost the others)
            row.update(status="error", error=_err(e), ms_per_token=None)
            _free(device)
        emit(row)
    _FLEX.kb = _FLEX.qb = None
    fns = spec = fn = cache = k = v = q = None  # (closures hold them: drop before freeing the memory)
    _free(device)


# --------------------------------------------------------------------------------------
# Model scope
# --------------------------------------------------------------------------------------


def layer_case(context: int, batch: int, *, heads: int, head_dim: int, buckets: int, device: torch.device,
               dtype: torch.dtype = torch.bfloat16):
    """The tools' one-layer case (``tools/decode_sweep.py``, ``tools/decode_profile.py``): a new
    query ``(batch, heads, 1, head_dim)``, a full :class:`~sparseflash.nn.KVCache` of ``context``
    random keys and values with uniform random buckets, and the query's buckets ``(batch, heads)``,
    drawn from a generator seeded ``context + batch``.  Returns ``(q, cache, q_buckets)``."""
    from ..nn import KVCache

    B, H, D, L = batch, heads, head_dim, context
    g = torch.Generator(device=device).manual_seed(L + B)
    q = torch.randn(B, H, 1, D, device=device, dtype=dtype, generator=g)
    cache = KVCache(L, kernel=True)
    cache.append(torch.randn(B, H, L, D, device=device, dtype=dtype, generator=g),
                 torch.randn(B, H, L, D, device=device, dtype=dtype, generator=g),
                 torch.randint(0, buckets, (B, H, L), device=device, generator=g), n_buckets=buckets)
    return q, cache, torch.randint(0, buckets, (B, H), device=device, generator=g)


def model_step(name: str, *, context: int, batch: int, heads: int, kv_heads: int, width: int, layers: int,
               buckets: int, window: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """One decode step of a random-weight GPT with attention ``name`` (sdpa, dense, hash) over
    caches of ``context`` random keys and values (hash: bucketed by each layer's own LSH), as a
    function that resets the caches to ``context`` rows and returns the step's logits (so it
    can be called again and again, or captured in a CUDA graph)."""
    from ..nn import KVCache
    from ..train.model import GPT, GPTConfig

    is_hash = name == "hash"
    torch.manual_seed(seed)
    cfg = GPTConfig(n_layer=layers, n_head=heads, n_embd=width, n_kv_heads=kv_heads, attention=name,
                    n_buckets=buckets, window=window if is_hash else None)
    model = GPT(cfg).to(device=device, dtype=dtype).eval()
    D = width // heads
    g = torch.Generator(device=device).manual_seed(seed + context + batch)
    caches = []
    with torch.no_grad():
        for block in model.blocks:
            # kernel=True on the CPU too, so that --quick runs our kernels (interpreted) there
            cache = KVCache(context + 1, kernel=True)
            k = torch.randn(batch, kv_heads, context, D, device=device, dtype=dtype, generator=g)
            v = torch.randn(batch, kv_heads, context, D, device=device, dtype=dtype, generator=g)
            if is_hash:  # the layer's own LSH of the keys: its own bucket balance
                cache.append(k, v, block.attn._buckets(k), n_buckets=buckets)
            else:
                cache.append(k, v)
            caches.append(cache)
            del k, v
    counts = saved = None
    if is_hash:  # one tensor of every layer's counts, so that one copy restores them all
        counts = torch.stack([c.bucket_count for c in caches])
        for i, c in enumerate(caches):
            c.bucket_count = counts[i]
        saved = counts.clone()
    token = torch.randint(0, cfg.vocab_size, (batch, 1), device=device, generator=g)

    @torch.no_grad()
    def step():
        for c in caches:
            c.length = context
        if counts is not None:
            counts.copy_(saved)
        return model._forward_cached(token, caches)

    return step


def model_rows(args, device, context: int, batch: int, emit) -> None:
    """One decode step of a random-weight GPT per selected attention (sdpa, dense, hash)."""
    dtype = DTYPES[args.dtype]
    interpreted = device.type != "cuda" and bool(_runtime.INTERPRET)
    for name in (a for a in MODEL_ATTENTIONS if a in args.attentions):
        is_hash = name == "hash"
        row = dict(scope="model", attention=name, n_buckets=args.buckets if is_hash else None,
                   window=args.window if is_hash else 0, context=context, batch=batch, ms_per_token=None,
                   ms_per_token_eager=None, status="ok", error=None, timer=None)
        t0 = time.perf_counter()
        step = None
        try:
            step = model_step(name, context=context, batch=batch, heads=args.heads, kv_heads=args.kv_heads,
                              width=args.model_width, layers=args.model_layers, buckets=args.buckets,
                              window=args.window, dtype=dtype, device=device, seed=args.seed)
            logits = step()
            if not torch.isfinite(logits.float()).all():
                raise RuntimeError("non-finite logits")
            row["setup_s"] = round(time.perf_counter() - t0, 2)
            _time_row(row, step, args, device, interpreted and name != "sdpa")
        except Exception as e:  # noqa: BLE001
            row.update(status="error", error=_err(e), ms_per_token=None)
        step = None
        _free(device)
        emit(row)


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def default_out(dev_name: str, device_type: str, interpreter: bool, quick: bool) -> Path:
    """``results/decode_<device slug>.json`` (``results/quick/...`` for ``--quick``)."""
    folder = Path("results") / "quick" if quick else Path("results")
    return folder / f"decode_{device_slug(dev_name, device_type, interpreter)}.json"


def add_speedups(rows: list[dict]) -> None:
    """``speedup_vs_sdpa`` of every row from the sdpa row of its scope, context and batch."""
    base = {(r["scope"], r["context"], r["batch"]): r["ms_per_token"] for r in rows
            if r["attention"] == "sdpa" and r["status"] == "ok" and r["ms_per_token"]}
    for r in rows:
        b = base.get((r["scope"], r["context"], r["batch"]))
        r["speedup_vs_sdpa"] = b / r["ms_per_token"] if b and r["status"] == "ok" and r["ms_per_token"] else None


def write(path: Path, meta: dict, rows: list[dict]) -> None:
    """``{"meta", "rows"}`` JSON and a CSV of the rows, each through a temporary name and a rename."""
    add_speedups(rows)
    fields = list(ROW_FIELDS)
    for r in rows:
        fields += [k for k in r if k not in fields]
    clean = [{k: _clean(r.get(k)) for k in fields} for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": clean}, indent=1, default=str))
    os.replace(tmp, path)
    csv_path = path.with_suffix(".csv")
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in clean:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    os.replace(tmp, csv_path)


def make_meta(args, device: torch.device, argv) -> dict:
    import triton

    from .. import __version__

    dev_name = device_name(device)
    info = {"name": dev_name, "type": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(capability=list(torch.cuda.get_device_capability(device)),
                    multiprocessors=props.multi_processor_count, total_memory_gb=round(props.total_memory / 2**30, 1))
    notes = [
        "ms_per_token: one call (layer) or one model step (model) decoding one token for each of the batch "
        "sequences at once.",
        "layer hash rows: bucket ids uniform at random for keys and queries (balanced buckets); the kernel reads "
        "the window tail as a contiguous range and the query bucket's row list of the cache's bucket index in "
        "place (decode_attention with list_id), so its work is about window + context / n_buckets keys.",
        "sdpa: F.scaled_dot_product_attention(q, k_cache, v_cache) with one query, PyTorch's default backend "
        "choice, over the whole cache.",
        "flex_*: torch.compile(flex_attention) with one query; flex_hash's block mask (same bucket or among the "
        "window most recent keys) is built once outside the timing; compiled anew for every (context, batch).",
        "model rows: GPT with random weights in the given dtype; caches filled with random keys and values (hash: "
        "bucketed by each layer's own LSH rotations), not by a prefill; each timed step resets the caches to "
        "`context` rows (hash: plus one copy of all layers' bucket counts, a few KB).",
        "model rows, dense and hash: a layer's step rotates the new query and key, writes the cache's rows and (hash) "
        "buckets and indexes the key in one launch (sparseflash.decode_append); the sdpa model does the same "
        "work in PyTorch operations (rotary table and rotation, row copies).",
    ]
    if _runtime.INTERPRET:
        notes.insert(0, "INTERPRETER RUN: our kernels ran in Triton's interpreter on the CPU; not GPU timings.")
    return {
        "schema": SCHEMA, "device": dev_name, "device_info": info, "torch": torch.__version__,
        "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "sparseflash": __version__, "git_commit": _git_commit(), "host": socket.gethostname(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": [sys.executable, "-m", "sparseflash.bench.decode", *argv],
        "dtype": args.dtype, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
        "n_buckets": args.buckets, "window": args.window,
        "model": {"n_layer": args.model_layers, "n_embd": args.model_width, "n_head": args.heads,
                  "n_kv_heads": args.kv_heads, "head_dim": args.model_width // args.heads},
        "bucket_source": {"layer": "uniform random ids", "model": "the model's own LSH of random keys"},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "interpreter": bool(_runtime.INTERPRET), "complete": False, "fields": ROW_FIELDS, "notes": notes,
    }


def summary(rows: list[dict]) -> str:
    """One line per (scope, context, batch): ms per token and speedup over SDPA of each attention."""
    lines = []
    keys = sorted({(r["scope"], r["context"], r["batch"]) for r in rows}, key=lambda t: (t[0] != "layer", t[1], t[2]))
    for scope, ctx, batch in keys:
        cells = []
        for r in rows:
            if (r["scope"], r["context"], r["batch"]) == (scope, ctx, batch):
                if r["status"] == "ok":
                    sp = r.get("speedup_vs_sdpa")
                    cells.append(f"{r['attention']} {r['ms_per_token']:.4f}" + (f" ({sp:.2f}x)" if sp else ""))
                else:
                    cells.append(f"{r['attention']} {r['status']}")
        lines.append(f"{scope:5s} ctx={ctx:<6d} B={batch:<2d} | " + " | ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = open_device(args.device)
    if device is None:
        return 2
    from tqdm.auto import tqdm

    meta = make_meta(args, device, argv)
    out = args.out if args.out is not None else default_out(meta["device"], device.type, meta["interpreter"],
                                                             args.quick)
    out = Path(out)
    meta["config"]["out"] = str(out)
    if out.exists():  # never destroyed: keep the earlier run beside the new one
        for p in (out, out.with_suffix(".csv")):
            if p.exists():
                dest = backup_path(p)
                os.replace(p, dest)
                print(f"note: moved the existing {p} to {dest}", flush=True)
    configs = [(s, c, b) for s in ("layer", "model") if s in args.scopes for c in args.contexts for b in args.batches]
    print(f"sparseflash.bench.decode on {meta['device']} | torch {meta['torch']} triton {meta['triton']} | "
          f"H={args.heads} Hkv={args.kv_heads} D={args.head_dim} {args.dtype} | hash {args.buckets} ∪ w{args.window} "
          f"| contexts {args.contexts} batches {args.batches} -> {out}", flush=True)
    total = sum(len(args.attentions) if s == "layer" else len([a for a in MODEL_ATTENTIONS if a in args.attentions])
                for s, _, _ in configs)
    pbar = tqdm(total=total, desc="decode", unit="row", disable=args.no_progress, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10.0)
    rows: list[dict] = []
    t_start = time.perf_counter()

    def emit(row: dict) -> None:
        row["device"] = meta["device"]
        rows.append(row)
        add_speedups(rows)
        ms = f"{row['ms_per_token']:.4f} ms" if row["ms_per_token"] else row["status"]
        sp = f" ({row['speedup_vs_sdpa']:.2f}x sdpa)" if row.get("speedup_vs_sdpa") else ""
        why = f": {row['error']}" if row["error"] else ""
        tqdm.write(f"{row['scope']} ctx={row['context']} B={row['batch']} {row['attention']}: {ms}{sp}{why}",
                   file=sys.stderr)
        pbar.update(1)
        meta["wall_s"] = round(time.perf_counter() - t_start, 1)
        try:
            write(out, meta, rows)
        except Exception as e:  # noqa: BLE001
            tqdm.write(f"warning: could not write {out}: {_err(e)}", file=sys.stderr)

    try:
        for scope, context, batch in configs:
            pbar.set_postfix_str(f"{scope} ctx={context} B={batch}")
            (layer_rows if scope == "layer" else model_rows)(args, device, context, batch, emit)
        meta["complete"] = True
    except KeyboardInterrupt:
        tqdm.write("interrupted: rows so far are saved", file=sys.stderr)
    finally:
        pbar.close()
        meta["wall_s"] = round(time.perf_counter() - t_start, 1)
        write(out, meta, rows)
    print(summary(rows))
    print(f"\n{'COMPLETE' if meta['complete'] else 'INCOMPLETE'}: {len(rows)} rows in {out} and "
          f"{out.with_suffix('.csv')} ({meta['wall_s']} s)", flush=True)
    return 0 if meta["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
