"""DWA and DTP act in mmseg runs, or the run refuses to start (issue 10, defect 5): their
weights move only on epoch ends (DWA, period=None) or on KPIs (DTP), which reach them through
``MTLHook``. In-process mmengine Runner on the synthetic config, 32x32 images."""
from pathlib import Path

import pytest
from mmengine.config import Config
from mmengine.runner import Runner

import mtl_plugins.mmseg  # noqa: F401
from mtl_plugins.core.tasks import MTLConfigError

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, balancer, max_iters=6, val_interval=100, hooks=True):
    cfg = Config.fromfile(str(ROOT / "configs" / "mmseg" / "synthetic" / "mtl_ft.py"))
    cfg.work_dir = str(tmp_path)
    for loader in (cfg.train_dataloader, cfg.val_dataloader):
        loader.batch_size = 2
        loader.dataset.num_samples = 4
        loader.dataset.img_size = (32, 32)
    cfg.model.data_preprocessor.size = (32, 32)
    cfg.train_cfg = dict(type="MTLIterBasedTrainLoop", max_iters=max_iters,
                         val_interval=val_interval)
    cfg.test_dataloader = cfg.test_cfg = cfg.test_evaluator = None
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=100)
    cfg.default_hooks.visualization = dict(type="SegVisualizationHook")
    cfg.optim_wrapper.mtl.balancer = balancer
    if not hooks:
        cfg.custom_hooks = []
    return cfg


def _train(cfg):
    runner = Runner.from_cfg(cfg)
    runner.train()
    return runner.optim_wrapper.controller.current_weights()


def test_dwa_per_epoch_in_an_iteration_loop_is_refused(tmp_path):
    with pytest.raises(MTLConfigError, match=r"balancer: DWA with period=None .* "
                                             r"MTLIterBasedTrainLoop .*period=<iterations>"):
        _train(_cfg(tmp_path, "dwa"))


def test_a_balancer_without_its_hook_is_refused(tmp_path):
    with pytest.raises(MTLConfigError, match=r"DynamicWeightAverage: its weights move only on "
                                             r"epoch ends.*MTLHook"):
        _train(_cfg(tmp_path, "dwa", hooks=False))


def test_dwa_with_a_period_in_iterations_moves_its_weights(tmp_path):
    weights = _train(_cfg(tmp_path, dict(type="dwa", period=2)))
    assert abs(sum(weights.values()) - 3.0) < 1e-4  # two periods closed: ratio weights
    assert any(abs(w - 1.0) > 1e-4 for w in weights.values()), weights


def test_dtp_without_kpis_is_refused(tmp_path):
    with pytest.raises(MTLConfigError, match=r"MTLHook.kpi_metrics=\{\}: DTP needs a "
                                             r"validation metric for every task"):
        _train(_cfg(tmp_path, "dtp"))
    cfg = _cfg(tmp_path, "dtp")
    cfg.custom_hooks = [dict(type="MTLHook", kpi_metrics=KPIS)]
    with pytest.raises(MTLConfigError, match=r"train_cfg.val_interval=100 \(run length 6\)"):
        _train(cfg)


KPIS = dict(seg="seg/mIoU", depth="depth/delta1", normal="normal/30")


def test_dtp_takes_its_kpis_from_validation(tmp_path):
    cfg = _cfg(tmp_path, "dtp", max_iters=3, val_interval=2)
    cfg.custom_hooks = [dict(type="MTLHook", kpi_metrics=KPIS)]
    weights = _train(cfg)
    assert all(w != 1.0 for w in weights.values()), weights  # init_weight until a KPI came
