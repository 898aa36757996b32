"""Property-based tests (hypothesis): every sparse entry point against the float64 reference.

Each test draws a whole case (shape, dtype, ``sm_scale``, tile sizes, keep masks or
bucket ids, and a seed for the tensors) and checks, against ``reference.attention``
with ``reference.qk_dropping_mask`` / ``reference.hash_mask``:

* the output and ``dq, dk, dv`` within the tolerances of ``tests/helpers.py``
  (float32 1e-3; bfloat16 1e-2 for outputs, 2e-2 for gradients), NaN/inf never
  passing; each gradient bound adds the error that the rounding of the kernel's stored
  output alone causes (``helpers.rounding_floor``: the backward's ``delta = do · o``
  uses that output, and on rows with two or three keys, whose ``dq``/``dk`` are a
  cancellation, the rounding alone costs several per cent in bfloat16 (e.g. 0.079 for
  dense causal N=2, D=128, under the interpreter, whose bfloat16 casts truncate);
  beyond that floor the kernels stayed below 0.0081 in 280 drawn bfloat16 examples);
* exact zeros where the mask leaves nothing: the output and ``dq`` of a query with
  no allowed key (dropped queries included) and ``dk, dv`` of a key no query may
  see (dropped keys included).

Every entry point has a float32 and a bfloat16 test, where all of this is a hard property.

Kernels run through Triton's interpreter here, so cases are kept small (the numbers of
tile pairs and of tokens are capped, see :func:`shapes`) and each test runs a few dozen
examples; ``sm_scale`` is the default or up to ``MAX_SCALE`` times it.

Replaying a failure: hypothesis prints the falsifying case as a ``QKCase(...)`` or
``HashCase(...)``; it holds everything needed (the tensors come from its ``seed``), so
``check_qk(QKCase(...))``, ``check_hash(...)``, ``check_permuted_compacted(...)`` or
``check_permuted_bucketed(...)`` run it again outside hypothesis.  The case summary (kept
counts, bucket id range, measured errors and bounds) is printed through ``note``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from helpers import GRAD_TOL, TOL, err, grads, rounding_floor
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st

from sparseflash import hash_sparse_attention, permuted_attention, qk_sparse_attention
from sparseflash import reference as ref
from sparseflash.layout import bucket_sort_layout, compact_layout, gather_tokens

# Each example costs about (B·H · query tiles · key tiles) interpreted tile pairs, and
# with buckets also grows with B·H·N (a layout may give each bucket its own tiles); cases
# above either bound are only drawn with B = H = 1.
MAX_TILE_PAIRS = 100
MAX_TOKENS = 200
MAX_SCALE = 2.0
SETTINGS = dict(
    deadline=None,
    derandomize=False,
    print_blob=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

HEAD_DIMS = (16, 32, 64, 80, 128)
LENGTHS = (1, 7, 100)


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    B: int
    H: int
    N: int
    D: int
    dtype: torch.dtype
    sm_scale: float | None
    block_m: int
    block_n: int
    seed: int

    @property
    def kernel_options(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n)

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


@dataclass(frozen=True)
class QKCase:
    """Query/key dropping.  ``q_keep``/``k_keep``: one mode per (batch, head), in
    ``b * H + h`` order: ``"all"``, ``"none"``, ``"first"`` / ``"last"`` (only that
    token), or a keep rate in (0, 1) (each token kept independently)."""

    shape: Shape
    q_keep: tuple
    k_keep: tuple
    trim_q: bool = False  # permuted_attention only: drop the all-padding tail slots
    trim_k: bool = False


@dataclass(frozen=True)
class HashCase:
    """Hash buckets.  ``q_buckets``/``k_buckets``: number of distinct raw ids per
    (batch, head); ``relation``: ``"same"`` (k ids are the q tensor itself),
    ``"independent"`` or ``"disjoint"`` (q ids even, k ids odd: nothing allowed);
    ids are multiplied by ``stride``; ``n_buckets_extra``: None calls without
    ``n_buckets=``, else ``n_buckets = max id + 1 + n_buckets_extra``."""

    shape: Shape
    q_buckets: tuple
    k_buckets: tuple
    relation: str = "independent"
    stride: int = 1
    id_dtype: torch.dtype = torch.int64
    n_buckets_extra: int | None = None


@st.composite
def shapes(draw, dtype: torch.dtype) -> Shape:
    N = draw(st.one_of(st.sampled_from(LENGTHS), st.integers(1, 200)))
    block_m = draw(st.sampled_from((16, 32)))
    block_n = draw(st.sampled_from((16, 32)))
    pairs = math.ceil(N / block_m) * math.ceil(N / block_n)
    B, H = draw(st.sampled_from([(b, h) for b in (1, 2) for h in (1, 2)
                                 if (b * h * pairs <= MAX_TILE_PAIRS and b * h * N <= MAX_TOKENS) or b * h == 1]))
    D = draw(st.sampled_from(HEAD_DIMS))
    # sm_scale: the default, or up to MAX_SCALE times it.  Much sharper softmaxes make the
    # relative gradient error ill-conditioned even for an exact float32 computation
    # (4x: ~3e-3 measured on N < 12 in float32), so they say nothing about the kernels.
    mult = draw(st.one_of(st.none(), st.floats(0.05, MAX_SCALE)))
    sm_scale = None if mult is None else round(mult / math.sqrt(D), 5)
    seed = draw(st.integers(0, 2**31 - 1))
    return Shape(B, H, N, D, dtype, sm_scale, block_m, block_n, seed)


KEEP_MODES = st.one_of(
    st.sampled_from((0.5, 0.1, 0.9)),
    st.sampled_from(("all", "none", "first", "last")),
    st.floats(0.01, 0.99).map(lambda x: round(x, 3)),
)


@st.composite
def qk_cases(draw, dtype: torch.dtype, trims: bool = False) -> QKCase:
    shape = draw(shapes(dtype))
    n = shape.B * shape.H
    q_keep = tuple(draw(st.lists(KEEP_MODES, min_size=n, max_size=n)))
    k_keep = tuple(draw(st.lists(KEEP_MODES, min_size=n, max_size=n)))
    trim_q, trim_k = (draw(st.booleans()), draw(st.booleans())) if trims else (False, False)
    return QKCase(shape, q_keep, k_keep, trim_q, trim_k)


BUCKET_COUNTS = st.one_of(st.sampled_from((1, 2, 3, 8)), st.integers(1, 300))


@st.composite
def hash_cases(draw, dtype: torch.dtype, with_n_buckets: bool = True, big_ids: bool = True) -> HashCase:
    shape = draw(shapes(dtype))
    n = shape.B * shape.H
    relation = draw(st.sampled_from(("independent", "same", "disjoint")))
    q_buckets = tuple(draw(st.lists(BUCKET_COUNTS, min_size=n, max_size=n)))
    k_buckets = q_buckets if relation == "same" else tuple(draw(st.lists(BUCKET_COUNTS, min_size=n, max_size=n)))
    extra = draw(st.one_of(st.none(), st.integers(0, 5))) if with_n_buckets else None
    # Large sparse ids (up to ~1.3e9 < 2**31, like raw hash values) only where no n_buckets is
    # given or derived from the ids: a layout may size tables by the number of buckets.
    big = big_ids and extra is None
    stride = draw(st.sampled_from((1, 7, 2**21) if big else (1, 7)))
    id_dtype = draw(st.sampled_from((torch.int64, torch.int32)))
    return HashCase(shape, q_buckets, k_buckets, relation, stride, id_dtype, extra)


# ---------------------------------------------------------------------------
# Building the inputs of a case
# ---------------------------------------------------------------------------


def _tensors(shape: Shape, gen: torch.Generator):
    size = (shape.B, shape.H, shape.N, shape.D)
    return tuple(torch.randn(size, generator=gen).to(shape.dtype) for _ in range(4))


def _keep(shape: Shape, modes, gen: torch.Generator) -> torch.Tensor:
    N = shape.N
    keep = torch.zeros(shape.B * shape.H, N, dtype=torch.bool)
    for i, mode in enumerate(modes):
        if mode == "all":
            keep[i] = True
        elif mode == "first":
            keep[i, 0] = True
        elif mode == "last":
            keep[i, N - 1] = True
        elif mode != "none":
            keep[i] = torch.rand(N, generator=gen) < mode
    return keep.view(shape.B, shape.H, N)


def qk_inputs(case: QKCase):
    s = case.shape
    gen = s.generator()
    q, k, v, do = _tensors(s, gen)
    return q, k, v, do, _keep(s, case.q_keep, gen), _keep(s, case.k_keep, gen)


def hash_inputs(case: HashCase):
    s = case.shape
    gen = s.generator()
    q, k, v, do = _tensors(s, gen)

    def ids(counts):
        raw = torch.stack([torch.randint(0, c, (s.N,), generator=gen) for c in counts])
        return raw.view(s.B, s.H, s.N)

    qb = ids(case.q_buckets)
    if case.relation == "same":
        kb = qb
    elif case.relation == "disjoint":
        qb, kb = 2 * qb, 2 * ids(case.k_buckets) + 1
    else:
        kb = ids(case.k_buckets)
    qb, kb = (qb * case.stride).to(case.id_dtype), (kb * case.stride).to(case.id_dtype)
    if case.relation == "same":
        kb = qb
    n_buckets = None
    if case.n_buckets_extra is not None:
        n_buckets = int(max(qb.max(), kb.max())) + 1 + case.n_buckets_extra
    return q, k, v, do, qb, kb, n_buckets


# ---------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------


def _reference(q, k, v, do, mask, sm_scale):
    return grads(lambda q, k, v: ref.attention(q, k, v, mask, sm_scale), q.double(), k.double(), v.double(),
                 do.double())


def _compare(got, want, row_empty, col_empty, dtype, floor, what=""):
    """``got``/``want``: ``(out, dq, dk, dv)``.  ``row_empty`` (B, H, Nq): rows with no
    allowed key; ``col_empty`` (B, H, Nk): keys no query may see.  ``floor``: the errors
    that the rounding of the kernel's stored output alone causes (``rounding_floor``),
    added to the gradient tolerance.

    Checked in this order: shapes, dtypes, finiteness, exact zeros, output error, and
    last the gradient errors."""
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape, f"{what}{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert a.dtype == dtype, f"{what}{name}: dtype {a.dtype} != {dtype}"
        assert torch.isfinite(a).all(), f"{what}{name}: {int((~torch.isfinite(a)).sum())} non-finite entries"
    out, dq, dk, dv = got
    for name, t, empty in (("out", out, row_empty), ("dq", dq, row_empty), ("dk", dk, col_empty),
                           ("dv", dv, col_empty)):
        bad = int((t[empty] != 0).any(-1).sum())
        assert bad == 0, f"{what}{name}: {bad} rows that should be exactly 0 are not"
    errors = {name: err(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), got, want)}
    bounds = {name: GRAD_TOL[dtype] + f for name, f in zip(("dq", "dk", "dv"), floor[1:])}
    note(f"{what}errors: " + ", ".join(f"{n}={e:.3g}" for n, e in errors.items())
         + "; gradient bounds (tolerance + rounding floor): " + ", ".join(f"{n}={b:.3g}" for n, b in bounds.items()))
    assert errors["out"] <= TOL[dtype], f"{what}out: error {errors['out']:.3g} > {TOL[dtype]:g}"
    for name, bound in bounds.items():
        assert errors[name] <= bound, (f"{what}{name}: error {errors[name]:.3g} > {bound:.3g} "
                                       f"({', '.join(f'{n}={e:.3g}' for n, e in errors.items())})")


def _describe_keep(name, keep):
    note(f"{name} kept per head: {keep.sum(-1).flatten().tolist()} of {keep.shape[-1]}")


def check_qk(case: QKCase) -> None:
    s = case.shape
    q, k, v, do, q_keep, k_keep = qk_inputs(case)
    _describe_keep("q", q_keep)
    _describe_keep("k", k_keep)
    got = grads(lambda q, k, v: qk_sparse_attention(q, k, v, q_keep, k_keep, s.sm_scale,
                                                    kernel_options=s.kernel_options), q, k, v, do)
    mask = ref.qk_dropping_mask(q_keep, k_keep)
    want = _reference(q, k, v, do, mask, s.sm_scale)
    # dropped queries/keys are in the empty rows/columns of the mask
    assert not (mask.any(-1) & ~q_keep).any() and not (mask.any(-2) & ~k_keep).any()
    floor = rounding_floor(want, got[0], q, k, v, do, mask, s.sm_scale)
    _compare(got, want, ~mask.any(-1), ~mask.any(-2), s.dtype, floor)


def check_hash(case: HashCase) -> None:
    s = case.shape
    q, k, v, do, qb, kb, n_buckets = hash_inputs(case)
    note(f"ids: q in [{int(qb.min())}, {int(qb.max())}], k in [{int(kb.min())}, {int(kb.max())}], "
         f"n_buckets={n_buckets}")
    kw = dict(kernel_options=s.kernel_options)
    if n_buckets is not None:
        kw["n_buckets"] = n_buckets
    got = grads(lambda q, k, v: hash_sparse_attention(q, k, v, qb, kb, s.sm_scale, **kw), q, k, v, do)
    mask = ref.hash_mask(qb, kb)
    want = _reference(q, k, v, do, mask, s.sm_scale)
    floor = rounding_floor(want, got[0], q, k, v, do, mask, s.sm_scale)
    _compare(got, want, ~mask.any(-1), ~mask.any(-2), s.dtype, floor)


def _gather_rows(x, index):
    """(B, H, N) per-token tensor into the layout's slot order."""
    return x.gather(-1, index)


def _check_permuted(s: Shape, q, k, v, do, mask, q_index, k_index, q_pos, k_pos, q_sorted=None, k_sorted=None):
    """Run ``permuted_attention`` on the gathered tensors and compare in slot order
    with the token-order reference gathered the same way."""
    n_q, n_k = q_index.shape[-1], k_index.shape[-1]
    want = _reference(q, k, v, do, mask, s.sm_scale)
    want = (gather_tokens(want[0], q_index), gather_tokens(want[1], q_index),
            gather_tokens(want[2], k_index), gather_tokens(want[3], k_index))
    qs, ks, vs, dos = (gather_tokens(q, q_index), gather_tokens(k, k_index), gather_tokens(v, k_index),
                       gather_tokens(do, q_index))
    note(f"slots: {n_q} query, {n_k} key")
    got = grads(lambda q, k, v: permuted_attention(q, k, v, q_pos, k_pos, q_sorted, k_sorted, s.sm_scale,
                                                   kernel_options=s.kernel_options), qs, ks, vs, dos)
    row_empty = _gather_rows(~mask.any(-1), q_index)
    col_empty = _gather_rows(~mask.any(-2), k_index)
    # padding slots hold dropped tokens: they must be among the empty ones
    assert row_empty[q_pos < 0].all() and col_empty[k_pos < 0].all()
    slot_mask = mask.gather(-2, q_index[..., None].expand(*q_index.shape, mask.shape[-1]))
    slot_mask = slot_mask.gather(-1, k_index[..., None, :].expand(*q_index.shape, n_k))
    floor = rounding_floor(want, got[0], qs, ks, vs, dos, slot_mask, s.sm_scale)
    _compare(got, want, row_empty, col_empty, s.dtype, floor, "permuted ")


def check_permuted_compacted(case: QKCase) -> None:
    """The layout ``qk_sparse_attention`` builds (``compact_layout``), optionally with the
    all-padding tail cut off (then ``Nq != Nk``), given to ``permuted_attention``."""
    s = case.shape
    q, k, v, do, q_keep, k_keep = qk_inputs(case)
    _describe_keep("q", q_keep)
    _describe_keep("k", k_keep)
    q_index, q_pos = compact_layout(q_keep)
    k_index, k_pos = compact_layout(k_keep)
    if case.trim_q:
        n = max(1, int(q_keep.sum(-1).max()))
        q_index, q_pos = q_index[..., :n], q_pos[..., :n]
    if case.trim_k:
        n = max(1, int(k_keep.sum(-1).max()))
        k_index, k_pos = k_index[..., :n], k_pos[..., :n]
    _check_permuted(s, q, k, v, do, ref.qk_dropping_mask(q_keep, k_keep), q_index, k_index, q_pos, k_pos)


def check_permuted_bucketed(case: HashCase) -> None:
    """The layout ``hash_sparse_attention`` builds (``bucket_sort_layout``), given to
    ``permuted_attention`` with its sorted bucket ids."""
    s = case.shape
    q, k, v, do, qb, kb, _ = hash_inputs(case)
    note(f"ids: q in [{int(qb.min())}, {int(qb.max())}], k in [{int(kb.min())}, {int(kb.max())}]")
    q_index, q_pos, q_sorted = bucket_sort_layout(qb)
    k_index, k_pos, k_sorted = bucket_sort_layout(kb)
    _check_permuted(s, q, k, v, do, ref.hash_mask(qb, kb), q_index, k_index, q_pos, k_pos, q_sorted, k_sorted)


# ---------------------------------------------------------------------------
# The tests (explicit examples first: the edge cases every run covers)
# ---------------------------------------------------------------------------


def _shape(N, D=32, dtype=torch.float32, B=1, H=2, sm_scale=None, bm=16, bn=16, seed=0):
    return Shape(B, H, N, D, dtype, sm_scale, bm, bn, seed)


def _bf16(case):
    """The same case in bfloat16."""
    return replace(case, shape=replace(case.shape, dtype=torch.bfloat16))


def _examples(*cases):
    def decorate(test):
        for case in reversed(cases):
            test = example(case=case)(test)
        return test
    return decorate


QK_EXAMPLES = (
    QKCase(_shape(1), ("all", "none"), ("all", "all")),
    QKCase(_shape(7, D=80), ("none", "all"), ("all", "none")),
    QKCase(_shape(100, D=16, bm=32, sm_scale=0.3), (0.1, "all"), ("none", 0.5)),
    QKCase(_shape(200, D=128, H=1, bm=32, bn=32), ("last",), ("first",)),
)
HASH_EXAMPLES = (
    HashCase(_shape(1), (1, 1), (1, 1)),
    HashCase(_shape(7, D=64), (300, 1), (300, 1), "same", n_buckets_extra=0),
    HashCase(_shape(100, D=16, bm=32, bn=16), (3, 200), (3, 200), "independent", stride=2**21),
    HashCase(_shape(30, D=16, bm=32, bn=16), (250, 2), (250, 3), "independent", stride=7, n_buckets_extra=5),
    HashCase(_shape(100, D=128, H=1, bm=32, bn=32), (4,), (4,), "disjoint", n_buckets_extra=3),
    HashCase(_shape(50, D=80, B=2, H=1), (8, 8), (2, 1), "independent", id_dtype=torch.int32, n_buckets_extra=1),
)
COMPACTED_EXAMPLES = (
    QKCase(_shape(100, bm=32, bn=16), (0.3, "none"), ("all", 0.05), trim_q=True, trim_k=True),
    QKCase(_shape(7, D=16), ("all", "first"), ("last", "none"), trim_q=True),
)
BUCKETED_EXAMPLES = (
    HashCase(_shape(100, bm=16, bn=32), (5, 1), (5, 1), "same"),
    HashCase(_shape(7, D=32), (2, 300), (3, 300), "independent"),
)


@settings(max_examples=25, **SETTINGS)
@given(case=qk_cases(torch.float32))
@_examples(*QK_EXAMPLES)
def test_qk_sparse_attention(case):
    check_qk(case)


@settings(max_examples=15, **SETTINGS)
@given(case=qk_cases(torch.bfloat16))
@_examples(*(_bf16(c) for c in QK_EXAMPLES[1:3]))
def test_qk_sparse_attention_bf16(case):
    check_qk(case)


@settings(max_examples=10, **SETTINGS)
@given(case=hash_cases(torch.float32))
@_examples(*HASH_EXAMPLES)
def test_hash_sparse_attention(case):
    check_hash(case)


@settings(max_examples=5, **SETTINGS)
@given(case=hash_cases(torch.bfloat16))
@_examples(*(_bf16(c) for c in HASH_EXAMPLES[1:3]))
def test_hash_sparse_attention_bf16(case):
    check_hash(case)


@settings(max_examples=15, **SETTINGS)
@given(case=qk_cases(torch.float32, trims=True))
@_examples(*COMPACTED_EXAMPLES)
def test_permuted_attention_compacted(case):
    check_permuted_compacted(case)


@settings(max_examples=10, **SETTINGS)
@given(case=qk_cases(torch.bfloat16, trims=True))
@_examples(*(_bf16(c) for c in COMPACTED_EXAMPLES[:1]))
def test_permuted_attention_compacted_bf16(case):
    check_permuted_compacted(case)


@settings(max_examples=5, **SETTINGS)
@given(case=hash_cases(torch.float32, with_n_buckets=False, big_ids=False))
@_examples(*BUCKETED_EXAMPLES)
def test_permuted_attention_bucketed(case):
    check_permuted_bucketed(case)


@settings(max_examples=6, **SETTINGS)
@given(case=hash_cases(torch.bfloat16, with_n_buckets=False, big_ids=False))
@_examples(*(_bf16(c) for c in BUCKETED_EXAMPLES[1:]))
def test_permuted_attention_bucketed_bf16(case):
    check_permuted_bucketed(case)
