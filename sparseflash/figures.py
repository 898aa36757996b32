"""Regenerate the committed figures: ``python -m sparseflash.figures --out figures/``.

Writes, on a CPU in a few seconds (no kernel runs: schedules are predicted in PyTorch
by :mod:`sparseflash.tiles`, which the tests check against the kernels):

- ``tile_maps.png``: dense causal, query/key dropping and hash buckets side by side,
  tiles in original coordinates (top) and in the kernel's layout (bottom);
- ``computed_fraction.png``: fraction of tiles computed against sequence length,
  keep rate and number of buckets;
- ``speed.png`` (head dim 64) and ``speed_d<D>.png`` (other head dims) of ``results/h100.json``,
  ``speed_<device>.png`` (and ``_d<D>``) of each other ``results/<device>.json``, only when
  ``results/*.json`` hold benchmark rows (written on a GPU by ``python -m sparseflash.bench``:
  ``{"meta": ..., "rows": [...]}``): speed-up over SDPA FlashAttention-2 against sequence
  length, per mode (rows) and pattern (columns: dense baselines, query/key dropping, hash
  buckets).  See :func:`speed_figure` for the keys it reads; rows without them, or not
  ``status == "ok"``, are left out with a printed note, and so are rows not timed on a GPU
  (files with ``meta.interpreter`` true, rows whose ``timer`` is ``interpreter-wallclock`` or
  ``cpu-wallclock``): interpreter timings are never drawn as GPU speed-ups.
- ``quality_<device>.png``, for each ``results/quality_<device>.json`` of ``tools/quality_ablation.py``
  (see :func:`quality_figure`): validation loss of sparse patterns against dense.
- ``train_speed.png`` and ``train_loss.png`` (of ``results/train_h200.json``; ``train_speed_<x>.png``,
  ``train_loss_<x>.png`` of each other ``train_<x>.json``), only when ``results/train_*.json`` hold rows of
  ``python -m sparseflash.train.experiment`` (see :func:`train_speed_figure` and
  :func:`train_loss_figure`): training step throughput per attention and sequence length,
  with the no-attention ceiling, and validation loss against steps and training time.
  These files are not benchmark records: :func:`load_results` leaves them out.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import matplotlib
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from . import tiles, viz

ROOT = Path(__file__).resolve().parent.parent
DPI = 110

#: Keys every speed record needs (``python -m sparseflash.bench`` rows have them).
SPEED_REQUIRED = ("variant", "seq_len", "ms", "speedup_vs_sdpa_flash")
#: Columns of the speed figure: family of the pattern, title.
SPEED_COLUMNS = (("dense", "dense baselines"), ("qk", "query/key dropping"), ("hash", "hash buckets"))
#: Lines of the dense column (SDPA FlashAttention-2 is the baseline; naive is left out): label, colour.
SPEED_DENSE = {"ours_dense": ("ours, dense", "C0"), "sdpa_cudnn": ("SDPA cuDNN", "C1"),
               "flex_dense": ("FlexAttention", "C2")}
#: Sparse variants, ``<impl>_<family>_<param>``, and the line style of each implementation.
SPARSE_VARIANT = re.compile(r"(ours|flex_kernel|flex_e2e)_(qk|hash)_([0-9.]+)")
#: Sliding-window variants, alone (``ours_window_256``) or in a union (``ours_hash_16_w256``):
#: ``<impl>_<pattern>``; drawn in a fourth column when there are any.
WINDOW_VARIANT = re.compile(r"(ours|flex_kernel|flex_e2e)_(window_\d+|hash_\d+_w\d+)")
WINDOW_COLUMN = ("window", "sliding window, hash ∪ window")
#: The result file whose speed figures keep the plain names (``speed.png``, ``speed_d<D>.png``);
#: those of other devices' files are ``speed_<file stem>.png``, ``speed_<file stem>_d<D>.png``.
PRIMARY_RESULTS = "h100"
SPEED_STYLES = {"ours": ("-", "ours"), "flex_kernel": ("--", "flex, kernel"), "flex_e2e": (":", "flex, end to end")}
SPEED_PARAM_COLORS = ("C3", "C4", "C5", "C6", "C8", "C9")
#: ``timer`` values of rows that are not GPU timings (``python -m sparseflash.bench`` on a CPU).
NON_GPU_TIMERS = ("interpreter-wallclock", "cpu-wallclock")
#: Result files of ``python -m sparseflash.train.experiment`` (drawn by the training figures only).
TRAIN_GLOB = "train_*.json"
#: Result files of ``tools/quality_ablation.py`` (validation loss of sparse patterns against dense).
QUALITY_GLOB = "quality_*.json"
#: Training configurations in drawing order, with their colours.
TRAIN_COLORS = {"sdpa": "C0", "sdpa_cudnn": "C1", "dense": "C2", "hash16": "C3", "hash32": "C4", "qk0.5": "C5",
                "qk0.3": "C6", "hash16w0": "C3", "hash16w128": "C9", "hash16w256": "C8", "none": "0.5"}

def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def tile_maps_figure(path=None, *, seq_len: int = 192, block: int = 16, keep_rate: float = 0.5, n_buckets: int = 4,
                     seed: int = 0):
    """The README picture: 2 rows (original coordinates, kernel layout) × 3 variants.

    Hash buckets are uniform random ids (:func:`sparseflash.tiles.example_inputs`).
    Returns the figure (saved to ``path`` if given).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(13, 9.6), constrained_layout=True)
    for col, kind in enumerate(tiles.KINDS):
        sched = tiles.schedule_for(kind, seq_len, block, keep_rate=keep_rate, n_buckets=n_buckets, seed=seed)
        viz.plot_tile_map(sched, coords="original", ax=axes[0, col], legend=False,
                          title=f"{viz.schedule_label(sched)}\noriginal coordinates")
        n, dense = int(sched.computed.sum()), sched.dense_causal_tiles
        empty = int((sched.state == tiles.EMPTY).sum())
        viz.plot_tile_map(sched, coords="layout", ax=axes[1, col], legend=False,
                          title=f"kernel layout: {n} of {dense} causal tiles computed\n"
                                f"({n / dense:.0%}{f', {empty} empty' if empty else ''}; "
                                f"ideal speed-up {sched.ideal_speedup:.1f}×)")
        for ax in axes[:, col]:
            ax.title.set_fontsize(10.5)
    fig.suptitle(f"Which {block}×{block} tiles the kernels compute (N = {seq_len}, one head)", fontsize=14)
    fig.legend(handles=viz.state_legend_handles(), loc="outside lower center", ncols=5, fontsize=10.5,
               frameon=False)
    if path is not None:
        fig.savefig(path, dpi=DPI)
    return fig


def computed_fraction_figure(path=None, *, seq_len: int = 4096, block: int = 64, seeds=(0, 1)):
    """Three panels: fraction of tiles computed against seq_len (of the full grid), keep
    rate and bucket count (of the dense causal tiles).  Returns the figure."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), constrained_layout=True)
    viz.plot_fraction("seq_len", values=[128, 256, 512, 1024, 2048, 4096], block=block, keep_rate=0.5,
                      n_buckets=8, seeds=seeds, ax=axes[0],
                      title=f"against sequence length ({block}×{block} tiles)")
    viz.plot_fraction("keep_rate", seq_len=seq_len, block=block, seeds=seeds, ax=axes[1],
                      title=f"query/key dropping (N = {seq_len})")
    viz.plot_fraction("n_buckets", values=[1, 2, 4, 6, 8, 12, 16, 24, 32], seq_len=seq_len, block=block,
                      seeds=seeds, ax=axes[2], title=f"hash buckets, random ids (N = {seq_len})")
    fig.suptitle("Fraction of tiles the kernels compute (predicted by sparseflash.tiles; "
                 f"mean of {len(seeds)} random patterns, band: their range)", fontsize=13)
    if path is not None:
        fig.savefig(path, dpi=DPI)
    return fig


# --------------------------------------------------------------------------------------
# Speed (from benchmark results)
# --------------------------------------------------------------------------------------


def load_results(folder) -> list[dict]:
    """All records of ``folder/*.json``.

    A file is ``{"meta": {...}, "rows": [...]}`` (what ``python -m sparseflash.bench``
    writes; ``meta["device"]`` is copied into rows without one, and rows of a file with
    ``meta["interpreter"]`` true get ``_interpreter: True``), a dict with a
    ``"records"`` / ``"results"`` list, a list of records, or one record.  Unreadable
    files are skipped with a note, and so are decode timings (schema
    ``sparseflash.bench.decode/1``), generated text (``sparseflash.samples/1``), training
    results (:data:`TRAIN_GLOB`, read by :func:`load_train_results`) and quality results
    (:data:`QUALITY_GLOB`, drawn by :func:`quality_figure`).
    """
    records: list[dict] = []
    for path in sorted(Path(folder).glob("*.json")):
        if path.match(TRAIN_GLOB) or path.match(QUALITY_GLOB):
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"figures: skipping {path}: {exc}")
            continue
        meta = {}
        if isinstance(data, dict):
            meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
            if str(meta.get("schema", "")).startswith(("sparseflash.bench.decode", "sparseflash.samples")):
                continue  # decode timings (results/decode_*.json), text samples: no kernel speed figure to draw
            for key in ("rows", "records", "results"):
                if isinstance(data.get(key), list):
                    data = data[key]
                    break
            else:
                data = [data]
        if not isinstance(data, list):
            print(f"figures: skipping {path}: expected a list of records")
            continue
        for r in data:
            if isinstance(r, dict):
                r = dict(r, _file=path.name)
                if r.get("device") is None and meta.get("device"):
                    r["device"] = meta["device"]
                if meta.get("interpreter"):
                    r["_interpreter"] = True
                records.append(r)
    return records


def _gpu_timed(r: dict) -> bool:
    """False for rows timed in Triton's interpreter or on the CPU (see :data:`NON_GPU_TIMERS`)."""
    return not r.get("_interpreter") and r.get("timer") not in NON_GPU_TIMERS


def _drop_non_gpu(records: list[dict]) -> list[dict]:
    """``records`` less those not timed on a GPU, saying how many were left out and from where."""
    gpu = [r for r in records if _gpu_timed(r)]
    if len(gpu) < len(records):
        files = sorted({str(r.get("_file")) for r in records if not _gpu_timed(r) and r.get("_file")})
        print(f"figures: skipping {len(records) - len(gpu)} result record(s) timed in Triton's interpreter or on "
              f"the CPU{' (' + ', '.join(files) + ')' if files else ''}: not GPU speed-ups")
    return gpu


def _usable(r: dict) -> bool:
    if r.get("status", "ok") != "ok" or not all(r.get(k) is not None for k in SPEED_REQUIRED):
        return False
    try:
        return float(r["ms"]) > 0 and int(r["seq_len"]) > 0 and float(r["speedup_vs_sdpa_flash"]) > 0
    except (TypeError, ValueError):
        return False


def _speed_line(ax, rows, variant, notes, **style):
    """Plot ``variant``'s speed-up against N; the last point of ``ours_*`` lines goes to ``notes``."""
    rs = sorted((r for r in rows if r["variant"] == variant), key=lambda r: int(r["seq_len"]))
    if rs:
        x, y = [int(r["seq_len"]) for r in rs], [float(r["speedup_vs_sdpa_flash"]) for r in rs]
        ax.plot(x, y, marker="o", ms=4, **style)
        if variant.startswith("ours_") and notes is not None:
            notes.append((x[-1], y[-1], style["color"]))


def _annotate(ax, notes, gap=1.2):
    """Write "5.1x" right of each point in ``notes``, nudged apart (log y) so that none overlap."""
    last = 0.0
    for x, y, color in sorted(notes, key=lambda n: n[1]):
        last = max(y, last * gap)
        ax.annotate(f"{y:.1f}x", (x, y), xytext=(x * 1.1, last), va="center", fontsize=9, color=color,
                    fontweight="bold")


def _speed_panel(ax, rows, family):
    """One panel: speed-up over SDPA FlashAttention-2 of one family's variants, with its legend."""
    notes = []
    if family == "dense":
        for name, (label, color) in SPEED_DENSE.items():
            _speed_line(ax, rows, name, notes, color=color, label=label)
        ax.legend(fontsize=9, loc="upper left")
    elif family == "window":
        _speed_line(ax, rows, "ours_dense", None, color="0.65", lw=1.2)
        pats = sorted({m[2] for r in rows if (m := WINDOW_VARIANT.fullmatch(str(r["variant"])))},
                      key=lambda p: (not p.startswith("window"), p))
        handles = [Line2D([], [], color="0.65", label="ours, dense")]
        for pat, color in zip(pats, SPEED_PARAM_COLORS):
            for impl, (ls, _) in SPEED_STYLES.items():
                _speed_line(ax, rows, f"{impl}_{pat}", notes, color=color, ls=ls)
            n, _, w = pat.partition("_w") if pat.startswith("hash") else ("", "", pat.split("_")[1])
            handles.append(Line2D([], [], color=color, label=f"{n.split('_')[1]} buckets ∪ window {w}"
                                  if n else f"window {w}"))
        handles += _style_handles(rows, [f"{{impl}}_{p}" for p in pats])
        ax.legend(handles=handles, fontsize=9, loc="upper left", ncols=2, columnspacing=1, handlelength=2.2)
    else:
        _speed_line(ax, rows, "ours_dense", None, color="0.65", lw=1.2)
        params = sorted({m[3] for r in rows if (m := SPARSE_VARIANT.fullmatch(str(r["variant"]))) and m[2] == family},
                        key=float)
        handles = [Line2D([], [], color="0.65", label="ours, dense")]
        for param, color in zip(params, SPEED_PARAM_COLORS):
            for impl, (ls, _) in SPEED_STYLES.items():
                _speed_line(ax, rows, f"{impl}_{family}_{param}", notes, color=color, ls=ls)
            handles.append(Line2D([], [], color=color, label=("keep " if family == "qk" else "buckets ") + param))
        handles += _style_handles(rows, [f"{{impl}}_{family}_{p}" for p in params])
        ax.legend(handles=handles, fontsize=9, loc="upper left", ncols=2, columnspacing=1, handlelength=2.2)
    _annotate(ax, notes)


def _style_handles(rows, templates: list[str]) -> list:
    """Legend entries of the line styles (ours, flex kernel, flex end to end) that some row of
    ``templates`` (variant names with ``{impl}``) draws: no entry for a line that is not there."""
    variants = {str(r["variant"]) for r in rows}
    return [Line2D([], [], color="k", ls=ls, label=label) for impl, (ls, label) in SPEED_STYLES.items()
            if any(t.format(impl=impl) in variants for t in templates)]


def _n_label(n: int) -> str:
    """``4096`` -> ``"4k"``, ``131072`` -> ``"128k"`` (long numbers overlap on a log axis)."""
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _values(rows, key) -> str:
    return "/".join(sorted({str(r[key]) for r in rows if r.get(key) is not None}))


def speed_figure(records: list[dict], path=None, *, head_dim=None):
    """The paper's speed plot with today's baselines, for one head dim.

    Speed-up over SDPA FlashAttention-2 (``speedup_vs_sdpa_flash``, log) against sequence
    length; rows: mode (fwd+bwd, fwd); columns: dense baselines (:data:`SPEED_DENSE`),
    query/key dropping and hash buckets (``ours_*`` solid, ``flex_kernel_*`` dashed,
    ``flex_e2e_*`` dotted, one colour per keep rate / bucket count, ``ours_dense`` grey).
    Records are ``python -m sparseflash.bench`` rows; those without :data:`SPEED_REQUIRED`
    or with ``status`` other than ``"ok"`` are left out with a printed note.  ``head_dim``:
    the ``D`` to draw (default: the smallest present).

    Rows not timed on a GPU (:func:`_gpu_timed`) are left out first, with a note.

    Returns the figure (saved to ``path`` if given), or None, with a note, if no record is usable.
    """
    records = _drop_non_gpu(records)
    good = [r for r in records if _usable(r)]
    if len(good) < len(records):
        print(f"figures: {len(records) - len(good)} of {len(records)} result records have no usable "
              f"{'/'.join(SPEED_REQUIRED)} (missing, null, or status not ok); left out")
    dims = sorted({r.get("D") for r in good}, key=lambda d: (d is None, d or 0))
    rows = [r for r in good if r.get("D") == (dims[0] if head_dim is None and dims else head_dim)]
    if not rows:
        print(f"figures: no usable benchmark records{f' for D={head_dim}' if head_dim else ''}; no speed figure")
        return None
    plt = _pyplot()
    ns = sorted({int(r["seq_len"]) for r in rows})
    modes = sorted({str(r.get("mode", "fwd")) for r in rows}, key=lambda m: (m != "fwd+bwd", m != "fwd", m))
    columns = SPEED_COLUMNS + ((WINDOW_COLUMN,) if any(WINDOW_VARIANT.fullmatch(str(r["variant"])) for r in rows)
                               else ())
    fig, axes = plt.subplots(len(modes), len(columns), figsize=(4 * len(columns), 0.6 + 3.5 * len(modes)),
                             sharex=True, sharey=True, squeeze=False, constrained_layout=True)
    for i, mode in enumerate(modes):
        for j, (family, title) in enumerate(columns):
            ax = axes[i, j]
            _speed_panel(ax, [r for r in rows if str(r.get("mode", "fwd")) == mode], family)
            ax.axhline(1, color="k", lw=1, ls="--", zorder=0)
            ax.grid(alpha=0.3)
            ax.set_title(f"{title}, {mode}", fontsize=11)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [_n_label(n) for n in ns])
    ax.set_xlim(ns[0] / 1.25, ns[-1] * 1.6)
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_ylim(top=ax.get_ylim()[1] * 3)  # room for the legends
    ax.minorticks_off()
    for a in axes[:, 0]:
        a.set_ylabel("speed-up over SDPA FA2")
    for a in axes[-1]:
        a.set_xlabel("sequence length N (k = 1024 tokens)")
    d = rows[0].get("D")
    fig.suptitle(f"Speed-up over SDPA FlashAttention-2 on {_values(rows, 'device') or 'an unknown device'}"
                 + (f": head dim {d}" if d is not None else "")
                 + "".join(f", {k}={_values(rows, k)}" for k in ("B", "H") if _values(rows, k))
                 + (f", {_values(rows, 'dtype')}" if _values(rows, "dtype") else ""), fontsize=13)
    if path is not None:
        fig.savefig(path, dpi=DPI)
    return fig


def speed_figures(records: list[dict], out) -> list[Path]:
    """Speed figures in ``out``, one per result file (one device kind each) and head dim:
    ``speed.png`` (smallest D, 64 in the committed results) and ``speed_d<D>.png`` for
    :data:`PRIMARY_RESULTS`' file (and records that name no file), ``speed_<stem>.png`` and
    ``speed_<stem>_d<D>.png`` for each other file ``<stem>.json``.  Returns the paths written."""
    plt = _pyplot()
    records = _drop_non_gpu(records)  # the note about left-out rows, once
    groups: dict = {}
    for r in records:
        stem = Path(str(r["_file"])).stem if r.get("_file") else PRIMARY_RESULTS
        groups.setdefault(stem, []).append(r)
    written = []
    for stem in sorted(groups, key=lambda s: (s != PRIMARY_RESULTS, s)):
        recs = groups[stem]
        good = [r for r in recs if _usable(r)]
        dims = sorted({r.get("D") for r in good}, key=lambda d: (d is None, d or 0)) or [None]
        base = "speed" if stem == PRIMARY_RESULTS else f"speed_{stem}"
        for i, d in enumerate(dims):
            path = Path(out) / (f"{base}.png" if i == 0 else f"{base}_d{d}.png")
            fig = speed_figure(recs if i == 0 else good, path, head_dim=d)  # notes about left-out rows once
            if fig is not None:
                plt.close(fig)
                written.append(path)
    return written


# --------------------------------------------------------------------------------------
# Training (from python -m sparseflash.train.experiment results)
# --------------------------------------------------------------------------------------


def load_train_results(folder) -> list[dict]:
    """Rows of ``folder/train_*.json`` (``{"meta", "rows"}`` of ``python -m
    sparseflash.train.experiment``), each with ``_file`` and ``device``.  Files of runs in
    Triton's interpreter (``meta.interpreter``) are left out with a note: not GPU timings."""
    rows = []
    for path in sorted(Path(folder).glob(TRAIN_GLOB)):
        try:
            data = json.loads(path.read_text())
            meta, file_rows = data.get("meta", {}), data["rows"]
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
            print(f"figures: skipping {path}: {exc}")
            continue
        if meta.get("interpreter"):
            print(f"figures: skipping {path.name}: measured in Triton's interpreter (not GPU timings)")
            continue
        if str(meta.get("schema", "")).startswith("sparseflash.train.scaling"):
            continue  # 1 vs n GPUs (train/scaling.py): other rows, shown in notebook 07 and the README
        rows += [dict(r, _file=path.name, device=r.get("device") or meta.get("device")) for r in file_rows
                 if isinstance(r, dict)]
    return rows


def _listed_order(name: str, listed) -> tuple:
    """Sort key: the names of ``listed`` in its order, then any other name alphabetically."""
    names = list(listed)
    return (names.index(name) if name in names else len(names), name)


def _train_order(name: str) -> tuple:
    return _listed_order(name, TRAIN_COLORS)


def train_speed_figure(rows: list[dict], path=None):
    """Training throughput (tokens/s) per attention, one panel per sequence length, from the
    ``phase == "speed"`` rows with ``status == "ok"``; each bar says its speed-up over SDPA
    FlashAttention-2, and the grey line is the model with no attention (Amdahl's ceiling).
    Returns the figure, or None (with a note) if there are no such rows."""
    rows = [r for r in rows if r.get("phase") == "speed" and r.get("status") == "ok" and r.get("tokens_per_s")]
    if not rows:
        print("figures: no training speed rows; no train_speed figure")
        return None
    plt = _pyplot()
    # One panel per sequence length and mode (eager, or torch.compile'd model): each compared
    # with its own SDPA and no-attention rows.
    panels = sorted({(bool(r.get("compile")), int(r["seq_len"])) for r in rows})
    cols = min(len(panels), 2 if len(panels) == 4 else 3)
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False,
                             constrained_layout=True)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (compiled, n) in zip(axes.flat, panels):
        mine = sorted((r for r in rows if int(r["seq_len"]) == n and bool(r.get("compile")) == compiled),
                      key=lambda r: _train_order(r["name"]))
        bars = [r for r in mine if r["name"] != "none"]
        y = range(len(bars))
        ax.barh(list(y), [r["tokens_per_s"] / 1e3 for r in bars],
                color=[TRAIN_COLORS.get(r["name"], "C7") for r in bars])
        ax.set_yticks(list(y), [r["name"] for r in bars])
        ax.invert_yaxis()
        for i, r in enumerate(bars):
            label = f" {r['speedup_vs_sdpa']:.2f}x" if r.get("speedup_vs_sdpa") else ""
            ax.text(r["tokens_per_s"] / 1e3, i, label, va="center", fontsize=9)
        none = next((r for r in mine if r["name"] == "none"), None)
        if none:
            ax.axvline(none["tokens_per_s"] / 1e3, color="0.4", ls="--", lw=1.2)
            ax.text(none["tokens_per_s"] / 1e3, len(bars) - 0.6, " no attention\n (ceiling)", color="0.3",
                    fontsize=9, va="bottom")
        ax.set_xlim(0, max([r["tokens_per_s"] for r in mine]) / 1e3 * 1.25)
        ax.set_xlabel("thousand tokens / s (training step)")
        r0 = mine[0]
        mode = "torch.compile" if compiled else "eager"
        ax.set_title(f"N = {n}, {mode}\nmodel {r0.get('model')}, {r0.get('tokens_per_step')} tokens/step",
                     fontsize=10.5)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Training throughput on {_values(rows, 'device') or 'an unknown device'} "
                 "(label: speed-up over SDPA FlashAttention-2)", fontsize=12)
    if path is not None:
        fig.savefig(path, dpi=DPI)
    return fig


def train_loss_figure(rows: list[dict], path=None):
    """Validation loss (nats per byte) of the ``phase == "loss"`` rows against steps (left) and
    training time (right); the dotted line is the reference run's final loss, and a dot marks
    where each run reaches it.  Returns the figure, or None (with a note) if there are no rows."""
    rows = sorted((r for r in rows if r.get("phase") == "loss" and r.get("curve")),
                  key=lambda r: _train_order(r["name"]))
    if not rows:
        print("figures: no training loss rows; no train_loss figure")
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True, constrained_layout=True)
    for r in rows:
        c = [p for p in r["curve"] if p["step"] > 0]
        color = TRAIN_COLORS.get(r["name"], "C7")
        label = f"{r['name']}: {r['final_val_loss']:.3f}" + ("" if r.get("status") == "ok" else " (partial)")
        axes[0].plot([p["step"] for p in c], [p["loss"] for p in c], color=color, marker=".", label=label)
        axes[1].plot([p["time_s"] for p in c], [p["loss"] for p in c], color=color, marker=".")
        if r.get("time_to_reference_s") is not None:
            axes[1].plot(r["time_to_reference_s"], r["reference_final_val_loss"], "o", color=color, ms=7)
    target = next((r.get("reference_final_val_loss") for r in rows if r.get("reference_final_val_loss")), None)
    for ax in axes:
        if target:
            ax.axhline(target, color="k", ls=":", lw=1)
        ax.grid(alpha=0.3)
    points = [p for r in rows for p in r["curve"] if p["step"] > 0]
    lo, hi = min(p["loss"] for p in points), max(p["loss"] for p in points)
    last = max(p["step"] for p in points)
    top = max((p["loss"] for p in points if p["step"] >= 0.1 * last), default=hi)  # from 10% of the steps on
    axes[0].set_ylim(lo - 0.05 * (top - lo), top + 0.05 * (top - lo))
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training time (s)")
    axes[0].set_ylabel("validation loss (nats / byte)")
    axes[0].legend(title="final validation loss", fontsize=9)
    r0 = rows[0]
    fig.suptitle(f"Validation loss, N = {r0.get('seq_len')}, model {r0.get('model')}, on "
                 f"{_values(rows, 'device') or 'an unknown device'}", fontsize=12)
    if path is not None:
        fig.savefig(path, dpi=DPI)
    return fig


#: The training result file whose figures keep the plain names (``train_speed.png``,
#: ``train_loss.png``) when present; those of another file ``train_<x>.json`` are
#: ``train_speed_<x>.png`` and ``train_loss_<x>.png``: one GPU kind per figure.
PRIMARY_TRAIN_RESULTS = "train_h200"


def train_figures(folder, out) -> list[Path]:
    """``train_speed*.png`` and ``train_loss*.png`` in ``out``, one of each per ``folder/train_*.json``
    with such rows (plain names for :data:`PRIMARY_TRAIN_RESULTS`, or for the only or first file
    when it is absent); the paths written."""
    plt = _pyplot()
    by_file: dict = {}
    for r in load_train_results(folder):
        by_file.setdefault(Path(str(r["_file"])).stem, []).append(r)
    primary = PRIMARY_TRAIN_RESULTS if PRIMARY_TRAIN_RESULTS in by_file else next(iter(sorted(by_file)), None)
    written = []
    for stem in sorted(by_file, key=lambda s: (s != primary, s)):
        suffix = "" if stem == primary else "_" + stem.removeprefix("train_")
        for name, make in ((f"train_speed{suffix}.png", train_speed_figure),
                           (f"train_loss{suffix}.png", train_loss_figure)):
            fig = make(by_file[stem], Path(out) / name)
            if fig is not None:
                plt.close(fig)
                written.append(Path(out) / name)
    return written


# --------------------------------------------------------------------------------------
# Quality of sparse patterns (from tools/quality_ablation.py results)
# --------------------------------------------------------------------------------------

#: Line colour and style of each quality configuration: dense black, windows alone dashed,
#: pure hashing dotted, hash ∪ window solid (a colour per bucket count and window).
QUALITY_STYLES = {"dense": ("k", "-"), "window128": ("C2", "--"), "window256": ("C8", "--"),
                  "hash16": ("C3", ":"), "hash32": ("C0", ":"), "hash16w128": ("C3", "-"),
                  "hash16w256": ("C1", "-"), "hash32w128": ("C0", "-"), "hash32w256": ("C9", "-")}


def _quality_order(name: str) -> tuple:
    return _listed_order(name, QUALITY_STYLES)


def _mean_curve(rows: list[dict]) -> tuple[list[int], list[float]]:
    """Steps every row has, and the mean validation loss over the rows (seeds) at each."""
    curves = [dict((int(s), float(v)) for s, v in r["curve"]) for r in rows]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return steps, [sum(c[s] for c in curves) / len(curves) for s in steps]


def quality_figure(data: dict, path=None):
    """Validation loss of each pattern against steps, one panel per sequence length (mean of the
    seeds; the legend gives the final mean and the seed spread), and a last panel: final loss
    over dense's (same length) against the end-of-training pair density.  ``data``: a
    ``results/quality_*.json`` (``{"meta", "summary", "rows"}`` of ``tools/quality_merge.py``).
    Returns the figure (saved to ``path`` if given), or None with a note when there are no rows."""
    rows = [r for r in data.get("rows", []) if r.get("curve")]
    if not rows:
        print("figures: no quality rows; no quality figure")
        return None
    plt = _pyplot()
    lengths = sorted({int(r["seq_len"]) for r in rows})
    fig, axes = plt.subplots(1, len(lengths) + 1, figsize=(5.0 * (len(lengths) + 1), 4.4), constrained_layout=True)
    summary = {(s["seq_len"], s["name"]): s for s in data.get("summary", [])}
    for ax, n in zip(axes, lengths):
        mine = [r for r in rows if int(r["seq_len"]) == n]
        names = sorted({r["name"] for r in mine}, key=_quality_order)
        dense_top = None
        for name in names:
            rs = [r for r in mine if r["name"] == name]
            steps, loss = _mean_curve(rs)
            color, ls = QUALITY_STYLES.get(name, ("C7", "-"))
            finals = [r["val_loss"] for r in rs]
            label = f"{name}: {sum(finals) / len(finals):.3f}" + (f" ±{(max(finals) - min(finals)) / 2:.3f}"
                                                                   if len(finals) > 1 else "")
            ax.plot(steps, loss, color=color, ls=ls, lw=1.6, label=label)
            if name == "dense":
                dense_top = max(v for s, v in zip(steps, loss) if s >= 0.3 * steps[-1])
        lo = min(r["val_loss"] for r in mine)
        if dense_top is not None:
            ax.set_ylim(lo - 0.05, dense_top + 0.1)
        ax.set_xlabel("step")
        ax.set_title(f"N = {n}, batch {mine[0].get('batch')}, {len({r['seed'] for r in mine})} seeds", fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="final val loss (mean ± half spread)", title_fontsize=8)
    axes[0].set_ylabel("validation loss (nats / byte)")
    ax = axes[-1]
    top, bottom = 1.08, 0.90
    xs, above = [], []
    for k, ((n, name), s) in enumerate(sorted(summary.items())):
        if name == "dense" or s.get("vs_dense_mean") is None:
            continue
        color, _ = QUALITY_STYLES.get(name, ("C7", "-"))
        marker = "o" if n == lengths[0] else "s"
        y, x = s["vs_dense_mean"], s["pair_density_end_mean"]
        xs.append(x)
        if y > top:  # pure hashing: far above, drawn at the edge with its value
            # Both lengths of one pattern sit at about the same density: stagger their labels.
            ax.annotate(f"{name}, {marker}\n{y:.2f}x", (x, top), xytext=(0, -22 - 24 * (above.count(name) % 2)),
                        textcoords="offset points", ha="center", fontsize=8, color=color,
                        arrowprops=dict(arrowstyle="->", color=color))
            above.append(name)
            continue
        dense_mean = s["val_loss_mean"] / y
        err = [[(s["val_loss_mean"] - s["val_loss_min"]) / dense_mean], [(s["val_loss_max"] - s["val_loss_mean"])
                                                                         / dense_mean]]
        ax.errorbar(x, y, yerr=err, fmt=marker, color=color, ms=6, capsize=2)
        ax.annotate(name, (x, y), xytext=(5, 4 if k % 2 else -9), textcoords="offset points", fontsize=8,
                    color=color)
    ax.axhline(1.0, color="k", lw=1)
    ax.axhline(1.01, color="k", lw=0.8, ls=":")
    ax.set_ylim(bottom, top)
    ax.set_xscale("log")
    if xs:
        ax.set_xlim(min(xs) / 1.6, max(xs) * 1.6)
    ax.set_xlabel("pair density at the end of training (allowed / causal pairs)")
    ax.set_ylabel("final val loss / dense's (same N)")
    ax.set_title("quality against density (o: N = %d%s)" % (lengths[0], f", s: N = {lengths[1]}"
                                                             if len(lengths) > 1 else ""), fontsize=11)
    ax.grid(alpha=0.3, which="both")
    meta = data.get("meta", {})
    fig.suptitle(f"Validation loss of sparse patterns against dense, our kernels on {meta.get('device', '?')}", fontsize=12)
    if path is not None:
        fig.savefig(path, dpi=DPI)
    return fig


def quality_figures(folder, out) -> list[Path]:
    """``quality_<device>.png`` in ``out`` for each ``folder/quality_<device>.json``; the paths written."""
    plt = _pyplot()
    written = []
    for src in sorted(Path(folder).glob(QUALITY_GLOB)):
        try:
            data = json.loads(src.read_text())
        except (OSError, ValueError) as exc:
            print(f"figures: skipping {src}: {exc}")
            continue
        path = Path(out) / f"{src.stem}.png"
        fig = quality_figure(data, path)
        if fig is not None:
            plt.close(fig)
            written.append(path)
    return written


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def build_all(out, results=None) -> list[Path]:
    """Write every figure into ``out``; returns the paths written."""
    plt = _pyplot()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in (("tile_maps.png", tile_maps_figure), ("computed_fraction.png", computed_fraction_figure)):
        fig = make(out / name)
        plt.close(fig)
        written.append(out / name)
    results = Path(results) if results is not None else ROOT / "results"
    records = load_results(results) if results.is_dir() else []
    if not records:
        print(f"figures: no benchmark results in {results}/*.json (run `python -m sparseflash.bench` on a GPU); "
              "no speed figure")
    else:
        written += speed_figures(records, out)
    if results.is_dir() and any(results.glob(TRAIN_GLOB)):
        written += train_figures(results, out)
    if results.is_dir():
        written += quality_figures(results, out)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sparseflash.figures",
        description="Regenerate the figures: tile maps and computed-tile fractions (CPU, seconds), "
                    "and speed plots from benchmark results if there are any.",
    )
    parser.add_argument("--out", default=str(ROOT / "figures"), help="output folder (default: %(default)s)")
    parser.add_argument("--results", default=str(ROOT / "results"),
                        help="folder of benchmark *.json files for the speed figure (default: %(default)s)")
    args = parser.parse_args(argv)
    matplotlib.use("Agg")
    for path in build_all(args.out, args.results):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
