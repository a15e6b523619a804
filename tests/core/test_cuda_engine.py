"""CUDA only: the backward engine's CUDA paths (``vjp="batched"``, float16 autocast with the
engine's loss scaler, the fused Gramian kernels). Skipped without a CUDA device;
``tools/gpu_check.sh`` runs them."""
import pytest
import torch

from mtl_plugins.core.aggregation import build_aggregator
from mtl_plugins.core.amp import DynamicLossScaler
from mtl_plugins.core.backward import TaskBackward, split_parameters

from ._engine_models import TASKS, Recorder, TinyMTL, batch, task_losses

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _grads(vjp, aggregator, autocast=False, scaler=None):
    model = TinyMTL().cuda()
    x, y = (t.cuda() for t in batch())
    engine = TaskBackward(TASKS, aggregator, vjp=vjp, loss_scaler=scaler)
    with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
        _, out = model(x)
        losses = task_losses(out, y)
    shared, heads = split_parameters(model.encoder, model.heads)
    result = engine(losses, shared, heads)
    return result, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["pcgrad", "mgda", "cagrad", "upgrad"])
def test_batched_vjp_equals_sequential_on_cuda(name):
    (_, seq), (_, bat) = (_grads(v, build_aggregator(name).cuda())
                          for v in ("sequential", "batched"))
    assert seq.keys() == bat.keys() and len(seq) == len(list(TinyMTL().parameters()))
    for n in seq:
        assert seq[n].device.type == "cuda"
        torch.testing.assert_close(seq[n], bat[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("vjp", ["sequential", "batched"])
def test_float16_autocast_with_loss_scaler_matches_float32(vjp):
    rec16, rec32 = Recorder(), Recorder()
    scaler = DynamicLossScaler(init_scale=1024.0, growth_interval=1)
    result, g16 = _grads(vjp, rec16, autocast=True, scaler=scaler)
    _, g32 = _grads(vjp, rec32)
    assert not result.found_inf and scaler.scale == 2048.0  # grew after a finite step
    assert rec16.seen.dtype == torch.float32  # the aggregator sees unscaled float32 rows
    torch.testing.assert_close(rec16.seen, rec32.seen, atol=2e-2, rtol=2e-2)
    for n in g32:
        torch.testing.assert_close(g16[n], g32[n], atol=2e-2, rtol=2e-2, msg=n)


def test_float16_overflow_skips_and_backs_off():
    scaler = DynamicLossScaler(init_scale=2.0 ** 120)
    result, _ = _grads("sequential", Recorder(), autocast=True, scaler=scaler)
    assert result.found_inf and scaler.scale == 2.0 ** 119


def test_fused_gramian_kernel_on_cuda_is_the_exact_gramian():
    """``gramian_kernel="fused"`` on CUDA (a Triton kernel): the float64 Gramian of float32
    rows, as ``gramian64`` forms it, and the engine's step unchanged."""
    from mtl_plugins.core.aggregation._utils import gramian64
    from mtl_plugins.core.aggregation.fused_gramian import fused_gramian64

    G = torch.randn(3, 1_000_003, device="cuda")
    exact = G.double() @ G.double().T
    got = fused_gramian64(G)
    assert got.device.type == "cuda" and got.dtype == torch.float64
    torch.testing.assert_close(got, exact, rtol=1e-12, atol=0)
    torch.testing.assert_close(got, gramian64(G), rtol=1e-12, atol=0)
    model = TinyMTL().cuda()
    x, y = (t.cuda() for t in batch())
    steps = {}
    for kernel in ("blas", "fused"):
        model.zero_grad(set_to_none=True)
        _, out = model(x)
        shared, heads = split_parameters(model.encoder, model.heads)
        TaskBackward(TASKS, build_aggregator("pcgrad").cuda(), gramian_kernel=kernel)(
            task_losses(out, y), shared, heads)
        steps[kernel] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n, g in steps["blas"].items():
        torch.testing.assert_close(steps["fused"][n], g, atol=1e-6, rtol=1e-5, msg=n)


def test_fused_block_gramians_on_cuda_are_each_blocks_exact_gramian():
    """GradVac's per-layer Gramians from the Triton kernel (wide blocks) and a float64
    product (narrow ones), on the device, no host copy of G."""
    from mtl_plugins.core.aggregation.fused_gramian import fused_block_gramians64

    G = torch.randn(3, 300_001, device="cuda")
    sizes = [7, 4096, 200_000, 95_898]
    got = fused_block_gramians64(G, sizes)
    assert got.device.type == "cuda" and got.dtype == torch.float64 and got.shape == (4, 3, 3)
    for b, block in enumerate(torch.split(G, sizes, dim=1)):
        torch.testing.assert_close(got[b], block.double() @ block.double().T, rtol=1e-12,
                                   atol=0, msg=str(b))
