"""GradSplit and the Recon search through the detectron2 MTL trainer (MTL.GRADSPLIT.*,
MTL.RECON_SEARCH.*)."""
import json

import pytest
import torch

from mtl_plugins.core.tasks import MTLConfigError

from .conftest import make_cfg

SPLIT = "backbone.bottom_up.res5.2.conv3"


def _trainer(cfg, dataset, **structure):
    from detectron2.data import build_detection_train_loader
    from detectron2.engine import DefaultTrainer
    from detectron2.modeling import build_model

    from mtl_plugins.d2 import MTLTrainer, build_mtl_controller, task_loss_mapping

    cfg.DATASETS.TRAIN = (dataset,)
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = DefaultTrainer.build_optimizer(cfg, model)
    grads = []
    step = optimizer.step

    def record(*a, **k):
        grads.append(dict(model.named_parameters())[f"{SPLIT}.weight"].grad.clone())
        return step(*a, **k)

    optimizer.step = record
    return MTLTrainer(model, build_detection_train_loader(cfg), optimizer,
                      build_mtl_controller(cfg), task_loss_mapping(cfg), **structure), grads


def test_gradsplit_gives_the_absent_tasks_group_exactly_zero(shapes_dataset):
    from mtl_plugins.core.structure import GradSplit
    from mtl_plugins.d2.config import structure_configs

    cfg = make_cfg(**{"ALLOCATION.MODE": "sta", "GRADSPLIT.MODULES": [SPLIT]})
    cfg.SOLVER.BASE_LR = 1e-6  # randomly initialised Mask R-CNN: keep 3 steps finite
    gradsplit, recon = structure_configs(cfg)
    assert recon is None and gradsplit["relation"] is None  # identity
    trainer, grads = _trainer(cfg, shapes_dataset, gradsplit=gradsplit)
    assert isinstance(trainer.controller.aggregator, GradSplit)
    trainer.train(0, 3)
    images = {t: [v for v, _ in trainer.storage.history(f"mtl/images/{t}").values()]
              for t in ("detection", "mask")}
    assert 0 in images["detection"] + images["mask"], "no step with an absent task (seeded)"
    channels = grads[0].shape[0]
    half = channels // 2  # group 0: detection, group 1: mask (contiguous channel groups)
    for i, g in enumerate(grads):
        for group, task in ((slice(0, half), "detection"), (slice(half, channels), "mask")):
            zero = bool((g[group] == 0).all())
            assert zero == (images[task][i] == 0), (i, task)


def test_recon_search_writes_a_ranking(shapes_dataset, tmp_path):
    from mtl_plugins.d2.trainer import MTLDefaultTrainer

    cfg = make_cfg(**{"RECON_SEARCH.ENABLED": True,
                      "RECON_SEARCH.MODULES": ["backbone.bottom_up.res5.*"]})
    cfg.DATASETS.TRAIN = (shapes_dataset,)
    cfg.DATASETS.TEST = ()
    cfg.OUTPUT_DIR = str(tmp_path)
    cfg.SOLVER.MAX_ITER = 2
    MTLDefaultTrainer(cfg).train()
    ranking = json.loads((tmp_path / "recon_ranking.json").read_text())
    text = json.dumps(ranking)
    assert "res5" in text


def test_structure_config_errors_name_the_key():
    from mtl_plugins.d2.config import structure_configs

    cfg = make_cfg(**{"GRADSPLIT.MODULES": [SPLIT], "GRADSPLIT.RELATION": [[1, 0]]})
    with pytest.raises(MTLConfigError, match="MTL.GRADSPLIT.RELATION: shape"):
        structure_configs(cfg)
