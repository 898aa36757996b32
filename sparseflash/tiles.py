"""Which tiles a kernel computes: recorded by the kernel, and predicted in PyTorch."""
from __future__ import annotations

import torch
from torch import Tensor


class TileRecord:
    """Counts of computed ``(query tile, key tile)`` pairs, written by the kernels.

    Pass one as ``tile_record=`` to any attention function; after the forward (and
    the backward, if run) it holds int32 tensors ``(B, H, n_q_tiles, n_k_tiles)``:

    - ``fwd``: the forward pass,
    - ``bwd_kv``: the backward's dK/dV loop (a key tile walking query tiles),
    - ``bwd_q``: the backward's dQ loop (a query tile walking key tiles),

    each entry the number of times that pair was computed (0 = skipped).  For the
    sparse variants the tiles are in the kernel's (compacted or sorted) layout.
    Recording is a compile-time switch: kernels launched without a record carry no
    trace of it.
    """

    def __init__(self) -> None:
        self.kind: str | None = None
        self.config: dict = {}
        self.maps: dict[str, Tensor] = {}

    def start(self, kind: str, config: dict) -> None:
        self.kind, self.config, self.maps = kind, dict(config), {}

    def buffer(self, name: str, shape, device) -> Tensor:
        self.maps[name] = torch.zeros(shape, dtype=torch.int32, device=device)
        return self.maps[name]

    def __getattr__(self, name: str) -> Tensor:
        maps = self.__dict__.get("maps", {})
        if name in maps:
            return maps[name]
        raise AttributeError(name)
