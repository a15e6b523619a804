"""GradSplit's detectron2 example configs (every conv of res5, paper 000 §3.1), its yacs keys
(relation file, DropGrad, separate optimizers) and the per-task optimizer steps in the trainer."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mtl_plugins.core.tasks import MTLConfigError

from .conftest import make_cfg

ROOT = Path(__file__).resolve().parents[2]


def _load(name, *opts):
    from detectron2.config import get_cfg

    from mtl_plugins.d2 import add_mtl_config
    from mtl_plugins.d2.config import check_mtl_config, merge_config_file

    cfg = get_cfg()
    add_mtl_config(cfg)
    merge_config_file(cfg, str(ROOT / "configs" / "d2" / name))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts])
    check_mtl_config(cfg)
    return cfg


def _res5_convs(model) -> set:
    res5 = model.backbone.bottom_up.res5
    return {f"backbone.bottom_up.res5.{n}" for n, m in res5.named_modules()
            if isinstance(m, nn.Conv2d)}


def _split_modules(model, cfg_or_dict, tasks, task_losses):
    from mtl_plugins.core.structure.from_config import structure_aggregator
    from mtl_plugins.d2.trainer import split_task_parameters

    shared, _ = split_task_parameters(model, task_losses)
    agg = structure_aggregator(model, shared, tasks, None, gradsplit=cfg_or_dict)
    return set(agg.layout.modules), agg


@pytest.mark.parametrize("name", ["mask_rcnn_R_50_FPN_1x_coco_gradsplit.yaml",
                                  "mask_rcnn_R_50_FPN_synthetic_cpu_gradsplit.yaml"])
def test_yacs_examples_split_every_conv_of_res5(name):
    from detectron2.modeling import build_model

    from mtl_plugins.d2 import task_loss_mapping
    from mtl_plugins.d2.config import structure_configs

    cfg = _load(name)
    gradsplit, _ = structure_configs(cfg)
    assert gradsplit["separate_optimizers"] is True
    model = build_model(cfg)
    split, agg = _split_modules(model, gradsplit, tuple(cfg.MTL.TASKS), task_loss_mapping(cfg))
    want = _res5_convs(model)
    assert len(want) == 3 * 3 + 1  # conv1-3 of 3 blocks + the first block's shortcut
    assert split == want
    assert agg.record_task_rows


def test_lazy_example_splits_every_conv_of_res5():
    from detectron2.config import LazyConfig, instantiate

    from mtl_plugins.d2.lazy import build_mtl_from_dict

    cfg = LazyConfig.load(str(ROOT / "configs" / "d2" / "lazy" /
                              "mask_rcnn_R_50_FPN_synthetic_cpu_gradsplit.py"))
    cfg.train.device = "cpu"
    model = instantiate(cfg.model)
    parts = build_mtl_from_dict(dict(cfg.train.mtl))
    split, _ = _split_modules(model, parts.gradsplit, parts.controller.task_names,
                              parts.task_losses)
    assert split == _res5_convs(model)


def test_yacs_relation_file_dropgrad_and_errors(tmp_path):
    from mtl_plugins.d2.config import structure_configs

    rel = tmp_path / "relation.json"
    rel.write_text(json.dumps({"tasks": ["mask", "detection"], "tau": -0.01,
                               "relation": [[1, 0], [1, 1]]}))
    cfg = make_cfg(**{"GRADSPLIT.MODULES": ["backbone.bottom_up.res5.*"],
                      "GRADSPLIT.RELATION_FILE": str(rel)})
    gradsplit, _ = structure_configs(cfg)
    # reordered to the model's tasks [detection, mask]: mask's group ignores detection's loss
    assert gradsplit["relation"] == [[1, 1], [0, 1]]
    missing = str(tmp_path / "nope.json")
    cfg = make_cfg(**{"GRADSPLIT.MODULES": ["x"], "GRADSPLIT.RELATION_FILE": missing})
    with pytest.raises(MTLConfigError, match=rf"MTL.GRADSPLIT.RELATION_FILE='{missing}': no "
                                             "such file"):
        structure_configs(cfg)
    cfg = make_cfg(**{"GRADSPLIT.MODULES": ["x"], "GRADSPLIT.RELATION_FILE": str(rel),
                      "GRADSPLIT.RELATION": [[1, 0], [0, 1]]})
    with pytest.raises(MTLConfigError, match="expected one of them"):
        structure_configs(cfg)
    cfg = make_cfg(**{"GRADSPLIT.MODULES": ["x"], "GRADSPLIT.DROP_RATE": 0.5})
    gradsplit, _ = structure_configs(cfg)
    assert gradsplit["drop_rate"] == 0.5 and gradsplit["relation"] is None
    cfg = make_cfg(**{"GRADSPLIT.MODULES": ["x"], "GRADSPLIT.DROP_RATE": 1.5})
    with pytest.raises(MTLConfigError, match=r"MTL.GRADSPLIT.DROP_RATE=1.5: expected"):
        structure_configs(cfg)


def test_trainer_steps_each_task_with_its_own_optimizer_state(shapes_dataset):
    from detectron2.data import build_detection_train_loader
    from detectron2.engine import DefaultTrainer
    from detectron2.modeling import build_model

    from mtl_plugins.core.structure.separate_optim import STATE_KEY
    from mtl_plugins.d2 import MTLTrainer, build_mtl_controller, task_loss_mapping
    from mtl_plugins.d2.config import structure_configs

    cfg = make_cfg(**{"GRADSPLIT.MODULES": ["backbone.bottom_up.res5.*"],
                      "GRADSPLIT.SEPARATE_OPTIMIZERS": True})
    cfg.SOLVER.BASE_LR = 1e-6
    cfg.DATASETS.TRAIN = (shapes_dataset,)
    gradsplit, _ = structure_configs(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = DefaultTrainer.build_optimizer(cfg, model)  # SGD with momentum
    trainer = MTLTrainer(model, build_detection_train_loader(cfg), optimizer,
                         build_mtl_controller(cfg), task_loss_mapping(cfg), gradsplit=gradsplit)
    trainer.train(0, 2)
    params = dict(model.named_parameters())
    shared = optimizer.state[params["backbone.bottom_up.res5.0.conv1.weight"]]
    assert set(shared[STATE_KEY]) == {"detection", "mask"}  # one momentum buffer per task
    mask_head = optimizer.state[params["roi_heads.mask_head.predictor.weight"]]
    assert set(mask_head[STATE_KEY]) == {"mask"}
    box_head = optimizer.state[params["roi_heads.box_predictor.cls_score.weight"]]
    assert set(box_head[STATE_KEY]) == {"detection"}


def test_model_side_refuses_separate_optimizers():
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(str(ROOT / "configs" / "d2" / "lazy" /
                              "mask_rcnn_R_50_FPN_synthetic_cpu_model_side.py"))
    cfg.model.mtl.gradsplit = dict(modules=["backbone.bottom_up.res5.*"],
                                   separate_optimizers=True)
    with pytest.raises(MTLConfigError, match="model.mtl.gradsplit.separate_optimizers=True"):
        instantiate(cfg.model)
