"""Regenerate the committed figures: ``python -m sparseflash.figures --out figures/``.

Writes, on a CPU in a few seconds (no kernel runs: schedules are predicted in PyTorch
by :mod:`sparseflash.tiles`, which the tests check against the kernels):

- ``tile_maps.png``: dense causal, query/key dropping and hash buckets side by side,
  tiles in original coordinates (top) and in the kernel's layout (bottom);
- ``computed_fraction.png``: fraction of tiles computed against sequence length,
  keep rate and number of buckets;
- ``speed.png``, only when ``results/*.json`` hold benchmark rows (written on a GPU by
  ``python -m sparseflash.bench``: ``{"meta": ..., "rows": [...]}``): time and speed-up
  over dense causal against sequence length, per mode (and head dim, dtype where they
  vary).  See :func:`speed_figure` for the keys it reads; rows without them, or not
  ``status == "ok"``, are left out with a printed note.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

from . import tiles, viz

ROOT = Path(__file__).resolve().parent.parent
DPI = 110

#: Keys every speed record needs.
SPEED_REQUIRED = ("variant", "seq_len", "ms")
#: Keys that split records into panels (with ``mode``) when they vary, e.g. two head dims.
SPEED_FACET_KEYS = ("D", "head_dim", "dtype", "B", "H", "batch", "heads", "device")
#: Keys added to a line's label when they vary (``sparseflash.bench`` puts them in ``variant``).
SPEED_LABEL_KEYS = ("keep_rate", "n_buckets", "sparsity")
#: Baseline of the speed-up row: the first of these variants present in a panel.
DENSE_NAMES = ("ours_dense", "dense", "flash", "flash_attention", "dense_causal")

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
    writes; ``meta["device"]`` is copied into rows without one), a dict with a
    ``"records"`` / ``"results"`` list, a list of records, or one record.  Unreadable
    files are skipped with a note.
    """
    records: list[dict] = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"figures: skipping {path}: {exc}")
            continue
        meta = {}
        if isinstance(data, dict):
            meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
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
                records.append(r)
    return records


def _usable(r: dict) -> bool:
    if r.get("status", "ok") != "ok" or not all(r.get(k) is not None for k in SPEED_REQUIRED):
        return False
    try:
        return float(r["ms"]) > 0 and int(r["seq_len"]) > 0
    except (TypeError, ValueError):
        return False


def speed_figure(records: list[dict], path=None):
    """Time and speed-up over dense causal against sequence length, from benchmark records.

    A record is a dict with at least ``variant``, ``seq_len`` and ``ms`` (milliseconds;
    rows with ``status`` other than ``"ok"`` or ``ms`` null are left out).  Optional:
    ``mode`` (``"fwd"``, ``"fwd+bwd"``, ``"bwd"``; default ``"fwd"``) and the keys of
    :data:`SPEED_FACET_KEYS` (head dim, dtype, ...) that vary between records make one
    column of panels each; keys of :data:`SPEED_LABEL_KEYS` that vary go into the line
    labels.  Top row: time; bottom row: ``ms(dense) / ms`` (both log-log), ``dense`` the
    first variant of :data:`DENSE_NAMES` measured in that panel at that ``seq_len``.

    Prints a note about the records left out; if none is usable prints a note and
    returns None.  Otherwise returns the figure (saved to ``path`` if given).
    """
    good = [r for r in records if _usable(r)]
    if len(good) < len(records):
        print(f"figures: {len(records) - len(good)} of {len(records)} result records have no usable "
              f"{'/'.join(SPEED_REQUIRED)} (missing, null, or status not ok); left out")
    if not good:
        print("figures: no usable benchmark records; no speed figure")
        return None
    plt = _pyplot()
    facet_keys = [k for k in SPEED_FACET_KEYS if k != "device" and len({str(r.get(k)) for r in good}) > 1]
    label_keys = [k for k in SPEED_LABEL_KEYS if len({str(r.get(k)) for r in good}) > 1]

    def facet(r):
        return (str(r.get("mode", "fwd")),) + tuple(str(r.get(k)) for k in facet_keys)

    def label(r):
        extra = ", ".join(f"{k}={r[k]}" for k in label_keys if r.get(k) is not None)
        return f"{r['variant']} ({extra})" if extra else str(r["variant"])

    panels = sorted({facet(r) for r in good}, key=lambda f: (("fwd", "fwd+bwd", "bwd") + (f[0],)).index(f[0]))
    labels = sorted({label(r) for r in good}, key=lambda x: (x not in DENSE_NAMES, x))
    colors = {name: plt.get_cmap("tab20")(i % 20) for i, name in enumerate(labels)}
    ns = sorted({int(r["seq_len"]) for r in good})
    fig, axes = plt.subplots(2, len(panels), figsize=(4.8 * len(panels) + 2.5, 8), squeeze=False,
                             constrained_layout=True)
    for col, key in enumerate(panels):
        rows = [r for r in good if facet(r) == key]
        base = next((n for n in DENSE_NAMES if any(str(r["variant"]) == n for r in rows)), None)
        dense = {int(r["seq_len"]): float(r["ms"]) for r in rows if str(r["variant"]) == base}
        for name in labels:
            rs = sorted((r for r in rows if label(r) == name), key=lambda r: int(r["seq_len"]))
            if not rs:
                continue
            x = [int(r["seq_len"]) for r in rs]
            style = dict(marker="o", ms=4, color=colors[name], label=name)
            axes[0, col].plot(x, [float(r["ms"]) for r in rs], **style)
            pts = [(int(r["seq_len"]), dense[int(r["seq_len"])] / float(r["ms"]))
                   for r in rs if int(r["seq_len"]) in dense]
            if pts:
                axes[1, col].plot(*zip(*pts), **style)
        where = ", ".join([key[0]] + [f"{k}={v}" for k, v in zip(facet_keys, key[1:])])
        axes[0, col].set(yscale="log", xlabel="sequence length N", ylabel="time (ms)", title=f"time ({where})")
        axes[1, col].axhline(1, color="k", lw=1, ls="--")
        axes[1, col].set(yscale="log", xlabel="sequence length N", ylabel=f"speed-up over {base or 'dense (none measured)'}",
                         title=f"speed-up ({where})")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.minorticks_off()
            ax.grid(alpha=0.3)
    handles, names = axes[0, 0].get_legend_handles_labels()
    for ax in axes[0, 1:]:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.legend(handles, names, loc="outside right upper", fontsize="small")
    devices = sorted({str(r["device"]) for r in good if r.get("device")})
    fig.suptitle("Benchmarks" + (f" on {', '.join(devices)}" if devices else ""), fontsize=13)
    if path is not None:
        fig.savefig(path, dpi=DPI)
    return fig


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
        fig = speed_figure(records, out / "speed.png")
        if fig is not None:
            plt.close(fig)
            written.append(out / "speed.png")
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
