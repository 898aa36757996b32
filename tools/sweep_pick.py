"""Which sweeps to turn on, from the A/B files of tools/band_sweep_ab.py and tools/layout_sweep_ab.py.

    python tools/sweep_pick.py BAND_AB.json LAYOUT_AB.json [--shape 8192,64,128]

For the shape of the training model (N, D, window), sums each variant's forward and backward time at
the launch defaults' pipeline depths and prints shell assignments: ``BAND=True BAND_PPS=4 ...``
(``BAND_ONCE``, ``LAYOUT_ONCE``: the pick reads its held tiles once), a
sweep on where its best programs-per-SM setting beats the kernel it replaces by more than 3%, and
every variant's sum on stderr.  Variants whose values differ from the replaced kernel's by more
than bf16 rounding (``max_diff`` > 0.05) are never picked.
"""
from __future__ import annotations

import argparse
import json
import sys


def pick(path: str, old: str, N: int, D: int, W: int, fwd_stages: int, bwd_stages: int):
    rows = [r for r in json.load(open(path))["rows"] if (r["N"], r["D"], r["window"]) == (N, D, W)]
    total = {}
    for r in rows:
        name = r["variant"]
        if name != old:
            want = f"_s{fwd_stages}" if r["pass_"] == "fwd" else f"_s{bwd_stages}"
            if not name.endswith(want) or r["max_diff"] > 0.05:
                continue
            name = name.rsplit("_s", 1)[0]
        total.setdefault(name, []).append(r["ms"])
    total = {k: sum(v) for k, v in total.items() if len(v) == 2}
    print(path, {k: round(v, 4) for k, v in sorted(total.items())}, file=sys.stderr)
    if old not in total or len(total) < 2:
        return False, 4, False
    best = min((k for k in total if k != old), key=total.get)
    return total[best] < 0.97 * total[old], int(best.split("_pps")[1]), "_once" in best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("band")
    p.add_argument("layout")
    p.add_argument("--shape", default="8192,64,128", help="N,D,window of the training model's attention")
    args = p.parse_args()
    N, D, W = map(int, args.shape.split(","))
    band_on, band_pps, band_once = pick(args.band, "dense_kernel", N, D, W, 2, 2)
    layout_on, layout_pps, layout_once = pick(args.layout, "one_tile", N, D, W, 2, 2)
    print(f"BAND={band_on} BAND_PPS={band_pps} BAND_ONCE={band_once} LAYOUT={layout_on} LAYOUT_PPS={layout_pps} LAYOUT_ONCE={layout_once}")


if __name__ == "__main__":
    main()
