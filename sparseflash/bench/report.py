"""The table printed at the end of a run: speed-up of every variant by sequence length."""
from __future__ import annotations

from .results import MODES


def summary_table(rows: list[dict]) -> str:
    """Per (B, H, D, dtype, mode): speedup vs sdpa_flash (or ours_dense when absent) by N, and tile efficiency.

    Cells: ``1.23x``, ``skip`` (skipped), ``ERR`` (error), ``-`` (not run), ``?`` (no baseline).
    Rows timed without a GPU are marked: their ratios say nothing about GPU speed.
    """
    lines = []

    def group(r):
        return r.get("B"), r.get("H"), r.get("D"), r.get("dtype"), r.get("mode")

    keys = sorted({group(r) for r in rows}, key=lambda t: (t[0] or 0, t[1] or 0, t[2] or 0, str(t[3]),
                                                           MODES.index(t[4]) if t[4] in MODES else len(MODES)))
    for B, H, D, dt, mode in keys:
        sub = [r for r in rows if group(r) == (B, H, D, dt, mode)]
        ns = sorted({r["seq_len"] for r in sub})
        names = list(dict.fromkeys(r["variant"] for r in sub))
        width = max([22] + [len(str(n)) + 1 for n in names])
        ok_names = [n for n in names if any(r["variant"] == n and r.get("status") == "ok" for r in sub)]
        base = next((b for b in ("sdpa_flash", "ours_dense", "flex_dense") if b in ok_names),
                    ok_names[0] if ok_names else "sdpa_flash")
        timers = sorted({r.get("timer") for r in sub if r.get("timer") and r.get("timer") != "triton.do_bench"})
        lines.append(f"\n{dt} B={B} H={H} D={D} {mode}: speedup vs {base} (>1 faster; eff = tile_efficiency)"
                     + (f"  [NOT GPU TIMINGS: {', '.join(timers)}]" if timers else ""))
        lines += _speedups(sub, names, ns, base, "ms", width)
        if any(r.get("graph_ms") for r in sub):
            lines.append(f"{dt} B={B} H={H} D={D} {mode}, CUDA-graph replays (graph_ms): speedup vs {base}")
            lines += _speedups(sub, names, ns, base, "graph_ms", width)
    errs = [r for r in rows if r.get("status") == "error"]
    if errs:
        lines.append(f"\n{len(errs)} row(s) with errors, e.g. {errs[0]['variant']} N={errs[0]['seq_len']} "
                     f"{errs[0]['mode']}: {str(errs[0].get('error'))[:200]}")
    return "\n".join(lines)


def _speedups(sub: list[dict], names: list[str], ns: list[int], base: str, key: str, width: int) -> list[str]:
    """One table: ``base``'s ``key`` time over each variant's, by N, and the tile efficiency at the largest N
    (for ``ms`` only: it is defined on eager times)."""
    base_ms = {r["seq_len"]: r.get(key) for r in sub if r["variant"] == base and r.get("status") == "ok"}
    lines = [f"{'variant':<{width}}" + "".join(f"{'N=' + str(n):>10}" for n in ns)
             + ("   eff@N=" + str(ns[-1]) if key == "ms" else "")]
    for name in names:
        cells, eff = [], ""
        for n in ns:
            r = next((r for r in sub if r["variant"] == name and r["seq_len"] == n), None)
            if r is None:
                cells.append("-")
            elif r.get("status") == "skipped":
                cells.append("skip")
            elif r.get("status") != "ok":
                cells.append("ERR")
            else:
                x = base_ms[n] / r[key] if (base_ms.get(n) and r.get(key)) else None
                cells.append(("?" if x is None else f"{x:.2f}x" if x >= 0.1 else f"{x:.2g}x"))
            if key == "ms" and n == ns[-1] and r is not None and r.get("tile_efficiency") is not None:
                eff = f"{r['tile_efficiency']:.2f}"
        lines.append(f"{name:<{width}}" + "".join(f"{c:>10}" for c in cells) + (f"   {eff}" if key == "ms" else ""))
    return lines
