"""One configuration ``(B, H, D, N, dtype)``: build, check and time every selected variant × mode.

Correctness first: before a variant is timed its output (and ``dq`` when a backward
mode is asked for) on the full-size inputs is compared with a float64 reference on a
few (batch, head) slices (``(0, 0)``, ``(0, 1)``, ``(B-1, H-1)``), computed query chunk
by query chunk so that it fits in memory at any ``N``.  Relative error
``‖x - ref‖ / ‖ref‖`` must be below ``--tol`` (default 2e-2 for bf16/fp16, 2e-3 for
fp32) and finite, else the variant is not timed and its rows carry the error.

FLOPs: every row uses the *effective* FLOPs of the dense causal problem, so that
TFLOP/s compare directly (a sparse variant that is 3× faster shows 3× the TFLOP/s).
"""
from __future__ import annotations

import time
import traceback
from typing import Callable

import torch

from .. import _runtime
from .baselines import _clear_flex_state
from .patterns import DTYPES, check_slices, dense_causal_flops, make_patterns, reference_slices, rel_err
from .results import _err, config_key
from .timing import _clear_grads, _free, time_mode
from .variants import all_variants, build_fn, measured_tile_fraction, schedule_tile_fraction, selected, skip_reason


def run_config(args, device, B, H, D, N, rows: list[dict], flush: Callable, pbar, log, dev_name: str = "",
               measured_at: str | None = None) -> None:
    """Check and time every selected variant × mode of one configuration, appending one row per
    (variant, mode) to ``rows`` and calling ``flush()`` after each variant."""
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
                    window=int(var.pattern.window), pattern=var.pattern.name, seq_len=N, B=B, H=H, D=D,
                    dtype=args.dtype, device=dev_name, config=key, measured_at=measured_at)
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
                        default = var.kind == "ours_hash_default"  # the layout's default bucket budget
                        info["computed_tile_fraction"] = pat.cache.setdefault(
                            "tiles_default" if default else "tiles",
                            measured_tile_fraction(pat, q, k, v, dense_tiles, default_call=default))
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
        interpreted = var.impl == "ours" and device.type != "cuda" and bool(_runtime.INTERPRET)
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
                    timing = time_mode(fn, mode, q, k, v, grad, device, args, interpreted=interpreted,
                                       log=lambda m: log(f"[{key} {var.name} {mode}] {m}"))
                    row.update(status="ok", error=None, **timing,
                               tflops=dense_causal_flops(B, H, N, D, mode) / (timing["ms"] * 1e-3) / 1e12)
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
    _clear_flex_state()
    _free(device)
