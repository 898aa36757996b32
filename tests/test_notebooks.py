"""Every notebook in notebooks/ runs top to bottom without an error.

Notebooks with exercises (cells tagged ``exercise``, whose answers the learner fills in)
are also run with the solutions of ``notebooks/solutions/ex<NN>.py`` swapped in after each
such cell: then every checker must print ✓.
"""
from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
SOLUTIONS = NOTEBOOK_DIR / "solutions"


def _execute(nb, monkeypatch):
    # The kernel inherits this environment: no display, and this checkout's
    # sparseflash first on the path even if another copy is installed.
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=600,
        startup_timeout=120,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()  # raises CellExecutionError, with the traceback, if a cell fails
    return nb


def _printed(nb) -> str:
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", []) if out.get("output_type") == "stream")


def _has_exercises(nb) -> bool:
    return any("exercise" in cell.get("metadata", {}).get("tags", []) for cell in nb.cells)


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, monkeypatch):
    nb = _execute(nbformat.read(path, as_version=4), monkeypatch)
    if _has_exercises(nb):
        # Unfilled exercise cells: every checker says "not attempted yet", none fails.
        printed = _printed(nb)
        assert "✗" not in printed, printed
        assert "not attempted yet" in printed


EXERCISE_NOTEBOOKS = [p for p in NOTEBOOKS if _has_exercises(nbformat.read(p, as_version=4))]


def _solution_module(path: Path) -> str:
    return "ex" + path.stem.split("_")[0]


def test_exercise_notebooks_have_solutions():
    assert EXERCISE_NOTEBOOKS
    for path in EXERCISE_NOTEBOOKS:
        assert (SOLUTIONS / f"{_solution_module(path)}.py").exists(), path.name
        assert f"{_solution_module(path)}.py" in (SOLUTIONS / "README.md").read_text(), path.name


@pytest.mark.parametrize("path", EXERCISE_NOTEBOOKS, ids=[p.stem for p in EXERCISE_NOTEBOOKS])
def test_notebook_with_solutions(path: Path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    swap_in = nbformat.v4.new_code_cell(
        f"import sys\nsys.path.insert(0, {str(NOTEBOOK_DIR)!r})\nfrom solutions.{_solution_module(path)} import *")
    cells = []
    for cell in nb.cells:
        cells.append(cell)
        if "exercise" in cell.get("metadata", {}).get("tags", []):
            cells.append(nbformat.from_dict(dict(swap_in, id=f"solution-{len(cells)}")))
    nb.cells = cells
    printed = _printed(_execute(nb, monkeypatch))
    n_checks = sum(cell.source.count("exercises.check_") for cell in nb.cells if cell.cell_type == "code")
    assert "✗" not in printed and "not attempted" not in printed, printed
    assert printed.count("✓") >= n_checks, printed
