"""Gather tools/quality_ablation.py outputs into one results file, with a per-configuration summary.

    python tools/quality_merge.py --out results/quality_h200.json RUN_DIR/q*.json [--note TEXT ...]

Rows are keyed by ``(name, seq_len, seed)``: a new file's row replaces the old one of the
same key, others are kept, so the file grows run by run.  ``summary`` holds, per
``(seq_len, name)``: seeds, mean / min / max validation loss, the seed spread (max - min),
the ratio of the mean to dense's mean at the same length, and the mean end pair density.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["seq_len"], r["name"]), []).append(r)
    dense = {n: statistics.mean(r["val_loss"] for r in rs) for (n, name), rs in groups.items() if name == "dense"}
    out = []
    for (n, name), rs in sorted(groups.items()):
        losses = [r["val_loss"] for r in sorted(rs, key=lambda r: r["seed"])]
        mean = statistics.mean(losses)
        out.append(dict(seq_len=n, name=name, attention=rs[0]["attention"], n_buckets=rs[0]["n_buckets"],
                        window=rs[0]["window"], seeds=sorted(r["seed"] for r in rs), val_loss_mean=mean,
                        val_loss_min=min(losses), val_loss_max=max(losses), seed_spread=max(losses) - min(losses),
                        vs_dense_mean=(mean / dense[n]) if n in dense else None,
                        pair_density_end_mean=statistics.mean(r["pair_density_end"] for r in rs),
                        density_tokens=sorted({r.get("density_tokens") for r in rs}, key=str)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--note", action="append", default=[], help="a line for meta.notes (repeatable)")
    args = ap.parse_args(argv)
    old = json.loads(args.out.read_text()) if args.out.exists() else {"meta": {}, "rows": []}
    rows = {(r["name"], r["seq_len"], r["seed"]): r for r in old["rows"]}
    meta = old["meta"]
    sources = meta.setdefault("sources", [])
    for f in args.files:
        data = json.loads(f.read_text())
        for r in data["rows"]:
            rows[(r["name"], r["seq_len"], r["seed"])] = r
        sources.append(dict(argv=data["meta"].get("argv"), torch=data["meta"].get("torch"),
                            note=data["meta"].get("note"), rows=len(data["rows"])))
        meta["device"] = data["meta"].get("device") or meta.get("device")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    meta.setdefault("notes", [])
    meta["notes"] += [n for n in args.note if n not in meta["notes"]]
    meta["merged_at_commit"] = commit
    ordered = sorted(rows.values(), key=lambda r: (r["seq_len"], r["name"], r["seed"]))
    summary = summarize(ordered)
    args.out.write_text(json.dumps(dict(meta=meta, summary=summary, rows=ordered), indent=1) + "\n")
    print(f"{args.out}: {len(ordered)} rows")
    for s in summary:
        ratio = f"{s['vs_dense_mean']:.3f}" if s["vs_dense_mean"] else "-"
        print(f"  T={s['seq_len']:>5} {s['name']:<11} seeds {s['seeds']}: val loss {s['val_loss_mean']:.4f} "
              f"(spread {s['seed_spread']:.4f}, x{ratio} dense), end density {s['pair_density_end_mean']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
