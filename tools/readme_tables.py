"""Print the README's result tables (Markdown) from the committed result files.

    python tools/readme_tables.py                     # the H200 files: kernels, training, decoding
    python tools/readme_tables.py --device h100       # results/h100.json, train_h100.json, decode_h100.json

Every number in those README tables is read here from ``results/<device>.json`` (``python -m
sparseflash.bench``), ``results/train_<device>.json`` (``python -m sparseflash.train.experiment --phase
speed``) and ``results/decode_<device>.json`` (``python -m sparseflash.bench.decode``); a cell whose row
is missing or not ``ok`` prints as ``–``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

KERNEL_ROWS = (("sdpa_cudnn", "SDPA cuDNN"), ("ours_dense", "**sparseflash dense** (`flash_attention`)"),
               ("ours_hash_16", "**hash buckets, 16** (`n_buckets=16`)"),
               ("ours_hash_16_default", "hash buckets, 16, no optional arguments"),
               ("ours_hash_16_w256", "**hash-16 ∪ window 256** (`window=256`)"),
               ("ours_qk_0.3", "**query/key dropping, keep 30%**"))
TRAIN_ROWS = (("sdpa", "`sdpa` (FlashAttention-2)"), ("sdpa_cudnn", "`sdpa_cudnn`"), ("dense", "`dense` (ours)"),
              ("hash16w128", "**`hash` 16 ∪ window 128** (keeps dense's loss, below)"),
              ("hash16w0", "`hash` 16, pure (`window=0`)"), ("qk0.3", "`qk` keep 30%"),
              ("none", "`none` (no attention: the ceiling)"))


def _load(path: Path) -> tuple[list[dict], dict]:
    data = json.loads(path.read_text())
    return [r for r in data["rows"] if r.get("status") == "ok"], data.get("meta", {})


def _x(v) -> str:
    return "–" if v is None else (f"{v:.1f}x" if v >= 10 else f"{v:.2f}x")


def kernel_table(rows: list[dict], seq_lens=(4096, 8192, 16384, 65536, 131072), dims=(64, 128),
                 mode: str = "fwd+bwd") -> str:
    """Speed-up over SDPA FlashAttention-2 per variant (rows) and N (columns), ``D=64 / D=128`` per cell."""
    at = {(r["variant"], r["seq_len"], r["D"]): r["speedup_vs_sdpa_flash"] for r in rows if r["mode"] == mode}
    out = [f"| {mode}, D = {dims[0]} / D = {dims[1]} | " + " | ".join(f"N = {n}" for n in seq_lens) + " |",
           "|---|" + "---|" * len(seq_lens)]
    for variant, label in KERNEL_ROWS:
        cells = [" / ".join(_x(at.get((variant, n, d))) for d in dims) for n in seq_lens]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def train_table(rows: list[dict], seq_lens=(8192, 16384)) -> str:
    """Step time, speed-up over the SDPA-flash and cuDNN models, and pair density per configuration."""
    at = {(r["name"], r["seq_len"]): r for r in rows if r.get("phase") == "speed"}
    head = " | ".join(f"T={n}: ms | over SDPA / cuDNN | pairs" for n in seq_lens)
    out = [f"| training step, compiled | {head} |", "|---|" + "---|---|---|" * len(seq_lens)]
    for name, label in TRAIN_ROWS:
        cells = []
        for n in seq_lens:
            r = at.get((name, n))
            if r is None:
                cells += ["–"] * 3
                continue
            dens = r.get("pair_density")
            pairs = "–" if name == "none" else ("100%" if dens is None else f"{100 * dens:.0f}%" if dens >= 0.1
                                                 else f"{100 * dens:.1f}%")
            bold = "**" if name == "hash16w128" else ""
            cells += [f"{bold}{r['step_ms']:.1f}{bold}",
                      f"{bold}{_x(r.get('speedup_vs_sdpa'))} / {_x(r.get('speedup_vs_sdpa_cudnn'))}{bold}", pairs]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def decode_table(rows: list[dict], context: int = 65536, batches=(1, 8), model: dict | None = None) -> str:
    """One new token against ``context`` cached keys: one layer and a whole model's step
    (``model``: the file's ``meta.model``, which names it)."""
    at = {(r["scope"], r["attention"], r["batch"]): r for r in rows if r["context"] == context}

    def cell(scope, att, b, what):
        r = at.get((scope, att, b))
        if r is None:
            return "–"
        return f"{1000 * r['ms_per_token']:.1f} µs" if what == "us" else _x(r["speedup_vs_sdpa"])

    out = [f"| one new token, {context} cached | " + " | ".join(f"batch {b}" for b in batches) + " |",
           "|---|" + "---|" * len(batches),
           "| one layer: SDPA | " + " | ".join(cell("layer", "sdpa", b, "us") for b in batches) + " |",
           "| one layer: our dense decode | " + " | ".join(cell("layer", "dense", b, "x") for b in batches) + " |",
           "| one layer: our hash ∪ window decode | " + " | ".join(cell("layer", "hash", b, "x") for b in batches)
           + " |",
           "| one layer: FlexAttention, dense / hash ∪ window mask | " + " | ".join(
               f"{cell('layer', 'flex_dense', b, 'x')} / {cell('layer', 'flex_hash', b, 'x')}" for b in batches) + " |"]
    steps = []
    for b in batches:
        ms = [at.get(("model", a, b)) for a in ("sdpa", "dense", "hash")]
        steps.append(" / ".join("–" if r is None else f"{r['ms_per_token']:.2f}" for r in ms) + " ms")
    name = f"{model['n_layer']}×{model['n_embd']} model step" if model else "model step"
    out.append(f"| {name}: SDPA / dense / hash ∪ window | " + " | ".join(steps) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="h200", help="file stem: results/<device>.json and its train_/decode_ files")
    p.add_argument("--results", type=Path, default=ROOT / "results")
    args = p.parse_args(argv)
    files = {"kernels": args.results / f"{args.device}.json", "training": args.results / f"train_{args.device}.json",
             "decoding": args.results / f"decode_{args.device}.json"}
    tables = {"kernels": kernel_table, "training": train_table, "decoding": decode_table}
    for what, path in files.items():
        if path.exists():
            print(f"<!-- {what}: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} -->")
            rows, meta = _load(path)
            print(tables[what](rows, model=meta.get("model")) if what == "decoding" else tables[what](rows))
            print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
