"""MTLIterBasedTrainLoop / MTLEpochBasedTrainLoop: iterations are optimizer steps (issue 11,
item 1) for ISTA and the gap mode (paper 001, Table 7), the LR scheduler steps once per
iteration, and a resume inside an ISTA batch drops its remaining sub-steps. mmengine's Runner
runs in-process on the synthetic config (32x32 images, 3 tasks: ISTA has 3 sub-steps)."""
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner

import mtl_plugins.mmseg  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("seg", "depth", "normal")


class Recorder(Hook):
    """Per iteration: the identity of the batch trained and each sample's allocated tasks.

    The batches are kept alive: CPython reuses a freed object's ``id``, so a new batch could
    otherwise take the identity of a batch that has been trained and dropped."""

    def __init__(self) -> None:
        self.batches, self.allocs, self._alive = [], [], []

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        self._alive.append(data_batch)
        self.batches.append(id(data_batch))
        self.allocs.append([ds.metainfo["mtl_alloc"] for ds in data_batch["data_samples"]])


def _cfg(work, allocation, loop, samples=16):
    cfg = Config.fromfile(str(ROOT / "configs" / "mmseg" / "synthetic" / "mtl_ft.py"))
    cfg.work_dir = str(work)
    cfg.train_dataloader.batch_size = 4
    cfg.train_dataloader.dataset.num_samples = samples
    cfg.train_dataloader.dataset.img_size = (32, 32)
    cfg.model.data_preprocessor.size = (32, 32)
    cfg.train_cfg = loop
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.test_dataloader = cfg.test_cfg = cfg.test_evaluator = None
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=1)
    cfg.custom_hooks = []
    cfg.optim_wrapper.mtl.allocation = allocation
    return cfg


@pytest.fixture
def optimizer_steps():
    from torch.optim.optimizer import register_optimizer_step_post_hook

    steps = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: steps.append(1))
    yield steps
    handle.remove()


def _runner(cfg):
    runner = Runner.from_cfg(cfg)
    recorder = Recorder()
    runner.register_hook(recorder)
    return runner, recorder


def _order(ids):
    """Batch identities as 0, 1, ... in order of first appearance."""
    first = {}
    return [first.setdefault(i, len(first)) for i in ids]


def _check_visits(recorder, k=1):
    """Every sample trains k tasks per visit and each task at most once per batch."""
    per_batch = {}
    for b, allocs in zip(recorder.batches, recorder.allocs):
        seen = per_batch.setdefault(b, [set() for _ in allocs])
        for sample, tasks in zip(seen, allocs):
            assert len(tasks) == k and not sample & set(tasks)
            sample.update(tasks)
    return per_batch


@pytest.mark.parametrize("allocation,order", [
    (dict(mode="ista", k=1), [0, 0, 0, 1, 1]),
    (dict(mode="gap", k=1, gap=2), [0, 1, 0, 1, 0]),
], ids=["ista", "gap2"])
def test_iter_loop_iterations_are_optimizer_and_scheduler_steps(tmp_path, optimizer_steps,
                                                                allocation, order):
    cfg = _cfg(tmp_path, allocation, dict(type="MTLIterBasedTrainLoop", max_iters=5,
                                          val_interval=100))
    cfg.param_scheduler = [dict(type="PolyLR", eta_min=0.0, power=1.0, begin=0, end=100,
                                by_epoch=False)]
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False, interval=100)
    runner, recorder = _runner(cfg)
    runner.train()
    assert runner.iter == 5 and len(optimizer_steps) == 5
    assert runner.param_schedulers[0].last_step == 5  # one scheduler step per optimizer step
    assert _order(recorder.batches) == order
    _check_visits(recorder)
    alloc = runner.optim_wrapper.controller.allocator
    assert alloc.batches == 2 and alloc.held_batches == []  # stopped inside: dropped


def test_epoch_loop_replays_the_held_batches_before_the_epoch_ends(tmp_path, optimizer_steps):
    """gap 4 with 2 batches an epoch: the block closes at the epoch's end and its replays
    run (every (sample, task) pair once per epoch), 2 x 3 steps an epoch."""
    cfg = _cfg(tmp_path, dict(mode="gap", k=1, gap=4),
               dict(type="MTLEpochBasedTrainLoop", max_epochs=2, val_interval=100), samples=8)
    cfg.train_dataloader.sampler = dict(type="DefaultSampler", shuffle=True)
    cfg.param_scheduler = []
    cfg.log_processor = dict(by_epoch=True)
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=100)
    runner, recorder = _runner(cfg)
    runner.train()
    assert runner.iter == 12 and len(optimizer_steps) == 12
    assert _order(recorder.batches) == [0, 1] * 3 + [2, 3] * 3
    per_batch = _check_visits(recorder)
    assert all(s == set(TASKS) for samples in per_batch.values() for s in samples)


def test_resume_inside_an_ista_batch_drops_its_remaining_sub_steps(tmp_path, optimizer_steps):
    loop = dict(type="MTLIterBasedTrainLoop", max_iters=4, val_interval=100)
    cfg = _cfg(tmp_path, dict(mode="ista", k=1), loop)
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False, interval=4)
    runner, _ = _runner(cfg)
    runner.train()  # batch 0: 3 sub-steps, batch 1: 1 of 3 (checkpoint at iteration 4)
    saved = torch.load(tmp_path / "iter_4.pth", map_location="cpu", weights_only=True)
    state = saved["optimizer"]["mtl"]["_extra_state"]["allocator"]
    assert state["batches"] == 2 and [b for b, _ in state["plan"]] == [1]

    optimizer_steps.clear()
    cfg = _cfg(tmp_path, dict(mode="ista", k=1), dict(loop, max_iters=6))
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False, interval=100)
    cfg.resume, cfg.load_from = True, str(tmp_path / "iter_4.pth")
    runner, recorder = _runner(cfg)
    runner.train()
    assert runner.iter == 6 and len(optimizer_steps) == 2
    alloc = runner.optim_wrapper.controller.allocator
    # batch 1's two remaining sub-steps are dropped; iterations 4-5 train batch 2
    assert alloc.batches == 3
    assert _order(recorder.batches) == [0, 0]
    _check_visits(recorder)
