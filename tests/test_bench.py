"""The benchmark harness runs end to end on CPU and writes the documented files.

One ``--quick`` run (tiny sizes, our kernels in Triton's interpreter, wall-clock
timer) in a subprocess, exactly as a user would start it; CUDA-only variants
(cuDNN, compiled FlexAttention) must come out as ``skipped``, not as errors.
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

RATIO_KEYS = ("speedup_vs_sdpa_flash", "speedup_vs_sdpa_cudnn", "speedup_vs_ours_dense",
              "speedup_vs_flex_kernel", "tile_efficiency")
ROW_KEYS = ("variant", "kind", "impl", "family", "param", "seq_len", "B", "H", "D", "dtype", "mode",
            "status", "error", "ms", "timer", "tflops", "check_rel_err", "computed_tile_fraction",
            "config") + RATIO_KEYS


def _run(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "sparseflash.bench", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "r.json"
    proc = _run(["--quick", "--device", "cpu", "--out", str(out), "--modes", "fwd", "fwd+bwd",
                 "--no-progress"], tmp)
    return out, proc


def test_help():
    proc = subprocess.run([sys.executable, "-m", "sparseflash.bench", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--seq-lens", "--modes", "--keep-rates", "--buckets", "--variants", "--out", "--warmup",
                 "--rep", "--no-check", "--quick", "--device", "--resume"):
        assert flag in proc.stdout


def test_quick_files_and_keys(quick):
    out, proc = quick
    data = json.loads(out.read_text())
    assert set(data) == {"meta", "rows"}
    meta = data["meta"]
    for key in ("schema", "device", "torch", "triton", "cuda", "date", "argv", "config", "complete"):
        assert key in meta
    assert meta["complete"] is True
    rows = data["rows"]
    names = {r["variant"] for r in rows}
    assert {"naive", "ours_dense", "sdpa_flash", "sdpa_cudnn", "flex_dense",
            "ours_qk_0.3", "ours_qk_0.5", "ours_hash_2", "ours_hash_4",
            "flex_kernel_qk_0.3", "flex_e2e_hash_4"} <= names
    assert {r["seq_len"] for r in rows} == {64, 128}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    for r in rows:
        for key in ROW_KEYS:
            assert key in r, (key, r)
        assert r["family"] in ("dense", "qk", "hash")

    by = {(r["variant"], r["seq_len"], r["mode"]): r for r in rows}
    for n in (64, 128):
        for mode in ("fwd", "fwd+bwd"):
            # CUDA-only variants are skipped, with a reason, on CPU
            for name in ("sdpa_cudnn", "flex_dense", "flex_kernel_qk_0.3", "flex_e2e_hash_2"):
                r = by[(name, n, mode)]
                assert r["status"] == "skipped" and r["error"] and r["ms"] is None
            # ours and the CPU baselines ran, passed the check and carry ratios
            for name in ("ours_dense", "sdpa_flash", "naive", "ours_qk_0.3", "ours_hash_4"):
                r = by[(name, n, mode)]
                assert r["status"] == "ok", r
                assert r["timer"] == "cpu-wallclock"
                assert r["ms"] > 0 and r["tflops"] > 0
                assert 0 <= r["check_rel_err"] < 2e-2
                if mode == "fwd+bwd":
                    assert 0 <= r["check_rel_err_dq"] < 2e-2
                assert r["speedup_vs_sdpa_flash"] > 0 and r["speedup_vs_ours_dense"] > 0
                assert r["speedup_vs_sdpa_cudnn"] is None  # baseline skipped on CPU
            assert by[("ours_dense", n, mode)]["speedup_vs_ours_dense"] == pytest.approx(1.0)
            r = by[("ours_dense", n, mode)]
            assert r["speedup_vs_sdpa_flash"] == pytest.approx(
                by[("sdpa_flash", n, mode)]["ms"] / r["ms"])
            for name in ("ours_qk_0.3", "ours_hash_4"):
                r = by[(name, n, mode)]
                assert 0 < r["computed_tile_fraction"] <= 2
                assert r["tile_efficiency"] == pytest.approx(
                    by[("ours_dense", n, mode)]["ms"] * r["computed_tile_fraction"] / r["ms"])
                assert 0 < r["pair_density"] < 1

    csv_path = out.with_suffix(".csv")
    assert csv_path.exists()
    with open(csv_path, newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    for key in ROW_KEYS:
        assert key in csv_rows[0]
    ok = [r for r in csv_rows if r["status"] == "ok"]
    assert ok and all(math.isfinite(float(r["ms"])) for r in ok)

    assert "speedup vs" in proc.stdout and "COMPLETE" in proc.stdout


def test_variant_selection_and_resume(tmp_path):
    out = tmp_path / "sel.json"
    args = ["--quick", "--device", "cpu", "--out", str(out), "--modes", "fwd", "--no-progress",
            "--variants", "ours_dense", "sdpa_*", "--seq-lens", "64"]
    _run(args, tmp_path)
    rows = json.loads(out.read_text())["rows"]
    assert {r["variant"] for r in rows} == {"ours_dense", "sdpa_flash", "sdpa_cudnn"}
    first = {r["variant"]: r["ms"] for r in rows}
    # --resume: every configuration is done, so nothing is re-measured
    proc = _run(args + ["--resume"], tmp_path)
    assert "resuming" in proc.stdout
    again = json.loads(out.read_text())
    assert {r["variant"]: r["ms"] for r in again["rows"]} == first
    assert again["meta"]["complete"] is True


@pytest.mark.parametrize("family", ["qk", "hash", "dense"])
def test_prebuilt_block_mask_matches_create_block_mask(family):
    """flex_kernel's per-head eager block mask is create_block_mask's, table for table."""
    torch = pytest.importorskip("torch")
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    from sparseflash import bench
    from sparseflash.permuted import bucket_sort_layout, compact_layout

    B, H, N = 2, 3, 300
    g = torch.Generator().manual_seed(0)
    if family == "qk":
        _, qp = compact_layout(torch.rand(B, H, N, generator=g) < 0.4)
        _, kp = compact_layout(torch.rand(B, H, N, generator=g) < 0.4)
        bench._set_flex_state(qp, kp, None, None)
        mod, b, h = bench._flex_qk, B, H
    elif family == "hash":
        _, qp, qs = bucket_sort_layout(torch.randint(0, 4, (B, H, N), generator=g))
        _, kp, ks = bucket_sort_layout(torch.randint(0, 4, (B, H, N), generator=g))
        bench._set_flex_state(qp, kp, qs, ks)
        mod, b, h = bench._flex_hash, B, H
    else:
        mod, b, h = bench._flex_causal, 1, 1
    mine = bench.prebuilt_block_mask(mod, b, h, N, "cpu")
    ref = flex.create_block_mask(mod, b if family != "dense" else None, h if family != "dense" else None,
                                 N, N, device="cpu")
    assert torch.equal(mine.to_dense(), ref.to_dense())
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                 "q_indices"):
        a, r = getattr(mine, name), getattr(ref, name)
        assert (a is None) == (r is None)
        if a is not None:
            assert torch.equal(a, r), name
    if family != "dense":
        assert bench._FLEX.qpos.shape == (B, H, N)  # the full layout is back in place
