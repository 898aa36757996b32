"""Draw the causal forward's TFLOP/s against the sequence length from ``tools/gluon_fa3_probe.py``'s
file: SDPA cuDNN and flash, our Triton kernel, and the Gluon kernel of ``sparseflash/hopper.py`` at
its default setting, one panel a head dim.

    python tools/plot_hopper_forward.py [results/logs/gluon_fa3_probe_h100.json] [--out figures/hopper_forward_h100.png]
"""
from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sparseflash.hopper import CONFIG  # noqa: E402

LINES = [("sdpa_cudnn", "SDPA cuDNN", "tab:gray", "--"), ("sdpa_flash", "SDPA FlashAttention-2", "tab:gray", ":"),
         ("ours_triton", "sparseflash, Triton kernel", "tab:blue", "-"),
         ("gluon", "sparseflash, Gluon kernel (hopper.py)", "tab:red", "-")]


def _default_variant(D: int) -> str:
    c = CONFIG[D]
    return f"fa3_n{c['BLOCK_N']}_s{c['STAGES']}{'_pingpong' if c['PINGPONG'] else ''}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", nargs="?", default="results/logs/gluon_fa3_probe_h100.json")
    p.add_argument("--out", default="figures/hopper_forward_h100.png")
    args = p.parse_args()
    doc = json.load(open(args.path))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, D in zip(axes, (64, 128)):
        for key, label, color, style in LINES:
            variant = _default_variant(D) if key == "gluon" else key
            pts = sorted((r["N"], r["tflops"]) for r in doc["rows"]
                         if r["D"] == D and r["variant"] == variant and "tflops" in r)
            if pts:
                ax.plot([n for n, _ in pts], [t for _, t in pts], style, color=color, marker="o", ms=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_title(f"causal forward, D = {D}")
        ax.set_xlabel("sequence length N")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("TFLOP/s")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{doc['meta']['device']}, B = 2, H = 12, bf16", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
