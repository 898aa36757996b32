"""Every notebook in notebooks/ runs top to bottom without an error.

Notebooks with exercises (cells tagged ``exercise``, whose answers the learner fills in)
are also run with the solutions of ``notebooks/solutions/ex<NN>.py`` swapped in after each
such cell: then every checker must print ✓.

The two runs of an exercise notebook share everything before its first exercise cell (in
07 and 08 that is the training runs and the kernels, nearly all of the time), so one kernel
runs that prefix once, then the rest as the learner gets it (unfilled), then the rest again
with the solutions swapped in, from the prefix's random number generator states: each
variant is checked on its own printed output (prefix + its rest), as two separate runs
would print it.
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


EXERCISE_NOTEBOOKS = [p for p in NOTEBOOKS if _has_exercises(nbformat.read(p, as_version=4))]
PLAIN_NOTEBOOKS = [p for p in NOTEBOOKS if p not in EXERCISE_NOTEBOOKS]


@pytest.mark.parametrize("path", PLAIN_NOTEBOOKS, ids=[p.stem for p in PLAIN_NOTEBOOKS])
def test_notebook_runs(path: Path, monkeypatch):
    _execute(nbformat.read(path, as_version=4), monkeypatch)


def _solution_module(path: Path) -> str:
    return "ex" + path.stem.split("_")[0]


def test_exercise_notebooks_have_solutions():
    assert EXERCISE_NOTEBOOKS
    for path in EXERCISE_NOTEBOOKS:
        assert (SOLUTIONS / f"{_solution_module(path)}.py").exists(), path.name
        assert f"{_solution_module(path)}.py" in (SOLUTIONS / "README.md").read_text(), path.name


# Cells of the shared run that are no part of either notebook: the random number generators
# (Python's, NumPy's, torch's CPU and CUDA ones) as the prefix left them, put back before the
# solutions' rest, which then draws what a fresh run with the solutions draws.
_SAVE_RNG = """\
import random as _nbtest_random
import numpy as _nbtest_np
import torch as _nbtest_torch
_nbtest_rng = (_nbtest_random.getstate(), _nbtest_np.random.get_state(), _nbtest_torch.get_rng_state(),
               _nbtest_torch.cuda.get_rng_state_all() if _nbtest_torch.cuda.is_available() else None)"""
_RESTORE_RNG = """\
_nbtest_random.setstate(_nbtest_rng[0])
_nbtest_np.random.set_state(_nbtest_rng[1])
_nbtest_torch.set_rng_state(_nbtest_rng[2])
if _nbtest_rng[3] is not None:
    _nbtest_torch.cuda.set_rng_state_all(_nbtest_rng[3])"""


@pytest.mark.parametrize("path", EXERCISE_NOTEBOOKS, ids=[p.stem for p in EXERCISE_NOTEBOOKS])
def test_notebook_with_and_without_solutions(path: Path, monkeypatch):
    """The notebook as the learner gets it runs, every checker saying "not attempted yet" and
    none failing; with the solutions swapped in after each exercise cell, every checker prints ✓."""
    nb = nbformat.read(path, as_version=4)
    first = next(i for i, cell in enumerate(nb.cells) if "exercise" in cell.get("metadata", {}).get("tags", []))
    prefix, rest = nb.cells[:first], nb.cells[first:]
    swap_in = nbformat.v4.new_code_cell(
        f"import sys\nsys.path.insert(0, {str(NOTEBOOK_DIR)!r})\nfrom solutions.{_solution_module(path)} import *")
    solved = []
    for i, cell in enumerate(rest):
        solved.append(nbformat.from_dict(dict(cell, id=f"solved-{i}")))
        if "exercise" in cell.get("metadata", {}).get("tags", []):
            solved.append(nbformat.from_dict(dict(swap_in, id=f"solution-{i}")))
    save, restore = (nbformat.v4.new_code_cell(src) for src in (_SAVE_RNG, _RESTORE_RNG))
    save.id, restore.id = "nbtest-save-rng", "nbtest-restore-rng"
    nb.cells = [*prefix, save, *rest, restore, *solved]
    _execute(nb, monkeypatch)  # raises CellExecutionError, with the traceback, if a cell fails
    cells = nb.cells
    n_prefix, n_rest = len(prefix), len(rest)
    unfilled = cells[:n_prefix] + cells[n_prefix + 1:n_prefix + 1 + n_rest]
    with_solutions = cells[:n_prefix] + cells[n_prefix + 2 + n_rest:]

    # Unfilled exercise cells: every checker says "not attempted yet", none fails.
    printed = _printed(nbformat.v4.new_notebook(cells=unfilled))
    assert "✗" not in printed, printed
    assert "not attempted yet" in printed

    printed = _printed(nbformat.v4.new_notebook(cells=with_solutions))
    n_checks = sum(cell.source.count("exercises.check_") for cell in with_solutions if cell.cell_type == "code")
    assert "✗" not in printed and "not attempted" not in printed, printed
    assert printed.count("✓") >= n_checks, printed
