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
ROW_KEYS = ("variant", "kind", "impl", "family", "param", "window", "pattern", "seq_len", "B", "H", "D", "dtype",
            "mode", "status", "error", "ms", "timer", "tflops", "check_rel_err", "computed_tile_fraction",
            "config") + RATIO_KEYS


def _run(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "sparseflash.bench", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


#: Added to the CPU runs below (after --quick, whose presets give way to flags given): no timing
#: beyond the minimum (warm-up 0 ms: no warm-up calls; rep 0 ms: the 3 timed calls every row
#: takes), since these tests check the harness (rows, keys, statuses, the float64 check, the
#: ratios), not the timings.  ``LEAN``: also one head instead of --quick's 2 where no assertion
#: is about heads (the window run keeps 2: its window rows check that the first head's schedule
#: is every head's).  The --quick run: 93 s -> 38 s of interpreter time alone on a 2-core box.
NO_TIMING = ["--warmup", "0", "--rep", "0"]
LEAN = ["--heads", "1", *NO_TIMING]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The --quick run without sliding windows (``--windows`` with no value: none; the window
    variants have their own, smaller run in :func:`test_quick_windows`)."""
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "r.json"
    proc = _run(["--quick", "--device", "cpu", "--out", str(out), "--modes", "fwd", "fwd+bwd",
                 "--no-progress", "--windows", *LEAN], tmp)
    return out, proc


def test_help():
    proc = subprocess.run([sys.executable, "-m", "sparseflash.bench", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--seq-lens", "--modes", "--keep-rates", "--buckets", "--windows", "--variants", "--out", "--warmup",
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
        assert r["window"] == 0  # --windows with no value: no window variants
        assert r["pattern"] == "dense" if r["family"] == "dense" else r["variant"].removesuffix("_default").endswith("_" + r["pattern"])

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
                # our kernels run in Triton's interpreter on CPU: labelled as such, not as CPU (or GPU) time
                assert r["timer"] == ("interpreter-wallclock" if r["impl"] == "ours" else "cpu-wallclock")
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
            "--variants", "ours_dense", "sdpa_*", "--seq-lens", "64", *LEAN]
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


# --------------------------------------------------------------------------------------
# Sliding windows: the window alone and hash buckets ∪ window
# --------------------------------------------------------------------------------------

WINDOW_NAMES = {"ours_dense", "flex_dense", "ours_window_16", "flex_kernel_window_16", "flex_e2e_window_16",
                "ours_hash_4_w16", "flex_kernel_hash_4_w16", "flex_e2e_hash_4_w16"}


def test_quick_windows(tmp_path):
    """--quick's window (16) at N=64: ours and eager FlexAttention (fwd, CPU) pass the float64 check
    of the union / window masks, and the rows carry window, pattern and the flex ratio of their pattern."""
    out = tmp_path / "w.json"
    _run(["--quick", "--device", "cpu", "--out", str(out), "--modes", "fwd", "fwd+bwd", "--no-progress",
          "--seq-lens", "64", "--buckets", "4", "--no-flex-compile",
          "--variants", "ours_dense", "flex_dense", "*window*", "*_w*", *NO_TIMING], tmp_path)
    rows = _rows(out)
    assert {r["variant"] for r in rows} == WINDOW_NAMES
    by = {(r["variant"], r["mode"]): r for r in rows}
    for name, kind, family, param in (("ours_window_16", "ours_window", "window", 16),
                                      ("ours_hash_4_w16", "ours_hash", "hash", 4)):
        for mode in ("fwd", "fwd+bwd"):
            r = by[(name, mode)]
            assert r["status"] == "ok", r
            assert (r["kind"], r["family"], r["param"], r["window"]) == (kind, family, param, 16)
            assert r["pattern"] == name.removeprefix("ours_")
            assert r["timer"] == "interpreter-wallclock" and r["ms"] > 0
            assert 0 <= r["check_rel_err"] < 2e-2
            if mode == "fwd+bwd":
                assert 0 <= r["check_rel_err_dq"] < 2e-2
            assert 0 < r["pair_density"] < 1 and r["computed_tile_fraction"] > 0
            if family == "window":  # the same tiles in every head: the first head's schedule is all of them
                assert r["computed_tile_fraction"] == pytest.approx(r["schedule_tile_fraction"])
            assert r["tile_efficiency"] == pytest.approx(
                by[("ours_dense", mode)]["ms"] * r["computed_tile_fraction"] / r["ms"])
    for pat in ("window_16", "hash_4_w16"):
        for impl in ("flex_kernel", "flex_e2e"):
            r = by[(f"{impl}_{pat}", "fwd")]
            assert r["status"] == "ok" and 0 <= r["check_rel_err"] < 2e-2, r  # natural order, same mask
            assert r["pattern"] == pat and r["window"] == 16
            assert by[(f"{impl}_{pat}", "fwd+bwd")]["status"] == "skipped"
        r = by[(f"ours_{pat}", "fwd")]
        assert r["speedup_vs_flex_kernel"] == pytest.approx(by[(f"flex_kernel_{pat}", "fwd")]["ms"] / r["ms"])
    assert by[("ours_dense", "fwd")]["window"] == 0 and by[("ours_dense", "fwd")]["pattern"] == "dense"


def test_windows_flag_and_names():
    from sparseflash.bench import all_variants, pattern_stubs
    from sparseflash.bench.__main__ import parse_args

    def names(argv):
        return [v.name for v in all_variants(None, pattern_stubs(parse_args(argv)))]

    args = parse_args(["--buckets", "16"])
    assert args.windows == [256]
    got = names(["--buckets", "16", "--keep-rates", "0.3"])
    assert got[-10:] == ["ours_hash_16", "ours_hash_16_default", "flex_kernel_hash_16", "flex_e2e_hash_16",
                        "ours_hash_16_w256", "flex_kernel_hash_16_w256", "flex_e2e_hash_16_w256",
                        "ours_window_256", "flex_kernel_window_256", "flex_e2e_window_256"]
    assert parse_args(["--quick"]).windows == [16] and parse_args(["--quick", "--windows", "64"]).windows == [64]
    for off in (["--windows"], ["--windows", "0"]):
        assert not any("window" in n or "_w" in n for n in names(["--buckets", "16"] + off))
    both = names(["--buckets", "8", "16", "--windows", "32", "0", "128"])
    assert {"ours_hash_8_w32", "ours_hash_16_w128", "ours_window_32", "flex_e2e_window_128"} <= set(both)
    with pytest.raises(SystemExit):
        parse_args(["--windows", "-1"])


def test_window_pattern_density_allowed_and_flex_masks():
    """pair_density, allowed() and the flex mask_mods of the union and the window: the float64
    masks of sparseflash.reference, on index grids (no compile)."""
    import torch

    from sparseflash import bench
    from sparseflash import reference as ref

    g = torch.Generator().manual_seed(3)
    B, H, N, n, W = 2, 3, 77, 3, 9
    qb, kb = (torch.randint(0, n, (B, H, N), generator=g) for _ in range(2))
    union = bench.Pattern("hash", n, q_buckets=qb, k_buckets=kb, window=W, seq_len=N)
    window = bench.Pattern("window", W, window=W, seq_len=N)
    assert (union.name, window.name) == ("hash_3_w9", "window_9")
    um, wm = ref.hash_mask(qb, kb, window=W), ref.window_mask(N, window=W)
    dense_pairs = N * (N + 1) / 2
    assert union.pair_density() == pytest.approx(um.double().sum().item() / (B * H * dense_pairs), rel=1e-12)
    assert window.pair_density() == pytest.approx(wm.double().sum().item() / dense_pairs, rel=1e-12)
    bs, hs = torch.arange(B).repeat_interleave(H), torch.arange(H).repeat(B)
    assert torch.equal(union.allowed(bs, hs, 0, N, N), um.reshape(B * H, N, N))
    assert torch.equal(union.allowed(bs, hs, 20, 50, 50), um.reshape(B * H, N, N)[:, 20:50, :50])
    assert torch.equal(window.allowed(bs, hs, 0, N, N).expand(B * H, N, N), wm.expand(B * H, N, N))

    b, h = torch.arange(B)[:, None, None, None], torch.arange(H)[None, :, None, None]
    i, j = torch.arange(N)[None, None, :, None], torch.arange(N)[None, None, None, :]
    try:
        bench._set_flex_state(None, None, qb, kb, window=W)
        assert torch.equal(bench._flex_hash_window(b, h, i, j), um)
        assert torch.equal(bench._flex_window(b, h, i, j).expand(B, H, N, N), wm.expand(B, H, N, N))
    finally:
        bench.baselines._clear_flex_state()


def test_union_tile_fraction():
    """The union's measured tile fraction (far part + band, as areas) is in (0, 1] on a long enough
    case and equals the schedules' hash_schedule(window) + flash_schedule(window)."""
    import torch

    from sparseflash import bench
    from sparseflash.bench import variants as V

    g = torch.Generator().manual_seed(5)
    N, n, W = 256, 4, 32
    q, k, v = (torch.randn(1, 1, N, 16, generator=g) for _ in range(3))
    qb, kb = (torch.randint(0, n, (1, 1, N), generator=g) for _ in range(2))
    union = bench.Pattern("hash", n, q_buckets=qb, k_buckets=kb, window=W, seq_len=N)
    window = bench.Pattern("window", W, window=W, seq_len=N)
    cache: dict = {}
    frac = V.measured_tile_fraction(union, q, k, v, cache)
    assert 0 < frac <= 1
    assert frac == pytest.approx(V.schedule_tile_fraction(union, N, 16, "cpu"))
    wfrac = V.measured_tile_fraction(window, q, k, v, cache)
    assert 0 < wfrac < frac and wfrac == pytest.approx(V.schedule_tile_fraction(window, N, 16, "cpu"))


def test_union_variants_pass_the_window(monkeypatch):
    torch = pytest.importorskip("torch")
    from sparseflash.bench import Pattern, all_variants, build_fn
    from sparseflash.bench import variants as V
    from sparseflash.bench.__main__ import parse_args

    seen = {}

    def fake(name):
        def f(q, k, v, *a, **kw):
            seen[name] = kw
            return q
        return f
    monkeypatch.setattr(V, "hash_sparse_attention", fake("hash"))
    monkeypatch.setattr(V, "flash_attention", fake("flash"))
    ids = torch.zeros(1, 1, 8, dtype=torch.int64)
    pats = [Pattern("hash", 16, q_buckets=ids, k_buckets=ids, window=256), Pattern("window", 256, window=256)]
    args = parse_args(["--device", "cpu"])
    by = {x.name: x for x in all_variants(None, pats)}
    for name in ("ours_hash_16_w256", "ours_window_256"):
        fn, _ = build_fn(by[name], args, 8, 1, 1, "cpu")
        fn(torch.zeros(1, 1, 8, 16), None, None)
    assert seen == {"hash": {"n_buckets": 16, "window": 256}, "flash": {"causal": True, "window": 256}}
    assert (by["ours_window_256"].kind, by["flex_e2e_hash_16_w256"].kind) == ("ours_window", "flex_e2e_hash")


def test_flex_ratio_finds_the_union_baseline():
    from sparseflash.bench import add_ratios

    base = dict(config="c", mode="fwd", status="ok", family="hash", param=16, impl="flex")
    rows = [dict(base, variant="flex_kernel_hash_16", pattern="hash_16", window=0, ms=4.0),
            dict(base, variant="flex_kernel_hash_16_w256", pattern="hash_16_w256", window=256, ms=6.0),
            dict(base, variant="ours_hash_16_w256", pattern="hash_16_w256", window=256, impl="ours", ms=2.0),
            dict(base, variant="ours_hash_16", pattern="hash_16", impl="ours", ms=1.0),
            dict(base, variant="flex_kernel_window_256", pattern="window_256", family="window", param=256, ms=3.0),
            dict(base, variant="ours_window_256", pattern="window_256", family="window", param=256, impl="ours",
                 ms=1.5)]
    add_ratios(rows)
    got = {r["variant"]: r["speedup_vs_flex_kernel"] for r in rows}
    assert got["ours_hash_16_w256"] == pytest.approx(3.0) and got["ours_hash_16"] == pytest.approx(4.0)
    assert got["ours_window_256"] == pytest.approx(2.0)
    old = [dict(r) for r in rows[:1] + rows[3:4]]  # rows written before the pattern field
    for r in old:
        del r["pattern"]
    add_ratios(old)
    assert old[1]["speedup_vs_flex_kernel"] == pytest.approx(4.0)


def _flex_pattern(family, B, H, N, seed, n_buckets):
    """Set the flex mask_mod's layout state for one family; returns ``(mask_mod, B, H)``
    (dense and window: one shared mask, ``B = H = 1``; hash_window: the union in natural order)."""
    import torch

    from sparseflash import bench
    from sparseflash.layout import bucket_sort_layout, compact_layout

    g = torch.Generator().manual_seed(seed)
    if family == "qk":
        _, qp = compact_layout(torch.rand(B, H, N, generator=g) < 0.4)
        _, kp = compact_layout(torch.rand(B, H, N, generator=g) < 0.4)
        bench._set_flex_state(qp, kp, None, None)
        return bench._flex_qk, B, H
    if family == "hash":
        _, qp, qs = bucket_sort_layout(torch.randint(0, n_buckets, (B, H, N), generator=g))
        _, kp, ks = bucket_sort_layout(torch.randint(0, n_buckets, (B, H, N), generator=g))
        bench._set_flex_state(qp, kp, qs, ks)
        return bench._flex_hash, B, H
    if family == "hash_window":
        qb, kb = (torch.randint(0, n_buckets, (B, H, N), generator=g) for _ in range(2))
        bench._set_flex_state(None, None, qb, kb, window=37)
        return bench._flex_hash_window, B, H
    if family == "window":
        bench._set_flex_state(None, None, None, None, window=150)
        return bench._flex_window, 1, 1
    return bench._flex_causal, 1, 1


def _assert_same_block_mask(mine, ref):
    import torch

    assert torch.equal(mine.to_dense(), ref.to_dense())
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                 "q_indices"):
        a, r = getattr(mine, name), getattr(ref, name)
        assert (a is None) == (r is None)
        if a is not None:
            assert torch.equal(a, r), name


@pytest.mark.parametrize("family", ["qk", "hash", "dense", "hash_window", "window"])
def test_prebuilt_block_mask_matches_create_block_mask(family):
    """flex_kernel's per-head eager block mask is create_block_mask's, table for table."""
    pytest.importorskip("torch")
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    from sparseflash import bench

    B, H, N = 2, 3, 300
    mod, b, h = _flex_pattern(family, B, H, N, seed=0, n_buckets=4)
    mine = bench.prebuilt_block_mask(mod, b, h, N, "cpu")
    shared = family in ("dense", "window")
    ref = flex.create_block_mask(mod, None if shared else b, None if shared else h, N, N, device="cpu")
    _assert_same_block_mask(mine, ref)
    if not shared:  # the full layout is back in place
        assert (bench._FLEX.qpos if family != "hash_window" else bench._FLEX.qb).shape == (B, H, N)
        assert bench._FLEX.window == (37 if family == "hash_window" else 0)


@pytest.mark.parametrize("family", ["qk", "hash", "dense", "hash_window", "window"])
def test_prebuilt_block_mask_in_bands(family):
    """At long N the block mask is built a band of query blocks at a time: same tables."""
    pytest.importorskip("torch")
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    from sparseflash import bench

    N = 600
    mod, B, H = _flex_pattern(family, 1, 2, N, seed=1, n_buckets=3)
    mine = bench.prebuilt_block_mask(mod, B, H, N, "cpu", max_elems=N * 256)  # bands of 256 query rows: 3
    ref = flex.create_block_mask(mod, B, H, N, N, device="cpu")
    _assert_same_block_mask(mine, ref)


# --------------------------------------------------------------------------------------
# Result files: named for the device, extended when compatible, never destroyed
# --------------------------------------------------------------------------------------

H100_JSON = ROOT / "results" / "h100.json"
#: A fast CPU run (PyTorch baselines only: no interpreter kernels), sizes of --quick.
FAST = ["--quick", "--device", "cpu", "--modes", "fwd", "--no-progress", "--variants", "sdpa_flash", "naive"]


def _main(args, capsys):
    from sparseflash.bench.__main__ import main

    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _rows(path):
    return json.loads(Path(path).read_text())["rows"]


def test_device_slug_and_default_out():
    from sparseflash.bench import default_out, device_slug

    assert device_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert device_slug("NVIDIA H200") == "h200"
    assert device_slug("NVIDIA H100 PCIe") == "h100-pcie"  # another form factor, another speed
    assert device_slug("NVIDIA A100-SXM4-80GB") == "a100-sxm4"
    assert device_slug("NVIDIA GeForce RTX 4090") == "rtx-4090"
    assert device_slug("x86_64", "cpu", interpreter=True) == "cpu-interpreter"
    assert default_out("NVIDIA H100 80GB HBM3", "cuda") == Path("results/h100.json")
    assert default_out("x86_64", "cpu", interpreter=True) == Path("results/cpu-interpreter.json")
    assert default_out("x86_64", "cpu", interpreter=True, quick=True) == Path("results/quick/cpu-interpreter.json")


def test_default_out_on_this_machine(tmp_path, monkeypatch, capsys):
    """Without --out a CPU run writes results/cpu-interpreter.json (never results/h100.json)."""
    monkeypatch.chdir(tmp_path)
    rc, out, _ = _main(["--device", "cpu", "--seq-lens", "64", "--batch", "1", "--heads", "2", "--head-dim", "16",
                        "--modes", "fwd", "--variants", "sdpa_flash", "--warmup", "1", "--rep", "5",
                        "--no-progress"], capsys)
    assert rc == 0
    path = tmp_path / "results" / "cpu-interpreter.json"
    assert path.exists() and path.with_suffix(".csv").exists()
    assert not (tmp_path / "results" / "h100.json").exists()
    data = json.loads(path.read_text())
    assert data["meta"]["interpreter"] is True and data["meta"]["schema"] == "sparseflash.bench/1"
    assert "INTERPRETER RUN" in data["meta"]["notes"][0]
    rc, out, _ = _main(["--device", "cpu", "--quick", "--seq-lens", "64", "--modes", "fwd", "--variants",
                        "sdpa_flash", "--no-progress"], capsys)
    assert rc == 0 and (tmp_path / "results" / "quick" / "cpu-interpreter.json").exists()


def test_refuses_a_file_from_another_device(tmp_path, capsys):
    target = tmp_path / "h100.json"
    target.write_bytes(H100_JSON.read_bytes())
    before = target.read_bytes()
    rc, _, err = _main(FAST + ["--seq-lens", "64", "--out", target], capsys)
    assert rc == 2
    n_rows = len(json.loads(before)["rows"])
    assert "NVIDIA H100 80GB HBM3" in err and f"{n_rows} rows" in err
    for word in ("device", "torch", "triton", "--force", "cpu-interpreter.json"):
        assert word in err, word
    assert target.read_bytes() == before  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h100.json"]  # no CSV, no backup, nothing else
    # --resume is refused the same way
    rc, _, err = _main(FAST + ["--seq-lens", "64", "--out", target, "--resume"], capsys)
    assert rc == 2 and target.read_bytes() == before


def test_refuses_other_settings_and_unreadable_files(tmp_path, capsys):
    target = tmp_path / "r.json"
    assert _main(FAST + ["--seq-lens", "64", "--out", target], capsys)[0] == 0
    before = target.read_bytes()
    rc, _, err = _main(FAST + ["--seq-lens", "64", "--out", target, "--rep", "7"], capsys)
    assert rc == 2 and "--rep" in err and target.read_bytes() == before
    rc, _, err = _main(FAST + ["--seq-lens", "64", "--out", target, "--bucket-source", "lsh"], capsys)
    assert rc == 2 and "--bucket-source" in err and target.read_bytes() == before
    junk = tmp_path / "junk.json"
    junk.write_text("not json")
    rc, _, err = _main(FAST + ["--seq-lens", "64", "--out", junk], capsys)
    assert rc == 2 and "cannot be read" in err and junk.read_text() == "not json"


def test_extends_a_compatible_file(tmp_path, capsys):
    target = tmp_path / "r.json"
    assert _main(FAST + ["--seq-lens", "64", "--out", target], capsys)[0] == 0
    first = {(r["config"], r["variant"]): r for r in _rows(target)}
    assert set(first) == {("B1_H2_D16_N64_bf16", "sdpa_flash"), ("B1_H2_D16_N64_bf16", "naive")}
    # another N: added beside the first rows, which are kept as they were
    rc, out, _ = _main(FAST + ["--seq-lens", "128", "--out", target], capsys)
    assert rc == 0 and "extending" in out
    data = json.loads(target.read_text())
    rows = {(r["config"], r["variant"]): r for r in data["rows"]}
    assert len(rows) == len(data["rows"]) == 4
    for key, r in first.items():
        assert rows[key]["ms"] == r["ms"] and rows[key]["measured_at"] == r["measured_at"]
    assert set(data["meta"]["completed_configs"]) == {"B1_H2_D16_N64_bf16", "B1_H2_D16_N128_bf16"}
    assert len(data["meta"]["previous_invocations"]) == 1
    # one variant of a measured configuration again: its row is replaced, nothing else moves
    assert _main(FAST[:-3] + ["--variants", "naive", "--seq-lens", "64", "--out", target], capsys)[0] == 0
    data = json.loads(target.read_text())
    assert len(data["rows"]) == 4 and len(data["meta"]["previous_invocations"]) == 2
    rows = {(r["config"], r["variant"]): r for r in data["rows"]}
    assert rows[("B1_H2_D16_N64_bf16", "sdpa_flash")]["ms"] == first[("B1_H2_D16_N64_bf16", "sdpa_flash")]["ms"]
    assert rows[("B1_H2_D16_N64_bf16", "naive")]["measured_at"] == data["meta"]["date"]
    naive = rows[("B1_H2_D16_N64_bf16", "naive")]
    assert naive["speedup_vs_sdpa_flash"] == pytest.approx(
        rows[("B1_H2_D16_N64_bf16", "sdpa_flash")]["ms"] / naive["ms"])
    with open(target.with_suffix(".csv"), newline="") as f:
        assert len(list(csv.DictReader(f))) == 4


def test_force_moves_the_old_file_to_a_backup(tmp_path, capsys):
    target = tmp_path / "h100.json"
    target.write_bytes(H100_JSON.read_bytes())
    target.with_suffix(".csv").write_text("old,csv\n")
    before = target.read_bytes()
    rc, out, _ = _main(FAST + ["--seq-lens", "64", "--out", target, "--force"], capsys)
    assert rc == 0 and "--force" in out
    backups = sorted(tmp_path.glob("h100.json.bak-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == before
    csv_backups = sorted(tmp_path.glob("h100.csv.bak-*"))
    assert len(csv_backups) == 1 and csv_backups[0].read_text() == "old,csv\n"
    data = json.loads(target.read_text())
    assert {r["seq_len"] for r in data["rows"]} == {64} and len(data["rows"]) == 2
    assert data["meta"]["replaced_file_backup"][0] == str(backups[0])
    assert not list(tmp_path.glob("*.json.bak*.json"))  # backups are not *.json: figures never read them


def test_committed_results_still_load(tmp_path):
    """results/h100.json: readable by figures (every row, 340 at this commit) and extendable on its own device."""
    from sparseflash import figures
    from sparseflash.bench import differences

    data = json.loads(H100_JSON.read_text())
    n_rows = len(data["rows"])
    assert data["meta"]["schema"] == "sparseflash.bench/1" and n_rows >= 204
    same = dict(data["meta"], date="later", argv=[])
    assert differences(data["meta"], same) == []
    other = dict(same, device="x86_64", torch="2.13.0+cpu", interpreter=True)
    assert {d.split(":")[0] for d in differences(data["meta"], other)} == {"device", "torch", "interpreter"}
    recs = figures.load_results(ROOT / "results")
    mine = [r for r in recs if r["_file"] == "h100.json"]
    assert len(mine) == n_rows
    assert len([r for r in mine if figures._gpu_timed(r) and figures._usable(r)]) > 150


def test_figures_skip_interpreter_rows(tmp_path, capsys):
    """A CPU run beside the H100 file: the speed figure draws the H100 rows only, and says so."""
    from sparseflash import figures

    res = tmp_path / "results"
    res.mkdir()
    (res / "h100.json").write_bytes(H100_JSON.read_bytes())
    cpu = res / "cpu-interpreter.json"
    assert _main(FAST + ["--seq-lens", "64", "--out", cpu], capsys)[0] == 0
    old_cpu = res / "old-cpu.json"  # a file from before meta.interpreter: its timer still tells
    old_cpu.write_text(json.dumps({"meta": {"device": "x86_64"}, "rows": [
        dict(r, timer="cpu-wallclock", D=64) for r in _rows(cpu)]}))
    n_cpu = len(_rows(cpu)) * 2
    records = figures.load_results(res)
    assert len(records) == len(json.loads(H100_JSON.read_text())["rows"]) + n_cpu
    assert all(r.get("_interpreter") for r in records if r["_file"] == "cpu-interpreter.json")
    capsys.readouterr()
    (tmp_path / "figs").mkdir()
    written = figures.speed_figures(records, tmp_path / "figs")
    said = capsys.readouterr().out
    assert f"skipping {n_cpu} result record(s) timed in Triton's interpreter or on the CPU" in said
    assert "cpu-interpreter.json" in said and "old-cpu.json" in said
    h100_dims = sorted({r["D"] for r in json.loads(H100_JSON.read_text())["rows"]})
    assert [p.name for p in written] == ["speed.png"] + [f"speed_d{d}.png" for d in h100_dims if d != 64]
    fig = figures.speed_figure(records, head_dim=64)
    assert "x86_64" not in fig._suptitle.get_text() and "H100" in fig._suptitle.get_text()
    # only interpreter rows: no speed figure at all
    assert figures.speed_figure([r for r in records if r["_file"] != "h100.json"]) is None
    assert "skipping" in capsys.readouterr().out


# --------------------------------------------------------------------------------------
# Long sequences, memory, host overhead, n_buckets
# --------------------------------------------------------------------------------------


def test_shapes_beside_seq_lens(tmp_path, capsys):
    from sparseflash.bench import parse_shape
    from sparseflash.bench.__main__ import configurations, parse_args

    assert parse_shape("1x4x65536") == (1, 4, 65536)
    args = parse_args(["--seq-lens", "4096", "--head-dim", "64", "128", "--shapes", "1x4x65536", "1x4x131072"])
    assert configurations(args) == [(2, 12, 64, 4096), (2, 12, 128, 4096), (1, 4, 64, 65536), (1, 4, 128, 65536),
                                    (1, 4, 64, 131072), (1, 4, 128, 131072)]
    assert configurations(parse_args(["--seq-lens", "--shapes", "1x4x65536"])) == [(1, 4, 64, 65536)]
    with pytest.raises(SystemExit):
        parse_args(["--shapes", "4x65536"])

    target = tmp_path / "r.json"
    rc, out, _ = _main(FAST + ["--seq-lens", "64", "--shapes", "1x1x96", "--naive-max-n", "64", "--out", target],
                       capsys)
    assert rc == 0 and "COMPLETE" in out
    data = json.loads(target.read_text())
    assert set(data["meta"]["completed_configs"]) == {"B1_H2_D16_N64_bf16", "B1_H1_D16_N96_bf16"}
    by = {(r["config"], r["variant"]): r for r in data["rows"]}
    long_naive = by[("B1_H1_D16_N96_bf16", "naive")]
    assert long_naive["status"] == "skipped" and "--naive-max-n=64" in long_naive["error"]
    assert by[("B1_H1_D16_N96_bf16", "sdpa_flash")]["status"] == "ok"
    assert by[("B1_H1_D16_N96_bf16", "sdpa_flash")]["B"] == 1
    for r in data["rows"]:  # every row has the new keys (null on CPU)
        assert "peak_mem_gb" in r and r["peak_mem_gb"] is None
        assert "host_bound_ratio" in r and "kernel_ms" in r
    assert "peak_mem_gb" in data["meta"]["fields"] and "host_bound_ratio" in data["meta"]["fields"]


def test_new_flags_in_help():
    proc = subprocess.run([sys.executable, "-m", "sparseflash.bench", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "RuntimeWarning" not in proc.stderr
    for flag in ("--shapes", "--force", "--flex-max-n", "--kernel-time", "--graph-time", "BxHxN"):
        assert flag in proc.stdout


def test_host_bound_ratio_and_busy_time():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from sparseflash.bench import add_ratios, busy_us
    from sparseflash.bench.timing import device_intervals

    assert busy_us([]) == 0
    assert busy_us([(0, 10), (20, 25)]) == 15
    assert busy_us([(0, 10), (5, 12), (5, 12), (30, 31)]) == 13  # overlaps and duplicates counted once

    def evt(dev, start, end, kind="kernel", annotation=False):
        return SimpleNamespace(device_type=dev, time_range=SimpleNamespace(start=start, end=end),
                               activity_type=kind, is_user_annotation=annotation)
    events = [evt(DeviceType.CPU, 0, 100, "cpu_op"), evt(DeviceType.CUDA, 10, 20), evt(DeviceType.CUDA, 30, 35),
              evt(DeviceType.CUDA, 40, 41, "gpu_memset"),
              evt(DeviceType.CUDA, 5, 60, "gpu_user_annotation", annotation=True),  # a scope, not work
              evt(DeviceType.CUDA, 5, 60, "gpu_user_annotation")]
    assert device_intervals(events) == [(10, 20), (30, 35), (40, 41)]
    assert busy_us(device_intervals(events)) == 16

    base = dict(config="c", mode="fwd", status="ok", family="hash", param=16, impl="ours")
    rows = [dict(base, variant="ours_hash_16", ms=3.0, kernel_ms=1.5),
            dict(base, variant="ours_dense", family="dense", param=None, ms=2.0, kernel_ms=None)]
    add_ratios(rows)
    assert rows[0]["host_bound_ratio"] == pytest.approx(2.0) and rows[1]["host_bound_ratio"] is None


def test_graph_time_ratios_and_cpu_rows():
    """graph_ms is CUDA-only (None on CPU, the row still timed); its ratios come from the baselines'
    graph_ms in the same configuration and mode."""
    from types import SimpleNamespace

    import torch

    import sparseflash as sf
    from sparseflash.bench import add_ratios, time_mode

    q, k, v, g = (torch.randn(1, 1, 32, 16) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    args = SimpleNamespace(warmup=0, rep=0, kernel_time=False, graph_time=True)
    res = time_mode(lambda q, k, v: sf.flash_attention(q, k, v), "fwd+bwd", q, k, v, g, torch.device("cpu"), args,
                    interpreted=True)
    assert res["graph_ms"] is None and res["ms"] > 0 and q.grad is None

    base = dict(config="c", mode="fwd+bwd", status="ok", family="hash", param=16, impl="ours")
    rows = [dict(base, variant="ours_hash_16", ms=3.0, graph_ms=0.5),
            dict(base, variant="sdpa_flash", family="dense", param=None, ms=2.0, graph_ms=1.5),
            dict(base, variant="sdpa_cudnn", family="dense", param=None, ms=1.0, graph_ms=None)]
    add_ratios(rows)
    assert rows[0]["graph_speedup_vs_sdpa_flash"] == pytest.approx(3.0)
    assert rows[0]["graph_speedup_vs_sdpa_cudnn"] is None and rows[0]["speedup_vs_sdpa_flash"] == pytest.approx(2 / 3)

    from sparseflash.bench.report import summary_table
    for r in rows:
        r.update(B=1, H=1, D=16, dtype="bf16", seq_len=64)
    table = summary_table(rows).splitlines()
    at = table.index("bf16 B=1 H=1 D=16 fwd+bwd, CUDA-graph replays (graph_ms): speedup vs sdpa_flash")
    assert table[at + 2].split() == ["ours_hash_16", "3.00x"] and table[at + 4].split() == ["sdpa_cudnn", "?"]
    assert "0.67x" in next(line for line in table[:at] if line.startswith("ours_hash_16"))


@pytest.mark.gpu
def test_gpu_graph_time():
    """On CUDA the captured call is timed by its replays; the gradients stay cleared afterwards."""
    from types import SimpleNamespace

    import torch

    import sparseflash as sf
    from sparseflash.bench import time_mode

    q, k, v, g = (torch.randn(2, 4, 1024, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ids = torch.randint(0, 16, (2, 4, 1024), device="cuda")
    args = SimpleNamespace(warmup=5, rep=20, kernel_time=False, graph_time=True)
    for fn in (lambda q, k, v: sf.flash_attention(q, k, v),
               lambda q, k, v: sf.hash_sparse_attention(q, k, v, ids, ids, n_buckets=16)):
        for mode in ("fwd", "fwd+bwd"):
            res = time_mode(fn, mode, q, k, v, g, torch.device("cuda"), args)
            assert res["graph_ms"] is not None and 0 < res["graph_ms"] < 10 * res["ms"], (mode, res)
            assert q.grad is None


def test_ours_hash_passes_n_buckets(monkeypatch):
    torch = pytest.importorskip("torch")
    from sparseflash.bench import Pattern, all_variants, build_fn
    from sparseflash.bench import variants as V
    from sparseflash.bench.__main__ import parse_args

    seen = {}

    def fake(q, k, v, q_buckets, k_buckets, sm_scale=None, **kw):
        seen.update(kw)
        return q
    monkeypatch.setattr(V, "hash_sparse_attention", fake)
    ids = torch.zeros(1, 1, 8, dtype=torch.int64)
    pat = Pattern("hash", 16, q_buckets=ids, k_buckets=ids)
    var = next(x for x in all_variants(None, [pat]) if x.name == "ours_hash_16")
    fn, _ = build_fn(var, parse_args(["--device", "cpu"]), 8, 1, 1, "cpu")
    fn(torch.zeros(1, 1, 8, 16), None, None)
    assert seen == {"n_buckets": 16}


def test_bench_modules_import_downwards():
    """sparseflash/bench/: every module imports only modules above it in ORDER (no cycles)."""
    import ast

    order = ["patterns", "baselines", "variants", "timing", "results", "report", "run", "decode", "__main__"]
    folder = ROOT / "sparseflash" / "bench"
    assert {p.stem for p in folder.glob("*.py")} == set(order) | {"__init__"}
    for i, name in enumerate(order):
        tree = ast.parse((folder / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                target = node.module or ""
                assert target in order[:i], f"{name}.py imports .{target}"
