"""The C kernel on rows given as segments (``c_gramian.SegmentedRows``, issue 12): the
engine's per-task gradients, one tensor per parameter, without a ``[T, P]`` matrix.

The Gramian must be the exact one (float32 products exact in float64, float64 sums) with the
same bits for any thread count and vector width; ``w @ G`` must be the float64 sum rounded
once to float32, written in place into row 0's tensors by default; None segments are zeros;
tensors that do not fit are refused with their row and segment named.
"""
import math
import os
import shutil

import pytest
import torch

from mtl_plugins.core.aggregation import c_gramian
from mtl_plugins.core.aggregation._utils import gramian64
from mtl_plugins.core.aggregation.c_gramian import SegmentedRows, c_block_gramians64

from ._engine_models import nearly_collinear

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None,
                                reason="the C kernel needs a C compiler")

#: widths around the kernel's units: narrow, one lane group +-1, an item (65536) +-1, wider
SIZES = [1, 15, 16, 17, 3, 65_535, 65_536, 65_537, 140_001, 7]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MTL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mtl_cache"))


def _rows(t, sizes=SIZES, none=(), seed=0):
    """``t`` rows of random float32 segments; the ``(row, segment)`` pairs in ``none`` None."""
    g = torch.Generator().manual_seed(seed)
    return [[None if (r, s) in none else torch.randn(n, generator=g)
             for s, n in enumerate(sizes)] for r in range(t)]


def _matrix(rows, sizes=SIZES):
    """The ``[T, P]`` float64 matrix the rows stand for (None: zeros)."""
    return torch.stack([torch.cat([torch.zeros(n) if part is None else part.reshape(-1)
                                   for part, n in zip(row, sizes)]) for row in rows]).double()


def _with_threads(threads, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("t", [1, 2, 3, 4, 7])
def test_the_gramian_is_the_exact_one_of_the_matrix_they_stand_for(t):
    """T = 1..7 (one to three 3-row tiles), with None segments in several rows: equal to a
    float64 product of the matrix up to the order of the float64 sums (1e-13 of the largest
    entry; random rows' off-diagonal entries are ~1e-3 of it)."""
    rows = _rows(t, none={(0, 1), (t - 1, 7), (t // 2, 0)})
    got = SegmentedRows(rows, SIZES).gramian()
    exact = _matrix(rows) @ _matrix(rows).T
    assert got.dtype == torch.float64 and got.shape == (t, t)
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-13 * float(exact.abs().max()))
    assert torch.equal(got, got.T)


def test_nearly_collinear_rows_keep_their_small_eigenvalues():
    """The float64 sums keep what a float32 Gramian loses (as gramian64 does)."""
    G = nearly_collinear((1.0, -0.5, 2.0), P=150_000)
    sizes = [100, 70_000, 79_900]
    rows = [list(torch.split(row, sizes)) for row in G]
    got = SegmentedRows(rows, sizes).gramian()
    torch.testing.assert_close(got, gramian64(G), rtol=1e-12, atol=0)
    assert torch.linalg.eigvalsh(got)[0] > 0


def test_the_same_bits_for_any_thread_count_and_vector_width():
    rows = _rows(5, sizes=SIZES * 3, none={(2, 4)})
    runs = [_with_threads(n, lambda: SegmentedRows(rows, SIZES * 3).gramian())
            for n in (1, 2, 3)]
    baseline = c_gramian._bind(c_gramian.ctypes.CDLL(str(c_gramian._build(baseline=True))))
    segments = SegmentedRows(rows, SIZES * 3)
    segments._lib = baseline
    runs.append(segments.gramian())
    for run in runs[1:]:
        assert torch.equal(run, runs[0])


def test_combine_is_the_float64_sum_rounded_once_and_the_same_for_any_thread_count():
    rows = _rows(4, none={(1, 2), (3, 8)})
    w = torch.tensor([0.75, -1.5, 2.0, 1e-3], dtype=torch.float64)
    exact = w @ _matrix(rows)
    outs = []
    for threads in (1, 2, 3):
        out = [torch.empty(n) for n in SIZES]
        _with_threads(threads, lambda: SegmentedRows(rows, SIZES).combine(w, out))
        outs.append(torch.cat(out))
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    # within half a float32 ulp of the float64 sum (rounded once), up to the float64 sum's
    # own rounding
    assert bool(((outs[0].double() - exact).abs() <= exact.abs() * 2.0 ** -24 * 1.001).all())


def test_combine_writes_into_row_0_by_default_and_a_fresh_tensor_for_its_none_segments():
    rows = _rows(3, none={(0, 4)})
    w = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)
    exact = w @ _matrix(rows)
    pointers = [None if part is None else part.data_ptr() for part in rows[0]]
    segments = SegmentedRows(rows, SIZES)
    out = segments.combine(w)
    for s, part in enumerate(out):
        assert part.numel() == SIZES[s] and part.dtype == torch.float32
        assert pointers[s] is None or part.data_ptr() == pointers[s]
    torch.testing.assert_close(torch.cat([o.reshape(-1) for o in out]).double(), exact,
                               rtol=2e-7, atol=1e-30)


def test_per_segment_gramians_and_weights_are_the_blocks_ones():
    """GradVac's form: one Gramian per segment, bitwise the block Gramians of the matrix the
    rows stand for, and one weight vector per segment in ``combine``."""
    rows = _rows(3, none={(1, 5)})
    segments = SegmentedRows(rows, SIZES)
    blocks = segments.gramian(per_segment=True)
    assert blocks.shape == (len(SIZES), 3, 3)
    assert torch.equal(blocks, c_block_gramians64(_matrix(rows).float(), SIZES))
    w = torch.randn(len(SIZES), 3, dtype=torch.float64)
    exact = torch.cat([w[s] @ block for s, block in
                       enumerate(torch.split(_matrix(rows), SIZES, dim=1))])
    got = torch.cat([o.reshape(-1) for o in segments.combine(w)]).double()
    assert bool(((got - exact).abs() <= exact.abs() * 2.0 ** -24 * 1.001).all())


def test_segments_of_any_shape_are_read_in_memory_order():
    """A segment is a whole tensor (a conv kernel [O, I, kh, kw]): flat, as G's columns."""
    shapes = [(4, 3, 3, 3), (4,), (2, 4, 1, 1)]
    sizes = [108, 4, 8]
    rows = [[torch.randn(*shape) for shape in shapes] for _ in range(3)]
    flat = [[part.reshape(-1) for part in row] for row in rows]
    assert torch.equal(SegmentedRows(rows, sizes).gramian(),
                       SegmentedRows(flat, sizes).gramian())


def test_rows_and_tensors_that_do_not_fit_are_refused():
    rows = _rows(2, sizes=[4, 6])
    with pytest.raises(ValueError, match=r"rows: expected T >= 1 rows of 2 segments each "
                                         r"\(one per size\), got \[2, 1\]"):
        SegmentedRows([rows[0], rows[1][:1]], [4, 6])
    bad = [
        (torch.randn(6, dtype=torch.float64), "torch.float64"),
        (torch.randn(7), "of 7 elements"),
        (torch.randn(3, 2).t(), r"strides \(1, 2\)"),
        (torch.randn(6).to_sparse(), "torch.sparse_coo"),
    ]
    for part, what in bad:
        with pytest.raises(ValueError, match=r"rows\[1\]\[1\]: expected a contiguous float32 "
                                             r"CPU tensor of 6 elements or None, got .*" + what):
            SegmentedRows([rows[0], [rows[1][0], part]], [4, 6])
    segments = SegmentedRows(rows, [4, 6])
    with pytest.raises(ValueError, match=r"weights: expected \[2\] \(one per row\) or \[2, 2\] "
                                         r"\(per segment\), got \(3,\)"):
        segments.combine(torch.ones(3))
    with pytest.raises(ValueError, match=r"out: expected 2 contiguous float32 CPU tensors of "
                                         r"the segments' sizes \[4, 6\]"):
        segments.combine(torch.ones(2), [torch.empty(4), torch.empty(5)])


def test_sums64_are_float64_sums_finite_iff_their_tensor_is():
    """The engine's NaN/inf check of the head gradients: float64 sums that finite float32
    entries cannot overflow (3e38 each), NaN/inf when an entry is; None for tensors it does
    not take (torch sums those)."""
    tensors = [torch.randn(n) for n in (0, 1, 7, 33, 100_003)] + [torch.randn(3, 4)]
    got = c_gramian.sums64(tensors)
    for value, t in zip(got, tensors):
        assert value == pytest.approx(float(t.double().sum()), rel=1e-12, abs=1e-12)
    big = torch.full((1000,), 3e38)
    assert c_gramian.sums64([big]) == [pytest.approx(3e41)]
    for bad in (float("nan"), float("inf"), -float("inf")):
        spoiled = big.clone()
        spoiled[17] = bad
        assert not math.isfinite(c_gramian.sums64([torch.randn(5), spoiled])[1])
    assert c_gramian.sums64([torch.randn(4, dtype=torch.float64)]) is None
    assert c_gramian.sums64([torch.randn(4, 2).t()]) is None
