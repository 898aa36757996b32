"""``python -m sparseflash.train``: train a byte-level GPT with one of the attentions.

Examples (more in ``--help``)::

    python -m sparseflash.train.data prepare                       # once: data/sotu-gutenberg/
    python -m sparseflash.train --attention hash --n-buckets 16    # one GPU (defaults: T=8192, 6x512)
    python -m sparseflash.train --attention hash --window 0        # the paper's pure hashing
    torchrun --nproc-per-node 8 -m sparseflash.train --attention qk --keep-rate 0.3
    TRITON_INTERPRET=1 python -m sparseflash.train --device cpu --data README.md --seq-len 64 \\
        --batch-size 2 --n-layer 1 --n-embd 32 --n-head 2 --max-steps 10 --eval-every 10 \\
        --eval-windows 4 --out-dir runs/cpu-try                  # tiny, on the CPU: under a minute

``python -m sparseflash.train sample --ckpt <out-dir>/ckpt.pt --prompt "..."`` samples text
from a run's checkpoint (:mod:`sparseflash.train.sample`; ``sample --help`` lists its flags).

Every flag is a field of :class:`~sparseflash.train.loop.TrainConfig`.  The run writes
``--out-dir`` (default ``runs/<attention>-T<seq_len>``): ``log.json`` and ``ckpt.pt``;
``--resume`` continues from the checkpoint there.  Mistakes (a missing corpus, a bad flag
value, a checkpoint that cannot be resumed from) end the run with one line on stderr and
exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

import torch

from ..nn import DEFAULT_WINDOW
from . import data as data_mod
from .loop import COMPILE_MODES, CheckpointError, TrainConfig, train
from .model import ATTENTIONS, GPT

PROG = "python -m sparseflash.train"
_WINDOWS = ", ".join([f"{w} for {a}" for a, w in DEFAULT_WINDOW.items() if w] + ["else 0"])
#: Help of every flag; "(default: ...)" is added from TrainConfig unless the text has its own.
HELP = {
    "n_layer": "transformer blocks",
    "n_head": "attention heads per block",
    "n_embd": "model width; n_embd / n_head is the head dimension",
    "n_kv_heads": "key/value heads (grouped-query attention), a divisor of n_head (default: n_head)",
    "attention": "attention of every block",
    "n_buckets": "hash buckets (--attention hash)",
    "keep_rate": "fraction of queries and keys kept (--attention qk)",
    "qk_gate": "topk (learned gate) or random (--attention qk)",
    "window": "every query also sees the W most recent keys (dense, hash, qk); 0 for the paper's pure "
              f"hashing (default: {_WINDOWS})",
    "data": "prepared corpus (name under data/ or folder), token file (*.bin) or text file(s), comma-separated",
    "seq_len": "sequence length T",
    "batch_size": "sequences per process and micro-step",
    "grad_accum": "micro-steps per optimiser step (gradient accumulation)",
    "max_steps": "optimiser steps (the schedule's length)",
    "lr": "peak learning rate",
    "min_lr_ratio": "final learning rate / peak (cosine decay)",
    "warmup_frac": "linear warm-up steps / max_steps",
    "weight_decay": "AdamW weight decay of the matrices and the embedding (none on norms and biases)",
    "beta1": "AdamW beta1 (decay of the gradient's running mean)",
    "beta2": "AdamW beta2 (decay of the squared gradient's running mean)",
    "grad_clip": "clip the gradients' global norm at this (0: no clipping)",
    "device": "auto: cuda (cuda:<LOCAL_RANK> under torchrun) if available, else cpu",
    "compile": "torch.compile the model",
    "compile_mode": "torch.compile mode with --compile: reduce-overhead replays the step's forward and backward "
                    "as CUDA graphs (one process only; fastest when the host is the bottleneck)",
    "seed": "seed of the initial weights, of the batches' order and of the random query/key dropping",
    "eval_every": "validate every this many steps (and at step 0 and at the end)",
    "eval_windows": "validation windows of seq_len bytes",
    "ckpt_every": "checkpoint every this many steps (and at the end)",
    "out_dir": "where log.json and ckpt.pt go (default: runs/<attention>-T<seq_len>)",
    "resume": "continue from <out-dir>/ckpt.pt if it exists (same model flags, --seq-len and --seed)",
    "time_budget": "seconds; then checkpoint and stop, to --resume later (default: no limit)",
    "progress": "show a progress bar",
}
CHOICES = {"attention": ATTENTIONS, "qk_gate": ("topk", "random"), "compile_mode": COMPILE_MODES}
EPILOG = """\
examples:
  a tiny run on the CPU, under a minute (Triton's interpreter runs the kernels; any text
  file of a few KB will do as the corpus, e.g. the repository's README.md):
    TRITON_INTERPRET=1 %(prog)s --device cpu --data README.md --seq-len 64 \\
        --batch-size 2 --n-layer 1 --n-embd 32 --n-head 2 --max-steps 10 --eval-every 10 \\
        --eval-windows 4 --out-dir runs/cpu-try

  on one GPU (prepare the corpus once; the defaults: T=8192, 6 blocks x 512):
    python -m sparseflash.train.data prepare
    %(prog)s --attention hash --n-buckets 16
    %(prog)s --attention hash --n-buckets 16 --resume     # continue it after a stop

  on 8 GPUs of one machine:
    torchrun --nproc-per-node 8 -m sparseflash.train --attention qk --keep-rate 0.3

  sample text from a run's checkpoint (its flags: %(prog)s sample --help):
    %(prog)s sample --ckpt runs/cpu-try/ckpt.pt --prompt "The " --tokens 200

Mistakes (a missing corpus, a bad value, a checkpoint that cannot be resumed from) end the
run with one line on stderr and exit status 2.
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """The epilog's lines as written; "(default: ...)" after every flag's help."""

    def _get_help_string(self, action):
        help = action.help or ""
        if action.option_strings and action.default is not argparse.SUPPRESS and "(default:" not in help \
                and "%(default)" not in help and action.dest != "help":
            help += " (default: %(default)s)"
        return help


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=_Formatter)
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name == "vocab_size":
            continue  # byte-level data: always 256
        if f.name == "progress":
            p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=default, help=HELP[f.name])
        elif isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=HELP[f.name])
        else:
            kind = {"n_kv_heads": int, "window": int, "time_budget": float}.get(f.name, type(default))
            p.add_argument(flag, type=kind, default=None if f.name == "out_dir" else default,
                           choices=CHOICES.get(f.name), help=HELP[f.name])
    return p


def _error(e: BaseException) -> int:
    """One line on stderr; the exit status of a mistake (as argparse's)."""
    print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sample"]:
        from . import sample

        return sample.main(argv[1:])
    args = parser().parse_args(argv)
    if args.out_dir is None:
        args.out_dir = f"runs/{args.attention}-T{args.seq_len}"
    try:  # the flags, the model's shape and the data, before any work
        cfg = TrainConfig(**vars(args))
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {cfg.device}: no CUDA GPU is available (--device cpu runs on the CPU)")
        with torch.device("meta"):  # checks the shape (heads, head dimension, ...); allocates nothing
            GPT(cfg.model_config())
        data = data_mod.load(cfg.data)
        data.train_batch(0, 1, cfg.seq_len)  # long enough for --seq-len
        data.val_starts(1, cfg.seq_len)
    except (OSError, ValueError) as e:  # a missing or unreadable corpus (FileNotFoundError), a bad value
        return _error(e)
    try:
        log = train(cfg, data=data)
    except CheckpointError as e:
        return _error(e)
    if log.get("val") and int(os.environ.get("RANK", 0)) == 0:
        v = log["val"][-1]
        print(f"{log['status']}: {log['steps_done']} steps, val loss {v['loss']:.4f} (ppl {v['ppl']:.2f}), "
              f"{log.get('median_tokens_per_s', 0):,.0f} tokens/s; log: {cfg.out_dir}/log.json")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
