"""Launching a compiled Triton kernel with less host work per call.

``kernel[grid](*args, **kwargs)`` runs Triton's ``JITFunction.run`` every time: the binder (which
specialises each argument: its dtype, a pointer's 16-byte alignment, an int's divisibility by 16 or
being 1), then a cache key built from the specialisation and ``str(options)``, a check that the
kernel's global values have not changed, launch metadata for the launch hooks, and the launch. On
a GPU host that Python is most of an eager sparse call's host time at short lengths (six launches
a call with its backward).

:func:`launch` keeps what decides *which* compiled kernel runs and drops the rest:

* the binder runs on every call, so a call is matched to a compiled kernel by exactly the
  specialisation Triton itself would compute (same dtypes, same alignment and divisibility
  facts, same constexprs and launch options): a call can never run a kernel compiled for other
  facts;
* the first call with a new specialisation goes through ``JITFunction.run`` (which compiles,
  checks and launches); its kernel is remembered under that specialisation, and later calls call
  the kernel's launcher directly, with no launch metadata when no launch hook is installed;
* the check that the kernel's global values are unchanged still runs (a changed one sends the
  call to Triton's path, which raises).

The direct call is taken only on Triton versions whose launch path it was written against
(:data:`RUN_OPTIONS`), for plain ``triton.jit`` kernels with no pre-run hooks, and while no
launch hook (a profiler's, say) or pass-pipeline hook is installed; otherwise, and under the
interpreter, it is ``kernel[grid](...)`` exactly. Set :data:`ENABLED` to ``False`` (or ``SPARSEFLASH_FAST_LAUNCH=0``)
to always take Triton's path.
"""
from __future__ import annotations

import os

import triton

#: Triton versions (major.minor) whose ``JITFunction.run`` the direct launch mirrors (the binder's
#: place and return value, the cache key's parts, the launcher's argument order, the hooks' types),
#: with the compilation knobs ``run`` adds to the launch options before it binds.
RUN_OPTIONS = {
    "3.6": ("instrumentation_mode",),
    "3.7": ("instrumentation_mode",),
    "3.8": ("instrumentation_mode",),
    "3.9": ("instrumentation_mode", "fpsan_homomorphic_casts"),
}

ENABLED = os.environ.get("SPARSEFLASH_FAST_LAUNCH", "1") not in ("", "0")

_VERSION = ".".join(triton.__version__.split(".")[:2])
_OPTIONS = RUN_OPTIONS.get(_VERSION)
_KEY_ATTR = "_sparseflash_launchers"
_MISSING = object()

try:  # the pieces of Triton's launch path the direct call reads (absent or different elsewhere)
    from triton import knobs as _knobs
    from triton.knobs import HookChain as _HookChain
    from triton.runtime import jit as _jit
    from triton.runtime.jit import JITFunction as _JITFunction
except ImportError:  # pragma: no cover - other Triton versions
    _OPTIONS = None


def _no_hooks(kernel) -> bool:
    """True when ``kernel`` has no pre-run hook and no launch hook or pass-pipeline hook is
    installed (the launch hooks are ``HookChain`` objects in the checked versions); checked on
    every call, since hooks come and go."""
    runtime = _knobs.runtime
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    return (not kernel.pre_run_hooks and type(enter) is _HookChain and not enter.calls
            and type(leave) is _HookChain and not leave.calls
            and getattr(runtime, "add_stages_inspection_hook", None) is None)


def direct_launch_possible(kernel) -> bool:
    """Whether :func:`launch` may call ``kernel``'s launcher directly (on a GPU, after its first
    call, while no hook is installed)."""
    # The interpreter's kernels are not JITFunctions, so they always take ``kernel[grid]``.
    return (ENABLED and _OPTIONS is not None and isinstance(kernel, _JITFunction)
            and type(kernel).run is _JITFunction.run)


def launch(kernel, grid: tuple, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, with Triton's per-call host work cut to the binder.

    ``grid`` is a tuple of 1 to 3 ints (not a callable). Returns the compiled kernel, as
    ``kernel[grid](...)`` does.
    """
    launchers = kernel.__dict__.get(_KEY_ATTR) if ENABLED else None
    if launchers is None:
        if not direct_launch_possible(kernel):
            return kernel[grid](*args, **kwargs)
        launchers = kernel.__dict__[_KEY_ATTR] = {}
    if not _no_hooks(kernel):
        return kernel[grid](*args, **kwargs)
    active = _jit.driver.active  # read through the module, as JITFunction.run does
    device = active.get_current_device()
    binder = kernel.device_caches[device][4]  # (built on first use, as JITFunction.run builds it)
    # The same options JITFunction.run adds before it binds, so the key below is its key.
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or _knobs.runtime.debug
    compilation = _knobs.compilation
    for name in _OPTIONS:
        kwargs[name] = getattr(compilation, name)
    bound, specialization, options = binder(*args, **kwargs)
    key = (device, tuple(specialization), tuple(options.items()))
    compiled = launchers.get(key)
    if compiled is None:  # first call with these facts: Triton compiles, checks and launches
        compiled = kernel.run(*args, grid=grid, warmup=False, **kwargs)
        if hasattr(compiled, "result"):  # an asynchronous compile's future
            compiled = compiled.result()
        launchers[key] = compiled
        return compiled
    for (name, _), (value, module_globals) in kernel.used_global_vals.items():
        if module_globals.get(name, _MISSING) != value:  # Triton's path raises the error it raises
            return kernel[grid](*args, **kwargs)
    run = compiled.run  # first: it loads the module and sets ``compiled.function``
    n = len(grid)
    run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, active.get_current_stream(device),
        compiled.function, compiled.packed_metadata, None, None, None, *bound.values())
    return compiled
