"""Multi-GPU scaling of the trainer: ``python -m sparseflash.train.scaling``.

The trainer (``python -m sparseflash.train``) runs under ``torchrun`` with one process per GPU
(DistributedDataParallel over NCCL).  This driver runs it on 1 and on ``--gpus`` GPUs and
writes what the comparison needs into one results file:

* **speed**: the GPT-2-small-shaped model of the single-GPU speed table (12 layers, width 768,
  12 heads of 64) at ``--seq-len`` (16384), one sequence per GPU and step (weak scaling: the
  global batch grows with the GPUs), ``--speed-steps`` steps; tokens/s is the trainer's median
  over the steps that compiled nothing.  ``scaling_efficiency = tokens/s(n GPUs) / (n ·
  tokens/s(1 GPU))``; ``speedup_vs_dense`` compares each attention with dense on the same GPUs.
* **loss**: the smaller model of the loss runs (6 × 512, 8 heads) trains ``--loss-steps``
  steps on a global batch of ``--loss-batch`` sequences, once on 1 GPU and once on ``--gpus``
  (each process ``loss_batch / gpus`` sequences of the same global batch, so both runs see the
  same data in the same order).  A second 1-GPU run with another seed measures the run-to-run
  noise that "matches within noise" is judged against.  Independent 1-GPU runs go side by side,
  one per GPU.

Every run's log and checkpoint are under ``--work-dir``; ``--resume`` skips finished runs and
continues stopped ones; ``--time-budget`` stops starting runs (and stops the trainer) after
that many seconds.  Results: ``--out`` (default ``results/train_<device>x<gpus>.json``).

Example (the committed ``results/train_h200x2.json``)::

    python -m sparseflash.train.scaling --gpus 2 --resume --time-budget 470
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from .experiment import _clean, _git_commit, parse_config, parse_model
from .loop import device_name, train_time

SCHEMA = "sparseflash.train.scaling/1"


def trainer_argv(name: str, model: str, seq_len: int, batch: int, steps: int, *, seed: int, out_dir: Path,
                 eval_every: int, eval_windows: int, data: str, time_budget: float | None) -> list[str]:
    """The trainer's flags for one run."""
    flags = {"attention": None, **parse_config(name), **parse_model(model), "seq_len": seq_len,
             "batch_size": batch, "max_steps": steps, "seed": seed, "eval_every": eval_every,
             "eval_windows": eval_windows, "ckpt_every": max(steps, 1), "data": data, "out_dir": str(out_dir)}
    argv = []
    for k, v in flags.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    if time_budget is not None:
        argv += ["--time-budget", f"{time_budget:.0f}"]
    return argv + ["--resume", "--no-progress"]


def launch(argv: list[str], gpus: int, gpu_ids: list[int] | None, log_file: Path) -> subprocess.Popen:
    """Start the trainer: ``torchrun`` with ``gpus`` processes (NCCL on CUDA), the machine's
    environment kept (NCCL variables included), ``CUDA_VISIBLE_DEVICES`` narrowed to ``gpu_ids``."""
    env = dict(os.environ)
    if gpu_ids is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpu_ids)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
           "-m", "sparseflash.train", *argv]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_file, "w")
    out.write(" ".join(cmd) + "\n")
    out.flush()
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


def read_log(out_dir: Path) -> dict | None:
    path = out_dir / "log.json"
    return json.loads(path.read_text()) if path.exists() else None


class Plan:
    """The runs, each ``(key, phase, name, gpus, seed, out_dir, argv)``, and how to start them."""

    def __init__(self, args):
        self.args = args
        self.work = Path(args.work_dir)

    def runs(self, phase: str, deadline: float):
        a = self.args
        out = []
        if phase == "speed":
            for name in a.configs:
                for g in sorted({1, a.gpus}):
                    d = self.work / f"speed_T{a.seq_len}_{name}_{g}gpu"
                    out.append(dict(phase="speed", name=name, gpus=g, seed=0, out_dir=d, argv=trainer_argv(
                        name, a.speed_model, a.seq_len, 1, a.speed_steps, seed=0, out_dir=d,
                        eval_every=a.speed_steps, eval_windows=g, data=a.data, time_budget=None)))
        else:
            for name in a.configs:
                for g, seed in dict.fromkeys([(1, 0), (a.gpus, 0), (1, 1)]):  # --gpus 1: each run once
                    if a.loss_batch % g:
                        raise ValueError(f"--loss-batch {a.loss_batch} does not split over {g} GPUs")
                    d = self.work / f"loss_T{a.seq_len}_{name}_{g}gpu_seed{seed}"
                    left = deadline - time.time()
                    out.append(dict(phase="loss", name=name, gpus=g, seed=seed, out_dir=d, argv=trainer_argv(
                        name, a.loss_model, a.seq_len, a.loss_batch // g, a.loss_steps, seed=seed, out_dir=d,
                        eval_every=a.eval_every, eval_windows=a.eval_windows, data=a.data,
                        time_budget=left if math.isfinite(left) else None)))
        return out


def run_all(runs: list[dict], n_gpus: int, deadline: float) -> list[dict]:
    """Run what is not done yet: runs that need every GPU one at a time; 1-GPU runs of the
    loss phase side by side, one per GPU (speed runs alone, so that nothing shares the machine)."""
    pending = [r for r in runs if not ((read_log(r["out_dir"]) or {}).get("status") == "done")]
    for r in runs:
        if r not in pending:
            print(f"{r['phase']} {r['name']} {r['gpus']} GPU seed {r['seed']}: done, skipped", flush=True)
    while pending:
        if time.time() > deadline:
            print("time budget spent: stopping (run again with --resume)", flush=True)
            return pending
        r = pending[0]
        batch = [r]
        if r["phase"] == "loss" and r["gpus"] == 1:
            batch = [p for p in pending if p["phase"] == "loss" and p["gpus"] == 1][:n_gpus]
        procs = []
        for i, p in enumerate(batch):
            ids = list(range(p["gpus"])) if p["gpus"] > 1 else [i]
            procs.append(launch(p["argv"], p["gpus"], ids if torch.cuda.is_available() else None,
                                p["out_dir"] / "stdout.txt"))
            print(f"{p['phase']} {p['name']} on {p['gpus']} GPU(s) seed {p['seed']}: started", flush=True)
        for p, proc in zip(batch, procs):
            rc = proc.wait()
            log = read_log(p["out_dir"]) or {}
            print(f"{p['phase']} {p['name']} {p['gpus']} GPU seed {p['seed']}: rc {rc}, status {log.get('status')}, "
                  f"{log.get('median_tokens_per_s', 0):,.0f} tokens/s", flush=True)
            if rc != 0:
                tail = (p["out_dir"] / "stdout.txt").read_text()[-3000:]
                print(tail, file=sys.stderr)
            pending.remove(p)
    return []


def row(run: dict, args) -> dict | None:
    log = read_log(run["out_dir"])
    if log is None:
        return None
    v = log["val"][-1] if log.get("val") else None
    r = {"phase": run["phase"], "name": run["name"], **parse_config(run["name"]), "gpus": run["gpus"],
         "seed": run["seed"], "seq_len": args.seq_len,
         "model": args.speed_model if run["phase"] == "speed" else args.loss_model,
         "batch_per_gpu": log["config"]["batch_size"], "tokens_per_step": log["tokens_per_step"],
         "world_size": log.get("world_size"), "status": "ok" if log.get("status") == "done" else log.get("status"),
         "steps_done": log.get("steps_done"), "median_step_ms": (log.get("median_step_s") or math.nan) * 1e3,
         "tokens_per_s": log.get("median_tokens_per_s"), "device": log.get("device"),
         "final_val_loss": v["loss"] if v else None, "final_val_ppl": v["ppl"] if v else None,
         "train_time_s": log.get("train_time_s"), "wall_s": log.get("wall_s"),
         "command": "torchrun --standalone --nproc-per-node=%d -m sparseflash.train %s"
                    % (run["gpus"], " ".join(run["argv"]))}
    if run["phase"] == "loss":
        r["curve"] = [{"step": c["step"], "loss": c["loss"], "time_s": train_time(log, c["step"])}
                      for c in log["val"]]
        r["train_curve"] = [{"step": s["step"], "loss": s["loss"]} for s in log["steps"]]
    return r


def summarise(rows: list[dict], gpus: int) -> dict:
    """Scaling efficiency, the sparse speed-up on 1 and ``gpus`` GPUs, and the loss agreement."""
    by = {(r["phase"], r["name"], r["gpus"], r["seed"]): r for r in rows if r["status"] == "ok"}
    out = {"speed": {}, "loss": {}}
    names = sorted({r["name"] for r in rows})
    for name in names:
        one, many = by.get(("speed", name, 1, 0)), by.get(("speed", name, gpus, 0))
        s = {}
        if one and many:
            s["tokens_per_s_1gpu"], s[f"tokens_per_s_{gpus}gpu"] = one["tokens_per_s"], many["tokens_per_s"]
            s["scaling_efficiency"] = many["tokens_per_s"] / (gpus * one["tokens_per_s"])
        dense1, densen = by.get(("speed", "dense", 1, 0)), by.get(("speed", "dense", gpus, 0))
        if one and dense1:
            s["speedup_vs_dense_1gpu"] = one["tokens_per_s"] / dense1["tokens_per_s"]
        if many and densen:
            s[f"speedup_vs_dense_{gpus}gpu"] = many["tokens_per_s"] / densen["tokens_per_s"]
        if "speedup_vs_dense_1gpu" in s and f"speedup_vs_dense_{gpus}gpu" in s:
            s["speedup_ratio_multi_over_1gpu"] = s[f"speedup_vs_dense_{gpus}gpu"] / s["speedup_vs_dense_1gpu"]
        out["speed"][name] = s
        a, b, c = by.get(("loss", name, 1, 0)), by.get(("loss", name, gpus, 0)), by.get(("loss", name, 1, 1))
        lo = {}
        if a and b:
            va = {p["step"]: p["loss"] for p in a["curve"]}
            diffs = [abs(p["loss"] - va[p["step"]]) for p in b["curve"] if p["step"] in va and p["step"] > 0]
            lo.update(final_val_loss_1gpu=a["final_val_loss"], **{f"final_val_loss_{gpus}gpu": b["final_val_loss"]},
                      final_diff_multi_vs_1gpu=b["final_val_loss"] - a["final_val_loss"],
                      max_abs_val_diff_multi_vs_1gpu=max(diffs) if diffs else None)
        if a and c:
            va = {p["step"]: p["loss"] for p in a["curve"]}
            diffs = [abs(p["loss"] - va[p["step"]]) for p in c["curve"] if p["step"] in va and p["step"] > 0]
            lo.update(final_val_loss_1gpu_seed1=c["final_val_loss"],
                      seed_noise_final=c["final_val_loss"] - a["final_val_loss"],
                      seed_noise_max_abs_val_diff=max(diffs) if diffs else None)
        if "final_diff_multi_vs_1gpu" in lo and "seed_noise_final" in lo:
            lo["within_noise"] = abs(lo["final_diff_multi_vs_1gpu"]) <= abs(lo["seed_noise_final"])
        out["loss"][name] = lo
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sparseflash.train.scaling",
                                description="The trainer on 1 GPU and on several (see the module docstring).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--out", help="results file (default results/train_<device>x<gpus>.json)")
    p.add_argument("--configs", nargs="+", default=["dense", "hash16"])
    p.add_argument("--phase", choices=("speed", "loss", "all"), default="all")
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--speed-model", default="12x768x12")
    p.add_argument("--speed-steps", type=int, default=20)
    p.add_argument("--loss-model", default="6x512x8")
    p.add_argument("--loss-batch", type=int, default=4, help="global batch (sequences per step)")
    p.add_argument("--loss-steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--data", default="sotu-gutenberg")
    p.add_argument("--work-dir", default="runs/scaling")
    p.add_argument("--resume", action="store_true", help="keep finished runs and continue stopped ones")
    p.add_argument("--time-budget", type=float, default=None, help="seconds")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    if args.gpus < 1:
        print(f"scaling: --gpus {args.gpus}: at least 1", file=sys.stderr)
        return 2
    if args.phase in ("loss", "all") and (args.loss_batch < 1 or args.loss_batch % args.gpus):
        print(f"scaling: --loss-batch {args.loss_batch} (the global batch) does not split evenly over "
              f"--gpus {args.gpus}: pick a multiple of {args.gpus}", file=sys.stderr)
        return 2
    start = time.time()
    deadline = start + args.time_budget if args.time_budget is not None else math.inf
    cuda = torch.cuda.is_available()
    n_visible = torch.cuda.device_count() if cuda else args.gpus
    if cuda and n_visible < args.gpus:
        print(f"scaling: --gpus {args.gpus} but {n_visible} GPU(s) visible", file=sys.stderr)
        return 2
    dev = device_name(torch.device("cuda", 0) if cuda else torch.device("cpu"))
    if args.out is None:
        from ..bench.results import device_slug

        args.out = f"results/train_{device_slug(dev, 'cuda' if cuda else 'cpu', not cuda)}x{args.gpus}.json"
    if Path(args.out).exists() and not args.resume:
        print(f"scaling: {args.out} exists: --resume rewrites it from the runs in {args.work_dir}", file=sys.stderr)
        return 2
    work = Path(args.work_dir)
    if not args.resume and work.exists() and any(work.iterdir()):
        print(f"scaling: {work} holds earlier runs: --resume keeps them, or remove it", file=sys.stderr)
        return 2
    plan = Plan(args)
    phases = ["speed", "loss"] if args.phase == "all" else [args.phase]
    runs = []
    for ph in phases:
        rs = plan.runs(ph, deadline)
        runs += rs
        left = run_all(rs, args.gpus, deadline)
        if left:
            break
    rows = [r for r in (row(x, args) for x in runs) if r is not None]
    import triton

    meta = {"schema": SCHEMA, "device": dev, "gpus": args.gpus, "interpreter": not cuda,
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "git_commit": _git_commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "argv": [sys.executable, "-m", "sparseflash.train.scaling", *argv], "config": vars(args),
            "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")},
            "complete": all(r["status"] == "ok" for r in rows) and len(rows) == len(runs),
            "elapsed_s": time.time() - start,
            "notes": ["speed: weak scaling, one sequence per GPU per step; tokens/s is the trainer's median step "
                      "(steps that compiled kernels excluded); bf16 autocast; DDP over NCCL, one process per GPU.",
                      "loss: the same global batch on 1 GPU and on several (identical data order); the seed-1 "
                      "1-GPU run measures run-to-run noise (other initialisation and data order)."]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "summary": summarise(rows, args.gpus), "rows": rows}
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(_clean(doc), indent=1, default=str) + "\n")
    os.replace(tmp, out)
    print(json.dumps(_clean(doc["summary"]), indent=1))
    print(f"{'complete' if meta['complete'] else 'incomplete'}: {out} ({len(rows)} rows, {time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
