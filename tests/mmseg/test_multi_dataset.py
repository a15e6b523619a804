"""MultiDatasetSampler over two synthetic datasets with different task annotations, through
mmengine's dataloader and Runner (the segmentor trains each batch on its dataset's tasks)."""
from pathlib import Path

from mmengine.config import Config
from mmengine.runner import Runner

import mtl_plugins.mmseg  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path):
    cfg = Config.fromfile(str(ROOT / "configs" / "mmseg" / "synthetic" / "mtl_ft.py"))
    cfg.work_dir = str(tmp_path)
    pipeline = cfg.train_dataloader.dataset.pipeline
    cfg.train_dataloader.batch_size = 2
    cfg.train_dataloader.sampler = dict(type="MultiDatasetSampler", batch_size=2, seed=0)
    cfg.train_dataloader.dataset = dict(
        type="ConcatDataset", ignore_keys=["mtl_tasks"],
        datasets=[dict(type="SyntheticScenesDataset", num_samples=4, seed=0, img_size=(32, 32),
                       tasks=["seg"], pipeline=pipeline),
                  dict(type="SyntheticScenesDataset", num_samples=6, seed=1, img_size=(32, 32),
                       tasks=["depth", "normal"], pipeline=pipeline)])
    cfg.model.data_preprocessor.size = (32, 32)
    cfg.train_cfg = dict(type="MTLIterBasedTrainLoop", max_iters=4, val_interval=100)
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.test_dataloader = cfg.test_cfg = cfg.test_evaluator = None
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False, interval=100)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=1)
    return cfg


def test_round_robin_batches_carry_their_datasets_tasks(tmp_path):
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    cfg = _cfg(tmp_path)
    loader = Runner.build_dataloader(cfg.train_dataloader)
    tasks = []
    for i, batch in zip(range(4), loader):
        per_sample = {tuple(ds.metainfo["mtl_tasks"]) for ds in batch["data_samples"]}
        assert len(per_sample) == 1, per_sample  # one dataset per batch
        tasks.append(per_sample.pop())
    assert tasks == [("seg",), ("depth", "normal")] * 2


def test_training_on_partially_labelled_datasets(tmp_path, monkeypatch):
    from mtl_plugins.mmseg.optim_wrapper import MTLOptimWrapper

    seen = []
    update = MTLOptimWrapper.update_params

    def record(self, loss, **kw):
        seen.append(tuple(sorted(loss)))
        return update(self, loss, **kw)

    monkeypatch.setattr(MTLOptimWrapper, "update_params", record)
    Runner.from_cfg(_cfg(tmp_path)).train()
    assert seen == [("seg",), ("depth", "normal")] * 2
