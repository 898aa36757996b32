"""Rotary embedding (sparseflash/rotary.py): the float64 formula, offsets, the table op
under torch.compile (one graph, no inlined table) and opcheck."""
import math

import pytest
import torch

from sparseflash.rotary import rotary, rotary_table


def rotary_ref(x: torch.Tensor, base: float = 10000.0, offset: int = 0) -> torch.Tensor:
    """float64 GPT-NeoX rotary, written out per position and frequency."""
    N, D = x.shape[-2], x.shape[-1]
    half = D // 2
    x = x.double()
    out = x.clone()
    for i in range(half):
        theta = base ** (-i / half)
        ang = torch.tensor([(offset + p) * theta for p in range(N)], dtype=torch.float64)
        c, s = ang.cos(), ang.sin()
        out[..., :, i] = x[..., :, i] * c - x[..., :, half + i] * s
        out[..., :, half + i] = x[..., :, i] * s + x[..., :, half + i] * c
    return out


@pytest.mark.parametrize("N,D,offset", [(1, 8, 0), (7, 16, 0), (100, 9, 3), (257, 64, 1000)])
def test_matches_float64(N, D, offset):
    x = torch.randn(2, 3, N, D, generator=torch.Generator().manual_seed(N + D))
    got = rotary(x, offset=offset)
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got.double(), rotary_ref(x, offset=offset), atol=2e-3 * math.log2(2 + offset + N),
                               rtol=1e-4)


def test_offset_continues_the_full_sequence(seed):
    x = torch.randn(1, 2, 20, 16)
    full = rotary(x)
    assert torch.equal(rotary(x[:, :, 12:], offset=12), full[:, :, 12:])


def test_bf16_and_grad(seed):
    x = torch.randn(2, 2, 33, 32, dtype=torch.bfloat16, requires_grad=True)
    y = rotary(x)
    assert y.dtype == torch.bfloat16
    y.float().pow(2).sum().backward()
    # A rotation keeps norms: d|Rx|^2/dx = 2x.
    torch.testing.assert_close(x.grad.float(), 2 * x.detach().float(), atol=0.1, rtol=0.02)
    assert torch.isfinite(x.grad).all()


def test_compiles_in_one_graph(seed):
    """One Dynamo graph in which the table is one registered op, not its formula inlined.

    The backend records each Dynamo graph and runs it eagerly: Inductor on CPU needs a C++
    toolchain that a CPU-only install may not have, and the property tested is the traced graph's."""
    torch._dynamo.reset()
    graphs = []

    def recorder(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = torch.randn(2, 3, 40, 16)
    f = torch.compile(lambda x: rotary(x, offset=5), backend=recorder, fullgraph=True)
    torch.testing.assert_close(f(x), rotary(x, offset=5))
    assert len(graphs) == 1, f"compiled {len(graphs)} graphs"
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert any("rotary_table" in t for t in targets), f"table op not in the graph: {targets}"
    assert not any(t.endswith("cos") or t.endswith("sin") for t in targets if "rotary_table" not in t), \
        f"the table's formula was inlined: {targets}"


def test_opcheck_table():
    positions = torch.arange(3, 50)
    torch.library.opcheck(torch.ops.sparseflash.rotary_table.default, (positions, 8, 10000.0))
    cos, sin = rotary_table(47, 8, offset=3)
    assert cos.shape == sin.shape == (47, 8) and cos.dtype == torch.float32
    torch.testing.assert_close(cos.pow(2) + sin.pow(2), torch.ones(47, 8))


def test_bad_rank():
    with pytest.raises(ValueError, match="seq_len, head_dim"):
        rotary(torch.randn(8))
