"""``python -m sparseflash.train``: train a byte-level GPT with one of the attentions.

Examples::

    python -m sparseflash.train.data prepare                       # once: data/sotu-gutenberg/
    python -m sparseflash.train --attention hash --n-buckets 16    # one GPU (defaults: T=8192, 6x512)
    python -m sparseflash.train --attention hash --window 0        # the paper's pure hashing
    torchrun --nproc-per-node 8 -m sparseflash.train --attention qk --keep-rate 0.3
    python -m sparseflash.train --device cpu --seq-len 64 --n-layer 2 --n-embd 64 --n-head 2 \\
        --batch-size 2 --max-steps 20 --eval-every 10 --data README.md     # tiny, on the CPU

Every flag is a field of :class:`~sparseflash.train.loop.TrainConfig`.  The run writes
``--out-dir`` (default ``runs/<attention>-T<seq_len>``): ``log.json`` and ``ckpt.pt``;
``--resume`` continues from the checkpoint there.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

from .loop import TrainConfig, train
from .model import ATTENTIONS

HELP = {
    "data": "prepared corpus (name under data/ or folder), token file (*.bin) or text file(s), comma-separated",
    "seq_len": "sequence length T",
    "batch_size": "sequences per process and micro-step",
    "grad_accum": "micro-steps per optimiser step (gradient accumulation)",
    "n_kv_heads": "key/value heads (grouped-query attention); default n_head",
    "attention": "attention of every block",
    "n_buckets": "hash buckets (--attention hash)",
    "keep_rate": "fraction of queries and keys kept (--attention qk)",
    "qk_gate": "topk (learned gate) or random (--attention qk)",
    "window": "every query also sees the W most recent keys (dense, hash, qk); default: 128 for hash, "
              "else 0; 0 for the paper's pure hashing",
    "max_steps": "optimiser steps (the schedule's length)",
    "lr": "peak learning rate",
    "min_lr_ratio": "final learning rate / peak",
    "warmup_frac": "warm-up steps / max_steps",
    "device": "auto: cuda (cuda:<LOCAL_RANK> under torchrun) if available, else cpu",
    "compile": "torch.compile the model",
    "eval_every": "validate every this many steps",
    "eval_windows": "validation windows of seq_len bytes",
    "ckpt_every": "checkpoint every this many steps",
    "out_dir": "where log.json and ckpt.pt go (default runs/<attention>-T<seq_len>)",
    "resume": "continue from out_dir/ckpt.pt if it exists",
    "time_budget": "seconds; then checkpoint and stop (resume later)",
}
CHOICES = {"attention": ATTENTIONS, "qk_gate": ("topk", "random")}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sparseflash.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name == "vocab_size":
            continue  # byte-level data: always 256
        if f.name == "progress":
            p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
        elif isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=HELP.get(f.name))
        else:
            kind = {"n_kv_heads": int, "window": int, "time_budget": float}.get(f.name, type(default))
            p.add_argument(flag, type=kind, default=None if f.name == "out_dir" else default,
                           choices=CHOICES.get(f.name), help=HELP.get(f.name, " "))
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.out_dir is None:
        args.out_dir = f"runs/{args.attention}-T{args.seq_len}"
    cfg = TrainConfig(**vars(args))
    log = train(cfg)
    if log.get("val") and int(os.environ.get("RANK", 0)) == 0:
        v = log["val"][-1]
        print(f"{log['status']}: {log['steps_done']} steps, val loss {v['loss']:.4f} (ppl {v['ppl']:.2f}), "
              f"{log.get('median_tokens_per_s', 0):,.0f} tokens/s; log: {cfg.out_dir}/log.json")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
