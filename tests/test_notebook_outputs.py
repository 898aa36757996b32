"""The committed notebooks carry their outputs, small and free of errors (no execution here:
``python -m sparseflash.notebooks`` writes them; tests/test_notebooks.py runs them from scratch).

Also: the regeneration command's rules (GPU outputs kept on a CPU run, heavy outputs dropped),
on small notebooks made here, and the README's course section with its thumbnails."""
from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from sparseflash import notebooks as regen

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MAX_PNG_BYTES = 300_000


def _read(path):
    return nbformat.read(path, as_version=4)


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_has_outputs(path):
    nb = _read(path)
    cells = _code_cells(nb)
    assert any(c.outputs for c in cells), f"{path.name} has no outputs: run python -m sparseflash.notebooks"
    not_run = [i for i, c in enumerate(nb.cells) if c in cells and c.execution_count is None]
    assert not not_run, f"{path.name}: cells {not_run} were never executed (python -m sparseflash.notebooks)"
    assert nb.metadata.get(regen.META, {}).get("executed_on"), f"{path.name}: no {regen.META}.executed_on metadata"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_has_no_error_output(path):
    assert regen.error_outputs(_read(path)) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_is_small(path):
    assert path.stat().st_size < regen.MAX_NOTEBOOK_BYTES, f"{path.name}: {path.stat().st_size / 1e6:.2f} MB"
    nb = _read(path)
    assert "widgets" not in nb.metadata, "widget state is stripped (it holds the explorer's PNGs)"
    for cell in _code_cells(nb):
        assert "execution" not in cell.metadata
        for out in cell.outputs:
            data = out.get("data", {})
            assert regen.WIDGET_VIEW not in data, "widget views are stripped; their text/plain note stays"
            assert not {"image/jpeg", "image/svg+xml", "application/pdf"} & set(data), "figures are PNG"
            if "image/png" in data:
                assert len(base64.b64decode(data["image/png"])) < MAX_PNG_BYTES


def test_every_notebook_has_a_thumbnail_cell_and_gpu_sections_are_tagged():
    for path in NOTEBOOKS:
        nb = _read(path)
        assert regen.thumbnail_png(nb) is not None, f"{path.name}: no PNG output in a cell tagged 'thumbnail'"
    gpu = {p.stem.split("_")[0] for p in NOTEBOOKS if regen.has_gpu_sections(_read(p))}
    assert {"03", "06", "08"} <= gpu


# ======================================================================================
# README: the course section lists every notebook with a thumbnail
# ======================================================================================


def _course_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Course")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def test_readme_course_lists_every_notebook_with_a_thumbnail():
    section = _course_section()
    for path in NOTEBOOKS:
        assert path.name in section, f"README's course section does not list {path.name}"
        thumb = f"figures/course/{path.stem.split('_')[0]}.png"
        assert thumb in section, f"README's course section has no thumbnail {thumb}"
        size = (ROOT / thumb).stat().st_size
        assert size < regen.THUMB_MAX_BYTES, f"{thumb}: {size / 1e3:.0f} kB"
    pictured = set(re.findall(r"figures/course/([\w.-]+\.png)", section))
    on_disk = {p.name for p in (ROOT / "figures" / "course").glob("*.png")}
    assert on_disk <= pictured, f"thumbnails no notebook uses: {sorted(on_disk - pictured)}"


# ======================================================================================
# The regeneration command's rules, on small notebooks
# ======================================================================================


def _nb(*cells):
    nb = nbformat.v4.new_notebook()
    for i, (source, tags, outputs) in enumerate(cells):
        cell = nbformat.v4.new_code_cell(source, id=f"c{i}")
        cell.metadata["tags"] = list(tags)
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=t) for t in outputs]
        cell.execution_count = i + 1
        nb.cells.append(cell)
    return nb


def _gpu_run():
    nb = _nb(("print(1)", [], ["1\n"]), ("time_it()", ["gpu"], ["0.12 ms on the H100\n"]))
    regen.merge_gpu_cells(nb, None, "NVIDIA H100 80GB HBM3")
    return nb


def test_gpu_run_stamps_its_gpu_cells():
    nb = _gpu_run()
    assert nb.metadata[regen.META] == {"executed_on": "NVIDIA H100 80GB HBM3"}
    assert nb.cells[1].metadata[regen.META]["executed_on"] == "NVIDIA H100 80GB HBM3"
    assert regen.META not in nb.cells[0].metadata


def test_cpu_run_keeps_gpu_outputs():
    committed = _gpu_run()
    fresh = _nb(("print(1)", [], ["1\n"]), ("time_it()", ["gpu"], ["no GPU here\n"]))
    kept = regen.merge_gpu_cells(fresh, committed, regen.CPU_DEVICE)
    assert kept == [1]
    assert fresh.cells[1].outputs[0]["text"] == "0.12 ms on the H100\n"
    assert fresh.metadata[regen.META] == {"executed_on": regen.CPU_DEVICE, "gpu_cells_from": "NVIDIA H100 80GB HBM3"}
    # ... and again on the next CPU run, from the notebook the first one wrote
    again = _nb(("print(1)", [], ["1\n"]), ("time_it()", ["gpu"], ["no GPU here\n"]))
    assert regen.merge_gpu_cells(again, fresh, regen.CPU_DEVICE) == [1]
    assert again.cells[1].outputs[0]["text"] == "0.12 ms on the H100\n"


def test_cpu_run_refuses_a_changed_gpu_cell_unless_forced():
    committed = _gpu_run()
    fresh = _nb(("print(1)", [], ["1\n"]), ("time_it(N=2)", ["gpu"], ["no GPU here\n"]))
    with pytest.raises(regen.NeedsGPU):
        regen.merge_gpu_cells(fresh, committed, regen.CPU_DEVICE)
    assert regen.merge_gpu_cells(fresh, committed, regen.CPU_DEVICE, force=True) == []
    assert fresh.cells[1].outputs[0]["text"] == "no GPU here\n"


def test_cpu_outputs_of_gpu_cells_are_not_kept_as_gpu_outputs():
    cpu_run = _nb(("time_it()", ["gpu"], ["no GPU here\n"]))
    regen.merge_gpu_cells(cpu_run, None, regen.CPU_DEVICE)
    fresh = _nb(("time_it()", ["gpu"], ["no GPU here, again\n"]))
    assert regen.merge_gpu_cells(fresh, cpu_run, regen.CPU_DEVICE) == []


def test_strip_heavy_keeps_a_widgets_text_and_finds_errors():
    nb = _nb(("explore()", [], []), ("1/0", [], []))
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    nb.cells[0].outputs = [nbformat.v4.new_output("display_data", data={
        regen.WIDGET_VIEW: {"model_id": "abc", "version_major": 2, "version_minor": 0},
        "text/plain": "[interactive explorer: ...]"})]
    nb.cells[0].metadata["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00Z"}
    regen.strip_heavy(nb)
    assert "widgets" not in nb.metadata and "execution" not in nb.cells[0].metadata
    assert nb.cells[0].outputs[0]["data"] == {"text/plain": "[interactive explorer: ...]"}
    assert regen.error_outputs(nb) == []
    nb.cells[1].outputs = [nbformat.v4.new_output("error", ename="ZeroDivisionError", evalue="division by zero",
                                                  traceback=[])]
    assert regen.error_outputs(nb) == ["cell 1: ZeroDivisionError: division by zero"]


def test_thumbnail_is_small(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 5), dpi=80)
    ax.imshow(__import__("numpy").random.rand(64, 64))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    nb = _nb(("plot()", ["thumbnail"], []))
    nb.cells[0].outputs = [nbformat.v4.new_output("display_data", data={
        "image/png": base64.b64encode(buf.getvalue()).decode()})]
    thumb = regen.write_thumbnail(Path("99_test.ipynb"), nb, out_dir=tmp_path)
    assert thumb == tmp_path / "99.png" and thumb.stat().st_size < regen.THUMB_MAX_BYTES
    from PIL import Image

    assert Image.open(thumb).width == regen.THUMB_WIDTH


def test_notebook_names():
    assert [p.stem for p in regen.notebook_paths(["03"])] == ["03_flash_attention_in_triton"]
    assert [p.stem for p in regen.notebook_paths(["03b", "04_query_key_dropping.ipynb"])] == [
        "03b_write_the_kernel", "04_query_key_dropping"]
    with pytest.raises(SystemExit):
        regen.notebook_paths(["99"])


def test_package_imports_without_nbclient():
    code = ("import sys; import sparseflash, sparseflash.notebooks; "
            "print('nbclient' in sys.modules, 'nbformat' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["False", "False"]
