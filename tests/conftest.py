"""Shared test set-up.

* ``SPARSEFLASH_POISON=1`` is set here, at import time, before any test imports
  sparseflash: kernel outputs are then NaN-filled before each kernel runs, so an
  element a kernel forgets to write shows up as NaN.  Notebook kernels started by
  the tests inherit it.
* ``MPLBACKEND=Agg``: no display is needed anywhere.
* Tests marked ``@pytest.mark.gpu`` are skipped when no CUDA device is present.
* The ``seed`` fixture seeds torch with a fresh random seed per test and prints it;
  set ``SPARSEFLASH_SEED=<n>`` to replay a failing run.
* Process-wide float32 precision flags (TF32, which the trainer turns on) are put back
  after every test, so no test's tolerance depends on which tests ran before it.
* ``sparseflash`` is imported before any test module, so Triton's interpreter is on (without a
  GPU) before any module imports triton.
"""
from __future__ import annotations

import os
import secrets

os.environ["SPARSEFLASH_POISON"] = "1"
os.environ["MPLBACKEND"] = "Agg"

# Under pytest-xdist (``-n N``) the workers share the machine's cores: each worker, and the
# processes it starts (notebook kernels, the benchmark and figure CLIs, torchrun), gets its
# share of the cores as its thread count instead of every one of them each (oversubscribed
# OpenMP/BLAS pools spin against each other).  Set here, before torch or numpy is imported
# in the worker; an explicit OMP_NUM_THREADS / MKL_NUM_THREADS / OPENBLAS_NUM_THREADS wins.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_name, _threads)

import pytest  # noqa: E402

# sparseflash decides whether Triton's interpreter is on (no GPU: TRITON_INTERPRET=1) when it is
# first imported, and Triton must not have defined any kernel before that: imported here, ahead
# of every test module, so no test's outcome depends on which module imported triton first.
import sparseflash._runtime  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture
def seed(request) -> int:
    """A fresh random seed for torch, printed so that a failure can be replayed."""
    import torch

    fixed = os.environ.get("SPARSEFLASH_SEED")
    value = int(fixed) if fixed else secrets.randbelow(2**31)
    torch.manual_seed(value)
    print(f"seed: {value} (replay with SPARSEFLASH_SEED={value})")
    request.node.user_properties.append(("seed", value))
    return value


@pytest.fixture(autouse=True)
def _restore_precision_flags():
    """Put TF32 and the float32 matmul precision back as they were before the test."""
    import torch

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    yield
    torch.set_float32_matmul_precision(saved[2])  # first: it sets matmul.allow_tf32 too
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
