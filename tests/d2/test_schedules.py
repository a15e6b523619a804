"""The schedules of the paper-001 Mask R-CNN configs (Table 4) in optimizer steps, which is
what SOLVER.MAX_ITER / train.max_iter count in every allocation mode (test_trainer.py,
test_lazyconfig.py, test_model_side.py check the counting itself).

Paper 001 (001_c8f1e1a697b20059.txt): "All hyper-parameters follow the default configuration
in detectron2" (line ~252); Cityscapes: "we only train half steps for STA and ISTA" (line
~256) and "STA and ISTA run for the same steps" (line ~286).
"""
import pytest

from .conftest import ROOT

YACS = ROOT / "configs" / "d2"
LAZY = YACS / "lazy"
SOLVER_KEYS = ("BASE_LR", "IMS_PER_BATCH", "MOMENTUM", "WEIGHT_DECAY", "WARMUP_ITERS",
               "WARMUP_FACTOR", "GAMMA", "LR_SCHEDULER_NAME", "CHECKPOINT_PERIOD")


def _yacs(name):
    from detectron2.config import get_cfg

    from mtl_plugins.d2 import add_mtl_config
    from mtl_plugins.d2.config import merge_config_file

    cfg = get_cfg()
    add_mtl_config(cfg)
    merge_config_file(cfg, str(YACS / name))
    return cfg


def _solver(cfg):
    return {k: cfg.SOLVER[k] for k in SOLVER_KEYS}


def test_cityscapes_sta_and_ista_train_half_the_baselines_optimizer_steps():
    ft, sta, ista = (_yacs(f"mask_rcnn_R_50_FPN_cityscapes_{m}.yaml")
                     for m in ("ft", "sta", "ista"))
    # detectron2's Cityscapes Mask R-CNN defaults: 24k steps of 8 images, LR 0.01, x0.1 at 18k
    assert ft.SOLVER.MAX_ITER == 24000 and tuple(ft.SOLVER.STEPS) == (18000,)
    assert ft.SOLVER.IMS_PER_BATCH == 8 and ft.SOLVER.BASE_LR == 0.01
    assert ft.MTL.ALLOCATION.MODE == "ft"
    for cfg, mode in ((sta, "sta"), (ista, "ista")):
        assert cfg.MTL.ALLOCATION.MODE == mode and cfg.MTL.ALLOCATION.K == 1
        assert cfg.SOLVER.MAX_ITER == ft.SOLVER.MAX_ITER // 2 == 12000  # "half steps"
        assert tuple(cfg.SOLVER.STEPS) == (9000,)  # the LR drop at the same fraction (0.75)
        assert _solver(cfg) == _solver(ft)  # everything else: detectron2's defaults
    # "STA and ISTA run for the same steps": identical schedules, optimizer steps both
    assert sta.SOLVER == ista.SOLVER and sta.TEST.EVAL_PERIOD == ista.TEST.EVAL_PERIOD


def test_coco_configs_keep_detectron2s_1x_schedule_in_optimizer_steps():
    cfgs = {m: _yacs(f"mask_rcnn_R_50_FPN_1x_coco_{m}.yaml") for m in ("ft", "sta", "ista")}
    for mode, cfg in cfgs.items():
        assert cfg.MTL.ALLOCATION.MODE == mode and cfg.MTL.ALLOCATION.GAP == 1
        assert cfg.SOLVER.MAX_ITER == 90000 and tuple(cfg.SOLVER.STEPS) == (60000, 80000)
        assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.SOLVER.BASE_LR == 0.02
        assert cfg.SOLVER == cfgs["ft"].SOLVER


@pytest.mark.parametrize("mode", ["ft", "sta", "ista"])
def test_lazy_coco_configs_keep_the_model_zoo_schedule(mode):
    from detectron2.config import LazyConfig

    cfg = LazyConfig.load(str(LAZY / f"mask_rcnn_R_50_FPN_1x_coco_{mode}.py"))
    assert cfg.train.max_iter == 90000  # optimizer steps, whatever the mode
    assert cfg.train.mtl.allocation.mode == mode and cfg.train.mtl.allocation.gap == 1
    assert cfg.dataloader.train.total_batch_size == 16 and cfg.optimizer.lr == 0.02
    assert list(cfg.lr_multiplier.scheduler.milestones) == [60000, 80000, 90000]
