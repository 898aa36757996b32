"""Execute the course notebooks in place, keeping their outputs: ``python -m sparseflash.notebooks``.

The committed notebooks in ``notebooks/`` carry their outputs (figures, tables, printed
errors and timings), so that a static view shows the lesson.  This command regenerates
them, one notebook after the other, each in a fresh Jupyter kernel, and writes a notebook
back only if every cell ran without an error::

    python -m sparseflash.notebooks                 # every notebook, on this machine
    python -m sparseflash.notebooks 04 05           # some (by number, name or path)
    python -m sparseflash.notebooks --gpu-only      # the notebooks with GPU sections (needs CUDA)
    python -m sparseflash.notebooks --cpu           # hide the GPU: the CPU path everywhere
    python -m sparseflash.notebooks --check         # run top to bottom, write nothing
    python -m sparseflash.notebooks --thumbnails-only   # figures/course/*.png from the saved outputs

**GPU sections.**  A code cell tagged ``gpu`` has outputs that are only real on a GPU
(timings, benchmark runs); a notebook with such a cell has GPU sections (03, 06, 08).  Run on
a CUDA machine, every cell executes there, and each ``gpu`` cell is stamped with the device
in its metadata (``sparseflash.executed_on``, and a hash of its source).  Run without CUDA
(or with ``--cpu``), the notebook is executed on the CPU and then **every** ``gpu`` cell whose
committed outputs came from a GPU gets those outputs back, provided its source is unchanged;
if its source changed, the notebook is left as it is (it needs a GPU run), unless ``--force``
replaces them with the CPU outputs.  The other cells are CPU sections: their outputs do not
depend on the device, and a CPU run refreshes them.  Notebook metadata
``sparseflash.executed_on`` says where the notebook last ran, and
``sparseflash.gpu_cells_from`` where its kept GPU outputs come from.

**Small outputs.**  The notebooks draw at ``figure.dpi = 80`` (PNG); this command drops
widget state and widget views (an explorer's ``text/plain`` note stays), and execution
timestamps, so the files stay light and their diffs readable.  It warns above
:data:`MAX_NOTEBOOK_BYTES`.

**Thumbnails.**  The first PNG output of the cell tagged ``thumbnail`` in each notebook
becomes ``figures/course/<number>.png`` (at most :data:`THUMB_WIDTH` pixels wide), the
pictures of the README's course section.

nbclient and nbformat are imported inside the functions: ``import sparseflash`` never needs them.
"""
from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import io
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
THUMB_DIR = ROOT / "figures" / "course"
GPU_TAG = "gpu"
THUMB_TAG = "thumbnail"
META = "sparseflash"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
CPU_DEVICE = "cpu (Triton interpreter)"
MAX_NOTEBOOK_BYTES = 1_500_000
THUMB_WIDTH = 360
THUMB_MAX_BYTES = 60_000


# --------------------------------------------------------------------------------------
# Which notebooks
# --------------------------------------------------------------------------------------


def notebook_paths(names=(), notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """The course notebooks, sorted; ``names`` picks some: a number (``04``, ``03b``), a name
    (``04_query_key_dropping`` or with ``.ipynb``) or a path."""
    every = sorted(p for p in Path(notebook_dir).glob("*.ipynb"))
    if not names:
        return every
    picked = []
    for name in names:
        path = Path(name)
        if path.suffix == ".ipynb" and path.exists():
            found = [path.resolve()]
        else:
            stem = path.name.removesuffix(".ipynb")
            found = [p for p in every if p.stem == stem or p.stem.split("_")[0] == stem]
        if not found:
            raise SystemExit(f"no notebook matches {name!r} in {notebook_dir} "
                             f"(have: {', '.join(p.stem.split('_')[0] for p in every)})")
        picked += [p for p in found if p not in picked]
    return picked


def is_gpu_cell(cell) -> bool:
    return cell.get("cell_type") == "code" and GPU_TAG in cell.get("metadata", {}).get("tags", [])


def has_gpu_sections(nb) -> bool:
    """True if some code cell is tagged ``gpu`` (its outputs are only real on a GPU)."""
    return any(is_gpu_cell(c) for c in nb["cells"])


def source_hash(cell) -> str:
    src = cell.get("source", "")
    src = "".join(src) if isinstance(src, list) else src
    return hashlib.sha1(src.encode()).hexdigest()[:12]


def current_device(force_cpu: bool = False) -> str:
    """Where a kernel started now would run: the CUDA device's name, or :data:`CPU_DEVICE`."""
    if force_cpu:
        return CPU_DEVICE
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:  # pragma: no cover - no torch, or a broken driver
        pass
    return CPU_DEVICE


def is_gpu_device(name: str | None) -> bool:
    return bool(name) and name != CPU_DEVICE and not name.startswith("cpu")


# --------------------------------------------------------------------------------------
# Outputs: keep GPU cells, drop what makes files heavy
# --------------------------------------------------------------------------------------


class NeedsGPU(Exception):
    """A CPU run would overwrite GPU outputs of a cell whose source changed since."""


def merge_gpu_cells(new_nb, old_nb, device: str, force: bool = False) -> list[int]:
    """Finish a freshly executed ``new_nb`` (in place) against the committed ``old_nb``.

    On a GPU (``device`` names one), stamp every ``gpu`` cell with the device and its source
    hash.  On the CPU, give every ``gpu`` cell whose committed outputs came from a GPU those
    outputs back (matched by cell id, or by position among the ``gpu`` cells); raise
    :class:`NeedsGPU` if such a cell's source changed since, unless ``force``.  Returns the
    indices of the cells whose GPU outputs were kept.
    """
    kept = []
    if is_gpu_device(device):
        for cell in new_nb["cells"]:
            if is_gpu_cell(cell):
                cell.setdefault("metadata", {})[META] = {"executed_on": device, "source_sha1": source_hash(cell)}
        new_nb["metadata"][META] = {"executed_on": device}
        return kept
    old_gpu = [c for c in (old_nb or {"cells": []})["cells"]
               if is_gpu_cell(c) and is_gpu_device(c.get("metadata", {}).get(META, {}).get("executed_on"))]
    by_id = {c.get("id"): c for c in old_gpu if c.get("id")}
    new_gpu = [i for i, c in enumerate(new_nb["cells"]) if is_gpu_cell(c)]
    stale, source_of = [], None
    for rank, i in enumerate(new_gpu):
        cell = new_nb["cells"][i]
        old = by_id.get(cell.get("id")) or (old_gpu[rank] if len(old_gpu) == len(new_gpu) else None)
        if old is None:
            continue
        stamp = old["metadata"][META]
        if stamp.get("source_sha1") != source_hash(cell):
            stale.append(i)
            continue
        cell["outputs"] = copy.deepcopy(old.get("outputs", []))
        cell["execution_count"] = old.get("execution_count")
        cell.setdefault("metadata", {})[META] = dict(stamp)
        source_of = stamp["executed_on"]
        kept.append(i)
    if stale and not force:
        raise NeedsGPU(f"cells {stale} have outputs from {old_gpu[0]['metadata'][META]['executed_on']} but their "
                       "source changed: run this notebook on a GPU (or pass --force to keep CPU outputs)")
    meta = {"executed_on": device}
    if source_of:
        meta["gpu_cells_from"] = source_of
    new_nb["metadata"][META] = meta
    return kept


def strip_heavy(nb) -> None:
    """Drop widget state and views (keeping their text), execution timestamps and empty ids' noise."""
    nb["metadata"].pop("widgets", None)
    for cell in nb["cells"]:
        cell.get("metadata", {}).pop("execution", None)
        if cell.get("cell_type") != "code":
            continue
        outputs = []
        for out in cell.get("outputs", []):
            data = out.get("data")
            if data and WIDGET_VIEW in data:
                data.pop(WIDGET_VIEW)
                if not data:
                    continue
            outputs.append(out)
        cell["outputs"] = outputs


def error_outputs(nb) -> list[str]:
    """Descriptions of the error outputs of a notebook (none in a committed one)."""
    found = []
    for i, cell in enumerate(nb["cells"]):
        for out in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            if out.get("output_type") == "error" or "ename" in out or "traceback" in out:
                found.append(f"cell {i}: {out.get('ename')}: {out.get('evalue')}")
            elif out.get("output_type") == "stream" and "Traceback (most recent call last)" in "".join(out.get("text", "")):
                found.append(f"cell {i}: a traceback printed to {out.get('name')}")
    return found


# --------------------------------------------------------------------------------------
# Thumbnails
# --------------------------------------------------------------------------------------


def thumbnail_png(nb) -> bytes | None:
    """The first PNG output of the cell tagged ``thumbnail`` (None if there is none)."""
    for cell in nb["cells"]:
        if THUMB_TAG in cell.get("metadata", {}).get("tags", []):
            for out in cell.get("outputs", []):
                png = out.get("data", {}).get("image/png")
                if png:
                    return base64.b64decode("".join(png) if isinstance(png, list) else png)
    return None


def write_thumbnail(path: Path, nb, out_dir: Path = THUMB_DIR, width: int = THUMB_WIDTH) -> Path | None:
    """``out_dir/<number>.png``: the notebook's key figure, at most ``width`` pixels wide."""
    from PIL import Image

    png = thumbnail_png(nb)
    if png is None:
        return None
    with Image.open(io.BytesIO(png)) as img:
        img = img.convert("RGB")
        if img.width > width:
            img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
        img = img.quantize(128, method=Image.Quantize.MEDIANCUT)
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / f"{path.stem.split('_')[0]}.png"
        img.save(target, format="PNG", optimize=True)
    return target


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------


def execute(path: Path, *, timeout: int = 600, force_cpu: bool = False):
    """Execute a notebook in a fresh kernel (its folder as the working directory, this
    checkout first on the path); returns the executed notebook.  Raises nbclient's
    ``CellExecutionError`` on the first failing cell."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    if force_cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = NotebookClient(nb, kernel_name="python3", timeout=timeout, startup_timeout=120,
                                record_timing=False, store_widget_state=False,
                                resources={"metadata": {"path": str(path.parent)}})
        client.execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def regenerate(path: Path, *, device: str, timeout: int = 600, force: bool = False, check: bool = False,
               force_cpu: bool = False, thumbnails: bool = True) -> tuple[bool, str]:
    """Execute one notebook and write it back (unless ``check``); returns (ok, one line of report)."""
    import nbformat

    old = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    try:
        nb = execute(path, timeout=timeout, force_cpu=force_cpu)
    except Exception as exc:  # CellExecutionError, a timeout, a dead kernel
        lines = str(exc).strip().splitlines()
        return False, f"FAILED after {time.perf_counter() - t0:.0f} s, not written: " + " | ".join(lines[-3:])[:600]
    seconds = time.perf_counter() - t0
    try:
        kept = merge_gpu_cells(nb, old, device, force)
    except NeedsGPU as exc:
        return False, f"not written: {exc}"
    strip_heavy(nb)
    errors = error_outputs(nb)
    if errors:
        return False, "not written, error outputs: " + "; ".join(errors)
    text = nbformat.writes(nb) + "\n"
    size = len(text.encode())
    report = f"ran in {seconds:.0f} s on {device}, {size / 1e3:.0f} kB"
    if kept:
        report += f", kept the GPU outputs of cells {kept} ({nb['metadata'][META]['gpu_cells_from']})"
    elif has_gpu_sections(nb) and not is_gpu_device(device):
        report += ", its gpu cells hold CPU outputs (run it on a GPU for theirs)"
    if size > MAX_NOTEBOOK_BYTES:
        report += f"  WARNING: above {MAX_NOTEBOOK_BYTES / 1e6:.1f} MB"
    if check:
        return True, report + " (--check: not written)"
    path.write_text(text)
    if thumbnails:
        thumb = write_thumbnail(path, nb)
        if thumb is not None:
            report += f", thumbnail {thumb.relative_to(ROOT)} ({thumb.stat().st_size / 1e3:.0f} kB)"
    return True, report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparseflash.notebooks",
                                     description="Execute the course notebooks in place, keeping their outputs.")
    parser.add_argument("names", nargs="*", help="notebooks to run: number (04, 03b), name or path (default: all)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--gpu-only", action="store_true",
                       help="only the notebooks with GPU sections (cells tagged 'gpu'); needs CUDA")
    where.add_argument("--cpu", action="store_true", help="hide the GPU from the kernels (CUDA_VISIBLE_DEVICES='')")
    parser.add_argument("--check", action="store_true", help="execute top to bottom but write nothing")
    parser.add_argument("--force", action="store_true",
                        help="on the CPU, replace GPU outputs of gpu cells whose source changed")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    parser.add_argument("--no-thumbnails", action="store_true", help="do not write figures/course/*.png")
    parser.add_argument("--thumbnails-only", action="store_true",
                        help="only write figures/course/*.png from the saved outputs (executes nothing)")
    parser.add_argument("--list", action="store_true", help="list the notebooks, their GPU sections and provenance")
    args = parser.parse_args(argv)

    import nbformat

    paths = notebook_paths(args.names)
    if args.list or args.thumbnails_only:
        for path in paths:
            nb = nbformat.read(path, as_version=4)
            meta = nb["metadata"].get(META, {})
            line = (f"{path.name:40s} gpu sections: {'yes' if has_gpu_sections(nb) else 'no ':3s}  "
                    f"executed on: {meta.get('executed_on', '-')}"
                    + (f", gpu cells from {meta['gpu_cells_from']}" if meta.get("gpu_cells_from") else ""))
            if args.thumbnails_only:
                thumb = write_thumbnail(path, nb)
                line = f"{path.name:40s} " + (f"-> {thumb.relative_to(ROOT)}" if thumb else "no thumbnail cell output")
            print(line, flush=True)
        return 0

    device = current_device(force_cpu=args.cpu)
    if args.gpu_only:
        if not is_gpu_device(device):
            print("--gpu-only needs a CUDA device; none is visible here.", file=sys.stderr)
            return 2
        paths = [p for p in paths if has_gpu_sections(nbformat.read(p, as_version=4))]
    print(f"{len(paths)} notebook(s) on {device}" + (" (check only)" if args.check else ""), flush=True)
    failed = 0
    for n, path in enumerate(paths, 1):
        print(f"[{n}/{len(paths)}] {path.name}: running", flush=True)
        ok, report = regenerate(path, device=device, timeout=args.timeout, force=args.force, check=args.check,
                                force_cpu=args.cpu, thumbnails=not args.no_thumbnails)
        failed += not ok
        print(f"[{n}/{len(paths)}] {path.name}: {report}", flush=True)
    if failed:
        print(f"{failed} notebook(s) not written (see above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
