"""Pictures of attention patterns and of the tiles the kernels compute or skip.

Every plotting function takes an optional matplotlib ``ax`` (or ``axes``) to draw
into, creates a figure with :mod:`matplotlib.pyplot` when none is given, and returns
what it drew on (see each docstring).  Schedules come from :mod:`sparseflash.tiles`.

Colours of a tile map (:data:`STATE_COLORS`): grey = skipped, dark blue = computed
with every pair allowed, light blue = computed and partly masked, orange = computed
although no pair in it is allowed.  Allowed token pairs outside FULL tiles are drawn
in navy on top, so one can check that each of them lies in a computed tile.

Two coordinate systems (``coords=``):

- ``"layout"``: the kernel's view: query slots down, key slots across, after
  compaction (query/key dropping) or sorting by bucket (hashing), with the tile grid
  drawn.  Skipped tiles form solid blocks.
- ``"original"``: token positions.  Each pair ``(i, j)`` is coloured by the state of
  the layout tile it falls in, so the kernel's tiles appear scattered over the
  original matrix; no grid is drawn since tiles are no longer rectangles there.

:func:`explore` is an ipywidgets explorer of all of this.
"""
from __future__ import annotations

import io

import matplotlib
import numpy as np
import torch
from matplotlib.colors import to_rgb
from matplotlib.patches import Patch

from . import tiles
from .tiles import EMPTY, FULL, PARTIAL, SKIPPED, TileSchedule

#: Tile state → colour.
STATE_COLORS = {
    SKIPPED: "#e8e8e8",
    PARTIAL: "#9ecae1",
    FULL: "#4a90d9",
    EMPTY: "#fd8d3c",
}
#: Short legend labels of the states.
STATE_LABELS = {
    SKIPPED: "skipped",
    FULL: "computed, all pairs allowed",
    PARTIAL: "computed, partly masked",
    EMPTY: "computed, nothing allowed",
}
PAIR_COLOR = "#08306b"  #: allowed token pairs (drawn outside FULL tiles)
KIND_TITLES = {"dense": "dense causal", "flash": "dense causal", "qk": "query/key dropping", "hash": "hash buckets"}
LAYOUT_NAMES = {"flash": "original order", "qk": "compacted: kept tokens first", "hash": "sorted by bucket"}


def _new_ax(ax, figsize=(4.5, 4.5)):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize, constrained_layout=True)[1]


def _row(x: torch.Tensor, b: int, h: int) -> torch.Tensor:
    """Head ``(b, h)`` of a per-token ``(B, H, N)`` tensor (or ``(N,)``)."""
    return x if x.dim() == 1 else x[b, h]


def _head(x: torch.Tensor, b: int, h: int) -> torch.Tensor:
    while x.dim() < 4:
        x = x.unsqueeze(0)
    return x[b, h]


def state_legend_handles(states=(SKIPPED, FULL, PARTIAL, EMPTY), pairs: bool = True) -> list:
    """Legend patches for the tile states (and the allowed-pair colour)."""
    handles = [Patch(facecolor=STATE_COLORS[s], edgecolor="#888888", label=STATE_LABELS[s]) for s in states]
    if pairs:
        handles.append(Patch(facecolor=PAIR_COLOR, label="allowed token pair"))
    return handles


def plot_pattern(mask, b: int = 0, h: int = 0, *, ax=None, title: str | None = None,
                 xlabel: str = "key position j", ylabel: str = "query position i"):
    """Draw a token-level attention pattern: dark where query ``i`` may attend key ``j``.

    Args:
        mask: bool ``(N, M)`` or ``(B, H, N, M)`` (e.g. from :mod:`sparseflash.reference`
            or ``TileSchedule.mask``); ``b``, ``h`` pick the head of a 4-d mask.
        ax: matplotlib axes to draw into (a new figure if None).
    Returns:
        The axes.
    """
    ax = _new_ax(ax)
    m = _head(torch.as_tensor(mask), b, h).bool().cpu().numpy()
    ax.imshow(m, cmap=matplotlib.colors.ListedColormap(["white", PAIR_COLOR]), vmin=0, vmax=1,
              interpolation="nearest", aspect="auto")
    ax.set(xlabel=xlabel, ylabel=ylabel,
           title=title if title is not None else f"attention pattern ({int(m.sum())} of {m.size} pairs allowed)")
    return ax


def tile_state_image(schedule: TileSchedule, b: int = 0, h: int = 0, coords: str = "layout",
                     show_pairs: bool = True) -> np.ndarray:
    """RGB ``(n_q, n_k, 3)`` float array (slots of the layout with ``coords="layout"``):
    each token pair coloured by its tile's state,
    allowed pairs of non-FULL tiles in :data:`PAIR_COLOR` (see the module docstring
    for ``coords``)."""
    if coords == "layout":
        tq = torch.arange(schedule.n_q_slots) // schedule.block_m
        tk = torch.arange(schedule.n_k_slots) // schedule.block_n
        state = _head(schedule.state, b, h)[tq[:, None], tk[None, :]]
        allowed = _head(schedule.layout_mask(), b, h)
    elif coords == "original":
        state = schedule.state_of_pairs(b, h)
        allowed = _head(schedule.mask, b, h)
    else:
        raise ValueError(f"coords must be 'layout' or 'original', got {coords!r}")
    palette = np.array([to_rgb(STATE_COLORS[s]) for s in (SKIPPED, PARTIAL, FULL, EMPTY)])
    img = palette[state.long().cpu().numpy()]
    if show_pairs:  # in FULL tiles every pair is allowed: the tile colour already says so
        a = allowed.cpu().numpy() & (state != FULL).cpu().numpy()
        img[a] = np.array(to_rgb(PAIR_COLOR))
    return img


def plot_tile_map(schedule: TileSchedule, b: int = 0, h: int = 0, *, coords: str = "layout", ax=None,
                  show_pairs: bool = True, grid: bool | None = None, legend: bool = True,
                  title: str | None = None):
    """Draw which tiles a kernel computes: skipped / computed-full / computed-partial /
    computed-empty, with the allowed token pairs on top.

    Args:
        schedule: from :func:`sparseflash.tiles.flash_schedule`, ``qk_schedule`` or
            ``hash_schedule``; ``b``, ``h`` pick the head.
        coords: ``"layout"`` (the kernel's compacted / sorted order, tile grid drawn)
            or ``"original"`` (token positions; each pair coloured by the state of the
            layout tile it falls in).
        show_pairs: draw allowed token pairs (outside FULL tiles, where all are allowed).
        grid: draw tile boundaries (default: in layout coordinates only).
        legend: add a legend of the states.
        ax: matplotlib axes to draw into (a new figure if None).
    Returns:
        The axes.
    """
    ax = _new_ax(ax)
    img = tile_state_image(schedule, b, h, coords, show_pairs)
    n_q, n_k = img.shape[:2]
    ax.imshow(img, interpolation="nearest", extent=(-0.5, n_k - 0.5, n_q - 0.5, -0.5), aspect="auto")
    grid = coords == "layout" if grid is None else grid
    if grid:
        lw = 0.6 if max(schedule.n_tiles) <= 32 else 0.3
        for y in range(schedule.block_m, n_q, schedule.block_m):
            ax.axhline(y - 0.5, color="white", lw=lw)
        for x in range(schedule.block_n, n_k, schedule.block_n):
            ax.axvline(x - 0.5, color="white", lw=lw)
    if coords == "layout" and schedule.kind != "flash":
        ax.set(xlabel=f"key slot ({LAYOUT_NAMES[schedule.kind]})", ylabel="query slot")
    else:
        ax.set(xlabel="key position j", ylabel="query position i")
    if title is None:
        where = "kernel layout" if coords == "layout" else "original coordinates"
        title = f"{KIND_TITLES.get(schedule.kind, schedule.kind)}: {where}"
    ax.set_title(title)
    if legend:
        present = [s for s in (SKIPPED, FULL, PARTIAL, EMPTY) if bool((schedule.state == s).any())]
        ax.legend(handles=state_legend_handles(present, show_pairs), loc="upper right", fontsize="small",
                  framealpha=0.9)
    return ax


def plot_window_union(q_buckets: torch.Tensor, k_buckets: torch.Tensor, window: int, block: int = 16, *,
                      b: int = 0, h: int = 0, axes=None):
    """Draw hash buckets ∪ a sliding window as its two kernels compute it: the band
    ``0 <= i - j < window`` in natural order (dense kernel), and the same-bucket pairs with
    ``i - j >= window`` in the bucket layout of query positions ``i - window``.

    ``q_buckets``, ``k_buckets``: ids ``(N,)``, ``(H, N)`` or ``(B, H, N)``.  Returns the two
    axes (a new figure of two panels if ``axes`` is None).
    """
    if axes is None:
        import matplotlib.pyplot as plt

        _, axes = plt.subplots(1, 2, figsize=(10, 4.8))
    n = q_buckets.shape[-1]
    band = tiles.flash_schedule(n, block_m=block, window=window)
    far = tiles.hash_schedule(q_buckets, k_buckets, block, block, window=window)
    plot_tile_map(band, title=f"the band, i - j < {window}\n{describe(band)}", ax=axes[0])
    plot_tile_map(far, b, h, title=f"same bucket, i - j >= {window}\n{describe(far, b, h)}", ax=axes[1])
    for ax in axes:
        ax.title.set_fontsize("small")
    return axes


def describe(schedule: TileSchedule, b: int = 0, h: int = 0) -> str:
    """Short text: computed tiles of head (b, h) against dense causal, and the ideal speed-up."""
    n = int(schedule.computed[b, h].sum())
    dense = schedule.dense_causal_tiles
    speed = f"{dense / n:.1f}×" if n else "∞"
    empty = int((schedule.state[b, h] == EMPTY).sum())
    extra = f", {empty} of them empty" if empty else ""
    return f"{n} of {dense} causal tiles computed{extra} ({n / max(dense, 1):.0%}, ideal speed-up {speed})"


def _kind_label(kind: str, keep_rate: float, n_buckets: int) -> str:
    if kind == "qk":
        return f"query/key dropping, keep {keep_rate:.0%}"
    if kind == "hash":
        return f"hash, {n_buckets} random buckets"
    return "dense causal"


def schedule_label(schedule: TileSchedule, b: int = 0, h: int = 0) -> str:
    """A short name of the variant with its actual sparsity in head (b, h), read from the schedule."""
    if schedule.kind == "qk":
        rq = (schedule.q_pos[b, h] >= 0).float().mean().item()
        rk = (schedule.k_pos[b, h] >= 0).float().mean().item()
        return f"query/key dropping ({rq:.0%} of queries, {rk:.0%} of keys kept)"
    if schedule.kind == "hash":
        n = len(torch.unique(torch.cat([schedule.q_buckets[b, h], schedule.k_buckets[b, h]])))
        return f"hash buckets ({n} buckets)"
    return "dense causal" if schedule.causal else "dense, not causal"


def plot_skipping(kind: str = "qk", seq_len: int = 256, block: int = 16, *, keep_rate: float = 0.5,
                  n_buckets: int = 4, seed: int = 0, buckets: str = "random",
                  schedule: TileSchedule | None = None, axes=None, b: int = 0, h: int = 0,
                  legend: bool = True, title: str | None = None):
    """Two panels side by side: the tile map in original coordinates and in the kernel's layout.

    Builds a random example with :func:`sparseflash.tiles.schedule_for` (``kind`` is
    ``"dense"``, ``"qk"`` or ``"hash"``; hash buckets are uniform random ids unless
    ``buckets="lsh"``), or draws the given ``schedule`` (then ``kind`` and the example
    parameters are ignored).  The title gives the actual sparsity and the computed tiles.

    Args:
        axes: two matplotlib axes to draw into (a new 1×2 figure if None).
        legend: one legend for both panels, below them.
    Returns:
        ``(fig, axes)``.
    """
    if schedule is None:
        schedule = tiles.schedule_for(kind, seq_len, block, keep_rate=keep_rate, n_buckets=n_buckets, seed=seed,
                                      buckets=buckets)
    if axes is None:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 5.2), constrained_layout=True)
    fig = axes[0].figure
    plot_tile_map(schedule, b, h, coords="original", ax=axes[0], legend=False, title="original coordinates")
    plot_tile_map(schedule, b, h, coords="layout", ax=axes[1], legend=False,
                  title=f"kernel layout ({schedule.block_m}×{schedule.block_n} tiles)")
    if title is None:
        title = f"{schedule_label(schedule, b, h)}, N={schedule.n_q}\n{describe(schedule, b, h)}"
    fig.suptitle(title)
    if legend:
        fig.legend(handles=state_legend_handles(), loc="outside lower center", ncols=5, fontsize="small",
                   frameon=False)
    return fig, axes


_DEFAULT_VALUES = {
    "seq_len": [64, 128, 256, 512, 1024, 2048],
    "keep_rate": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
    "n_buckets": [1, 2, 3, 4, 6, 8, 12, 16],
}
_DEFAULT_KINDS = {"seq_len": ("dense", "qk", "hash"), "keep_rate": ("qk",), "n_buckets": ("hash",)}
_KIND_STYLE = {"dense": ("C0", "o"), "qk": ("C1", "s"), "hash": ("C2", "^")}


def fraction_sweep(kind: str, vary: str, values, *, seq_len: int = 1024, block: int = 64, keep_rate: float = 0.5,
                   n_buckets: int = 8, seeds=(0, 1, 2), relative_to: str = "causal") -> np.ndarray:
    """Computed-tile fraction of ``kind`` for each value of ``vary``, ``(len(values), len(seeds))``.

    ``relative_to="causal"``: :attr:`TileSchedule.computed_fraction` (over the dense
    causal tiles); ``"grid"``: :attr:`TileSchedule.grid_fraction` (over all tiles).
    """
    if vary not in _DEFAULT_VALUES:
        raise ValueError(f"vary must be one of {sorted(_DEFAULT_VALUES)}, got {vary!r}")
    if relative_to not in ("causal", "grid"):
        raise ValueError(f"relative_to must be 'causal' or 'grid', got {relative_to!r}")
    out = np.zeros((len(values), len(seeds)))
    for i, value in enumerate(values):
        params = dict(seq_len=seq_len, keep_rate=keep_rate, n_buckets=n_buckets)
        params[vary] = value
        for j, s in enumerate(seeds):
            sched = tiles.schedule_for(kind, int(params["seq_len"]), block, keep_rate=float(params["keep_rate"]),
                                       n_buckets=int(params["n_buckets"]), seed=s)
            out[i, j] = sched.computed_fraction if relative_to == "causal" else sched.grid_fraction
            if kind == "dense":
                break
        if kind == "dense":
            out[i, :] = out[i, 0]
    return out


def plot_fraction(vary: str = "seq_len", kinds=None, values=None, *, seq_len: int = 1024, block: int = 64,
                  keep_rate: float = 0.5, n_buckets: int = 8, seeds=(0, 1, 2), relative_to: str | None = None,
                  theory: bool = True, mark=None, ax=None, title: str | None = None):
    """Fraction of tiles computed against ``vary`` (``"seq_len"``, ``"keep_rate"`` or ``"n_buckets"``).

    Args:
        kinds: which of ``"dense"``, ``"qk"``, ``"hash"`` to draw (default: all three
            against ``seq_len``, ``qk`` against ``keep_rate``, ``hash`` against ``n_buckets``).
        values: x values (defaults per ``vary``); the other parameters stay at
            ``seq_len``, ``block`` (square tiles), ``keep_rate``, ``n_buckets``.
        seeds: random examples averaged per point (the band shows min–max).
        relative_to: ``"causal"`` (computed tiles / dense causal tiles, the
            ``computed_fraction``) or ``"grid"`` (computed / all tiles, where dense
            causal tends to 1/2).  Default: ``"grid"`` against ``seq_len``, else ``"causal"``.
        theory: dashed guides, the large-N limits: dense causal ½ of the grid, dropping
            ``r²`` and hashing ``1/n_buckets`` of the dense causal tiles (halved on the grid).
        mark: an x value to mark with a vertical line (the explorer's current value).
        ax: matplotlib axes to draw into (a new figure if None).
    Returns:
        The axes.
    """
    ax = _new_ax(ax, figsize=(5, 4))
    kinds = _DEFAULT_KINDS[vary] if kinds is None else tuple(kinds)
    values = _DEFAULT_VALUES[vary] if values is None else list(values)
    relative_to = ("grid" if vary == "seq_len" else "causal") if relative_to is None else relative_to
    x = np.asarray(values, dtype=float)
    for kind in kinds:
        f = fraction_sweep(kind, vary, values, seq_len=seq_len, block=block, keep_rate=keep_rate,
                           n_buckets=n_buckets, seeds=seeds, relative_to=relative_to)
        color, marker = _KIND_STYLE.get(kind, ("C3", "x"))
        label = {"dense": "dense causal", "qk": f"q/k dropping, keep {keep_rate:.0%}",
                 "hash": f"hash, {n_buckets} buckets"}[kind]
        if vary == "keep_rate" and kind == "qk":
            label = "query/key dropping"
        if vary == "n_buckets" and kind == "hash":
            label = "hash buckets (random)"
        ax.plot(x, f.mean(1), marker=marker, color=color, label=label)
        if f.shape[1] > 1 and np.ptp(f, axis=1).max() > 0:
            ax.fill_between(x, f.min(1), f.max(1), color=color, alpha=0.2, lw=0)
    if theory:
        if vary == "seq_len":
            half = 0.5 if relative_to == "grid" else 1.0
            guides = {"dense": (half, "½" if half == 0.5 else "1"),
                      "qk": (half * keep_rate**2, "r²/2" if half == 0.5 else "r²"),
                      "hash": (half / n_buckets, "1/(2·n_buckets)" if half == 0.5 else "1/n_buckets")}
            for kind in kinds:
                if kind in guides:
                    y, name = guides[kind]
                    ax.axhline(y, color=_KIND_STYLE[kind][0], ls="--", lw=1, label=f"{name} (large-N limit)")
        if vary == "keep_rate":
            xs = np.linspace(min(x), max(x), 100)
            ax.plot(xs, xs**2 * (1 if relative_to == "causal" else 0.5), "k--", lw=1, label="r² (ideal)")
        if vary == "n_buckets":
            xs = np.linspace(min(x), max(x), 100)
            ax.plot(xs, 1 / xs * (1 if relative_to == "causal" else 0.5), "k--", lw=1, label="1 / n_buckets (ideal)")
    if mark is not None:
        ax.axvline(mark, color="0.4", lw=1, ls=":")
    if vary == "seq_len":
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(int(v)) for v in x])
    xlabel = {"seq_len": "sequence length N", "keep_rate": "keep rate r (queries and keys)",
              "n_buckets": "number of buckets"}[vary]
    ylabel = "computed tiles / dense causal tiles" if relative_to == "causal" else "computed tiles / all tiles"
    ax.set(xlabel=xlabel, ylabel=ylabel, ylim=(0, None))
    fixed = f"{block}×{block} tiles" + ("" if vary == "seq_len" else f", N={seq_len}")
    ax.set_title(title if title is not None else f"fraction of tiles computed ({fixed})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return ax


# --------------------------------------------------------------------------------------
# Layouts and tile plans (sparseflash.layout, sparseflash.plan)
# --------------------------------------------------------------------------------------

PAD_COLOR = "white"  #: padding slots of a layout
DROPPED_COLOR = "0.75"  #: dropped tokens (not kept, or no bucket)


def _n_tokens(index: torch.Tensor) -> int:
    """Tokens of a layout row: padding slots hold the token count ``N`` (several of them), tokens 0..N-1."""
    top = int(index.max())
    return top if int((index == top).sum()) > 1 else index.numel()


def plot_layout(layout, b: int = 0, h: int = 0, *, n_tokens: int | None = None, ax=None, title: str | None = None,
                labels: bool = True):
    """Where each token sits in a :class:`~sparseflash.layout.Layout`: tokens in original order
    (top row) joined to their slots (bottom row), coloured by bucket; padding slots white,
    dropped tokens grey; dotted lines at tile boundaries, and each slot's position below it.

    Args:
        layout: from :func:`~sparseflash.layout.bucket_layouts` or ``reference_layout``.
        n_tokens: tokens ``N`` (read off the layout if None: padding slots hold ``N``).
        labels: write each slot's position under it (small layouts only).
    Returns:
        The axes.
    """
    index = _row(layout.index, b, h).long().cpu()
    pos = _row(layout.pos, b, h).long().cpu()
    bucket = _row(layout.bucket, b, h).long().cpu()
    L, block = index.numel(), layout.block
    n = _n_tokens(index) if n_tokens is None else int(n_tokens)
    ax = _new_ax(ax, figsize=(max(6.0, 0.42 * L), 2.8))
    cmap = matplotlib.colormaps["tab10"]
    real = index < n
    token_bucket = torch.full((n,), -1, dtype=torch.long)
    token_bucket[index[real]] = bucket[real]
    colour = lambda bk: cmap(int(bk) % 10) if bk >= 0 else DROPPED_COLOR
    for a in range(L):
        if real[a]:
            ax.plot([int(index[a]), a], [1, 0], color=colour(bucket[a]), lw=1.2, alpha=0.8)
    ax.scatter(range(n), np.ones(n), c=[colour(bk) for bk in token_bucket.tolist()], marker="s", s=120, zorder=3,
               edgecolors="0.4", linewidths=0.5)
    slot_colours = [colour(bucket[a]) if real[a] else PAD_COLOR for a in range(L)]
    ax.scatter(range(L), np.zeros(L), c=slot_colours, marker="s", s=120, zorder=3, edgecolors="0.4", linewidths=0.5)
    for t in range(block, L, block):
        ax.axvline(t - 0.5, ymin=0.02, ymax=0.45, color="0.3", ls=":", lw=1)
    if labels:
        for a in range(L):
            p = int(pos[a])
            text = str(p) if real[a] and bucket[a] >= 0 else "·"
            ax.text(a, -0.22, text, ha="center", va="top", fontsize=8)
    ax.set_xticks(range(0, max(L, n), 1 if max(L, n) <= 40 else 8))
    ax.set(yticks=[0, 1], yticklabels=["slot\n(position)", "token"], ylim=(-0.5, 1.25), xlim=(-1, max(L, n)),
           xlabel="token position (top row), slot (bottom row); dotted: tile boundaries")
    ax.spines[["top", "right", "left"]].set_visible(False)
    ax.set_title(title if title is not None else
                 f"layout: {n} tokens in {L} slots, tiles of {block} (colour = bucket, white = padding, "
                 "grey = dropped)")
    return ax


def allowed_per_tile(q_layout, k_layout, block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """int32 ``(B, H, n_q_tiles, n_k_tiles)``: allowed (query, key) pairs in each tile of two
    layouts: same bucket, both real, ``0 <= k_pos <= q_pos`` (quadratic: small sizes only).

    Tiles default to the layouts' own blocks; pass others to tile a layout built with ``block=1``
    (the plain sort, with no padding)."""
    bm = q_layout.block if block_m is None else int(block_m)
    bn = k_layout.block if block_n is None else int(block_n)
    qp, kp = q_layout.pos.long(), k_layout.pos.long()
    qb, kb = q_layout.bucket.long(), k_layout.bucket.long()
    ok = (kp[..., None, :] <= qp[..., :, None]) & (kp[..., None, :] >= 0) & (kb[..., None, :] == qb[..., :, None])
    ok &= (qb >= 0)[..., :, None] & (kb >= 0)[..., None, :]
    ok = torch.nn.functional.pad(ok.int(), (0, (-ok.shape[-1]) % bn, 0, (-ok.shape[-2]) % bm))
    return ok.unflatten(-1, (-1, bn)).unflatten(-3, (-1, bm)).sum((-3, -1), dtype=torch.int32)


def tile_plan_states(plan, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """int8 ``(B, H, n_q_tiles, n_k_tiles)`` tile states of the forward of a
    :class:`~sparseflash.plan.TilePlan`: :data:`~sparseflash.tiles.FULL` for its mask-free
    run ``[lo, full)``, :data:`~sparseflash.tiles.PARTIAL` for the masked run ``[full, hi)``,
    :data:`~sparseflash.tiles.SKIPPED` elsewhere.  ``plan`` may also be a bool map of visited
    tiles (a rule without runs: every visited tile masked).  With ``allowed`` (pairs per tile,
    :func:`allowed_per_tile`), visited tiles with no allowed pair are :data:`~sparseflash.tiles.EMPTY`."""
    if isinstance(plan, torch.Tensor):
        visited = plan.bool()
        while visited.dim() < 4:
            visited = visited.unsqueeze(0)
        free = torch.zeros_like(visited)
    else:
        runs = plan.q_runs.long()
        s = torch.arange(plan.k_runs.shape[-2], device=runs.device)
        visited = (s >= runs[..., 0:1]) & (s < runs[..., 2:3])
        free = (s >= runs[..., 0:1]) & (s < runs[..., 1:2])
    state = torch.full(visited.shape, SKIPPED, dtype=torch.int8, device=visited.device)
    state[visited] = PARTIAL
    state[free] = FULL
    if allowed is not None:
        state[visited & (allowed.to(visited.device) == 0)] = EMPTY
    return state


PLAN_LABELS = {SKIPPED: "skipped", FULL: "no mask (lo..full)", PARTIAL: "masked (full..hi)",
               EMPTY: "computed, nothing allowed"}


def plot_tile_plan(plan, b: int = 0, h: int = 0, *, allowed: torch.Tensor | None = None, q_layout=None,
                   k_layout=None, ax=None, title: str | None = None, legend: bool = True):
    """Draw the tiles a kernel visits, one cell per (query tile, key tile): the mask-free run
    of a :class:`~sparseflash.plan.TilePlan` dark blue, its masked run light blue, skipped
    tiles grey (and orange: visited with no allowed pair, when ``allowed`` is given).

    ``plan`` may also be a bool ``(n_q_tiles, n_k_tiles)`` (or ``(B, H, ·, ·)``) map of
    visited tiles.  With ``q_layout`` and ``k_layout``, red lines mark where each bucket's
    run of tiles starts.
    Returns:
        The axes.
    """
    ax = _new_ax(ax)
    state = _head(tile_plan_states(plan, allowed), b, h).long().cpu().numpy()
    palette = np.array([to_rgb(STATE_COLORS[s]) for s in (SKIPPED, PARTIAL, FULL, EMPTY)])
    n_qt, n_kt = state.shape
    ax.imshow(palette[state], interpolation="nearest", extent=(-0.5, n_kt - 0.5, n_qt - 0.5, -0.5), aspect="auto")
    if max(n_qt, n_kt) <= 48:
        for y in range(1, n_qt):
            ax.axhline(y - 0.5, color="white", lw=0.6)
        for x in range(1, n_kt):
            ax.axvline(x - 0.5, color="white", lw=0.6)
    for lay, line in ((q_layout, ax.axhline), (k_layout, ax.axvline)):
        if lay is not None:
            starts = _row(lay.start, b, h)[_row(lay.count, b, h) > 0] // lay.block
            for t in starts.tolist():
                if t > 0:
                    line(t - 0.5, color="tab:red", lw=1)
    ax.set(xlabel="key tile", ylabel="query tile")
    ax.set_title(title if title is not None else f"tile plan: {int((state != SKIPPED).sum())} tiles visited")
    if legend:
        present = [s for s in (SKIPPED, FULL, PARTIAL, EMPTY) if (state == s).any()]
        ax.legend(handles=[Patch(facecolor=STATE_COLORS[s], edgecolor="#888888", label=PLAN_LABELS[s])
                           for s in present], loc="upper right", fontsize="small", framealpha=0.9)
    return ax


def png_bytes(path, max_width: int = 900) -> bytes:
    """A PNG file's bytes, scaled down (keeping its aspect) to at most ``max_width`` pixels wide:
    committed figures are drawn large; a notebook shows them smaller, and its saved outputs stay light."""
    from PIL import Image

    with Image.open(path) as img:
        if img.width <= max_width:
            with open(path, "rb") as f:
                return f.read()
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
        small = img.resize((max_width, round(img.height * max_width / img.width)), Image.LANCZOS)
        if small.mode == "RGBA":  # our figures are opaque: a palette keeps the PNG small
            small = small.convert("RGB")
        small = small.quantize(256, method=Image.Quantize.MEDIANCUT)
    buf = io.BytesIO()
    small.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def show_png(path, max_width: int = 900) -> None:
    """Display a PNG file in a notebook, scaled down to at most ``max_width`` pixels (:func:`png_bytes`)."""
    from IPython.display import Image as IPImage, display

    display(IPImage(data=png_bytes(path, max_width), format="png"))


# --------------------------------------------------------------------------------------
# Explorer
# --------------------------------------------------------------------------------------


def draw_explorer(fig, kind: str = "qk", seq_len: int = 128, block: int = 16, keep_rate: float = 0.5,
                  n_buckets: int = 4, seed: int = 0) -> TileSchedule:
    """The explorer's picture on ``fig`` (cleared first): the tile maps of one random example,
    original coordinates and kernel layout, and the computed fraction against the variant's
    own parameter.  Returns the example's :class:`~sparseflash.tiles.TileSchedule`."""
    sched = tiles.schedule_for(kind, seq_len, block, keep_rate=keep_rate, n_buckets=n_buckets, seed=seed)
    fig.clear()
    axes = fig.subplots(1, 3, width_ratios=[1, 1, 1.15])
    plot_skipping(schedule=sched, axes=axes[:2])
    vary = {"dense": "seq_len", "qk": "keep_rate", "hash": "n_buckets"}[kind]
    values = {"seq_len": [32, 64, 128, 256, 512], "keep_rate": [0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0],
              "n_buckets": [1, 2, 4, 8, 16]}[vary]
    params = dict(seq_len=seq_len, keep_rate=keep_rate, n_buckets=n_buckets)
    plot_fraction(vary, kinds=(kind,), values=values, seq_len=seq_len, block=block, keep_rate=keep_rate,
                  n_buckets=n_buckets, seeds=(seed,), mark=params[vary], ax=axes[2])
    return sched


def explore(kind: str = "qk", seq_len: int = 128, block: int = 16, keep_rate: float = 0.5, n_buckets: int = 4,
            seed: int = 0):
    """An ipywidgets explorer: pick the variant and sizes, see which tiles are skipped.

    Controls: variant (dense causal / query-key dropping / hash buckets), ``seq_len``,
    tile size (square tiles), keep rate, number of buckets, random seed.  The picture
    (:func:`draw_explorer`) shows the tile map in original coordinates and in the kernel's
    layout, and the computed fraction against the variant's own parameter (``seq_len`` for
    dense, the keep rate for dropping, the bucket count for hashing).  Hash buckets are
    uniform random ids (:func:`sparseflash.tiles.example_inputs`), so that any bucket count works.

    The figure is rendered to PNG into an ``ipywidgets.Image``, so it draws the same with
    any matplotlib backend and also without a frontend (then it is drawn once, and again
    on each change of a control).  In a notebook, prefer :func:`show_explorer`, which draws
    the default setting as a plain figure first.

    Returns:
        An ``ipywidgets.VBox``, with attributes ``controls`` (dict name → widget:
        ``kind``, ``seq_len``, ``block``, ``keep_rate``, ``n_buckets``, ``seed``),
        ``image`` (the Image widget), ``info`` (an HTML line), ``figure`` (the matplotlib
        Figure), ``schedule`` (the current :class:`~sparseflash.tiles.TileSchedule`),
        ``draws`` (number of renders) and ``redraw()``.
    """
    import ipywidgets as widgets
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    style = {"description_width": "80px"}
    layout = widgets.Layout(width="330px")
    slider = dict(continuous_update=False, style=style, layout=layout)
    controls = {
        "kind": widgets.Dropdown(options=[("dense causal", "dense"), ("query/key dropping", "qk"),
                                          ("hash buckets", "hash")], value=kind, description="variant",
                                 style=style, layout=layout),
        "seq_len": widgets.IntSlider(value=seq_len, min=32, max=512, step=16, description="seq_len", **slider),
        "block": widgets.SelectionSlider(options=[16, 32, 64], value=block, description="tile size", **slider),
        "keep_rate": widgets.FloatSlider(value=keep_rate, min=0.05, max=1.0, step=0.05, description="keep rate",
                                         readout_format=".2f", **slider),
        "n_buckets": widgets.IntSlider(value=n_buckets, min=1, max=16, description="n_buckets", **slider),
        "seed": widgets.IntSlider(value=seed, min=0, max=20, description="seed", **slider),
    }
    image = widgets.Image(format="png", layout=widgets.Layout(max_width="100%"))
    info = widgets.HTML()
    fig = Figure(figsize=EXPLORER_FIGSIZE, dpi=80, layout="constrained")
    FigureCanvasAgg(fig)
    box = widgets.VBox([widgets.HBox([widgets.VBox(list(controls.values())[:3]),
                                      widgets.VBox(list(controls.values())[3:])]), info, image])

    def redraw(*_):
        v = {name: w.value for name, w in controls.items()}
        controls["keep_rate"].disabled = v["kind"] != "qk"
        controls["n_buckets"].disabled = v["kind"] != "hash"
        sched = draw_explorer(fig, **v)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        image.value = buf.getvalue()
        info.value = (f"<b>{_kind_label(v['kind'], v['keep_rate'], v['n_buckets'])}</b>, N={v['seq_len']}, "
                      f"{v['block']}×{v['block']} tiles: {describe(sched)}")
        box.schedule = sched
        box.draws += 1

    box.controls, box.image, box.info, box.figure, box.draws, box.redraw = controls, image, info, fig, 0, redraw
    for w in controls.values():
        w.observe(redraw, names="value")
    redraw()
    return box


#: Size (inches) of the explorer's picture.
EXPLORER_FIGSIZE = (12, 4.2)

#: What a view without live widgets shows in place of the explorer's controls.
EXPLORER_NOTE = ("[interactive explorer: its sliders need a live Jupyter kernel with ipywidgets; "
                 "the figure above shows its default setting]")


class _WidgetOrNote:
    """Displays as the widget where a frontend renders widgets, and as ``note`` (its
    ``text/plain``) everywhere else: static views, nbconvert, a terminal."""

    def __init__(self, widget, note: str):
        self.widget, self.note = widget, note

    def _repr_mimebundle_(self, include=None, exclude=None, **kwargs):
        data = self.widget._repr_mimebundle_(include=include, exclude=exclude, **kwargs)
        if isinstance(data, tuple):  # (data, metadata)
            data = data[0]
        data = dict(data or {})
        data["text/plain"] = self.note
        return data

    def __repr__(self) -> str:
        return self.note


def show_explorer(kind: str = "qk", seq_len: int = 128, block: int = 16, keep_rate: float = 0.5,
                  n_buckets: int = 4, seed: int = 0, *, interactive: bool = True):
    """Static first, interactive second: the explorer of a notebook cell.

    1. Draws the default setting with plain matplotlib (:func:`draw_explorer`), so that a
       static view of the notebook, and a headless run, show it.
    2. Then, if ``interactive`` and ipywidgets is installed, displays the live
       :func:`explore` controls; a view that cannot render widgets shows
       :data:`EXPLORER_NOTE` in their place.  Without ipywidgets it prints a note instead.

    Returns None (so that a notebook cell ending with it displays nothing more).
    """
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=EXPLORER_FIGSIZE, layout="constrained")
    sched = draw_explorer(fig, kind, seq_len, block, keep_rate, n_buckets, seed)
    plt.show()
    print(f"{_kind_label(kind, keep_rate, n_buckets)}, N={seq_len}, {block}×{block} tiles: {describe(sched)}")
    if not interactive:
        return None
    try:
        import ipywidgets  # noqa: F401
        from IPython.display import display
    except ImportError:
        print("(ipywidgets is not installed, so there are no sliders: `pip install ipywidgets` for the "
              "live explorer; the figure above shows its default setting)")
        return None
    display(_WidgetOrNote(explore(kind, seq_len, block, keep_rate, n_buckets, seed), EXPLORER_NOTE))
    return None
