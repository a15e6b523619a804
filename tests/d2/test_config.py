"""add_mtl_config, the loss → task mapping and config errors that name the key."""
import pytest
import torch

from mtl_plugins.core.tasks import MTLConfigError

from .conftest import make_cfg


def test_defaults_and_builtin_groups():
    from mtl_plugins.d2 import task_loss_mapping

    cfg = make_cfg()
    assert cfg.MTL.TASKS == ["detection", "mask"] and cfg.MTL.ALLOCATION.MODE == "ft"
    assert task_loss_mapping(cfg) == {
        "detection": ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"),
        "mask": ("loss_mask",)}
    cfg.MTL.TASKS = ["detection", "mask", "keypoint"]
    assert task_loss_mapping(cfg)["keypoint"] == ("loss_keypoint",)


def test_explicit_mapping_list_and_dict():
    from mtl_plugins.d2 import group_task_losses, task_loss_mapping

    cfg = make_cfg(TASKS=["rpn", "roi"], TASK_LOSSES=[
        "rpn:loss_rpn_cls", "rpn:loss_rpn_loc", "roi:loss_cls", "roi:loss_box_reg",
        "roi:loss_mask"])
    mapping = task_loss_mapping(cfg)
    assert mapping["rpn"] == ("loss_rpn_cls", "loss_rpn_loc")
    # the dict form (yacs stores mappings as CfgNode); also accepted on its own
    as_dict = {"rpn": ["loss_rpn_cls", "loss_rpn_loc"],
               "roi": ["loss_cls", "loss_box_reg", "loss_mask"]}
    cfg.MTL.TASK_LOSSES = type(cfg)(as_dict)
    assert task_loss_mapping(cfg) == mapping
    losses = {k: torch.tensor(float(i)) for i, k in enumerate(
        ["loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"])}
    grouped = group_task_losses(losses, mapping)
    assert float(grouped["rpn"]) == 1.0 and float(grouped["roi"]) == 9.0


@pytest.mark.parametrize("overrides,match", [
    ({"TASK_LOSSES": ["detection:loss_cls", "detection:loss_box_reg"]},
     r"MTL.TASK_LOSSES.*'mask'.*no loss key"),
    ({"TASK_LOSSES": ["detection-loss_cls"]}, r"MTL.TASK_LOSSES contains 'detection-loss_cls'"),
    ({"TASK_LOSSES": ["depth:loss_depth", "detection:loss_cls", "mask:loss_mask"]},
     r"MTL.TASK_LOSSES.*'depth'.*not in MTL.TASKS"),
    ({"TASKS": ["detection", "depth"]}, r"MTL.TASK_LOSSES=\[\].*'depth'"),
    ({"TASKS": ["detection", "detection"]}, r"MTL.TASKS"),
    ({"ALLOCATION.MODE": "random"}, r"MTL.ALLOCATION.MODE='random'"),
    ({"ALLOCATION.K": 3}, r"MTL.ALLOCATION.K=3"),
    ({"LEVEL": "layer"}, r"MTL.LEVEL='layer'"),
    ({"TASK_REDUCTION": "avg"}, r"MTL.TASK_REDUCTION='avg'"),
    ({"GRAMIAN_KERNEL": "gemm"}, r"MTL.GRAMIAN_KERNEL='gemm': expected one of \['auto', 'blas', 'c', 'fused'\]"),
    ({"GRAMIAN_KERNEL": "fused"}, r"MTL.GRAMIAN_KERNEL='fused' with no aggregator"),
    ({"AGGREGATOR": "pcgradd"}, r"MTL.AGGREGATOR='pcgradd'"),
    ({"BALANCER": "nope"}, r"MTL.BALANCER='nope'"),
    ({"BALANCER": "dwa"}, r"MTL.BALANCER='dwa' without a period.*weights would stay 1; "
                          r"expected MTL.BALANCER_ARGS.period=<iterations per period>"),
    ({"BALANCER": "dwa", "BALANCER_ARGS": {"period": 0}}, r"MTL.BALANCER_ARGS.period=0"),
    ({"BALANCER": "dtp"}, r"MTL.BALANCER='dtp'.*no KPI source.*expected another balancer"),
    ({"BALANCER_ARGS": {"period": 5}}, r"MTL.BALANCER_ARGS=\{'period': 5\} with "
                                       r"MTL.BALANCER='': expected a balancer name"),
])
def test_config_errors_name_the_key(overrides, match):
    from mtl_plugins.d2 import build_mtl_controller

    with pytest.raises(MTLConfigError, match=match):
        build_mtl_controller(make_cfg(**overrides), rank=0)


def test_gramian_kernel_reaches_the_engine():
    from mtl_plugins.d2 import build_mtl_controller

    assert build_mtl_controller(make_cfg(AGGREGATOR="pcgrad"), rank=0).engine.gramian_kernel \
        == "auto"
    for aggregator in ("pcgrad", "gradvac"):  # GradVac's per-layer Gramians too
        ctl = build_mtl_controller(make_cfg(AGGREGATOR=aggregator, GRAMIAN_KERNEL="fused"),
                                   rank=0)
        assert ctl.engine.gramian_kernel == "fused"


def test_balancer_args_from_a_yaml_file(tmp_path):
    """``MTL.BALANCER_ARGS`` takes the balancer's keyword arguments (new keys allowed in a
    yaml file; the shipped DWA smoke config sets its period)."""
    from pathlib import Path

    from mtl_plugins.d2 import build_mtl_controller, merge_config_file

    path = tmp_path / "dwa.yaml"
    path.write_text("MTL:\n  BALANCER: dwa\n  BALANCER_ARGS:\n    period: 7\n"
                    "    temperature: 3.0\n")
    cfg = make_cfg()
    cfg.merge_from_file(str(path))
    balancer = build_mtl_controller(cfg, rank=0).balancer
    assert (balancer.period, balancer.temperature) == (7, 3.0)
    shipped = make_cfg()
    merge_config_file(shipped, str(Path(__file__).resolve().parents[2] / "configs" / "d2" /
                                   "mask_rcnn_R_50_FPN_synthetic_cpu_dwa.yaml"))
    shipped.merge_from_list(["MTL.BALANCER_ARGS.period", "3"])  # the key exists now
    assert build_mtl_controller(shipped, rank=0).balancer.period == 3


def test_loss_key_without_task_and_task_without_key():
    from mtl_plugins.d2 import group_task_losses, task_loss_mapping

    mapping = task_loss_mapping(make_cfg())
    losses = {k: torch.tensor(1.0) for ks in mapping.values() for k in ks}
    with pytest.raises(MTLConfigError, match=r"MTL.TASK_LOSSES.*\['loss_keypoint'\].*no task"):
        group_task_losses(dict(losses, loss_keypoint=torch.tensor(1.0)), mapping)
    del losses["loss_mask"]
    with pytest.raises(MTLConfigError, match=r"task 'mask' has none of its loss keys"):
        group_task_losses(losses, mapping)


def test_plain_modules_cannot_take_an_allocation():
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from .test_allocation_losses import _batch

    cfg = make_cfg()
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    model = build_model(cfg)
    batch = _batch(n=1)
    batch[0]["mtl_alloc"] = ("mask",)
    with EventStorage(0), pytest.raises(MTLConfigError, match="MODEL.ROI_HEADS.NAME"):
        model(batch)


def test_coco_configs_resolve_the_model_zoo_base():
    from pathlib import Path

    from detectron2.config import get_cfg

    from mtl_plugins.d2 import add_mtl_config, merge_config_file

    root = Path(__file__).resolve().parents[2] / "configs" / "d2"
    for mode in ("ft", "sta", "ista"):
        cfg = get_cfg()
        add_mtl_config(cfg)
        merge_config_file(cfg, str(root / f"mask_rcnn_R_50_FPN_1x_coco_{mode}.yaml"))
        assert cfg.MTL.ALLOCATION.MODE == mode
        assert cfg.MODEL.META_ARCHITECTURE == "MTLGeneralizedRCNN"
        assert cfg.MODEL.MASK_ON and cfg.SOLVER.MAX_ITER == 90000  # detectron2's 1x defaults
        assert cfg.DATASETS.TRAIN == ("coco_2017_train",)
    cfg = get_cfg()
    add_mtl_config(cfg)
    merge_config_file(cfg, str(root / "mask_rcnn_R_50_FPN_synthetic_cpu_ista.yaml"))
    assert cfg.MODEL.DEVICE == "cpu" and cfg.MTL.ALLOCATION.MODE == "ista"
    assert cfg.INPUT.MASK_FORMAT == "bitmask"


def test_cityscapes_configs_resolve_and_halve_the_sta_ista_schedule():
    from pathlib import Path

    from detectron2.config import get_cfg

    from mtl_plugins.d2 import add_mtl_config, merge_config_file

    root = Path(__file__).resolve().parents[2] / "configs" / "d2"
    iters = {}
    for mode in ("ft", "sta", "ista"):
        cfg = get_cfg()
        add_mtl_config(cfg)
        merge_config_file(cfg, str(root / f"mask_rcnn_R_50_FPN_cityscapes_{mode}.yaml"))
        assert cfg.MTL.ALLOCATION.MODE == mode
        assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 8
        assert cfg.DATASETS.TRAIN == ("cityscapes_fine_instance_seg_train",)
        iters[mode] = cfg.SOLVER.MAX_ITER
    assert iters == {"ft": 24000, "sta": 12000, "ista": 12000}


def test_roaming_and_recon_configs_build(tmp_path):
    """The COCO Maximum Roaming / Recon configs (papers' settings) and the CPU smoke configs
    build their models (the Recon ranking is a file of the search stage: written here)."""
    import json
    from pathlib import Path

    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from mtl_plugins.d2 import add_mtl_config, check_mtl_config, merge_config_file

    root = Path(__file__).resolve().parents[2] / "configs" / "d2"

    def load(name, *opts):
        cfg = get_cfg()
        add_mtl_config(cfg)
        merge_config_file(cfg, str(root / name))
        cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts])
        check_mtl_config(cfg)
        return cfg

    cfg = load("mask_rcnn_R_50_FPN_1x_coco_roaming.yaml")
    assert (cfg.MTL.ROAMING.P, cfg.MTL.ROAMING.INTERVAL_EPOCHS, cfg.MTL.ROAMING.INTERVAL,
            cfg.MTL.ROAMING.COMPLETION) == (0.8, 0.05, 0, 0.5)
    roaming = build_model(cfg).roaming  # Δ in epochs: no training data needed to build
    assert roaming.interval_epochs == 0.05 and roaming.interval is None
    # res3-res5: 13 blocks x 3 convs + 3 shortcuts; FPN: 4 lateral + 4 output convs
    assert len(roaming.layer_names) == 13 * 3 + 3 + 8
    assert roaming.updates_to_finish() == (2048 - 1638) // 2  # res5: r (1 - p) 2048 swaps
    # 117266 COCO images / 16 per batch: Δ = 366 steps, the plan ends before 90k iterations
    assert roaming.set_steps_per_epoch(117266 / 16) == 366
    assert roaming.updates_to_finish() * 366 < cfg.SOLVER.MAX_ITER == 90000
    search = load("mask_rcnn_R_50_FPN_1x_coco_recon_search.yaml")
    assert search.MTL.RECON_SEARCH.ENABLED and search.MTL.RECON_SEARCH.S == -0.02
    ranking = tmp_path / "ranking.json"
    names = [f"backbone.bottom_up.res{s}.{b}.conv{c}" for s in (4, 5) for b in range(3)
             for c in (1, 2, 3)] + ["backbone.fpn_output2", "backbone.fpn_output3"] * 2
    ranking.write_text(json.dumps({"ranking": [{"module": n} for n in dict.fromkeys(names)]}))
    cfg = load("mask_rcnn_R_50_FPN_1x_coco_recon.yaml", "MTL.RECON.RANKING", str(ranking))
    assert cfg.MTL.RECON.TOPK == 25 and cfg.MTL.RECON.INIT == "copy"
    assert len(build_model(cfg).recon.converted) == 20  # the whole (short) ranking
    for mode in ("roaming", "recon"):
        cfg = load(f"mask_rcnn_R_50_FPN_synthetic_cpu_{mode}.yaml")
        assert cfg.MODEL.DEVICE == "cpu" and cfg.DATASETS.TRAIN == ("mtl_synthetic_shapes_train",)
