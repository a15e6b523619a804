#!/usr/bin/env python
"""Detectron2's ``tools/train_net.py`` with the mtl_plugins multi-task trainer.

Same command line as upstream::

    python tools/train_net.py --config-file configs/d2/mask_rcnn_R_50_FPN_1x_coco_sta.yaml \
        --num-gpus 8 [--resume] [--eval-only] [KEY VALUE ...]

Differences from upstream: ``add_mtl_config(cfg)`` before ``merge_from_file`` (the ``MTL``
keys), the trainer is :class:`~mtl_plugins.d2.trainer.MTLDefaultTrainer` (FT/STA/ISTA
allocation, loss balancing, gradient aggregation, the MTL state in every checkpoint), the
synthetic CPU smoke datasets are registered (``mtl_synthetic_shapes_{train,val}``, see
:mod:`mtl_plugins.d2.data`), and ``COCOEvaluator`` uses pycocotools' reference evaluation when
``detectron2._C`` is the placeholder of a Python-only install; ``--eval-only`` loads weights with
:class:`~mtl_plugins.d2.trainer.MTLCheckpointer` (pretrained weights into Recon's copies).
"""
import logging
import os
from collections import OrderedDict

import detectron2.utils.comm as comm
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.engine import default_argument_parser, default_setup, hooks, launch
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    COCOEvaluator,
    DatasetEvaluators,
    LVISEvaluator,
    PascalVOCDetectionEvaluator,
    SemSegEvaluator,
    verify_results,
)
from detectron2.modeling import GeneralizedRCNNWithTTA

from mtl_plugins.compat.detectron2_c import has_real_extension
from mtl_plugins.d2 import MTLCheckpointer, MTLDefaultTrainer, add_mtl_config, merge_config_file
from mtl_plugins.d2.data import register_if_named


def build_evaluator(cfg, dataset_name, output_folder=None):
    """Upstream's evaluator dispatch on ``evaluator_type`` (COCO, Cityscapes instance and
    semantic, semantic seg, VOC, LVIS)."""
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    evaluator_list = []
    evaluator_type = MetadataCatalog.get(dataset_name).evaluator_type
    if evaluator_type in ["sem_seg", "coco_panoptic_seg"]:
        evaluator_list.append(SemSegEvaluator(dataset_name, distributed=True,
                                              output_dir=output_folder))
    if evaluator_type in ["coco", "coco_panoptic_seg"]:
        # both tasks always reported (upstream infers them from the predictions, so a model
        # that predicts nothing yet would report bbox only)
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        if cfg.MODEL.KEYPOINT_ON:
            tasks += ("keypoints",)
        evaluator_list.append(COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder,
                                            use_fast_impl=has_real_extension()))
    if evaluator_type == "cityscapes_instance":
        return CityscapesInstanceEvaluator(dataset_name)
    if evaluator_type == "cityscapes_sem_seg":
        return CityscapesSemSegEvaluator(dataset_name)
    if evaluator_type == "pascal_voc":
        return PascalVOCDetectionEvaluator(dataset_name)
    if evaluator_type == "lvis":
        return LVISEvaluator(dataset_name, output_dir=output_folder)
    if len(evaluator_list) == 0:
        raise NotImplementedError(
            f"no Evaluator for the dataset {dataset_name} with the type {evaluator_type}")
    if len(evaluator_list) == 1:
        return evaluator_list[0]
    return DatasetEvaluators(evaluator_list)


class Trainer(MTLDefaultTrainer):
    """Upstream's ``Trainer`` on top of :class:`MTLDefaultTrainer`."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def test_with_TTA(cls, cfg, model):
        logger = logging.getLogger("detectron2.trainer")
        logger.info("Running inference with test-time augmentation ...")
        model = GeneralizedRCNNWithTTA(cfg, model)
        evaluators = [cls.build_evaluator(cfg, name, output_folder=os.path.join(
            cfg.OUTPUT_DIR, "inference_TTA")) for name in cfg.DATASETS.TEST]
        res = cls.test(cfg, model, evaluators)
        return OrderedDict({k + "_TTA": v for k, v in res.items()})


def setup(args):
    """Create the config (with the MTL keys) and perform the basic setups."""
    cfg = get_cfg()
    add_mtl_config(cfg)
    merge_config_file(cfg, args.config_file)  # also resolves _BASE_: model_zoo://...
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    register_if_named(tuple(cfg.DATASETS.TRAIN) + tuple(cfg.DATASETS.TEST))

    if args.eval_only:
        model = Trainer.build_model(cfg)
        MTLCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(Trainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if cfg.TEST.AUG.ENABLED:
        trainer.register_hooks(
            [hooks.EvalHook(0, lambda: trainer.test_with_TTA(cfg, trainer.model))])
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines,
           machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))
