"""Quality of hash ∪ window against dense and window alone: equal steps, equal data, two seeds.

    PYTHONPATH=. python tools/quality_ablation.py --out $OUT/quality.json --seq-len 8192 --batch 4 \\
        --configs dense hash16 hash16w256 window256 --seeds 0 1

Each configuration trains the 6x512 byte-level GPT of ``sparseflash.train`` (``max_steps``
steps, lr 2e-3, the default corpus) with our kernels, and gives a row ``{attention, n_buckets,
window, seq_len, batch, steps, seed, val_loss, ppl, median_step_ms, pair_density_start,
pair_density_end}`` with its validation curve.  Names: ``dense``; ``window<W>`` (dense with a
sliding window); ``hash<n>`` (pure hashing, window 0); ``hash<n>w<W>`` (the union).

``pair_density``: allowed pairs over causal pairs in the first ``--density-tokens`` tokens of
a validation window (default: a whole ``--seq-len`` window; the row's ``density_tokens``),
averaged over layers and heads, with the model's own buckets, at step 0 and at the end of
training (buckets drift as the model trains, and this decides the speed).
Rows are written after each run (``--out``), so a run cut short keeps what finished.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

import torch

from sparseflash.train import data as data_mod
from sparseflash.train.density import pair_density
from sparseflash.train.loop import TrainConfig, build, setup, train


def parse(name: str) -> dict:
    if name == "dense":
        return dict(attention="dense", n_buckets=None, window=0)
    m = re.fullmatch(r"window(\d+)", name)
    if m:
        return dict(attention="dense", n_buckets=None, window=int(m[1]))
    m = re.fullmatch(r"hash(\d+)(?:w(\d+))?", name)
    if m:
        return dict(attention="hash", n_buckets=int(m[1]), window=int(m[2] or 0))
    raise ValueError(f"unknown configuration {name!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", nargs="+", default=["dense", "hash16", "hash16w256", "window256"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--density-tokens", type=int, default=0,
                    help="tokens of the validation window the pair density is counted on (0: --seq-len)")
    ap.add_argument("--work-dir", default="runs/quality")
    ap.add_argument("--model", default="6x512x8", help="layers x width x heads")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--note", default="", help="free text kept in the file's meta (e.g. how the runs shared the GPU)")
    args = ap.parse_args(argv)
    data = data_mod.load(data_mod.DEFAULT_CORPUS)
    rows = []
    # seed-major: a run cut short by a time limit still leaves one seed of every configuration
    for seed in args.seeds:
        for name in args.configs:
            c = parse(name)
            extra = dict(n_buckets=c["n_buckets"]) if c["n_buckets"] else {}
            n_layer, n_embd, n_head = (int(x) for x in args.model.split("x"))
            cfg = TrainConfig(attention=c["attention"], window=c["window"], seq_len=args.seq_len, device=args.device,
                              n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                              batch_size=args.batch, max_steps=args.steps, seed=seed, progress=False,
                              out_dir=f"{args.work_dir}/{name}-T{args.seq_len}-s{seed}", eval_every=100, **extra)
            d = setup(cfg.device)
            n_density = args.density_tokens or args.seq_len
            sample = torch.as_tensor(data.val[:n_density].astype("int64"), device=d.device)[None]
            model, _, _ = build(cfg, d)
            with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=d.device.type == "cuda"):
                start = pair_density(model, sample)
            del model
            t0 = time.perf_counter()
            log = train(cfg, data)
            ckpt = torch.load(f"{cfg.out_dir}/ckpt.pt", map_location=d.device, weights_only=False)
            model, _, _ = build(cfg, d)
            model.load_state_dict(ckpt["model"])
            with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=d.device.type == "cuda"):
                end = pair_density(model, sample)
            del model, ckpt
            v = log["val"][-1]
            rows.append(dict(name=name, attention=c["attention"], n_buckets=c["n_buckets"], window=c["window"],
                             seq_len=args.seq_len, batch=args.batch, steps=log["steps_done"], seed=seed,
                             val_loss=v["loss"], ppl=v["ppl"], median_step_ms=1e3 * log["median_step_s"],
                             pair_density_start=start, pair_density_end=end, density_tokens=n_density, wall_s=time.perf_counter() - t0,
                             curve=[[e["step"], e["loss"]] for e in log["val"]],
                             device=torch.cuda.get_device_name() if d.device.type == "cuda" else "cpu"))
            print(f"{name} seed {seed}: val loss {v['loss']:.4f} (ppl {v['ppl']:.2f}), "
                  f"{rows[-1]['median_step_ms']:.1f} ms/step, density {start:.3f} -> {end:.3f}", flush=True)
            with open(args.out, "w") as f:
                json.dump(dict(meta=dict(argv=sys.argv, torch=torch.__version__, note=args.note,
                                         device=rows[-1]["device"]), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
