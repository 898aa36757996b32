"""Benchmark harness: dense and sparse causal attention, ours against PyTorch's kernels.

``python -m sparseflash.bench --help`` for the flags; ``results/README.md`` for what is
measured and the row schema (``sparseflash.bench/1``).  One idea per module, each
importing only the ones above it in this list:

* :mod:`.patterns`: shapes, attention patterns (keep masks, bucket ids) and their
  float64 reference;
* :mod:`.baselines`: naive, SDPA FlashAttention-2 / cuDNN, FlexAttention (block masks);
* :mod:`.variants`: ours and the baselines as named variants, skip rules, tile fractions;
* :mod:`.timing`: ``do_bench`` / wall clock, GPU busy time (``torch.profiler``), peak memory;
* :mod:`.results`: result files (device-named, extended, never destroyed) and ``meta``;
* :mod:`.report`: the summary table;
* :mod:`.run`: one configuration, every variant checked then timed;
* ``__main__``: the flags and the loop (``python -m sparseflash.bench``).

The names below are those the tests and notebooks use.
"""
from .baselines import (_FLEX, _flex_causal, _flex_hash, _flex_hash_window, _flex_qk, _flex_window, _set_flex_state,
                        prebuilt_block_mask)
from .patterns import (DTYPES, Pattern, dense_causal_flops, make_patterns, parse_shape, pattern_stubs,
                       reference_slices, rel_err)
from .report import summary_table
from .results import (ROW_FIELDS, SCHEMA, Refused, add_ratios, config_key, default_out, device_slug, differences,
                      make_meta, merge_rows, open_results, write_results)
from .run import run_config
from .timing import busy_us, kernel_ms, measure, time_mode
from .variants import KINDS, Variant, all_variants, build_fn, selected, skip_reason

__all__ = [
    "DTYPES", "KINDS", "ROW_FIELDS", "SCHEMA", "Pattern", "Refused", "Variant", "add_ratios", "all_variants",
    "build_fn", "busy_us", "config_key", "default_out", "dense_causal_flops", "device_slug", "differences",
    "kernel_ms", "make_meta", "make_patterns", "measure", "merge_rows", "open_results", "parse_shape", "pattern_stubs",
    "prebuilt_block_mask", "reference_slices", "rel_err", "run_config", "selected", "skip_reason",
    "summary_table", "time_mode", "write_results",
]
