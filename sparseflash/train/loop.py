"""The training loop: optimiser, schedule, steps, validation, checkpoints, DDP, the JSON log.

:func:`train` runs one run described by a :class:`TrainConfig` (``python -m
sparseflash.train`` builds one from its flags).  What it does, in order:

* **Processes.**  Started by ``torchrun``, each process joins a ``torch.distributed`` group
  (NCCL on CUDA, gloo on the CPU) and wraps the model in DDP; otherwise it runs alone.
  The *global batch* of a step is ``batch_size × world_size × grad_accum`` sequences, drawn
  from the data by step number only (:meth:`~sparseflash.train.data.TokenData.train_batch`);
  micro-step ``m`` of rank ``r`` takes its rows ``(m · world + r) · batch_size`` onwards, so
  one process with ``batch_size × world_size`` rows computes the same step.
* **Optimisation.**  AdamW (betas 0.9, 0.95; weight decay 0.1 on matrices and the
  embedding, none on norms), learning rate warmed up linearly over the first 2% of the
  steps, then cosine decay to 10% of the peak; gradient clipping at 1; bf16 autocast on
  CUDA (float32 on the CPU); ``torch.compile`` of the model if asked.
* **Time.**  Each step is timed from its start to its end (CUDA synchronised): ``dt_s`` in
  the log, with tokens/s.  The first :data:`FRESH_STEPS` steps of each process compile
  kernels; they are marked ``fresh`` in the log, and :func:`train_time` counts them at the
  run's median step time.  ``train_time_s`` (measured, all steps) and ``wall_s`` (also
  validation and checkpoints, summed over resumed segments) are logged at each validation.
* **Validation** every ``eval_every`` steps (and before the first): mean loss over fixed
  validation windows, and perplexity ``exp(loss)`` (per byte).
* **Checkpoints** (``out_dir/ckpt.pt``, every ``ckpt_every`` steps, at the end and when the
  time budget runs out): model, optimiser, the number of steps done (which is also the data
  position), the RNG states of every process (torch, CUDA, Python, NumPy) and the log so
  far.  ``resume=True`` continues from it: the next step computes exactly what it would
  have computed without the interruption.  A checkpoint that cannot be resumed from (damaged,
  or from a run with another model shape, ``seq_len`` or ``seed``) raises :class:`CheckpointError`.
* **Log** (``out_dir/log.json``, rewritten at each validation and at the end): the config,
  device, versions, per-step loss / time / tokens/s, validation loss and perplexity against
  steps, tokens and time, and ``status`` (``done``, or ``stopped`` by the time budget).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import numbers
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import data as data_mod
from .model import GPT, GPTConfig, flops_per_token

#: Steps at the start of each process that compile kernels (counted at the median in :func:`train_time`).
FRESH_STEPS = 2
MODEL_FIELDS = tuple(f.name for f in fields(GPTConfig))


#: ``torch.compile`` modes a run may ask for (``--compile-mode``). "reduce-overhead" captures
#: the compiled forward and backward in CUDA graphs and replays them: the host issues one
#: replay instead of every kernel, which matters when the GPU work per kernel is short (the
#: sparse attention calls at 4k-16k tokens are host-bound when eager or plainly compiled).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig(GPTConfig):
    """Everything a run depends on (the flags of ``python -m sparseflash.train``): the model's
    shape and attention (the fields of :class:`~sparseflash.train.model.GPTConfig`, first),
    then the data, optimisation, runtime and logging settings below."""

    # data
    data: str = data_mod.DEFAULT_CORPUS
    seq_len: int = 8192
    batch_size: int = 4  # sequences per process and micro-step
    grad_accum: int = 1
    # optimisation
    max_steps: int = 800
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_frac: float = 0.02
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # runtime
    device: str = "auto"  # auto: cuda if available (cuda:<local rank> under torchrun), else cpu
    compile: bool = False
    compile_mode: str = "default"  # torch.compile's mode; "reduce-overhead" replays CUDA graphs
    seed: int = 0
    # validation, checkpoints, log
    eval_every: int = 100
    eval_windows: int = 32
    ckpt_every: int = 200
    out_dir: str = "runs/default"
    resume: bool = False
    time_budget: float | None = None  # seconds of this process; then checkpoint and stop
    progress: bool = True

    def __post_init__(self):
        super().__post_init__()
        for name in ("n_layer", "n_head", "n_embd", "n_buckets", "seq_len", "batch_size", "grad_accum",
                     "eval_every", "eval_windows", "ckpt_every"):
            _check(name, getattr(self, name), "a positive integer", lambda v: v >= 1, integer=True)
        _check("max_steps", self.max_steps, "an integer >= 0", lambda v: v >= 0, integer=True)
        if self.n_kv_heads is not None:
            _check("n_kv_heads", self.n_kv_heads, f"a positive integer that divides n_head ({self.n_head})",
                   lambda v: v >= 1 and self.n_head % v == 0, integer=True)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        _check("keep_rate", self.keep_rate, "in (0, 1]", lambda v: 0 < v <= 1)
        _check("lr", self.lr, ">= 0", lambda v: v >= 0)
        for name in ("min_lr_ratio", "warmup_frac"):
            _check(name, getattr(self, name), "in [0, 1]", lambda v: 0 <= v <= 1)
        for name in ("beta1", "beta2"):
            _check(name, getattr(self, name), "in [0, 1)", lambda v: 0 <= v < 1)
        for name in ("weight_decay", "grad_clip"):
            _check(name, getattr(self, name), ">= 0", lambda v: v >= 0)
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ValueError(f"device must be auto, cpu, cuda or cuda:<index>, got {self.device!r}") from None

    def model_config(self) -> GPTConfig:
        return GPTConfig(**{k: getattr(self, k) for k in MODEL_FIELDS})

    def to_dict(self) -> dict:
        return asdict(self)


def _check(name: str, value, what: str, ok, integer: bool = False) -> None:
    """``ValueError`` unless ``value`` is a number (an integer if ``integer``; not a bool) and ``ok(value)``."""
    good = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
    try:
        good = good and bool(ok(value))
    except TypeError:
        good = False
    if not good:
        raise ValueError(f"{name} must be {what}, got {value!r}")


# --------------------------------------------------------------------------------------
# Processes and devices
# --------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this call initialised the process group (and tears it down)

    @property
    def ddp(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> Dist:
    """Join the ``torchrun`` process group if there is one (``RANK``/``WORLD_SIZE`` set), pick the device."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:  # "cuda" means this process's GPU
        dev = torch.device("cuda", local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True  # the float32 parts outside autocast
        torch.backends.cudnn.allow_tf32 = True
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return Dist(rank, world, local, dev, owns)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing (float32) on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------
# Optimiser, schedule, one step
# --------------------------------------------------------------------------------------


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on parameters with 2 or more dims (matrices, embedding) only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up, then cosine to ``min_lr_ratio · lr``."""
    warm = max(1, round(cfg.warmup_frac * cfg.max_steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, cfg.max_steps - warm))
    low = cfg.min_lr_ratio * cfg.lr
    return low + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - low)


def global_batch(cfg: TrainConfig, world: int) -> int:
    return cfg.batch_size * world * cfg.grad_accum


class Stepper:
    """One optimiser step over the global batch of a step number (shared by :func:`train` and
    the experiment's timing)."""

    def __init__(self, model, wrapped, opt, cfg: TrainConfig, data, d: Dist):
        self.model, self.wrapped, self.opt, self.cfg, self.data, self.d = model, wrapped, opt, cfg, data, d

    def __call__(self, step: int, sync_loss: bool = True):
        """Step ``step`` (0-based); returns the mean loss over the global batch (a float, or a
        device tensor with ``sync_loss=False``, which then does not wait for the device)."""
        cfg, d = self.cfg, self.d
        for group in self.opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x_all, y_all = self.data.train_batch(step, global_batch(cfg, d.world), cfg.seq_len, cfg.seed)
        if d.device.type == "cuda":  # pinned: the copies below do not wait for the GPU
            x_all, y_all = x_all.pin_memory(), y_all.pin_memory()
        total = torch.zeros((), device=d.device)
        if cfg.compile and cfg.compile_mode in ("reduce-overhead", "max-autotune"):
            # A new optimiser step: the CUDA graphs may reuse the memory of the last step's
            # outputs (its loss and gradients were consumed by now).
            torch.compiler.cudagraph_mark_step_begin()
        for m in range(cfg.grad_accum):
            rows = slice((m * d.world + d.rank) * cfg.batch_size, (m * d.world + d.rank + 1) * cfg.batch_size)
            x = x_all[rows].to(d.device, non_blocking=True)
            y = y_all[rows].to(d.device, non_blocking=True)
            last = m == cfg.grad_accum - 1
            no_sync = self.wrapped.no_sync() if d.ddp and not last else contextlib.nullcontext()
            with no_sync:
                with autocast(d.device):
                    _, loss = self.wrapped(x, y)
                (loss / cfg.grad_accum).backward()
            total += loss.detach().float()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        total /= cfg.grad_accum
        if d.ddp:
            dist.all_reduce(total)
            total /= d.world
        return float(total) if sync_loss else total


@torch.no_grad()
def evaluate(model, data, cfg: TrainConfig, d: Dist) -> float:
    """Mean loss over the fixed validation windows (shared out over the processes)."""
    model.eval()
    starts = data.val_starts(cfg.eval_windows, cfg.seq_len)
    mine = starts[d.rank::d.world]
    acc = torch.zeros(2, device=d.device, dtype=torch.float64)
    for i in range(0, len(mine), cfg.batch_size):
        x, y = data.val_batch(mine[i:i + cfg.batch_size], cfg.seq_len)
        with autocast(d.device):
            _, loss = model(x.to(d.device), y.to(d.device))
        acc += torch.stack([loss.double() * len(x), torch.tensor(float(len(x)), device=d.device, dtype=torch.float64)])
    if d.ddp:
        dist.all_reduce(acc)
    model.train()
    return float(acc[0] / acc[1])


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])


def save_checkpoint(path: Path, model, opt, step: int, cfg: TrainConfig, log: dict, d: Dist) -> None:
    """Write ``path`` (rank 0, through a temporary file); every rank's RNG state goes in."""
    states = [None] * d.world
    if d.ddp:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    if d.main:
        ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "data": {"seed": cfg.seed, "next_step": step, "global_batch": global_batch(cfg, d.world),
                         "seq_len": cfg.seq_len},
                "rng": states, "config": cfg.to_dict(), "log": log}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    if d.ddp:
        dist.barrier()


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: damaged or unreadable, or written by a run
    with another model shape or seed.  The message names the file and the way out."""


#: What every checkpoint holds (see :func:`save_checkpoint`).
CHECKPOINT_KEYS = ("model", "optimizer", "step", "rng", "config", "log")
_WAY_OUT = "delete it to start afresh, or use another out_dir (--out-dir)"


def _first_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    text = text.split(". ")[0].rstrip(".")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def read_checkpoint(path: Path, device, consequence: str = "") -> dict:
    """``torch.load`` of ``path``; :class:`CheckpointError` naming the file if it is damaged or
    unreadable (``consequence`` is appended to the message, e.g. what the caller cannot do)."""
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # truncated or garbled: zip, pickle, EOF and OS errors, whatever torch raises
        raise CheckpointError(f"{path} is damaged or unreadable ({_first_line(e)}){consequence}") from e


def load_checkpoint(path: Path, cfg: TrainConfig, device) -> dict:
    """The checkpoint at ``path``, checked against ``cfg`` (same model shape, ``seq_len`` and
    ``seed``); :class:`CheckpointError` if it is damaged, unreadable or from another run."""
    ckpt = read_checkpoint(path, device, f", so the run cannot resume from it: {_WAY_OUT}")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise CheckpointError(f"{path} is damaged or not a training checkpoint (no {', '.join(missing)}), so the "
                              f"run cannot resume from it: {_WAY_OUT}")
    old = ckpt["config"]
    differ = [k for k in (*MODEL_FIELDS, "seq_len", "seed") if old.get(k) != getattr(cfg, k, None) and k in old]
    if differ:
        raise CheckpointError(f"{path} was written by a run with other {', '.join(differ)} "
                              f"({', '.join(f'{k}={old[k]!r}' for k in differ)}): use another out_dir (--out-dir), "
                              "or the flags of that run")
    return ckpt


# --------------------------------------------------------------------------------------
# The log
# --------------------------------------------------------------------------------------


def train_time(log: dict, upto_step: int | None = None) -> float:
    """Training seconds up to step ``upto_step`` (all steps if None): measured step times, the
    ``fresh`` steps (kernel compilation at a process start) counted at the median of the others."""
    steps = log["steps"]
    others = [s["dt_s"] for s in steps if not s.get("fresh")] or [s["dt_s"] for s in steps] or [0.0]
    med = statistics.median(others)
    return sum(med if s.get("fresh") else s["dt_s"] for s in steps if upto_step is None or s["step"] <= upto_step)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def new_log(cfg: TrainConfig, model: GPT, d: Dist, data) -> dict:
    import triton

    tokens = global_batch(cfg, d.world) * cfg.seq_len
    return {
        "config": cfg.to_dict(),
        "model": model.cfg.to_dict(),
        "n_params": model.n_params(),
        "device": device_name(d.device),
        "device_type": d.device.type,
        "world_size": d.world,
        "dtype": "bf16 autocast" if d.device.type == "cuda" else "float32",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "argv": sys.argv,
        "data": {"name": data.name, "train_bytes": len(data.train), "val_bytes": len(data.val)},
        "tokens_per_step": tokens,
        "flops_per_token": flops_per_token(model.cfg, cfg.seq_len),
        "segments": [],
        "steps": [],
        "val": [],
        "status": "running",
    }


# --------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------


def build(cfg: TrainConfig, d: Dist):
    """Model (seeded by ``cfg.seed``: the same on every rank), optimiser, and the model to call
    (compiled and/or DDP-wrapped)."""
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model_config()).to(d.device)
    opt = make_optimizer(model, cfg, d.device)
    if cfg.compile and d.ddp and cfg.compile_mode in ("reduce-overhead", "max-autotune"):
        raise ValueError(f"compile_mode={cfg.compile_mode!r} (CUDA graphs) is for one process; with several "
                         "use --compile-mode default or max-autotune-no-cudagraphs")
    wrapped = torch.compile(model, mode=None if cfg.compile_mode == "default" else cfg.compile_mode) \
        if cfg.compile else model
    if d.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(wrapped, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                      broadcast_buffers=False)
    return model, opt, wrapped


def train(cfg: TrainConfig, data=None) -> dict:
    """Run (or resume) the training run ``cfg``; returns its log (also in ``out_dir/log.json``)."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    d = setup(cfg.device)
    try:
        data = data if data is not None else data_mod.load(cfg.data)
        out = Path(cfg.out_dir)
        ckpt_path, log_path = out / "ckpt.pt", out / "log.json"
        model, opt, wrapped = build(cfg, d)
        step = 0
        if cfg.resume and ckpt_path.exists():
            ckpt = load_checkpoint(ckpt_path, cfg, d.device)
            try:
                model.load_state_dict(ckpt["model"])
                opt.load_state_dict(ckpt["optimizer"])
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{ckpt_path} does not fit this model ({_first_line(e)}): damaged, or "
                                      f"written by another version; {_WAY_OUT}") from e
            step, log = ckpt["step"], ckpt["log"]
            if len(ckpt["rng"]) == d.world:
                set_rng_state(ckpt["rng"][d.rank])
            else:
                print(f"train: {ckpt_path} has RNG states of {len(ckpt['rng'])} processes, this run has {d.world}: "
                      "random streams restart", file=sys.stderr)
                torch.manual_seed(cfg.seed + 1 + d.rank)
            del ckpt
            log["status"] = "running"
        else:
            log = new_log(cfg, model, d, data)
            torch.manual_seed(cfg.seed + 1 + d.rank)  # runtime randomness (random query/key dropping)
        log["segments"].append({"start_step": step, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(
            timespec="seconds"), "world_size": d.world, "device": device_name(d.device)})
        wall0 = log.get("wall_s", 0.0)  # wall-clock of the segments before this one
        stepper = Stepper(model, wrapped, opt, cfg, data, d)
        tokens = log["tokens_per_step"]

        def validate(done: int):
            loss = evaluate(model, data, cfg, d)
            entry = {"step": done, "tokens": done * tokens, "loss": loss, "ppl": math.exp(min(loss, 50.0)),
                     "train_time_s": train_time(log), "measured_time_s": sum(s["dt_s"] for s in log["steps"]),
                     "wall_s": wall0 + time.perf_counter() - t_start}
            log["val"] = [v for v in log["val"] if v["step"] != done] + [entry]
            return entry

        if step == 0 and not log["val"]:
            validate(0)
        bar = tqdm(total=cfg.max_steps, initial=step, disable=not (cfg.progress and d.main), dynamic_ncols=True,
                   desc=f"{cfg.attention} T={cfg.seq_len}")
        fresh = 0
        stopped = False
        while step < cfg.max_steps:
            sync(d.device)
            t0 = time.perf_counter()
            loss = stepper(step)
            sync(d.device)
            dt = time.perf_counter() - t0
            step += 1
            log["steps"].append({"step": step, "loss": loss, "lr": lr_at(step - 1, cfg), "dt_s": dt,
                                 "tokens_per_s": tokens / dt, "fresh": fresh < FRESH_STEPS})
            fresh += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / dt:,.0f}")
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}")
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                v = validate(step)
                if d.main:
                    bar.write(f"step {step}: val loss {v['loss']:.4f} (ppl {v['ppl']:.2f}), "
                              f"train {train_time(log):.1f} s")
                    _write_json(log_path, log)
            over = cfg.time_budget is not None and time.perf_counter() - t_start > cfg.time_budget
            if d.ddp:
                flag = torch.tensor([float(over)], device=d.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                over = bool(flag.item())
            if over and step < cfg.max_steps:
                stopped = True
                break
            if step % cfg.ckpt_every == 0 and step < cfg.max_steps:
                log["wall_s"] = wall0 + time.perf_counter() - t_start
                save_checkpoint(ckpt_path, model, opt, step, cfg, log, d)
        bar.close()
        log["status"] = "stopped" if stopped else "done"
        log["steps_done"] = step
        log["wall_s"] = wall0 + time.perf_counter() - t_start
        log["train_time_s"] = train_time(log)
        if log["steps"]:
            dts = [s["dt_s"] for s in log["steps"] if not s.get("fresh")] or [s["dt_s"] for s in log["steps"]]
            log["median_step_s"] = statistics.median(dts)
            log["median_tokens_per_s"] = tokens / log["median_step_s"]
        save_checkpoint(ckpt_path, model, opt, step, cfg, log, d)
        if d.main:
            _write_json(log_path, log)
        return log
    finally:
        if d.owns_group:
            dist.destroy_process_group()
