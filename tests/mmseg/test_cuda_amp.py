"""CUDA only: float16 AMP through MTLOptimWrapper (``amp=True``), for each allocation mode and
with gradient surgery (parameter level, sequential and batched VJP; representation level).
Skipped without a CUDA device; ``tools/gpu_check.sh`` runs them."""
import pytest
import torch

from .test_segmentor import _batch, _build

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

TASKS = ["seg", "depth", "normal"]


@pytest.mark.parametrize("mode,extra", [
    ("ft", {}), ("sta", {}), ("ista", {}), ("sta", {"balancer": "uncertainty"}),
    ("ft", {"aggregator": "pcgrad"}), ("ft", {"aggregator": "pcgrad", "vjp": "batched"}),
    ("ft", {"aggregator": "mgda", "level": "representation"})],
    ids=["ft", "sta", "ista", "sta_uncertainty", "pcgrad", "pcgrad_batched", "mgda_repr"])
def test_mtl_optim_wrapper_float16_amp(mode, extra):
    from mmseg.registry import OPTIM_WRAPPERS

    from mtl_plugins.mmseg.loops import available_tasks, set_allocation

    model = _build().cuda()
    mtl = dict(tasks=TASKS, allocation=dict(mode=mode, k=1, seed=0), **extra)
    wrapper = OPTIM_WRAPPERS.build(dict(type="MTLOptimWrapper", mtl=mtl, amp=True,
                                        optimizer=torch.optim.SGD(model.parameters(), lr=0.01)))
    batch = _batch()
    ctl = wrapper.controller
    assert ctl.loss_scaler is not None
    finite_steps = 0
    for _ in range(3):
        n = ctl.start_batch(available_tasks(batch["data_samples"], TASKS)) if mode != "ft" else 1
        for _ in range(n):
            if mode != "ft":
                set_allocation(batch["data_samples"], ctl.next_mask(), TASKS)
            before = {k: v.detach().clone() for k, v in model.named_parameters()}
            model.train_step(batch, wrapper)
            after = dict(model.named_parameters())
            moved = sum(not torch.equal(before[k], v) for k, v in after.items())
            if wrapper.last_result.found_inf:
                assert moved == 0
            else:
                finite_steps += 1
                assert moved > 0
            assert all(torch.isfinite(v).all() for v in after.values())
            assert all(v.device.type == "cuda" for v in after.values())
    assert finite_steps > 0
