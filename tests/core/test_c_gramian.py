"""The C Gramian kernel (issue 12): the exact float64 Gramian of float32 rows in one read of G.

It must give the exact Gramian (float32 products are exact in float64; only the order of the
float64 sums differs from BLAS's), the same bits for any thread count and vector width (DDP
ranks agree whatever their CPU), act wherever it is named or chosen by ``"auto"`` (GradVac's
per-layer Gramians too), fall back to BLAS with a warning when it cannot be built, and be
refused where named and unusable. The tests need a C compiler (the first one builds the
library into a temporary cache, ~0.3 s).
"""
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from mtl_plugins.core.aggregation import build_aggregator
from mtl_plugins.core.aggregation import c_gramian
from mtl_plugins.core.aggregation._utils import gramian64
from mtl_plugins.core.aggregation.c_gramian import c_block_gramians64, c_gramian64
from mtl_plugins.core.backward import TaskBackward
from mtl_plugins.core.tasks import MTLConfigError

from ._engine_models import (TASKS, TinyMTL, assert_same_steps, batch, engine_step,
                             kernel_steps, nearly_collinear)

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None,
                                reason="the C Gramian kernel needs a C compiler")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    """Build into a cache of this test session (once), and forget the process's library."""
    monkeypatch.setenv("MTL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mtl_cache"))
    library = c_gramian._library  # (a test may replace it: clear the real one)
    library.cache_clear()
    yield
    library.cache_clear()


def _exact(G: torch.Tensor) -> torch.Tensor:
    return G.double() @ G.double().T


@pytest.mark.parametrize("coef", [(1.0,), (1.0, -0.5), (1.0, -0.5, 2.0), (1.0, -0.5, 2.0, 0.3),
                                  (1.0, -0.5, 2.0, 0.3, -1.5, 0.7, 1.1)])
def test_c_gramian_is_the_exact_float64_gramian(coef):
    """T = 1..7 (one, two and three row tiles), a width with a tail of 1 column past the 16
    lanes and more than one 65536-column item."""
    G = nearly_collinear(coef, P=2 * 65_536 + 17)
    got = c_gramian64(G)
    assert got.dtype == torch.float64 and got.shape == (len(coef), len(coef))
    assert torch.equal(got, got.T)
    assert torch.allclose(got, _exact(G), rtol=1e-13, atol=0)
    assert torch.allclose(got, gramian64(G), rtol=1e-13, atol=0)
    if len(coef) > 1:  # the kernel really sums in float64: a float32 Gramian is far off
        assert not torch.allclose((G @ G.T).double(), _exact(G), rtol=1e-9, atol=0)


@pytest.mark.parametrize("width", [0, 1, 15, 16, 17, 2049])
def test_any_width_and_a_row_stride_wider_than_the_rows(width):
    G = torch.randn(3, width + 9)[:, 4:4 + width]  # rows 9 floats apart, not at offset 0
    assert G.stride() == (width + 9, 1)
    torch.testing.assert_close(c_gramian64(G), _exact(G), rtol=1e-13, atol=0)


def test_the_same_bits_for_any_thread_count_and_vector_width():
    """The summation order is fixed by the source: 1, 2 and 3 threads and the architecture's
    baseline vectors (2 doubles) give this CPU's library's bits exactly (13 items of 65536
    columns: each of 3 threads gets at least 4, so all three start)."""
    G = torch.randn(5, 12 * 65_536 + 3)
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(c_gramian64(G))
    finally:
        torch.set_num_threads(before)
    baseline = c_gramian._bind(c_gramian.ctypes.CDLL(str(c_gramian._build(baseline=True))))
    runs.append(c_gramian._gramians(baseline, G, torch.tensor([0, G.shape[1]]))[0])
    for run in runs[1:]:
        assert torch.equal(run, runs[0])


def test_block_gramians_are_each_blocks_exact_gramian():
    """GradVac's per-layer Gramians in one call: narrow blocks, an empty one and one wider than
    an item."""
    G = nearly_collinear((1.0, -0.5, 2.0), P=150_000)
    sizes = [1, 7, 0, 4096, 140_000, 5_896]
    got = c_block_gramians64(G, sizes)
    assert got.shape == (6, 3, 3)
    for b, block in enumerate(torch.split(G, sizes, dim=1)):
        assert torch.allclose(got[b], gramian64(block), rtol=1e-13, atol=1e-300), b
    with pytest.raises(ValueError, match=r"sizes: expected non-negative widths summing to "
                                         r"150000, got \[1, 2\]"):
        c_block_gramians64(G, [1, 2])


def test_rows_it_does_not_take_are_refused():
    for G in (torch.randn(3, 10, dtype=torch.float64), torch.randn(3, 10).bfloat16(),
              torch.randn(10, 3).T, torch.randn(0, 10)):
        assert not c_gramian.supports(G)
        with pytest.raises(ValueError, match="expected a .T >= 1, P. float32 CPU matrix"):
            c_gramian64(G)


def test_the_library_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTL_CACHE_DIR", str(tmp_path))
    c_gramian._library.cache_clear()
    assert c_gramian.unavailable() == ""
    built = list((tmp_path / "kernels").glob("gramian-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    c_gramian._library.cache_clear()
    c_gramian64(torch.randn(2, 100))
    assert [p.stat().st_mtime_ns for p in (tmp_path / "kernels").glob("*")] == [stamp]


def test_without_a_compiler_the_kernel_is_unavailable_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("MTL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-here")
    c_gramian._library.cache_clear()
    assert "no C compiler: 'no-such-compiler-here' is not on PATH" in c_gramian.unavailable()
    monkeypatch.setenv("CC", shutil.which("false") or "false")
    c_gramian._library.cache_clear()
    assert "failed on gramian.c" in c_gramian.unavailable()
    with pytest.raises(RuntimeError, match="the C Gramian kernel is unavailable"):
        c_gramian64(torch.randn(2, 10))


def _spy(monkeypatch, name):
    calls = []
    real = getattr(c_gramian, name)
    monkeypatch.setattr(c_gramian, name, lambda grads, *a: calls.append(grads.shape) or
                        real(grads, *a))
    return calls


@pytest.mark.parametrize("name,level", [("pcgrad", "parameter"), ("upgrad", "parameter"),
                                        ("mgda", "representation")])
def test_auto_and_c_take_the_c_kernel_and_give_the_blas_step(name, level, monkeypatch):
    """At parameter level the kernel forms the Gramian from the per-task rows
    (``SegmentedRows``), at representation level from G."""
    if level == "parameter":
        calls = []
        real = c_gramian.SegmentedRows.gramian
        monkeypatch.setattr(c_gramian.SegmentedRows, "gramian",
                            lambda self: calls.append(self.t) or real(self))
    else:
        calls = _spy(monkeypatch, "c_gramian64")
    steps = kernel_steps(("blas", "auto", "c"), lambda: build_aggregator(name), level=level)
    assert len(calls) == 2  # "auto" and "c" formed their Gramian with the kernel, "blas" not
    assert_same_steps(steps["auto"], steps["blas"])
    assert_same_steps(steps["c"], steps["blas"])


def test_gradvac_takes_its_layer_gramians_from_the_c_kernel(monkeypatch):
    """From the per-task rows (one Gramian per parameter) with the engine's layers, from G
    with layers of its own (``group_sizes``)."""
    calls = []
    real = c_gramian.SegmentedRows.gramian
    monkeypatch.setattr(c_gramian.SegmentedRows, "gramian",
                        lambda self, per_segment=False: calls.append(per_segment) or
                        real(self, per_segment))
    steps = kernel_steps(("blas", "auto"), lambda: build_aggregator("gradvac", beta=0.5, seed=3),
                         steps=2)  # EMA targets move
    assert calls == [True, True]
    assert_same_steps(steps["auto"], steps["blas"], rows=True)
    block_calls = _spy(monkeypatch, "c_block_gramians64")
    own = [6 * 16 + 16, 16 * 8 + 8]  # TinyMTL's encoder: two layers of weight and bias
    steps = kernel_steps(("blas", "auto"), lambda: build_aggregator(
        "gradvac", beta=0.5, seed=3, group_sizes=own), steps=2)
    assert len(block_calls) == 2 and calls == [True, True]
    assert_same_steps(steps["auto"], steps["blas"])


def test_auto_without_the_kernel_warns_and_uses_blas(monkeypatch):
    monkeypatch.setattr(c_gramian, "_library", lambda: (None, "OSError: no C compiler"))
    c_calls = _spy(monkeypatch, "c_gramian64")
    x, y = batch()
    engine = TaskBackward(TASKS, build_aggregator("pcgrad"), gramian_kernel="auto")
    with pytest.warns(RuntimeWarning, match=r"gramian_kernel='auto': the C Gramian kernel "
                                            r"cannot be built \(OSError: no C compiler\)"):
        result, _ = engine_step(TinyMTL(), engine, x, y)
    assert c_calls == [] and result.gramian is not None
    with pytest.raises(MTLConfigError, match=r"gramian_kernel='c': the C Gramian kernel cannot "
                                             r"be built on this machine \(OSError: no C "
                                             r"compiler\); expected a C compiler"):
        TaskBackward(TASKS, build_aggregator("pcgrad"), gramian_kernel="c")


def test_auto_is_quiet_and_uses_blas_for_rows_the_kernel_does_not_take(monkeypatch):
    """Float64 task gradients (a float64 model): "auto" takes BLAS without a warning, "c" is
    refused at the step naming the dtype, before the optimizer could move a weight."""
    calls = _spy(monkeypatch, "c_gramian64")
    x, y = batch()
    model = TinyMTL().double()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        engine_step(model, TaskBackward(TASKS, build_aggregator("pcgrad")), x.double(),
                    y.double())
    assert calls == []
    engine = TaskBackward(TASKS, build_aggregator("pcgrad"), gramian_kernel="c")
    with pytest.raises(MTLConfigError, match=r"gramian_kernel='c': the C kernel takes float32 "
                                             r"task gradients on a CPU with contiguous columns, "
                                             r"got torch.float64 on cpu with strides"):
        engine_step(model, engine, x.double(), y.double())


def test_a_damaged_cached_library_is_built_again(tmp_path, monkeypatch):
    """A cached file that does not load (a crash left it truncated) is compiled again, in a
    fresh process (this one has the library mapped: its file is replaced, never rewritten)."""
    monkeypatch.setenv("MTL_CACHE_DIR", str(tmp_path))
    c_gramian._library.cache_clear()
    assert c_gramian.unavailable() == ""
    built, = (tmp_path / "kernels").glob("gramian-*.so")
    damaged = tmp_path / "damaged"
    damaged.write_bytes(b"truncated by a crash")
    os.replace(damaged, built)
    probe = ("import torch; from mtl_plugins.core.aggregation import c_gramian as c; "
             "G = torch.randn(2, 50); print(repr(c.unavailable()), "
             "torch.allclose(c.c_gramian64(G), G.double() @ G.double().T, rtol=1e-13, atol=0))")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=dict(os.environ, MTL_CACHE_DIR=str(tmp_path)), timeout=120)
    assert run.stdout.split() == ["''", "True"], run.stderr[-2000:]
    assert built.stat().st_size > 1000


def test_cc_may_be_a_command_with_words(tmp_path, monkeypatch):
    monkeypatch.setenv("MTL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", f"env {shutil.which(os.environ.get('CC') or 'cc')}")
    c_gramian._library.cache_clear()
    assert c_gramian.unavailable() == ""


def test_block_widths_must_be_integers():
    with pytest.raises(TypeError):
        c_block_gramians64(torch.randn(2, 10), [4.0, 6.0])
