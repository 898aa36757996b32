"""``python -m sparseflash.bench``: flags, the loop over configurations, and the output file.

Run ``python -m sparseflash.bench --help`` for the flags; results/README.md for what is
measured and the row schema.  Typical H100 run::

    python -m sparseflash.bench --head-dim 64 128 --shapes 1x4x65536 1x4x131072 --resume --time-budget 420

(writes ``results/h100.json`` on an H100, extending it when it is there: see
:mod:`sparseflash.bench.results`).
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

from .patterns import DTYPES, parse_shape, pattern_stubs
from .report import summary_table
from .results import MODES, Refused, _err, config_key, default_out, make_meta, merge_rows, open_results, write_results
from .run import run_config
from .timing import _free, open_device
from .variants import KINDS, all_variants, selected

DEFAULT_SEQ_LENS = [1024, 2048, 4096, 8192, 16384]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sparseflash.bench",
        description="Time dense and sparse causal attention (ours, SDPA FlashAttention-2 / cuDNN, "
                    "FlexAttention, naive) after checking each against a float64 reference; "
                    "write JSON + CSV and print ratio tables. An existing output file is extended "
                    "(same device, torch and triton) or left alone (else; --force backs it up), never overwritten.",
        epilog="Example (H100): python -m sparseflash.bench --head-dim 64 128 --shapes 1x4x65536 1x4x131072 "
               "--resume --time-budget 420   (writes results/h100.json; repeat the same command until it prints "
               "COMPLETE). Variants: " + ", ".join(KINDS) + " (with _<rate> / _<buckets> / _<buckets>_w<W> / _<W> "
               "suffixes for the sparse ones).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--seq-lens", type=int, nargs="*", default=DEFAULT_SEQ_LENS,
                   help="sequence lengths N, each at --batch x --heads (none: only --shapes)")
    p.add_argument("--batch", type=int, default=2, help="batch size B of --seq-lens")
    p.add_argument("--heads", type=int, default=12, help="heads H of --seq-lens")
    p.add_argument("--shapes", type=parse_shape, nargs="+", default=[], metavar="BxHxN",
                   help="more configurations, each its own batch, heads and N (e.g. 1x4x65536 1x4x131072), "
                        "run after the --seq-lens ones, at every --head-dim")
    p.add_argument("--head-dim", type=int, nargs="+", default=[64], help="head dims D (one run each)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="input dtype")
    p.add_argument("--modes", nargs="+", choices=MODES, default=["fwd", "fwd+bwd"],
                   help="fwd (no_grad forward), fwd+bwd (forward + backward), bwd (backward of a retained graph)")
    p.add_argument("--keep-rates", type=float, nargs="+", default=[0.3, 0.5],
                   help="query/key keep rates of the qk-dropping variants")
    p.add_argument("--buckets", type=int, nargs="+", default=[8, 16],
                   help="bucket counts of the hash variants (passed as n_buckets=)")
    p.add_argument("--windows", type=int, nargs="*", default=[256], metavar="W",
                   help="sliding windows W: for each, the window alone (ours_window_<W>, flex_*_window_<W>) "
                        "and its union with each --buckets count (ours_hash_<n>_w<W>, flex_*_hash_<n>_w<W>: "
                        "same bucket or i - j < W); --windows with no value, or 0: none")
    p.add_argument("--bucket-source", choices=["random", "lsh"], default="random",
                   help="random: uniform random bucket ids (balanced, the paper's setting); "
                        "lsh: sparseflash.lsh_buckets of the random q and k")
    p.add_argument("--variants", nargs="+", default=None, metavar="PATTERN",
                   help="run only these variants: names or kinds, shell patterns allowed "
                        "(e.g. ours_dense 'sdpa_*' 'ours_qk*' flex_kernel_hash_16); default: all")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (a .csv with the same rows is written beside it); default "
                        "results/<device>.json, e.g. results/h100.json on an H100, results/cpu-interpreter.json "
                        "on a CPU (results/quick/<device>.json with --quick). An existing file is extended "
                        "when compatible, else left untouched (see --force)")
    p.add_argument("--force", action="store_true",
                   help="start a new --out file even if one exists (e.g. from another device or torch): the old "
                        "JSON and CSV are moved to <name>.bak-<UTC time>, never deleted")
    p.add_argument("--warmup", type=float, default=25, help="warm-up time in ms (do_bench's warmup)")
    p.add_argument("--rep", type=float, default=100, help="measuring time in ms (do_bench's rep)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="check output (and dq) against a float64 reference before timing; a failing "
                        "variant is not timed")
    p.add_argument("--tol", type=float, default=None,
                   help="relative-error tolerance of the check (default 2e-2 for bf16/fp16, 2e-3 for fp32)")
    p.add_argument("--kernel-time", action=argparse.BooleanOptionalAction, default=False,
                   help="also record kernel_ms, the GPU busy time of one call (torch.profiler), and "
                        "host_bound_ratio = ms / kernel_ms, to tell launch-bound rows (>> 1) from kernel-bound ones")
    p.add_argument("--graph-time", action=argparse.BooleanOptionalAction, default=False,
                   help="also record graph_ms (CUDA only): the call captured once in a CUDA graph and timed by its "
                        "replays, i.e. the GPU's time with the gaps between kernels but none of the host's Python, "
                        "as a model compiled with mode='reduce-overhead' replays it; and graph_speedup_vs_sdpa_*")
    p.add_argument("--naive-max-n", type=int, default=4096, help="run the naive variant only up to this N")
    p.add_argument("--flex-max-n", type=int, default=None,
                   help="run the FlexAttention variants only up to this N (default: every N; their compilation "
                        "takes minutes per N)")
    p.add_argument("--flex-compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile FlexAttention and create_block_mask (without it flex runs eager: "
                        "slow, for testing the harness only; on CPU that is the only way flex runs, fwd only)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: N=64 128, B=1, H=2, D=16, buckets 2 4, windows 16, warmup 1 ms, rep 5 ms "
                        "(for those of these flags not given)")
    p.add_argument("--device", default=None,
                   help="cuda, cuda:N or cpu; default cuda if available, else cpu (cpu: our kernels in "
                        "Triton's interpreter, timer interpreter-wallclock; for smoke tests)")
    p.add_argument("--seed", type=int, default=0, help="base seed of inputs, masks and buckets")
    p.add_argument("--resume", action="store_true",
                   help="skip the configurations already complete in --out and run only the others "
                        "(use the same flags); without it every asked configuration is measured again and "
                        "its rows replace the file's")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no new configuration after this many seconds (the file stays resumable)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:  # tiny sizes, for every one of these flags left at its default
        quick = dict(seq_lens=[64, 128], batch=1, heads=2, head_dim=[16], buckets=[2, 4], windows=[16],
                     warmup=1.0, rep=5.0)
        for name, value in quick.items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    if any(w < 0 for w in args.windows):
        p.error(f"--windows must be >= 0 (0: no window), got {args.windows}")
    if args.force and args.resume:
        p.error("--force starts a new file, --resume continues one: pass one of them")
    return args


def configurations(args) -> list[tuple[int, int, int, int]]:
    """``(B, H, D, N)`` to run, in order: ``--seq-lens`` at ``--batch x --heads`` N-major (both head
    dims of one N in a row, so that work compiled per N is shared), then ``--shapes``."""
    out = [(args.batch, args.heads, D, N) for N in args.seq_lens for D in args.head_dim]
    out += [(b, h, D, n) for b, h, n in args.shapes for D in args.head_dim]
    return list(dict.fromkeys(out))


def main(argv=None) -> int:
    args = parse_args(argv)
    device = open_device(args.device)
    if device is None:
        return 2
    from tqdm.auto import tqdm

    meta = make_meta(args, device, argv=sys.argv[1:] if argv is None else list(argv))
    out = Path(args.out) if args.out is not None else default_out(meta["device"], device.type,
                                                                   meta["interpreter"], args.quick)
    meta["config"]["out"] = str(out)
    configs = configurations(args)
    if not configs:
        print("error: nothing to run: --seq-lens is empty and no --shapes given", file=sys.stderr)
        return 2
    n_var = len([x for x in all_variants(args, pattern_stubs(args)) if selected(x, args.variants)])
    if n_var == 0:
        print(f"error: --variants {args.variants} selects nothing; kinds: {', '.join(KINDS)}", file=sys.stderr)
        return 2

    try:
        kept = open_results(out, meta, force=args.force, log=lambda m: print(m, flush=True))
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    done = set(meta["completed_configs"])
    if kept or done:
        print(f"{'resuming' if args.resume else 'extending'} {out}: {len(done)} configuration(s) done, "
              f"{len(kept)} rows kept", flush=True)
    todo = [c for c in configs if not (args.resume and config_key(*c, args.dtype) in done)]

    shapes = " ".join(f"{b}x{h}x{n}" for b, h, n in args.shapes)
    print(f"sparseflash.bench on {meta['device']} | torch {meta['torch']} triton {meta['triton']} "
          f"cuda {meta['cuda']} | D={args.head_dim} {args.dtype} modes={args.modes} | "
          + (f"B={args.batch} H={args.heads} N={args.seq_lens}" if args.seq_lens else "")
          + (f" shapes={shapes}" if shapes else "") + f" -> {out}", flush=True)
    if meta["interpreter"]:
        print("note: our kernels run in Triton's interpreter here: timer interpreter-wallclock, times are not "
              "GPU timings (sparseflash.figures leaves them out)", flush=True)
    pbar = tqdm(total=len(todo) * n_var * len(args.modes), desc="bench", unit="row",
                disable=args.no_progress, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 10.0)

    def log(msg: str) -> None:
        tqdm.write(msg, file=sys.stderr)

    rows: list[dict] = []  # measured by this invocation

    def all_rows() -> list[dict]:
        return merge_rows(kept, rows)

    def flush() -> None:
        try:
            write_results(out, meta, all_rows())
        except Exception as e:  # noqa: BLE001
            log(f"warning: could not write {out}: {_err(e)}")

    t_start = time.perf_counter()
    last_duration = 0.0
    stopped = False
    try:
        for B, H, D, N in todo:
            elapsed = time.perf_counter() - t_start
            if args.time_budget is not None and elapsed + 1.5 * last_duration > args.time_budget:
                stopped = True
                log(f"time budget: {elapsed:.0f}s used, stopping before B={B} H={H} D={D} N={N}")
                break
            t0 = time.perf_counter()
            pbar.set_postfix_str(f"B={B} H={H} D={D} N={N}")
            key = config_key(B, H, D, N, args.dtype)
            try:
                run_config(args, device, B, H, D, N, rows, flush, pbar, log, meta["device"], meta["date"])
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
        meta["complete"] = {config_key(B, H, D, N, args.dtype) for B, H, D, N in configs} <= set(
            meta["completed_configs"])
        meta["wall_s"] = round(time.perf_counter() - t_start, 1)
        flush()
    asked = {config_key(B, H, D, N, args.dtype) for B, H, D, N in configs}
    print(summary_table([r for r in all_rows() if r.get("config") in asked]))
    state = "COMPLETE" if meta["complete"] else "INCOMPLETE (run again with --resume to continue)"
    total = len(all_rows())
    print(f"\n{state}: {len(rows)} rows measured, {total} in {out} and {out.with_suffix('.csv')} "
          f"({meta['wall_s']} s)", flush=True)
    return 0 if (meta["complete"] or stopped) else 1


if __name__ == "__main__":
    sys.exit(main())
