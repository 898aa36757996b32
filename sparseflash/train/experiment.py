"""The paper's training comparison at reduced scale: ``python -m sparseflash.train.experiment``.

Two phases, each a list of configurations (``sdpa``, ``sdpa_cudnn``, ``dense``, ``hash16w0``,
``hash16w128``, ``qk0.3``, ``none``, ...: the attention, with its bucket count or keep rate and,
after ``w``, its sliding window; ``hash16`` without ``w`` takes the model's default window, 128):

* **speed**: for each sequence length (8192, 16384) and configuration, a GPT-2-small-shaped
  model (12 layers, width 768, 12 heads of 64) takes ``--warmup`` training steps, then
  ``--timed`` steps back to back between two ``torch.cuda.synchronize``: step time, tokens/s,
  peak memory, and the ratios to SDPA FlashAttention-2 (``sdpa``), to our dense kernel, and
  to ``none`` (no attention at all: ``attention_share = 1 - t(none) / t`` is the part of the
  step that attention takes, and ``t / t(none)`` bounds any attention's speed-up: Amdahl).
  The batch holds ``--speed-tokens`` tokens at every length (16384: 2 × 8192, 1 × 16384).
  The patterns of ``hash`` and ``qk`` change as the model learns (trained LSH piles tokens into
  fewer buckets, which costs time), so those configurations first train ``--speed-train-steps``
  steps on the corpus; each row gives the ``pair_density`` of the model it timed
  (:func:`~sparseflash.train.density.pair_density` on a validation window).
* **loss**: at ``--loss-seq-len`` (8192), a smaller model (6 layers, width 512, 8 heads of 64:
  fast enough that a few hundred steps of three runs fit in a few minutes) trains with each
  of ``--loss-configs`` (dense, hash16, qk0.5) on the same data and schedule
  (:func:`~sparseflash.train.loop.train`): validation loss and perplexity against steps and
  against training time, and the time each run takes to reach the final validation loss of the
  first one (the dense run).

**Results** go to ``--out`` (default ``results/train_<device>.json``: ``results/train_h100.json``
on an H100; ``{"meta": ..., "rows": [...]}``, one row per configuration,
rewritten through a temporary file after each one).  A results file is never destroyed: an
existing one is refused unless ``--resume`` (extend it: configurations already measured with
the same setup are skipped) or ``--force`` (move it to ``<name>.bak-<time>`` and start anew).
Loss runs checkpoint under ``--work-dir`` (``runs/experiment/loss_T8192_<config>/``) and, with
``--resume``, continue from there.  ``--time-budget SECONDS``: no new speed configuration
starts after it, and a loss run checkpoints and stops at it (``status: partial``; run again
with ``--resume``).

Times on CPU (Triton's interpreter) are not GPU timings: such a file says so in ``meta``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .._provenance import git_commit as _git_commit
from . import data as data_mod
from .density import pair_density
from .loop import COMPILE_MODES, Stepper, TrainConfig, build, device_name, setup, sync, train, train_time
from .model import GPTConfig, flops_per_token

ROOT = Path(__file__).resolve().parent.parent.parent
SCHEMA = "sparseflash.train.experiment/1"
SPEED_CONFIGS = ("sdpa", "sdpa_cudnn", "dense", "none", "hash16w0", "hash16w128", "qk0.3")
LOSS_CONFIGS = ("dense", "hash16", "qk0.5")


def parse_config(name: str) -> dict:
    """A configuration name -> the model's attention fields.

    ``"hash16"`` -> ``{"attention": "hash", "n_buckets": 16}`` (the model's default window),
    ``"hash16w128"`` -> the same with ``"window": 128`` (``w0``: buckets alone), ``"qk0.3"`` ->
    keep rate 0.3 (``qk0.3w64``: with a window), ``"dense"``, ``"sdpa"``, ``"sdpa_cudnn"``,
    ``"none"`` by name.

    Raises:
        ValueError: for a name of none of these forms.
    """
    m = re.fullmatch(r"hash(\d+)(?:w(\d+))?", name)
    if m:
        out = {"attention": "hash", "n_buckets": int(m[1])}
        return out if m[2] is None else {**out, "window": int(m[2])}
    m = re.fullmatch(r"qk([0-9.]+)(?:w(\d+))?", name)
    if m:
        try:
            out = {"attention": "qk", "keep_rate": float(m[1])}
        except ValueError:
            raise ValueError(f"bad keep rate in configuration {name!r}") from None
        return out if m[2] is None else {**out, "window": int(m[2])}
    if name not in ("dense", "sdpa", "sdpa_cudnn", "none"):
        raise ValueError(f"unknown configuration {name!r}: expected sdpa, sdpa_cudnn, dense, none, "
                         "hash<n>[w<W>] or qk<rate>[w<W>]")
    return {"attention": name}


def pattern_fields(name: str) -> dict:
    """``n_buckets`` and ``window`` (the window the model uses, 0 for none) of a configuration."""
    c = parse_config(name)
    cfg = GPTConfig(**c)
    return {"n_buckets": c.get("n_buckets"), "window": cfg.effective_window}


def parse_model(shape: str) -> dict:
    """``"12x768x12"`` -> layers, width, heads."""
    n_layer, n_embd, n_head = (int(v) for v in shape.lower().split("x"))
    return {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head}


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


# --------------------------------------------------------------------------------------
# The results file
# --------------------------------------------------------------------------------------


class Refused(Exception):
    """The results file exists and this run may not extend it (the message says why)."""


def row_key(r: dict) -> tuple:
    """What a row measures; a row with the same key is the same measurement."""
    return (r.get("phase"), r.get("name"), r.get("seq_len"), r.get("model"), r.get("tokens_per_step"),
            r.get("compile"), r.get("max_steps"))


class Results:
    """``{"meta", "rows"}`` at ``path``, extended row by row and never destroyed."""

    def __init__(self, path: Path, meta: dict, *, resume: bool, force: bool):
        self.path, self.meta, self.rows = Path(path), meta, []
        if self.path.exists():
            try:
                old = json.loads(self.path.read_text())
            except ValueError as e:
                old, err = None, e
            if force or old is None:
                if old is None and not force:
                    raise Refused(f"{self.path} is not readable JSON ({err}); --force moves it aside")
                stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
                backup = self.path.with_name(f"{self.path.name}.bak-{stamp}")
                os.replace(self.path, backup)
                self.meta["replaced_file_backup"] = str(backup)
            elif not resume:
                raise Refused(f"{self.path} exists: --resume extends it (skipping what is done), --force moves it "
                              "aside and starts anew")
            else:
                differ = [k for k in ("schema", "device", "torch", "interpreter")
                          if old["meta"].get(k) != meta.get(k)]
                if differ:
                    raise Refused(f"{self.path} was measured with other {', '.join(differ)} ("
                                  + ", ".join(f"{k}: {old['meta'].get(k)!r} vs {meta.get(k)!r}" for k in differ)
                                  + "): write another file, or --force")
                self.rows = old["rows"]
                prev = old["meta"].get("previous_invocations", []) + [
                    {k: old["meta"].get(k) for k in ("date", "argv", "git_commit")}]
                self.meta["previous_invocations"] = prev

    def done(self, key: tuple) -> dict | None:
        for r in self.rows:
            if row_key(r) == key and r.get("status") == "ok":
                return r
        return None

    def put(self, row: dict) -> None:
        self.rows = [r for r in self.rows if row_key(r) != row_key(row)] + [row]
        add_ratios(self.rows)
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(_clean({"meta": self.meta, "rows": self.rows}), indent=1, default=str) + "\n")
        os.replace(tmp, self.path)


def add_ratios(rows: list[dict]) -> None:
    """Speed rows: ``speedup_vs_sdpa`` / ``_vs_dense`` / ``_vs_sdpa_cudnn`` (``t(base) / t``),
    ``none_ms``, ``attention_share`` and ``amdahl_ceiling`` (``t / t(none)``), per sequence length.
    Loss rows: ``time_to_reference_s`` / ``steps_to_reference`` (first time the validation
    loss reaches the reference run's final one, linearly interpolated between validations)
    and ``speedup_to_reference``."""
    speed = [r for r in rows if r.get("phase") == "speed" and r.get("status") == "ok"]
    for r in speed:
        same = {s["name"]: s["step_ms"] for s in speed if s["seq_len"] == r["seq_len"] and s["model"] == r["model"]
                and s["tokens_per_step"] == r["tokens_per_step"] and s.get("compile") == r.get("compile")}
        for base in ("sdpa", "sdpa_cudnn", "dense"):
            r[f"speedup_vs_{base}"] = same[base] / r["step_ms"] if base in same else None
        none = same.get("none")
        r["none_ms"] = none
        r["attention_share"] = 1 - none / r["step_ms"] if none else None
        r["amdahl_ceiling"] = r["step_ms"] / none if none else None
    loss = [r for r in rows if r.get("phase") == "loss" and r.get("curve")]
    for r in loss:
        ref = next((s for s in loss if s.get("is_reference") and s["seq_len"] == r["seq_len"]
                    and s["model"] == r["model"] and s.get("status") == "ok"), None)
        r["reference"] = ref["name"] if ref else None
        r["reference_final_val_loss"] = ref["final_val_loss"] if ref else None
        hit = reach(r["curve"], ref["final_val_loss"]) if ref else None
        r["time_to_reference_s"], r["steps_to_reference"] = hit if hit else (None, None)
        ref_t = ref and reach(ref["curve"], ref["final_val_loss"])
        r["speedup_to_reference"] = (ref_t[0] / hit[0]) if (hit and ref_t and hit[0] > 0) else None


def reach(curve: list[dict], target: float):
    """``(time_s, step)`` at which the validation curve first reaches ``target`` (interpolated), or None."""
    prev = None
    for p in curve:
        if p["loss"] <= target + 1e-12:
            if prev is None or prev["loss"] == p["loss"]:
                return p["time_s"], p["step"]
            f = (prev["loss"] - target) / (prev["loss"] - p["loss"])
            return prev["time_s"] + f * (p["time_s"] - prev["time_s"]), prev["step"] + f * (p["step"] - prev["step"])
        prev = p
    return None


# --------------------------------------------------------------------------------------
# Speed
# --------------------------------------------------------------------------------------


def time_steps(cfg: TrainConfig, data, *, warmup: int = 3, timed: int = 10, train_steps: int = 0) -> dict:
    """``train_steps`` + ``warmup`` training steps, then the mean time of ``timed`` steps run back
    to back (synchronised before and after), and the pair density of the model timed (None for
    SDPA's and no attention); the model and optimiser are freed afterwards."""
    d = setup(cfg.device)
    if d.device.type == "cuda":
        # The peak covers the configuration's whole life, compilation and CUDA-graph capture
        # included: under reduce-overhead the graphs' private pool is allocated while the first
        # steps are captured, and a reset taken after them would leave it out.
        torch.cuda.reset_peak_memory_stats(d.device)
    model, opt, wrapped = build(cfg, d)
    stepper = Stepper(model, wrapped, opt, cfg, data, d)
    tokens = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    try:
        t0 = time.perf_counter()
        for i in range(train_steps):  # patterns of a trained model (see the module docstring)
            stepper(i, sync_loss=False)
        sync(d.device)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        losses = [stepper(i) for i in range(train_steps, train_steps + warmup)]
        sync(d.device)
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        first = train_steps + warmup
        for i in range(first, first + timed):
            stepper(i, sync_loss=False)
        sync(d.device)
        ms = (time.perf_counter() - t0) / timed * 1e3
        peak = torch.cuda.max_memory_allocated(d.device) / 2**30 if d.device.type == "cuda" else None
        density = None
        if cfg.attention in ("dense", "hash", "qk"):
            sample = torch.as_tensor(data.val[:cfg.seq_len].astype("int64"), device=d.device)[None]
            with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=d.device.type == "cuda"):
                density = pair_density(model, sample)
        return {"step_ms": ms, "tokens_per_s": tokens / ms * 1e3, "warmup_s": warm_s, "train_steps": train_steps,
                "train_s": train_s, "peak_mem_gb": peak, "n_params": model.n_params(), "first_losses": losses,
                "pair_density": density, "tflops": flops_per_token(model.cfg, cfg.seq_len) * tokens / ms / 1e9}
    finally:
        del model, opt, wrapped, stepper
        if cfg.compile:
            # Each configuration compiles its own model; without a reset their guards pile up
            # on GPT.forward until Dynamo's recompile limit makes later ones run uncompiled.
            torch._dynamo.reset()
        gc.collect()
        if d.device.type == "cuda":
            torch.cuda.empty_cache()


def compile_field(args) -> bool | str:
    """A row's ``compile``: False (eager), True (``torch.compile``'s default mode) or the mode."""
    if not args.compile:
        return False
    return True if args.compile_mode == "default" else args.compile_mode


def run_speed(args, results: Results, data, deadline: float) -> bool:
    """Every speed configuration not done yet; False if the time budget stopped it."""
    model = parse_model(args.speed_model)
    for seq_len in args.speed_seq_lens:
        batch = max(1, args.speed_tokens // seq_len)
        for name in args.speed_configs:
            shape = args.speed_model
            key = ("speed", name, seq_len, shape, batch * seq_len, compile_field(args), None)
            if results.done(key):
                print(f"speed T={seq_len} {name}: done, skipped")
                continue
            if time.time() > deadline:
                print("time budget spent: stopping (run again with --resume)")
                return False
            cfg = TrainConfig(data=args.data, seq_len=seq_len, batch_size=batch, device=args.device,
                              compile=args.compile, compile_mode=args.compile_mode, max_steps=1000, progress=False,
                              **model, **parse_config(name))
            c = parse_config(name)
            learns = c["attention"] in ("hash", "qk")  # its pattern changes as the model trains
            row = {"phase": "speed", "name": name, "seq_len": seq_len, "model": shape, "batch_size": batch,
                   "batch": batch, "tokens_per_step": batch * seq_len, "compile": compile_field(args), "max_steps": None,
                   "warmup_steps": args.warmup, "timed_steps": args.timed, "data": data.name, **c, **pattern_fields(name),
                   "status": "ok", "error": None, "measured_at": results.meta["date"]}
            t0 = time.time()
            try:
                row.update(time_steps(cfg, data, warmup=args.warmup, timed=args.timed,
                                      train_steps=args.speed_train_steps if learns else 0))
            except Exception as e:  # noqa: BLE001  (an OOM or a missing backend is a result)
                row.update(status="error", error=f"{type(e).__name__}: {e}"[:600])
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            row["wall_s"] = time.time() - t0
            results.put(row)
            r = next(x for x in results.rows if row_key(x) == row_key(row))
            if r["status"] == "ok":
                vs = f", {r['speedup_vs_sdpa']:.2f}x sdpa" if r.get("speedup_vs_sdpa") else ""
                print(f"speed T={seq_len} {name}: {r['step_ms']:.1f} ms/step, {r['tokens_per_s']:,.0f} tokens/s, "
                      f"{r['tflops']:.0f} dense-equivalent TFLOP/s{vs} ({row['wall_s']:.0f} s)", flush=True)
            else:
                print(f"speed T={seq_len} {name}: {r['error']}", flush=True)
    return True


# --------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------


def loss_row(name: str, args, log: dict, is_reference: bool) -> dict:
    """The results row of a loss run's log: validation curve (time = training time up to each
    validation, compile steps counted at the median), a thinned training curve, the summary."""
    curve = [{"step": v["step"], "tokens": v["tokens"], "loss": v["loss"], "ppl": v["ppl"],
              "time_s": train_time(log, v["step"]), "wall_s": v["wall_s"]} for v in log["val"]]
    every = max(1, len(log["steps"]) // 200)
    final = curve[-1] if curve else None
    return {"phase": "loss", "name": name, "seq_len": args.loss_seq_len, "model": args.loss_model,
            "batch_size": args.loss_batch, "tokens_per_step": log["tokens_per_step"], "compile": compile_field(args),
            "max_steps": args.loss_steps, **parse_config(name), "is_reference": is_reference,
            "status": "ok" if log["status"] == "done" else "partial", "error": None,
            "steps_done": log.get("steps_done"), "n_params": log["n_params"], "lr": log["config"]["lr"],
            "final_val_loss": final["loss"] if final else None, "final_val_ppl": final["ppl"] if final else None,
            "train_time_s": log.get("train_time_s"), "wall_s": log.get("wall_s"),
            "median_step_ms": log["median_step_s"] * 1e3 if log.get("median_step_s") else None,
            "tokens_per_s": log.get("median_tokens_per_s"),
            "curve": curve,
            "train_curve": [{"step": s["step"], "loss": s["loss"]} for s in log["steps"][every - 1::every]],
            "segments": log.get("segments"), "measured_at": log["segments"][0]["date"] if log.get("segments") else None}


def run_loss(args, results: Results, data, deadline: float) -> bool:
    model = parse_model(args.loss_model)
    for i, name in enumerate(args.loss_configs):
        key = ("loss", name, args.loss_seq_len, args.loss_model, args.loss_batch * args.loss_seq_len, compile_field(args),
               args.loss_steps)
        if results.done(key):
            print(f"loss T={args.loss_seq_len} {name}: done, skipped")
            continue
        left = deadline - time.time()
        if left <= 0:
            print("time budget spent: stopping (run again with --resume)")
            return False
        cfg = TrainConfig(data=args.data, seq_len=args.loss_seq_len, batch_size=args.loss_batch, device=args.device,
                          compile=args.compile, compile_mode=args.compile_mode, max_steps=args.loss_steps, lr=args.lr, eval_every=args.eval_every,
                          eval_windows=args.eval_windows, ckpt_every=args.ckpt_every,
                          out_dir=str(Path(args.work_dir) / f"loss_T{args.loss_seq_len}_{name}"), resume=True,
                          time_budget=left if math.isfinite(left) else None, progress=args.progress,
                          **model, **parse_config(name))
        log = train(cfg, data=data)
        results.put(loss_row(name, args, log, is_reference=i == 0))
        v = log["val"][-1]
        print(f"loss T={args.loss_seq_len} {name}: {log['status']} at step {log['steps_done']}, val loss "
              f"{v['loss']:.4f} (ppl {v['ppl']:.2f}), {train_time(log):.0f} s of training", flush=True)
        if log["status"] != "done":
            return False
    return True


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sparseflash.train.experiment",
                                description="Training speed and loss of dense, hash and query/key-dropping "
                                            "attention (results JSON; see the module docstring).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", help="results file (default: results/train_<device>.json, e.g. results/train_h100.json "
                                 "on an H100, results/train_cpu-interpreter.json on a CPU)")
    p.add_argument("--phase", choices=("speed", "loss", "all"), default="all")
    p.add_argument("--resume", action="store_true", help="extend --out, skipping what is done; resume loss runs")
    p.add_argument("--force", action="store_true", help="move an existing --out aside and start anew")
    p.add_argument("--time-budget", type=float, default=None, help="seconds (see the module docstring)")
    p.add_argument("--data", default=data_mod.DEFAULT_CORPUS,
                   help="corpus for both phases (speed: random bytes if it is not there)")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (compile time is not timed)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile mode; anything but default implies --compile (reduce-overhead: CUDA graphs)")
    p.add_argument("--work-dir", default="runs/experiment", help="loss runs' checkpoints and logs")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    g = p.add_argument_group("speed")
    g.add_argument("--speed-seq-lens", type=int, nargs="+", default=[8192, 16384])
    g.add_argument("--speed-configs", nargs="+", default=list(SPEED_CONFIGS))
    g.add_argument("--speed-model", default="12x768x12", help="layers x width x heads")
    g.add_argument("--speed-tokens", type=int, default=16384, help="tokens per step (batch = this / seq_len)")
    g.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones (compilation)")
    g.add_argument("--timed", type=int, default=10, help="timed steps (their mean is step_ms)")
    g.add_argument("--speed-train-steps", type=int, default=0,
                   help="training steps before timing hash and qk configurations, whose patterns change as the "
                        "model learns (trained hashing piles tokens into fewer buckets); 0: a fresh model")
    g = p.add_argument_group("loss")
    g.add_argument("--loss-seq-len", type=int, default=8192)
    g.add_argument("--loss-configs", nargs="+", default=list(LOSS_CONFIGS),
                   help="the first is the reference (time to reach its final validation loss)")
    g.add_argument("--loss-model", default="6x512x8", help="layers x width x heads")
    g.add_argument("--loss-batch", type=int, default=4, help="sequences per step")
    g.add_argument("--loss-steps", type=int, default=1000)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--eval-every", type=int, default=50)
    g.add_argument("--eval-windows", type=int, default=32)
    g.add_argument("--ckpt-every", type=int, default=250)
    return p


def make_meta(args, argv) -> dict:
    import triton

    from .. import _runtime

    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    interpreter = bool(_runtime.INTERPRET) and dev.type != "cuda"
    notes = [
        "speed rows: step_ms is the mean of timed_steps training steps (forward, backward, AdamW) run back to back "
        "after warmup_steps, between two synchronisations; bf16 autocast on CUDA; the batch is tokens_per_step "
        "tokens at every seq_len.",
        "hash and qk speed rows first train train_steps steps (--speed-train-steps), so that their patterns are "
        "those of a model that has learned; pair_density: allowed / causal pairs of the timed model on a "
        "validation window, mean over layers and heads; window: the sliding window the model uses (0: none).",
        "none: the attention removed (y = v, projections kept): attention_share = 1 - t(none)/t, and t/t(none) "
        "(amdahl_ceiling) is the most any faster attention could speed the step up.",
        "tflops: the dense causal model's FLOPs per token (6N + attention, PaLM appendix B) times tokens/s, for "
        "every row alike: an effective rate, above the GPU's peak where attention is sparse or removed.",
        "peak_mem_gb: torch.cuda.max_memory_allocated over the configuration's whole life (compilation and "
        "CUDA-graph capture included).",
        "compile: false (eager), true (torch.compile, default mode) or the mode, e.g. 'reduce-overhead' (the "
        "compiled forward and backward replayed as CUDA graphs; the optimiser step stays eager); ratios compare "
        "rows of the same compile setting. Every configuration compiles afresh (torch._dynamo.reset between them).",
        "loss rows: curve time_s is training time up to each validation (measured step times; the first steps of "
        "each process, which compile kernels, counted at the run's median step time), excluding validation and "
        "checkpoints; loss is the mean cross-entropy per byte (nats) on fixed validation windows, ppl = exp(loss).",
        "qk with qk_gate=topk picks each head's kept tokens by a learned score over the whole sequence, so a "
        "token's fate depends on later tokens: fine for speed and loss studies, not for sampling.",
    ]
    if interpreter:
        notes.insert(0, "INTERPRETER RUN: our kernels ran in Triton's interpreter on the CPU; times are not GPU "
                        "timings.")
    return {"schema": SCHEMA, "device": device_name(dev), "device_type": dev.type, "interpreter": interpreter,
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "git_commit": _git_commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "argv": [sys.executable, "-m", "sparseflash.train.experiment", *argv],
            "config": vars(args), "notes": notes, "complete": False}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    args.compile = args.compile or args.compile_mode != "default"
    for name in (*args.speed_configs, *args.loss_configs):
        parse_config(name)
    start = time.time()
    deadline = start + args.time_budget if args.time_budget is not None else math.inf
    meta = make_meta(args, argv)
    if args.out is None:
        from ..bench.results import device_slug

        args.out = f"results/train_{device_slug(meta['device'], meta['device_type'], meta['interpreter'])}.json"
        meta["config"]["out"] = args.out
    try:
        results = Results(Path(args.out), meta, resume=args.resume, force=args.force)
    except Refused as e:
        print(f"experiment: {e}", file=sys.stderr)
        return 2
    try:
        data = data_mod.load(args.data)
        meta["data"] = {"name": data.name, "train_bytes": len(data.train), "val_bytes": len(data.val)}
    except FileNotFoundError as e:
        if args.phase != "speed":
            print(f"experiment: {e}", file=sys.stderr)
            return 2
        rng = np.random.default_rng(0)
        data = data_mod.TokenData(rng.integers(0, 256, 4_000_000, dtype=np.uint8),
                                  rng.integers(0, 256, 200_000, dtype=np.uint8), name="random bytes")
        meta["data"] = {"name": "random bytes (no corpus found)"}
    results.write()
    ok = True
    if args.phase in ("speed", "all"):
        ok = run_speed(args, results, data, deadline)
    if ok and args.phase in ("loss", "all"):
        ok = run_loss(args, results, data, deadline)
    results.meta["complete"] = ok  # every configuration of the phases asked for is in the file
    results.meta["elapsed_s"] = time.time() - start
    results.write()
    print(f"{'complete' if ok else 'stopped'}: {results.path} ({len(results.rows)} rows, {time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
