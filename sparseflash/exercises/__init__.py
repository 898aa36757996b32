"""Checkers for the exercises of the course notebooks (01, 02, 03, 03b and 08).

Each ``check_*`` function takes the learner's answer (a function, a Triton
``@triton.jit`` piece, or a dict of answers), runs it on fresh random inputs against
:mod:`sparseflash.reference` (float64) or the tile schedules of :mod:`sparseflash.tiles`,
and prints one verdict:

* ``✓ <exercise>: passed (<what was checked, the max error>)``,
* ``✗ <exercise>: <which input, expected vs got>`` and a ``hint:`` line,
* ``· <exercise>: not attempted yet`` while the answer still raises ``NotImplementedError``
  (or is still ``None``).

They return ``True`` or ``False`` and never raise on a wrong answer; they raise
``TypeError`` only on misuse (e.g. passing a number where a function is expected).
Every checker takes ``seed=`` to replay the random inputs a failure was found with.

Notebooks use them as ``from sparseflash import exercises; exercises.check_merge(merge)``:
every name is here.  They live in one module per notebook:

* :mod:`.nb01_naive`: notebook 01, naive attention (masks, peak memory, softmax, bfloat16).
* :mod:`.nb02_online_softmax`: notebook 02, online softmax and tiling.
* :mod:`.nb03_flash`: notebook 03, FlashAttention in Triton.
* :mod:`.nb03b_skeleton` and :mod:`.nb03b_write_kernel`: notebook 03b, write the kernel: a
  FlashAttention skeleton (:func:`forward_skeleton`, :func:`backward_skeleton`) that takes
  the learner's ``@triton.jit`` pieces as compile-time arguments, so each piece runs inside a
  real kernel, on CPU tensors through Triton's interpreter or on a GPU; and the checkers of
  the pieces and of the assembled kernels.
* :mod:`.nb08_own_pattern`: notebook 08, your own pattern.
* :mod:`._common`: what they share (verdicts, calls into the answer, comparisons, tolerances).

Notebooks 04, 05 and 06 have no checked exercises.  Notebook 07's checkers are in
:mod:`sparseflash.train.exercises`, next to the training code they use.

Solutions, for teachers: ``notebooks/solutions/`` (one module per notebook).
"""
from ._common import device
from .nb01_naive import _naive_attention  # noqa: F401  (notebook 01's naive attention, for the tests)
from .nb01_naive import (check_bf16_error, check_float16_exp_overflow, check_peak_memory,
                         check_sliding_window_mask, check_stable_softmax, check_window_pairs, peak_memory)
from .nb02_online_softmax import (check_fp16_online_stats, check_hash_setting, check_merge, check_needs_mask,
                                  check_tiled_macs, check_window_tiles)
from .nb03_flash import (check_empty_row, check_kernel_bf16_error, check_scores_computed, check_tile_products,
                         check_window_attention)
from .nb03b_skeleton import (backward_skeleton, build_attention, forward_skeleton, given_query_tile_start,
                             run_backward, run_forward, show)
from .nb03b_write_kernel import (check_backward, check_backward_step, check_finish_row, check_forward,
                                 check_key_tile_range, check_load_tile, check_query_tile_start,
                                 check_softmax_step, plot_key_tile_range, plot_tile_record)
from .nb08_own_pattern import check_top2_key_slots

__all__ = [
    # notebook 01
    "check_sliding_window_mask", "check_window_pairs", "check_peak_memory", "peak_memory",
    "check_stable_softmax", "check_float16_exp_overflow", "check_bf16_error",
    # notebook 02
    "check_merge", "check_fp16_online_stats", "check_tiled_macs", "check_needs_mask", "check_window_tiles",
    "check_hash_setting",
    # notebook 03
    "check_scores_computed", "check_window_attention", "check_empty_row", "check_kernel_bf16_error",
    "check_tile_products",
    # notebook 03b
    "check_load_tile", "check_key_tile_range", "check_softmax_step", "check_finish_row", "check_forward",
    "check_backward_step", "check_query_tile_start", "check_backward",
    "forward_skeleton", "backward_skeleton", "given_query_tile_start", "run_forward", "run_backward",
    "build_attention", "plot_key_tile_range", "plot_tile_record", "show", "device",
    # notebook 08
    "check_top2_key_slots",
]
