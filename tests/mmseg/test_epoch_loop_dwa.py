"""MTLEpochBasedTrainLoop with STA allocation and DWA's epoch updates through MTLHook, run by
mmengine's Runner in-process on the synthetic config."""
from pathlib import Path

from mmengine.config import Config
from mmengine.runner import Runner

import mtl_plugins.mmseg  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]


def test_epoch_loop_with_sta_and_dwa(tmp_path):
    cfg = Config.fromfile(str(ROOT / "configs" / "mmseg" / "synthetic" / "mtl_ft.py"))
    cfg.work_dir = str(tmp_path)
    cfg.train_dataloader.batch_size = 4
    cfg.train_dataloader.sampler = dict(type="DefaultSampler", shuffle=True)
    cfg.train_dataloader.dataset.num_samples = 8
    cfg.train_dataloader.dataset.img_size = (32, 32)
    cfg.model.data_preprocessor.size = (32, 32)
    cfg.train_cfg = dict(type="MTLEpochBasedTrainLoop", max_epochs=3, val_interval=100)
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.test_dataloader = cfg.test_cfg = cfg.test_evaluator = None
    cfg.param_scheduler = []
    cfg.log_processor = dict(by_epoch=True)
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=100)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=1)
    cfg.optim_wrapper.mtl.allocation = dict(mode="sta", k=1, seed=0)
    cfg.optim_wrapper.mtl.balancer = "dwa"
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.iter == 6  # 3 epochs x 2 batches, STA: one optimizer step per batch
    weights = runner.optim_wrapper.controller.current_weights()
    # DWA: weights stay 1 for two epochs, then follow the loss ratios (sum = T)
    assert abs(sum(weights.values()) - 3.0) < 1e-4
    assert any(abs(w - 1.0) > 1e-4 for w in weights.values()), weights
