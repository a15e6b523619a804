"""The fused Gramian kernel (issue 12): the exact float64 Gramian from one compiled pass over G.

``gramian_kernel="fused"`` must give the numbers of the BLAS path (float32 products are exact
in float64; only the order of the float64 sums differs), act wherever it is named (GradVac's
per-layer Gramians too), and stop naming the key when it cannot be built. The kernel is built by
``torch.compile`` (a C++ compiler on a CPU): these tests need one, and the first of them pays
the build (~15 s on an empty cache).
"""
import shutil

import pytest
import torch

from mtl_plugins.core.aggregation import build_aggregator
from mtl_plugins.core.aggregation import fused_gramian as fused_module
from mtl_plugins.core.aggregation._utils import gramian64
from mtl_plugins.core.aggregation.fused_gramian import fused_block_gramians64, fused_gramian64
from mtl_plugins.core.controller import MTLController
from mtl_plugins.core.tasks import MTLConfigError

from ._engine_models import TASKS, TinyMTL, assert_same_steps, kernel_steps, nearly_collinear

pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="torch.compile's CPU backend needs a C++ compiler")


@pytest.mark.parametrize("coef", [(1.0, -0.5, 2.0), (1.0, -0.5)])
def test_fused_gramian_is_the_exact_float64_gramian(coef):
    G = nearly_collinear(coef, P=50_001)
    t = len(coef)
    exact = G.double() @ G.double().T
    got = fused_gramian64(G)
    assert got.dtype == torch.float64 and got.shape == (t, t)
    assert torch.equal(got, got.T)
    assert torch.allclose(got, exact, rtol=1e-13, atol=0)
    assert torch.allclose(got, gramian64(G), rtol=1e-13, atol=0)
    # the kernel really sums in float64: a float32 Gramian is far off on these rows
    assert not torch.allclose((G @ G.T).double(), exact, rtol=1e-9, atol=0)


def test_fused_gramian_takes_half_precision_rows_and_any_width():
    G = nearly_collinear(P=1001).to(torch.bfloat16)
    exact = G.double() @ G.double().T
    assert torch.allclose(fused_gramian64(G), exact, rtol=1e-13, atol=0)
    narrow = torch.randn(3, 7)
    assert torch.allclose(fused_gramian64(narrow), narrow.double() @ narrow.double().T,
                          rtol=1e-13, atol=0)


@pytest.mark.parametrize("name,level", [("pcgrad", "parameter"), ("mgda", "parameter"),
                                        ("upgrad", "parameter"), ("mgda", "representation")])
def test_the_engine_gives_the_same_step_with_either_kernel(name, level, monkeypatch):
    calls = []
    monkeypatch.setattr(
        "mtl_plugins.core.aggregation.gramian_kernels.fused_gramian64",
        lambda grads: calls.append(tuple(grads.shape)) or fused_gramian64(grads))
    steps = kernel_steps(("blas", "fused"), lambda: build_aggregator(name), level=level)
    assert len(calls) == 1  # the fused engine formed its Gramian with the kernel, once
    assert_same_steps(steps["fused"], steps["blas"])


def test_block_gramians_are_each_blocks_exact_gramian(monkeypatch):
    """GradVac's per-layer Gramians: the wide blocks through the compiled kernel (one call a
    block), the narrow ones by a float64 product; each block's Gramian equals gramian64's,
    and a float32 product would not."""
    widths = []
    upper = fused_module._upper
    monkeypatch.setattr(fused_module, "_upper",
                        lambda block: widths.append(block.shape[1]) or upper(block))
    G = nearly_collinear((1.0, -0.5, 2.0), P=50_001)
    sizes = [1, 7, 4096, 40_000, 5_897]
    got = fused_block_gramians64(G, sizes)
    assert got.dtype == torch.float64 and got.shape == (5, 3, 3)
    assert widths == [4096, 40_000, 5_897]  # blocks of NARROW_BLOCK = 4096 columns and wider
    for b, block in enumerate(torch.split(G, sizes, dim=1)):
        assert torch.equal(got[b], got[b].T)
        assert torch.allclose(got[b], gramian64(block), rtol=1e-13, atol=0), b
    wide = G[:, 8 + 4096:8 + 4096 + 40_000]
    assert not torch.allclose((wide @ wide.T).double(), got[3], rtol=1e-9, atol=0)
    assert torch.equal(fused_block_gramians64(G, sizes, narrow=10 ** 6),
                       torch.stack([b.double() @ b.double().T
                                    for b in torch.split(G, sizes, dim=1)]))


def test_gradvac_takes_its_layer_gramians_from_the_kernel(monkeypatch):
    """``gramian_kernel="fused"`` with GradVac (per-layer Gramians) acts: every layer's block
    goes through the kernel (narrow blocks too, here), and the step is the BLAS one."""
    widths = []
    upper = fused_module._upper
    monkeypatch.setattr(fused_module, "_upper",
                        lambda block: widths.append(block.shape[1]) or upper(block))
    monkeypatch.setattr(fused_module, "NARROW_BLOCK", 1)
    steps = kernel_steps(("blas", "fused"),
                         lambda: build_aggregator("gradvac", beta=0.5, seed=3),
                         steps=2)  # EMA targets move
    shared = [p.numel() for p in TinyMTL().encoder.parameters()]
    assert widths == shared * 2
    assert_same_steps(steps["fused"], steps["blas"])


def test_a_kernel_that_cannot_be_built_stops_with_the_key_and_the_cause(monkeypatch):
    def broken(grads):
        raise RuntimeError("C++ compile error\nmore lines")

    monkeypatch.setattr(fused_module, "_kernel", lambda: broken)
    with pytest.raises(MTLConfigError, match=r"gramian_kernel='fused': torch.compile could not "
                                             r"build .*RuntimeError: C\+\+ compile error\)"):
        fused_gramian64(torch.randn(3, 10))


def test_the_controller_keeps_the_kernel_when_the_aggregator_is_replaced():
    ctl = MTLController(list(TASKS), aggregator="pcgrad", gramian_kernel="fused")
    assert ctl.engine.gramian_kernel == "fused"
    ctl.set_aggregator(build_aggregator("mgda"))
    assert ctl.engine.gramian_kernel == "fused"
