"""MultiTaskMetric on hand-made predictions; MTLOptimWrapper under AMP and under mmengine's DDP."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mtl_plugins.mmseg  # noqa: F401
from mtl_plugins.mmseg.metric import MultiTaskMetric

from .test_segmentor import _batch, _build, _wrapper


def _sample(seg_pred, seg_gt, depth_pred, depth_gt, normal_pred, normal_gt, tasks):
    return {"mtl_tasks": tasks,
            "pred_sem_seg": {"data": seg_pred}, "gt_sem_seg": {"data": seg_gt},
            "pred_depth_map": {"data": depth_pred}, "gt_depth_map": {"data": depth_gt},
            "pred_normal_map": {"data": normal_pred}, "gt_normal_map": {"data": normal_gt}}


def test_multitask_metric_hand_computed_and_delta_m(tmp_path):
    seg_gt = torch.tensor([[[0, 0], [1, 1]]])
    seg_pred = torch.tensor([[[0, 1], [1, 1]]])         # IoU: class 0 1/2, class 1 2/3
    depth_gt = torch.tensor([[[1.0, 2.0], [0.0, 4.0]]])  # one invalid pixel
    depth_pred = torch.tensor([[[1.5, 2.0], [9.0, 3.0]]])  # |err| 0.5, 0, 1 -> mean 0.5
    up = torch.zeros(3, 2, 2)
    up[1] = 1.0
    tilted = up.clone()
    tilted[:, 0, 0] = torch.tensor([1.0, 1.0, 0.0]) / 2 ** 0.5  # 45 degrees off
    baseline = tmp_path / "stl.json"
    baseline.write_text(json.dumps({"seg": {"mIoU": 50.0}, "depth": {"abs_err": 0.25},
                                    "normal": {"mean": 22.5}}))
    dump = tmp_path / "out.json"
    metric = MultiTaskMetric(tasks=["seg", "depth", "normal"], baseline_file=str(baseline),
                             dump_file=str(dump))
    metric.dataset_meta = {"classes": ("a", "b")}
    metric.process({}, [_sample(seg_pred, seg_gt, depth_pred, depth_gt, tilted, up,
                                ("seg", "depth", "normal")),
                        # a sample without depth labels is skipped for depth only
                        _sample(seg_gt, seg_gt, depth_pred * 0 + 7.0, depth_gt, up, up,
                                ("seg", "normal"))])
    out = metric.compute_metrics(metric.results)
    # seg over both samples: class 0 TP 1+2, union 2+2 -> 3/4; class 1 TP 2+2, union 3+2 -> 4/5
    assert out["seg/mIoU"] == pytest.approx(100 * (3 / 4 + 4 / 5) / 2)
    assert out["depth/abs_err"] == pytest.approx(0.5)
    assert out["normal/mean"] == pytest.approx(45.0 / 8, abs=1e-3)   # one pixel of 8 at 45°
    expected = ((out["seg/mIoU"] - 50) / 50 - (0.5 - 0.25) / 0.25 - (45 / 8 - 22.5) / 22.5) / 3
    assert out["delta_m"] == pytest.approx(100 * expected, rel=1e-4)
    assert json.loads(dump.read_text())["depth"]["abs_err"] == pytest.approx(0.5)


def test_wrapper_amp_bfloat16_on_cpu_trains():
    model = _build()
    wrapper = _wrapper(model, aggregator="pcgrad")
    wrapper.amp, wrapper.amp_dtype = True, torch.bfloat16
    from mtl_plugins.core.amp import DynamicLossScaler

    wrapper.controller.loss_scaler = wrapper.controller.engine.loss_scaler = DynamicLossScaler(
        init_scale=128.0)
    before = model.backbone.stem[0].weight.detach().clone()
    with wrapper.optim_context(model):
        data = model.data_preprocessor(_batch(), training=True)
        losses, _ = model.parse_losses(model(**data, mode="loss"))
    wrapper.update_params(losses)
    assert not wrapper.last_result.found_inf and wrapper.last_result.loss_scale == 128.0
    assert not torch.equal(before, model.backbone.stem[0].weight)


def _ddp_worker(rank, world, init_file, out_dir):
    from mmengine.model import MMDistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    model = _build()
    ddp = MMDistributedDataParallel(module=model)
    wrapper = _wrapper(model, aggregator="mgda", balancer="uncertainty")
    for step in range(2):
        batch = _batch(n=2)
        for ds in batch["data_samples"]:  # different data per rank
            ds.gt_sem_seg.data = (ds.gt_sem_seg.data + rank + step) % 5
        ddp.train_step(batch, optim_wrapper=wrapper)
    # parameters (batch-norm running statistics are per rank, as with any DDP run)
    torch.save({k: v.detach() for k, v in model.named_parameters()},
               os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_wrapper_under_mmengine_ddp_keeps_ranks_identical(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"{r}.pt") for r in range(2))
    initial = dict(_build().named_parameters())
    changed = [k for k in a if not torch.equal(a[k], initial[k])]
    assert changed, "no parameter was updated"
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def _static_graph_worker(rank, world, init_file, out_dir):
    from mmengine.model import MMDistributedDataParallel

    from mtl_plugins.core.tasks import MTLConfigError

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    for level, aggregator in (("parameter", "pcgrad"), ("representation", "mgda")):
        model = _build()
        ddp = MMDistributedDataParallel(module=model, static_graph=True)
        wrapper = _wrapper(model, aggregator=aggregator, level=level)
        before = model.backbone.stem[0].weight.detach().clone()
        try:
            ddp.train_step(_batch(n=2), optim_wrapper=wrapper)
            message = "trained"
        except MTLConfigError as err:
            message = str(err)
        unchanged = torch.equal(before, model.backbone.stem[0].weight)
        with open(os.path.join(out_dir, f"static_graph-{level}.txt"), "w") as f:
            f.write(f"{unchanged}\n{message}")
    dist.destroy_process_group()


def test_wrapper_refuses_ddp_static_graph_with_an_aggregator(tmp_path):
    """DDP's ``static_graph=True`` counts its gradient hooks' calls in the first iteration;
    the per-task passes of an aggregator call them once per task (at representation level
    too: without the check both die on the reducer's ``expect_autograd_hooks_`` assert): the
    step is refused before any backward, naming the key, with the weights untouched."""
    mp.spawn(_static_graph_worker, args=(1, str(tmp_path / "init"), str(tmp_path)), nprocs=1,
             join=True)
    for level in ("parameter", "representation"):
        unchanged, message = (tmp_path / f"static_graph-{level}.txt").read_text().split("\n", 1)
        assert unchanged == "True", level
        assert message.startswith("model_wrapper_cfg.static_graph=True") \
            and "static_graph=False" in message, (level, message)
