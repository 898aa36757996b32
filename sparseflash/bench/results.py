"""Result files: ``{"meta": {...}, "rows": [...]}`` JSON and a CSV of the rows beside it.

A result file is never destroyed:

* the default file is named for the device (:func:`default_out`): ``results/h100.json``
  on an "NVIDIA H100 80GB HBM3", ``results/cpu-interpreter.json`` on a CPU, so a run on
  another machine does not land on the committed numbers;
* an existing file is *extended* when it is compatible (:func:`differences`: same
  device name, torch and triton versions, interpreter or not, and the settings that
  change what a row means): rows of the configurations and variants measured now
  replace theirs, every other row is kept;
* otherwise the run is refused (:class:`Refused`, naming the difference) unless
  ``--force``, which moves the old JSON and CSV to timestamped backups
  (``<name>.bak-<UTC time>``, not ``*.json``, so ``sparseflash.figures`` does not read
  them) and starts a new file.

Both files are rewritten (to a temporary name, then renamed) after every variant,
so a run cut short keeps what it measured.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import re
import socket
import sys
from pathlib import Path

import torch

from .. import _runtime
from .._provenance import git_commit as _git_commit
from .patterns import fmt_param
from .timing import CPU_TIMER, GPU_TIMER, INTERPRETER_TIMER
from .variants import KINDS

SCHEMA = "sparseflash.bench/1"
MODES = ("fwd", "fwd+bwd", "bwd")
BASELINES = ("sdpa_flash", "sdpa_cudnn", "ours_dense")  # ratio columns, plus flex_kernel

#: Columns of a row (CSV order).  ``None`` in JSON / empty in CSV = not applicable or not measured.
ROW_FIELDS = {
    "variant": "full name, e.g. ours_qk_0.3, flex_kernel_hash_16, ours_hash_16_w256, ours_window_256, sdpa_flash",
    "kind": "variant without its parameter: one of " + ", ".join(KINDS),
    "impl": "ours | sdpa | flex | naive",
    "family": "dense | qk | hash | window (the attention pattern; hash ∪ window unions are hash with window > 0)",
    "param": "keep rate (qk), number of buckets (hash), window size W (window), null (dense)",
    "window": "sliding window W: window rows, and hash rows of the union 'hash buckets ∪ window' "
              "(pair allowed iff j <= i and same bucket or i - j < W); 0 for every other row",
    "pattern": "name of the attention pattern: dense, qk_0.3, hash_16, hash_16_w256, window_256 "
               "(the variant is <impl prefix>_<pattern> for sparse rows)",
    "seq_len": "N", "B": "batch", "H": "heads", "D": "head dim", "dtype": "bf16 | fp16 | fp32",
    "device": "GPU (or CPU) name, as meta.device",
    "mode": "fwd | fwd+bwd | bwd",
    "status": "ok | error | skipped",
    "error": "why the row has no time (error message or skip reason); null when ok",
    "ms": "median time in milliseconds",
    "timer": f"{GPU_TIMER} (CUDA events) | {INTERPRETER_TIMER} (CPU, our kernels in Triton's interpreter) | "
             f"{CPU_TIMER} (CPU, PyTorch); only {GPU_TIMER} rows are GPU timings",
    "kernel_ms": "GPU busy time per call (union of its kernels' intervals, torch.profiler; --kernel-time only): "
                 "ms / kernel_ms >> 1 means launch- or host-bound",
    "graph_ms": "CUDA only (--graph-time): median time of the call captured once in a CUDA graph and replayed "
                "(triton.do_bench over replays): the GPU's time, gaps between kernels included, without the host's "
                "Python and launch costs, as a model compiled with mode='reduce-overhead' pays",
    "graph_speedup_vs_sdpa_flash": "graph_ms(sdpa_flash) / graph_ms, same config and mode (--graph-time only)",
    "graph_speedup_vs_sdpa_cudnn": "graph_ms(sdpa_cudnn) / graph_ms (--graph-time only)",
    "host_bound_ratio": "ms / kernel_ms (--kernel-time only): about 1 when the GPU is busy all the time, "
                        "well above 1 when it waits for the host (launches, Python, synchronisations)",
    "peak_mem_gb": "CUDA only: torch.cuda.max_memory_allocated over one call after reset_peak_memory_stats, "
                   "GiB (inputs q, k, v, grad and outputs/gradients included)",
    "tflops": "effective dense-causal FLOPs / time, in TFLOP/s (same FLOP count for every variant)",
    "check_rel_err": "relative error of the output against the float64 reference",
    "check_rel_err_dq": "relative error of dq (backward modes only)",
    "pair_density": "allowed (query, key) pairs / dense causal pairs, for this pattern",
    "computed_tile_fraction": "tiles computed / tiles the same implementation computes for dense causal "
                              "(ours: forward TileRecord of the kernel, as tile areas BLOCK_M×BLOCK_N so that "
                              "other tile sizes compare; a union adds its far part and its band; flex: "
                              "block-mask blocks)",
    "schedule_tile_fraction": "the same predicted by sparseflash.tiles' schedules for the first (batch, head), "
                              "at the sparse kernels' tile sizes (union: hash_schedule(window=W) + "
                              "flash_schedule(window=W); N <= 4096 only: they build the N×N mask)",
    "speedup_vs_sdpa_flash": "ms(sdpa_flash) / ms, same config (B, H, D, N, dtype) and mode (>1: faster)",
    "speedup_vs_sdpa_cudnn": "ms(sdpa_cudnn) / ms",
    "speedup_vs_ours_dense": "ms(ours_dense) / ms",
    "speedup_vs_flex_kernel": "ms(flex kernel of the same pattern: flex_kernel_<pattern>, e.g. "
                              "flex_kernel_hash_16_w256, or flex_dense for dense rows) / ms",
    "tile_efficiency": "sparse rows: ms(dense of the same impl) × computed_tile_fraction / ms; 1 = time "
                       "shrinks exactly with the computed tiles, < 1 = overheads (layout, gathers, tables)",
    "config": "B{B}_H{H}_D{D}_N{N}_{dtype}: the unit of --resume",
    "setup_s": "seconds spent building the variant and checking it (includes compilation)",
    "time_s": "seconds spent timing this row",
    "measured_at": "meta.date of the invocation that measured this row (rows of one file may come from "
                   "several invocations: meta.previous_invocations); null in files written before it existed",
}

#: meta keys that must agree for a file to be extended.
COMPAT_META = ("schema", "device", "torch", "triton", "interpreter")
#: meta.config keys (flags) that change what a row means or how it was timed, so must agree too.
COMPAT_CONFIG = ("bucket_source", "flex_compile", "warmup", "rep")


class Refused(Exception):
    """The output file exists and may not be extended by this run (the message says why and what to do)."""


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


def config_key(B, H, D, N, dtype) -> str:
    return f"B{B}_H{H}_D{D}_N{N}_{dtype}"


def row_key(r: dict) -> tuple:
    """What a row measures: ``(config, variant, mode)``; one row per key in a file."""
    return r.get("config"), r.get("variant"), r.get("mode")


# --------------------------------------------------------------------------------------
# File names
# --------------------------------------------------------------------------------------

_VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro", "amd", "radeon", "instinct", "graphics", "corporation"}


def device_slug(name: str, device_type: str = "cuda", interpreter: bool = False) -> str:
    """Short file name of a device: ``"NVIDIA H100 80GB HBM3"`` -> ``h100``, ``"NVIDIA H100 PCIe"`` ->
    ``h100-pcie``, ``"NVIDIA A100-SXM4-80GB"`` -> ``a100-sxm4``, ``"NVIDIA GeForce RTX 4090"`` ->
    ``rtx-4090``; any CPU -> ``cpu-interpreter`` (our kernels in Triton's interpreter) or ``cpu``.

    Vendor words, memory sizes (``80gb``) and memory types (``hbm3``) are dropped;
    form factors (``pcie``, ``sxm4``, ``nvl``) are kept, since they run at other speeds.
    """
    if device_type != "cuda":
        return "cpu-interpreter" if interpreter else "cpu"
    words = [w for w in re.split(r"[^0-9a-z]+", str(name).lower()) if w]
    keep = [w for w in words if w not in _VENDOR_WORDS and not re.fullmatch(r"\d+gb|hbm\d*e?|gddr\d*x?", w)]
    return "-".join(keep) or "gpu"


def default_out(device_name: str, device_type: str = "cuda", interpreter: bool = False, quick: bool = False,
                folder: Path | str = "results") -> Path:
    """``results/<device_slug>.json`` (``results/quick/<slug>.json`` for ``--quick`` smoke runs, out of
    the way of ``sparseflash.figures``, which reads ``results/*.json``)."""
    folder = Path(folder) / "quick" if quick else Path(folder)
    return folder / f"{device_slug(device_name, device_type, interpreter)}.json"


def backup_path(path: Path) -> Path:
    """``<name>.bak-<UTC time>`` beside ``path`` (a free name; not ``*.json``)."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    cand, i = path.with_name(f"{path.name}.bak-{stamp}"), 1
    while cand.exists():
        cand, i = path.with_name(f"{path.name}.bak-{stamp}-{i}"), i + 1
    return cand


# --------------------------------------------------------------------------------------
# Opening an existing file: extend, refuse, or back up
# --------------------------------------------------------------------------------------


def differences(old: dict, new: dict) -> list[str]:
    """Why a file with meta ``old`` may not be extended by a run with meta ``new`` (empty: it may).

    Compared: :data:`COMPAT_META` and the flags :data:`COMPAT_CONFIG` (a key absent from
    ``old`` for ``interpreter`` and the flags, as in files written before they existed, is
    not compared).
    """
    diffs = []
    for key in COMPAT_META:
        if key == "interpreter" and key not in old:
            continue
        if old.get(key) != new.get(key):
            diffs.append(f"{key}: file has {old.get(key)!r}, this run {new.get(key)!r}")
    old_cfg, new_cfg = old.get("config") or {}, new.get("config") or {}
    for key in COMPAT_CONFIG:
        if key in old_cfg and old_cfg.get(key) != new_cfg.get(key):
            diffs.append(f"--{key.replace('_', '-')}: file has {old_cfg.get(key)!r}, this run {new_cfg.get(key)!r}")
    return diffs


def _invocation(meta: dict) -> dict:
    return {k: meta.get(k) for k in ("date", "argv", "wall_s", "completed_configs", "git_commit")}


def open_results(path: Path, meta: dict, *, force: bool = False, log=print) -> list[dict]:
    """Rows of an existing ``path`` to keep, after checking that this run may extend it.

    Returns ``[]`` when there is no file, or with ``force`` (the old JSON and CSV are then
    moved to :func:`backup_path` names, recorded in ``meta["replaced_file_backup"]``).  When a
    file is extended, ``meta["completed_configs"]`` starts from the file's and
    ``meta["previous_invocations"]`` lists the earlier calls.  Raises :class:`Refused` when
    the file cannot be read or :func:`differences` finds a difference (and not ``force``).
    """
    path = Path(path)
    csv_path = path.with_suffix(".csv")
    if force and path.exists():
        moved = []
        for p in (path, csv_path):
            if p.exists():
                dest = backup_path(p)
                os.replace(p, dest)
                moved.append(str(dest))
        meta["replaced_file_backup"] = moved
        log(f"--force: moved the existing {path} to {moved[0]}" + (f" (and {moved[1]})" if len(moved) > 1 else "")
            + "; starting a new file")
        return []
    if not path.exists():
        if csv_path.exists():  # a CSV without its JSON: keep it aside rather than overwrite it
            dest = backup_path(csv_path)
            os.replace(csv_path, dest)
            log(f"note: {csv_path} had no {path.name} beside it; moved to {dest}")
        return []
    own = default_out(meta.get("device", ""), (meta.get("device_info") or {}).get("type", "cuda"),
                      bool(meta.get("interpreter")), bool((meta.get("config") or {}).get("quick")))
    hint = (f"Nothing was written. Pass another --out (the default for this device is {own}), or --force "
            f"to move {path} (and its CSV) to a timestamped backup and start a new file.")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise Refused(f"{path} exists but cannot be read as JSON ({_err(e)}). {hint}") from None
    if not (isinstance(data, dict) and isinstance(data.get("meta"), dict) and isinstance(data.get("rows"), list)):
        raise Refused(f"{path} exists but is not a sparseflash.bench result file ({{'meta', 'rows'}}). {hint}")
    old = data["meta"]
    diffs = differences(old, meta)
    if diffs:
        raise Refused(f"{path} holds {len(data['rows'])} rows measured on {old.get('device')} (torch "
                      f"{old.get('torch')}, triton {old.get('triton')}, {old.get('date')}); this run would add rows "
                      f"that do not compare with them:\n  " + "\n  ".join(diffs) + f"\n{hint}")
    rows = [r for r in data["rows"] if isinstance(r, dict)]
    done = set(old.get("completed_configs") or [])
    meta["completed_configs"] = sorted(done)
    meta["previous_invocations"] = list(old.get("previous_invocations") or []) + [_invocation(old)]
    return rows


def merge_rows(kept: list[dict], new: list[dict]) -> list[dict]:
    """``kept`` in its order with each row that ``new`` re-measured (same :func:`row_key`) replaced,
    then the rows of ``new`` that are new to the file."""
    fresh = {row_key(r): r for r in new}
    out, used = [], set()
    for r in kept:
        key = row_key(r)
        if key in fresh:
            if key not in used:
                out.append(fresh[key])
                used.add(key)
        else:
            out.append(r)
    out += [r for r in new if row_key(r) not in used]
    return out


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def add_ratios(rows: list[dict]) -> None:
    """Fill speedup_*, graph_speedup_*, tile_efficiency and host_bound_ratio from rows of the same
    configuration and mode."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.get("config"), r.get("mode")), {})[r.get("variant")] = r
    for by_name in groups.values():
        def ms_of(name, key="ms"):
            r = by_name.get(name)
            return r[key] if r is not None and r.get("status") == "ok" and r.get(key) else None

        for r in by_name.values():
            ms = r.get("ms") if r.get("status") == "ok" else None
            for base in BASELINES:
                b = ms_of(base)
                r[f"speedup_vs_{base}"] = (b / ms) if (b and ms) else None
            g_ms = r.get("graph_ms") if r.get("status") == "ok" else None
            for base in ("sdpa_flash", "sdpa_cudnn"):
                b = ms_of(base, "graph_ms")
                r[f"graph_speedup_vs_{base}"] = (b / g_ms) if (b and g_ms) else None
            if r.get("family") == "dense":
                flex_name = "flex_dense"
            elif r.get("pattern"):
                flex_name = f"flex_kernel_{r['pattern']}"
            else:  # rows written before the pattern field (no windows then)
                flex_name = f"flex_kernel_{r.get('family')}_{fmt_param(r.get('param'))}"
            b = ms_of(flex_name)
            r["speedup_vs_flex_kernel"] = (b / ms) if (b and ms) else None
            eff = None
            frac = r.get("computed_tile_fraction")
            if ms and frac is not None and r.get("family") != "dense":
                dense = {"ours": "ours_dense", "flex": "flex_dense"}.get(r.get("impl"))
                d = ms_of(dense) if dense else None
                if d:
                    eff = d * frac / ms
            r["tile_efficiency"] = eff
            k_ms = r.get("kernel_ms")
            r["host_bound_ratio"] = (ms / k_ms) if (ms and k_ms) else None


def _ordered_fields(rows: list[dict]) -> list[str]:
    names = list(ROW_FIELDS)
    for r in rows:
        for key in r:
            if key not in names and not key.startswith("_"):
                names.append(key)
    return names


def write_results(path: Path, meta: dict, rows: list[dict]) -> None:
    """Write ``{"meta", "rows"}`` to ``path`` and the rows to ``path.with_suffix('.csv')``, each
    through a temporary file and a rename (a crash leaves the previous version)."""
    add_ratios(rows)
    path = Path(path)
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


def device_name(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` on CUDA; the processor (or machine) name on CPU."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_name(index)
    return platform.processor() or platform.machine()


def make_meta(args, device: torch.device, argv=None) -> dict:
    """The ``meta`` of a run: device, versions, date, command (``argv``: its flags), every flag."""
    import triton

    from .. import __version__

    dev_name = device_name(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        dev_info = {"name": dev_name, "type": "cuda", "index": index}
        try:
            props = torch.cuda.get_device_properties(index)
            dev_info.update(capability=list(torch.cuda.get_device_capability(index)),
                            total_memory_gb=round(props.total_memory / 2**30, 1),
                            multiprocessors=props.multi_processor_count)
        except Exception:  # noqa: BLE001
            pass
    else:
        dev_info = {"name": dev_name, "type": device.type, "cores": os.cpu_count()}
    interpreter = bool(_runtime.INTERPRET)
    notes = [
        "FLOPs: every row counts the dense causal problem (fwd 4*B*H*N^2*D/2, bwd 2.5x, fwd+bwd 3.5x), "
        "so TFLOP/s is an effective rate, comparable across variants.",
        "Sparse rows are end to end: our public functions include compaction/sort, gathers, tile tables "
        "and the scatter back; generating keep masks / bucket ids is excluded (the model provides them).",
        "flex_kernel_*: layout and block mask built once outside the timed region; gather + kernel + "
        "scatter timed. flex_e2e_*: layout + compiled create_block_mask + gather + kernel + scatter timed.",
        "Keep masks: random_keep per (batch, head), independently for queries and keys. Buckets: "
        + ("uniform random ids per token (the balanced case)" if args.bucket_source == "random"
           else "lsh_buckets of the random q and k (seed fixed)") + "; ours_hash_<n> passes n_buckets=n; ours_hash_<n>_default is the call without optional arguments (the layout's default bucket budget).",
        "Sliding windows (--windows W): ours_window_<W> is flash_attention(causal=True, window=W); "
        "ours_hash_<n>_w<W> is hash_sparse_attention(..., n_buckets=n, window=W), the union 'same bucket "
        "or i - j < W' (causal), with the same bucket ids as ours_hash_<n>. FlexAttention runs both in "
        "natural token order (no bucket sort, no gather/scatter: sorting would put window pairs in every "
        "block), mask_mod kv <= q & (qb[q] == kb[kv] | q - kv < W); the window alone has one block mask "
        "for all heads.",
        "Ratios compare rows of the same config (B, H, D, N, dtype) and mode; within one invocation they "
        "are measured back to back in one process (measured_at tells the invocation of each row).",
    ]
    if interpreter:
        notes.insert(0, "INTERPRETER RUN: our kernels ran in Triton's interpreter on the CPU; times are not GPU "
                        "timings and sparseflash.figures does not draw them.")
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
        "argv": [sys.executable, "-m", "sparseflash.bench", *(sys.argv[1:] if argv is None else argv)],
        "config": {k: v for k, v in vars(args).items()},
        "interpreter": interpreter,
        "complete": False,
        "completed_configs": [],
        "fields": ROW_FIELDS,
        "notes": notes,
    }
