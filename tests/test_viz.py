"""Pictures (sparseflash.viz), the explorer and `python -m sparseflash.figures`, all headless."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from sparseflash import figures, reference, tiles, viz  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_plot_pattern_renders(tmp_path):
    ax = viz.plot_pattern(reference.causal_mask(40))
    ax.figure.savefig(tmp_path / "p.png")
    assert _is_png(tmp_path / "p.png") and ax.get_xlabel() == "key position j"
    _, ax2 = plt.subplots()
    assert viz.plot_pattern(tiles.schedule_for("qk", 64, 16).mask, ax=ax2) is ax2


@pytest.mark.parametrize("kind", tiles.KINDS)
@pytest.mark.parametrize("coords", ["layout", "original"])
def test_plot_tile_map_renders(tmp_path, kind, coords):
    sched = tiles.schedule_for(kind, 80, 16, seed=1)
    ax = viz.plot_tile_map(sched, coords=coords)
    assert ax.get_legend() is not None and ax.get_title()
    ax.figure.savefig(tmp_path / "t.png")
    assert _is_png(tmp_path / "t.png")


def test_tile_state_image_colours_follow_the_schedule():
    sched = tiles.schedule_for("hash", 64, 16, seed=0)
    img = viz.tile_state_image(sched, coords="layout", show_pairs=False)
    palette = {s: np.array(matplotlib.colors.to_rgb(c)) for s, c in viz.STATE_COLORS.items()}
    for t in range(4):
        for s in range(4):
            state = int(sched.state[0, 0, t, s])
            assert np.allclose(img[t * 16 + 3, s * 16 + 5], palette[state])
    orig = viz.tile_state_image(sched, coords="original", show_pairs=False)
    assert orig.shape == (64, 64, 3)
    with pytest.raises(ValueError):
        viz.tile_state_image(sched, coords="nope")


@pytest.mark.parametrize("kind", tiles.KINDS)
def test_plot_skipping_two_panels(tmp_path, kind):
    fig, axes = viz.plot_skipping(kind, seq_len=96, block=16, keep_rate=0.4, n_buckets=3, seed=2)
    assert len(axes) == 2
    assert "original" in axes[0].get_title() and "layout" in axes[1].get_title()
    assert fig._suptitle is not None and "tiles computed" in fig._suptitle.get_text()
    fig.savefig(tmp_path / "s.png")
    assert _is_png(tmp_path / "s.png")
    # into given axes, from a given schedule
    fig2, axes2 = plt.subplots(1, 2)
    f, a = viz.plot_skipping(schedule=tiles.flash_schedule(64, block_m=16), axes=axes2, legend=False)
    assert f is fig2 and a is axes2


@pytest.mark.parametrize("vary", ["seq_len", "keep_rate", "n_buckets"])
def test_plot_fraction_renders(tmp_path, vary):
    values = {"seq_len": [64, 128, 256], "keep_rate": [0.25, 0.5, 1.0], "n_buckets": [1, 2, 4]}[vary]
    ax = viz.plot_fraction(vary, values=values, seq_len=256, block=32, seeds=(0, 1), mark=values[1])
    assert ax.get_ylabel().startswith("computed tiles")
    ax.figure.savefig(tmp_path / "f.png")
    assert _is_png(tmp_path / "f.png")


def test_fraction_sweep_numbers():
    f = viz.fraction_sweep("dense", "seq_len", [64, 4096], block=64, seeds=(0, 1), relative_to="grid")
    assert f[0, 0] == 1.0 and f[1, 0] == pytest.approx(0.5, abs=0.01)
    f = viz.fraction_sweep("qk", "keep_rate", [1.0], seq_len=128, block=32)
    assert np.all(f == 1.0)


def test_explorer_builds_and_reacts():
    w = viz.explore(kind="qk", seq_len=64, block=16)
    assert w.draws == 1 and w.image.value[:8] == PNG_MAGIC
    assert set(w.controls) == {"kind", "seq_len", "block", "keep_rate", "n_buckets", "seed"}
    first_png, first_state = w.image.value, w.schedule.state
    assert w.controls["n_buckets"].disabled and not w.controls["keep_rate"].disabled

    w.controls["seq_len"].value = 96
    # 96 tokens plus the padding that ends the kept run on a tile boundary: 7 tiles of 16 slots
    assert w.draws == 2 and w.schedule.n_q == 96 and w.schedule.state.shape[-1] == 7
    assert w.image.value != first_png and w.schedule.state.shape != first_state.shape

    w.controls["kind"].value = "hash"
    assert w.schedule.kind == "hash" and w.controls["keep_rate"].disabled
    png = w.image.value
    w.controls["n_buckets"].value = 8
    assert w.image.value != png and "hash" in w.info.value
    w.controls["kind"].value = "dense"
    assert w.schedule.kind == "flash" and w.schedule.computed_fraction == 1.0


def test_layout_and_tile_plan_pictures(tmp_path):
    from sparseflash.layout import bucket_layouts, reference_layout
    from sparseflash.plan import tile_plan

    keep = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 0, 1, 0], dtype=torch.bool)[None, None]
    ql, kl = bucket_layouts(keep.shape, q_keep=keep, k_keep=keep, block_m=4, block_n=4)
    ax = viz.plot_layout(ql)
    assert "16 tokens in 20 slots" in ax.get_title()
    plain = reference_layout((1, 1, 16), buckets=torch.arange(16)[None, None] % 3, n_buckets=3, block=1, pad=-1)
    viz.plot_layout(plain, n_tokens=16)

    g = torch.Generator().manual_seed(0)
    qb, kb = (torch.randint(0, 4, (1, 2, 96), generator=g) for _ in range(2))
    ql, kl = bucket_layouts((1, 2, 96), q_buckets=qb, k_buckets=kb, n_buckets=4, block_m=16, block_n=16)
    plan = tile_plan(ql, kl)
    allowed = viz.allowed_per_tile(ql, kl)
    assert int(allowed.sum()) == int(reference.hash_mask(qb, kb).sum())
    states = viz.tile_plan_states(plan, allowed)
    assert torch.equal(states != tiles.SKIPPED, plan.visited()) and not (states == tiles.EMPTY).any()
    ax = viz.plot_tile_plan(plan, h=1, allowed=allowed, q_layout=ql, k_layout=kl)
    ax.figure.savefig(tmp_path / "plan.png")
    assert _is_png(tmp_path / "plan.png")
    # a bare map of visited tiles: every one masked, the empty ones marked
    visited = torch.ones(2, 3, dtype=torch.bool)
    st = viz.tile_plan_states(visited, torch.tensor([[1, 0, 1], [1, 1, 1]])[None, None])
    assert st[0, 0].tolist() == [[tiles.PARTIAL, tiles.EMPTY, tiles.PARTIAL], [tiles.PARTIAL] * 3]
    viz.plot_tile_plan(visited)


def test_show_explorer_is_static_first(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)       # import ipywidgets -> ImportError
    assert viz.show_explorer(kind="hash", seq_len=64, block=16, n_buckets=2) is None
    out = capsys.readouterr().out
    assert "hash, 2 random buckets, N=64" in out and "ipywidgets is not installed" in out
    (num,) = plt.get_fignums()                                  # one plain figure, drawn first
    assert len(plt.figure(num).axes) >= 3


def test_explorer_degrades_to_a_note():
    w = viz.explore(kind="qk", seq_len=64, block=16)
    bundle = viz._WidgetOrNote(w, viz.EXPLORER_NOTE)._repr_mimebundle_()
    assert bundle["text/plain"] == viz.EXPLORER_NOTE
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_png_bytes_scales_down(tmp_path):
    from PIL import Image
    import io

    fig, ax = plt.subplots(figsize=(12, 4), dpi=100)
    ax.plot(np.arange(10))
    fig.savefig(tmp_path / "big.png")
    small = viz.png_bytes(tmp_path / "big.png", max_width=300)
    assert small[:8] == PNG_MAGIC and Image.open(io.BytesIO(small)).width == 300
    assert viz.png_bytes(tmp_path / "big.png", max_width=5000) == (tmp_path / "big.png").read_bytes()


def _bench_rows(dims=(64,), ns=(1024, 2048, 4096)):
    """Rows in the ``python -m sparseflash.bench`` schema (only the keys the figure reads)."""
    variants = ["sdpa_flash", "sdpa_cudnn", "ours_dense", "flex_dense", "naive"] + [
        f"{impl}_{fam}_{p}" for fam, ps in (("qk", (0.3, 0.5)), ("hash", (8, 16)))
        for impl in ("ours", "flex_kernel", "flex_e2e") for p in ps]
    return [dict(variant=v, seq_len=n, D=d, mode=mode, B=2, H=12, dtype="bf16", device="NVIDIA H100", status="ok",
                 ms=n / 1000 / (1 + i / 10), speedup_vs_sdpa_flash=1 + i / 10)
            for d in dims for mode in ("fwd", "fwd+bwd") for n in ns for i, v in enumerate(variants)]


def test_speed_figure_from_records(tmp_path, capsys):
    recs = _bench_rows() + [dict(variant="ours_qk_0.3", ms=1.0, speedup_vs_sdpa_flash=2.0)]  # no seq_len: left out
    fig = figures.speed_figure(recs, tmp_path / "speed.png")
    assert fig is not None and _is_png(tmp_path / "speed.png")
    assert "left out" in capsys.readouterr().out
    axes = np.array(fig.axes).reshape(2, 3)
    assert "fwd+bwd" in axes[0, 0].get_title() and "hash" in axes[1, 2].get_title()
    assert all(ax.get_legend() is not None for ax in axes.flat)
    assert len(axes[0, 0].lines) == 4  # ours_dense, sdpa_cudnn, flex_dense, the line at 1 (naive left out)
    assert len(axes[0, 1].lines) == 1 + 2 * 3 + 1  # ours_dense for reference, 2 keep rates x 3 impls
    assert [t.get_text() for t in axes[0, 0].texts] == ["1.2x"]  # last point of ours_dense
    assert fig._suptitle.get_text().endswith("on NVIDIA H100: head dim 64, B=2, H=12, bf16")
    assert figures.speed_figure([{"foo": 1}]) is None
    assert "no usable" in capsys.readouterr().out


def test_speed_figure_window_column(tmp_path):
    """Window and hash ∪ window rows get a fourth column; without them the figure keeps three."""
    extra = [dict(variant=v, seq_len=n, D=64, mode=mode, B=2, H=12, dtype="bf16", device="NVIDIA H200", status="ok",
                  ms=0.5, speedup_vs_sdpa_flash=s)
             for mode in ("fwd", "fwd+bwd") for n in (1024, 2048, 4096)
             for v, s in (("ours_window_256", 4.0), ("flex_kernel_window_256", 3.0), ("ours_hash_16_w256", 2.0),
                          ("flex_kernel_hash_16_w256", 0.5))]
    fig = figures.speed_figure(_bench_rows() + extra, tmp_path / "speed.png")
    axes = np.array(fig.axes).reshape(2, 4)
    assert "window" in axes[0, 3].get_title()
    assert len(axes[0, 3].lines) == 1 + 2 * 2 + 1  # ours_dense, 2 patterns x 2 impls, the line at 1
    labels = [t.get_text() for t in axes[0, 3].get_legend().get_texts()]
    assert "window 256" in labels and "16 buckets ∪ window 256" in labels
    assert len(axes[0, 2].lines) == 1 + 2 * 3 + 1  # the hash column does not take the union rows
    plt.close(fig)


def test_speed_legend_names_only_the_lines_drawn(tmp_path):
    """A file without FlexAttention rows gets no "flex" entries in its legends."""
    rows = [r for r in _bench_rows() if not str(r["variant"]).startswith("flex")]
    fig = figures.speed_figure(rows, tmp_path / "speed.png")
    for ax in np.array(fig.axes).reshape(2, 3)[:, 1:].flat:  # the sparse columns (the dense one has no styles)
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "ours" in labels and not any("flex" in x for x in labels), labels
    plt.close(fig)
    fig = figures.speed_figure(_bench_rows(), tmp_path / "speed.png")
    assert "flex, kernel" in [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    plt.close(fig)


def test_load_results_accepts_several_shapes(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"variant": "dense", "seq_len": 1, "ms": 1}]))
    (tmp_path / "b.json").write_text(json.dumps({"records": [{"variant": "qk", "seq_len": 1, "ms": 1}]}))
    (tmp_path / "c.json").write_text(json.dumps({"variant": "hash", "seq_len": 1, "ms": 1}))
    (tmp_path / "d.json").write_text("not json")
    (tmp_path / "e.json").write_text(json.dumps({"meta": {"device": "NVIDIA H100"}, "rows": [
        {"variant": "ours_dense", "seq_len": 1024, "ms": 1.0, "mode": "fwd", "status": "ok", "D": 64,
         "speedup_vs_sdpa_flash": 1.1},
        {"variant": "ours_qk_0.3", "seq_len": 1024, "ms": 0.2, "mode": "fwd", "status": "ok", "D": 64,
         "speedup_vs_sdpa_flash": 5.5},
        {"variant": "ours_dense", "seq_len": 1024, "ms": 1.9, "mode": "fwd", "status": "ok", "D": 128,
         "speedup_vs_sdpa_flash": 1.2},
        {"variant": "flex_kernel_qk_0.3", "seq_len": 1024, "ms": None, "mode": "fwd", "status": "skipped"}]}))
    recs = figures.load_results(tmp_path)
    assert [r["variant"] for r in recs[:3]] == ["dense", "qk", "hash"]
    assert len(recs) == 7 and recs[-1]["device"] == "NVIDIA H100"
    fig = figures.speed_figure(recs[3:])  # the bench schema: one mode, smallest head dim
    assert fig is not None and len(fig.axes) == 3 and "NVIDIA H100" in fig._suptitle.get_text()
    assert figures.speed_figure(recs[3:], head_dim=128) is not None


def _run_figures(*args):
    env = dict(os.environ, MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "sparseflash.figures", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def test_figures_cli_writes_pngs(tmp_path):
    out = tmp_path / "figs"
    empty = tmp_path / "results"
    empty.mkdir()
    proc = _run_figures("--out", str(out), "--results", str(empty))
    assert proc.returncode == 0, proc.stderr
    for name in ("tile_maps.png", "computed_fraction.png"):
        assert _is_png(out / name), name
    assert not (out / "speed.png").exists()
    assert "no benchmark results" in proc.stdout


def test_figures_cli_speed_and_help(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    (res / "h100.json").write_text(json.dumps({"meta": {"device": "NVIDIA H100"}, "rows": _bench_rows((64, 128))}))
    other = [dict(r, device="NVIDIA H200") for r in _bench_rows((64,))]
    (res / "h200.json").write_text(json.dumps({"meta": {"device": "NVIDIA H200"}, "rows": other}))
    out = tmp_path / "figs"
    out.mkdir()
    # the speed figures alone, in-process: test_figures_cli_writes_pngs already draws the tile figures
    figures.speed_figures(figures.load_results(res), out)
    assert _is_png(out / "speed.png") and _is_png(out / "speed_d128.png")  # one figure per head dim
    assert _is_png(out / "speed_h200.png") and not (out / "speed_h200_d128.png").exists()  # one per device file
    proc = _run_figures("--help")
    assert proc.returncode == 0 and "--out" in proc.stdout and "--results" in proc.stdout


def test_committed_figures_exist():
    for name in ("tile_maps.png", "computed_fraction.png"):
        assert _is_png(ROOT / "figures" / name), f"figures/{name}: run `python -m sparseflash.figures`"


def test_schedules_are_torch_only():
    # the figures never run a kernel: schedule building is plain PyTorch and quick
    sched = tiles.schedule_for("hash", 4096, 64, n_buckets=8)
    assert isinstance(sched.state, torch.Tensor) and sched.state.dtype == torch.int8


def test_plot_window_union():
    import matplotlib.pyplot as plt

    from sparseflash.viz import plot_window_union

    buckets = torch.randint(0, 4, (96,))
    axes = plot_window_union(buckets, buckets, 20, block=16)
    assert len(axes) == 2 and "i - j < 20" in axes[0].get_title() and "i - j >= 20" in axes[1].get_title()
    plt.close("all")


def _quality_file(tmp_path: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import quality_merge

    rows = []
    for n in (64, 128):
        for name, att, nb, w, final in (("dense", "dense", None, 0, 2.0), ("window8", "dense", None, 8, 1.98),
                                        ("hash4", "hash", 4, 0, 2.6), ("hash4w8", "hash", 4, 8, 1.95)):
            for seed in (0, 1):
                v = final + 0.01 * seed
                rows.append(dict(name=name, attention=att, n_buckets=nb, window=w, seq_len=n, batch=2, steps=20,
                                 seed=seed, val_loss=v, ppl=float(np.exp(v)), median_step_ms=1.0,
                                 pair_density_start=0.3, pair_density_end=1.0 if att == "dense" and not w else 0.3,
                                 density_tokens=n, curve=[[0, 5.5], [10, 3.0], [20, v]], device="cpu"))
    src = tmp_path / "q.json"
    src.write_text(json.dumps(dict(meta=dict(device="cpu", argv=["x"]), rows=rows)))
    out = tmp_path / "res" / "quality_cpu.json"
    out.parent.mkdir()
    assert quality_merge.main([str(src), "--out", str(out), "--note", "test"]) == 0
    return out


def test_quality_merge_summary_and_figure(tmp_path):
    out = _quality_file(tmp_path)
    data = json.loads(out.read_text())
    summ = {(s["seq_len"], s["name"]): s for s in data["summary"]}
    s = summ[(64, "hash4w8")]
    assert s["seeds"] == [0, 1] and s["seed_spread"] == pytest.approx(0.01)
    assert s["vs_dense_mean"] == pytest.approx(1.955 / 2.005)
    assert summ[(128, "dense")]["vs_dense_mean"] == pytest.approx(1.0)
    # merging again replaces rows of the same (name, seq_len, seed) instead of duplicating them
    import quality_merge
    assert quality_merge.main([str(tmp_path / "q.json"), "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())["rows"]) == len(data["rows"])
    fig = figures.quality_figure(data, tmp_path / "quality.png")
    assert fig is not None and _is_png(tmp_path / "quality.png")
    plt.close(fig)
    assert figures.quality_figure({"rows": []}) is None
    # quality files are not benchmark records, and build_all draws them
    assert figures.load_results(out.parent) == []
    written = figures.quality_figures(out.parent, tmp_path)
    assert [p.name for p in written] == ["quality_cpu.png"]
