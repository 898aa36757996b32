"""Continuations from trained checkpoints, side by side: what notebook 07 shows of real models.

    PYTHONPATH=. python tools/samples.py --ckpt dense=runs/dense/ckpt.pt \\
        --ckpt hash16w128=runs/hash16w128/ckpt.pt --out results/samples_h200.json

For each checkpoint and each prompt it writes a row ``{model, attention, n_buckets, window,
seq_len, steps, val_loss, prompt_name, prompt_bytes, prompt_tail, mode, temperature, top_k,
seed, text, ms_per_token}``: ``mode`` ``greedy`` (temperature 0) or ``topk`` (temperature
0.8, top-k 40, seeded).  Generation is :meth:`GPT.generate` with the KV cache, so the hash
model decodes under its own pattern (its layer's rotations, the bucket index, the window).
The prompts are short openings and, for the long-context case, the first ``--long-prompt``
bytes of a validation document of the corpus (text no model trained on).
``ms_per_token`` is the wall time of the whole generation (prompt included) over the bytes
generated, batch 1, eager, after a short warm-up generation of each model; ``ms_per_token_cuda_graph`` the same with ``cuda_graph=True``
(dense and hash on CUDA), and ``cuda_graph_same_tokens`` whether it gave the same bytes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sparseflash.train import data as data_mod
from sparseflash.train.sample import load_model

SHORT_PROMPTS = {
    "senate": "Fellow-Citizens of the Senate and of the House of Representatives:\n\n",
    "novel": "It was a dark and stormy night; ",
}


def long_prompt(corpus: str, n_bytes: int) -> str:
    """The first ``n_bytes`` of the longest validation document of ``corpus``, cut at a line end."""
    folder = data_mod.DATA_DIR / corpus
    val = np.fromfile(folder / "val.bin", dtype=np.uint8)
    docs = np.split(val, np.flatnonzero(val == data_mod.DOC_SEP) + 1)
    doc = max(docs, key=len).tobytes().rstrip(b"\0")
    cut = doc[:n_bytes]
    cut = cut[: cut.rfind(b"\n") + 1] or cut
    return cut.decode("utf-8", errors="replace")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", action="append", required=True, help="name=path of a checkpoint (repeat)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--data", default=data_mod.DEFAULT_CORPUS)
    p.add_argument("--long-prompt", type=int, default=6000, help="bytes of the long prompt (0: none)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    prompts = dict(SHORT_PROMPTS)
    if args.long_prompt:
        prompts["long"] = long_prompt(args.data, args.long_prompt)
    rows = []
    for spec in args.ckpt:
        name, path = spec.split("=", 1)
        model, cfg = load_model(path, device=args.device)
        ckpt_meta = torch.load(path, map_location="cpu", weights_only=False)
        vals = (ckpt_meta.get("log") or {}).get("val") or [{}]
        val_loss = vals[-1].get("val_loss", vals[-1].get("loss"))
        cuda = args.device.startswith("cuda")
        graphs = (False, True) if cuda and cfg.get("attention") in ("dense", "hash") else (False,)
        hashed = cfg.get("attention") == "hash"
        for graph in graphs:  # warm-up: kernels compiled and caches filled before anything is timed
            warm = torch.tensor([list(SHORT_PROMPTS["senate"].encode())], dtype=torch.long, device=args.device)
            with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=cuda):
                model.generate(warm, 8, temperature=0.0, cuda_graph=graph)
        for pname, prompt in prompts.items():
            idx = torch.tensor([list(prompt.encode())], dtype=torch.long, device=args.device)
            for mode, temp, top_k in (("greedy", 0.0, None), ("topk", 0.8, 40)):
                outs, ms = {}, {}
                for graph in graphs:
                    g = torch.Generator(device=args.device).manual_seed(0)
                    if cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=cuda):
                        outs[graph] = model.generate(idx, args.tokens, temperature=temp, top_k=top_k, generator=g,
                                                     cuda_graph=graph)
                    if cuda:
                        torch.cuda.synchronize()
                    ms[graph] = 1e3 * (time.perf_counter() - t0) / args.tokens
                out = outs[False]
                text = bytes(out[0, idx.shape[1]:].tolist()).decode("utf-8", errors="replace")
                rows.append(dict(model=name, attention=cfg.get("attention"), n_buckets=cfg.get("n_buckets") if hashed else None,
                                 window=cfg.get("window") or 0, seq_len=cfg.get("seq_len"), steps=cfg.get("max_steps"),
                                 val_loss=val_loss, prompt_name=pname, prompt_bytes=idx.shape[1],
                                 prompt_tail=prompt[-300:], mode=mode, temperature=temp, top_k=top_k, seed=0,
                                 text=text, ms_per_token=ms[False], ms_per_token_cuda_graph=ms.get(True),
                                 cuda_graph_same_tokens=torch.equal(outs[True], out) if True in outs else None))
                print(f"--- {name} / {pname} / {mode} ({ms[False]:.2f} ms/token eager, "
                      f"{ms.get(True, float('nan')):.2f} with a CUDA graph; same tokens: "
                      f"{rows[-1]['cuda_graph_same_tokens']})\n{text}\n", flush=True)
        del model
    meta = dict(schema="sparseflash.samples/1", argv=sys.argv, torch=torch.__version__, device=torch.cuda.get_device_name() if
                args.device.startswith("cuda") else "cpu", tokens=args.tokens, data=args.data)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
