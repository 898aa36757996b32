"""How one variant is timed: ``do_bench`` on CUDA, wall clock on CPU; GPU busy time; peak memory.

Timing: one untimed call (the correctness check), one more untimed call of exactly
the timed step, then ``triton.testing.do_bench(fn, warmup, rep, grad_to_none=[q, k, v],
return_mode="median")`` on CUDA.  On CPU (smoke tests only) the median of
``time.perf_counter`` wall-clock times: ``timer`` is ``interpreter-wallclock`` for
our kernels (they then run in Triton's interpreter) and ``cpu-wallclock`` for plain
PyTorch code; neither says anything about GPU speed.

Small problems are host-bound: the GPU idles between launches and ``ms`` measures
Python and launch overhead.  ``--kernel-time`` also records ``kernel_ms``, the GPU
busy time of one call from ``torch.profiler`` (:func:`kernel_ms`), and ``--graph-time``
records ``graph_ms``, the call captured in a CUDA graph and timed by its replays: the GPU's
time with the gaps between kernels, as a model compiled with ``mode="reduce-overhead"`` pays.

Memory: on CUDA every row records ``peak_mem_gb``, ``torch.cuda.max_memory_allocated``
over one call after ``reset_peak_memory_stats`` (inputs, outputs and gradients
included; do_bench's L2-flush buffer not).
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Callable

import torch

GPU_TIMER = "triton.do_bench"
GRAPH_TIMER = "triton.do_bench, cuda-graph replay"
CPU_TIMER = "cpu-wallclock"
INTERPRETER_TIMER = "interpreter-wallclock"  # (sparseflash.figures leaves rows of the two CPU timers out)


def open_device(name: str) -> torch.device | None:
    """The ``--device`` of a benchmark CLI, made current if it is a CUDA device with an index;
    None (after saying why on stderr) if CUDA was asked for and there is none."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return None
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device.index)
    return device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clear_grads(ts):
    for t in ts or ():
        t.grad = None


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001
            pass
        torch.cuda.empty_cache()


def cuda_graph_of(step: Callable, device: torch.device) -> "torch.cuda.CUDAGraph":
    """``step`` captured in a CUDA graph (after two warm-up calls on a side stream, as
    PyTorch's capture requires); ``graph.replay()`` then re-runs its kernels with one launch."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.cuda.synchronize(device)
    return graph


def measure(step: Callable, device: torch.device, warmup: float, rep: float, grads,
            interpreted: bool = False, graph: bool = False) -> tuple[float, str]:
    """Median ms of ``step`` and the timer's name: triton's do_bench on CUDA, wall clock on CPU.

    ``graph=True`` (CUDA): ``step`` is captured once in a CUDA graph and its replays are timed,
    so the time is the GPU's, without the host's launch and Python time (what a generation loop
    that replays a captured step pays); the L2 cache is flushed before each replay as before
    each eager call."""
    if device.type == "cuda":
        import triton.testing

        fn = cuda_graph_of(step, device).replay if graph else step
        ms = triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grads, return_mode="median")
        return float(ms), GRAPH_TIMER if graph else GPU_TIMER
    # CPU: for smoke tests only.  Warm up for `warmup` ms, then time at least 3 and at
    # most 50 calls or until `rep` ms have passed.
    t_end = time.perf_counter() + warmup / 1e3
    while time.perf_counter() < t_end:
        _clear_grads(grads)
        step()
    times = []
    t_end = time.perf_counter() + rep / 1e3
    while len(times) < 3 or (len(times) < 50 and time.perf_counter() < t_end):
        _clear_grads(grads)
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), (INTERPRETER_TIMER if interpreted else CPU_TIMER)


def busy_us(intervals) -> float:
    """Length of the union of ``(start, end)`` intervals (µs): time the device had work.

    On one stream kernels do not overlap and this is their summed duration; the
    union also stays right if a kernel is reported twice or streams overlap.
    """
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def device_intervals(events) -> list[tuple[float, float]]:
    """``(start_us, end_us)`` of the device-side work (kernels, memsets, copies) of a profile.

    Left out: host events, and the device-timeline *annotations* (``gpu_user_annotation``:
    the span of a ``record_function`` scope, e.g. Inductor's "Call CompiledFxGraph" around
    FlexAttention's kernels), which cover their kernels and the idle gaps between them.
    """
    from torch.autograd import DeviceType

    out = []
    for evt in events:
        if getattr(evt, "device_type", None) != DeviceType.CUDA or getattr(evt, "is_user_annotation", False):
            continue
        if "annotation" in str(getattr(evt, "activity_type", None) or "").lower():
            continue
        tr = evt.time_range
        out.append((float(tr.start), float(tr.end)))
    return out


def kernel_ms(step: Callable, device: torch.device, grads, reps: int = 3) -> float | None:
    """GPU busy time of one ``step``, in ms: the union of its device kernels' (and memsets' /
    copies') intervals from ``torch.profiler``, averaged over ``reps`` calls.

    ``ms`` from do_bench is the wall time between two events on the GPU's stream: when the
    host cannot launch work as fast as the GPU runs it (small problems, many small
    kernels, Python overhead, host synchronisations) the GPU idles in between and ``ms``
    measures the host.  ``kernel_ms`` does not count those gaps, so ``ms / kernel_ms``
    (``host_bound_ratio``) well above 1 means launch-bound.  Triton kernels (ours) are
    seen by the profiler like any other CUDA kernel.  None on CPU or when the profile
    holds no device event.
    """
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            _clear_grads(grads)
            step()
        torch.cuda.synchronize(device)
    intervals = device_intervals(prof.events())
    return busy_us(intervals) / reps / 1e3 if intervals else None


def time_mode(fn, mode: str, q, k, v, grad, device, args, interpreted: bool = False, log=None) -> dict:
    """Time one variant in one mode: ``{"ms", "timer", "kernel_ms", "graph_ms", "peak_mem_gb"}``.

    ``kernel_ms`` only with ``--kernel-time``; ``graph_ms`` only with ``--graph-time`` on CUDA (the
    step captured in a CUDA graph, gradients cleared before it as before each eager call, and its
    replays timed); ``peak_mem_gb`` only on CUDA;
    ``interpreted``: ``fn`` runs Triton kernels in the interpreter (CPU timer label).
    """
    qkv = [q, k, v]
    _clear_grads(qkv)
    out = None
    if mode == "fwd":
        qd, kd, vd = q.detach(), k.detach(), v.detach()  # (FlexAttention on CPU rejects requires_grad)
        step, grads = (lambda: fn(qd, kd, vd)), None
        ctx = torch.no_grad
    elif mode == "fwd+bwd":
        def step():
            fn(q, k, v).backward(grad)
        grads, ctx = qkv, torch.enable_grad
    else:  # bwd: one retained forward graph, backward only
        with torch.enable_grad():
            out = fn(q, k, v)
        step, grads, ctx = (lambda: out.backward(grad, retain_graph=True)), qkv, torch.enable_grad
    res = {"ms": None, "timer": None, "kernel_ms": None, "graph_ms": None, "peak_mem_gb": None}
    try:
        with ctx():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            step()  # untimed warm-up of exactly this call; also the call whose memory is recorded
            _sync(device)
            if device.type == "cuda":
                res["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            _clear_grads(grads)
            res["ms"], res["timer"] = measure(step, device, args.warmup, args.rep, grads, interpreted)
            if args.kernel_time:
                try:
                    res["kernel_ms"] = kernel_ms(step, device, grads)
                except Exception as e:  # noqa: BLE001  (a profiler problem must not cost the row)
                    if log is not None:
                        log(f"kernel_ms: profiler failed: {type(e).__name__}: {e}")
            if getattr(args, "graph_time", False) and device.type == "cuda":
                def fresh_step():  # the captured call assigns its gradients, as an eager call after do_bench's reset
                    _clear_grads(grads)
                    step()
                try:
                    res["graph_ms"], _ = measure(fresh_step, device, args.warmup, args.rep, grads, graph=True)
                except Exception as e:  # noqa: BLE001  (a call that cannot be captured keeps its eager row)
                    if log is not None:
                        log(f"graph_ms: capture or replay failed: {type(e).__name__}: {e}")
                    _sync(device)
        return res
    finally:
        del out
        _clear_grads(qkv)
