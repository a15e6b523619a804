#!/usr/bin/env python
"""Detectron2's ``tools/lazyconfig_train_net.py`` with the mtl_plugins multi-task trainer.

Same command line as upstream::

    python tools/lazyconfig_train_net.py \
        --config-file configs/d2/lazy/mask_rcnn_R_50_FPN_1x_coco_sta.py \
        --num-gpus 8 [--resume] [--eval-only] [key=value ...]

Differences from upstream:

- ``import mtl_plugins.d2`` registers the MTL modules;
- when the config has ``train.mtl`` (a dict, see :mod:`mtl_plugins.d2.lazy`), the trainer is
  :class:`~mtl_plugins.d2.trainer.MTLTrainer` (FT/STA/ISTA allocation, loss balancing, gradient
  aggregation, GradSplit, the Recon search) instead of ``SimpleTrainer``/``AMPTrainer``;
  ``train.amp.enabled`` then gives the controller its own loss scaler. The MTL state is in
  the trainer's ``state_dict`` (``checkpoint["trainer"]["mtl"]``), so every checkpoint
  carries it and ``--resume`` restores it;
- the Recon search's ranking is written (``train.mtl.recon_search.out`` in
  ``train.output_dir``) at every checkpoint period and at the end;
- the synthetic CPU smoke datasets ``mtl_synthetic_shapes_{train,val}`` are registered when
  the dataloaders name them (:mod:`mtl_plugins.d2.data`);
- ``COCOEvaluator`` runs pycocotools' reference evaluation (``use_fast_impl=False``) when
  ``detectron2._C`` is the placeholder of a Python-only install;
- ``main`` returns the trainer (training) or the evaluation results (``--eval-only``).
"""
import logging
import os
from typing import List, Optional, Tuple

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import (AMPTrainer, SimpleTrainer, default_argument_parser,
                               default_setup, default_writers, hooks, launch)
from detectron2.engine.defaults import create_ddp_model
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import COCOEvaluator, inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.registry import locate
from omegaconf import OmegaConf

import mtl_plugins.d2  # noqa: F401  (registers the MTL modules)
from mtl_plugins.compat.detectron2_c import has_real_extension
from mtl_plugins.d2.data import register_if_named
from mtl_plugins.d2.lazy import LazyMTL, build_mtl_from_dict, build_mtl_trainer
from mtl_plugins.d2.trainer import MTLCheckpointer, ReconRankingWriter

logger = logging.getLogger("detectron2")


def dataset_names(cfg) -> List[str]:
    """The dataset names of ``dataloader.{train,test}.dataset.names`` (a name or a list)."""
    names: List[str] = []
    for split in ("train", "test"):
        value = OmegaConf.select(cfg, f"dataloader.{split}.dataset.names", default=None)
        names += [value] if isinstance(value, str) else list(value or [])
    return names


def prepare_evaluator(cfg) -> None:
    """``use_fast_impl=False`` for a ``COCOEvaluator`` when ``detectron2._C`` is the
    placeholder (the fast implementation is compiled code)."""
    evaluator = OmegaConf.select(cfg, "dataloader.evaluator", default=None)
    if evaluator is None or has_real_extension():
        return
    target = evaluator.get("_target_")
    target = locate(target) if isinstance(target, str) else target
    if isinstance(target, type) and issubclass(target, COCOEvaluator):
        evaluator.use_fast_impl = False


def do_test(cfg, model):
    """Upstream's evaluation: ``dataloader.test`` through ``dataloader.evaluator``."""
    if "evaluator" in cfg.dataloader:
        ret = inference_on_dataset(model, instantiate(cfg.dataloader.test),
                                   instantiate(cfg.dataloader.evaluator))
        print_csv_format(ret)
        return ret


def build_trainer(cfg, model, train_loader, optim) -> Tuple[TrainerBase, Optional[LazyMTL]]:
    """``(MTLTrainer, its parts)`` built from ``train.mtl`` when the config has it, else
    upstream's ``(AMPTrainer or SimpleTrainer, None)``. Called before the LR scheduler is
    built (``hooks.LRScheduler.before_train``), so a parameter group the controller adds
    (uncertainty weighting) follows the schedule and is saved/resumed with the optimizer."""
    mtl = OmegaConf.select(cfg, "train.mtl", default=None)
    if mtl is None:
        trainer_cls = AMPTrainer if cfg.train.amp.enabled else SimpleTrainer
        return trainer_cls(model, train_loader, optim), None
    parts = build_mtl_from_dict(mtl, amp=cfg.train.amp.enabled, rank=comm.get_rank())
    return build_mtl_trainer(model, train_loader, optim, parts), parts


def recon_writer(cfg, parts: Optional[LazyMTL]) -> Optional[ReconRankingWriter]:
    """The Recon ranking writer when ``train.mtl.recon_search`` is on, else ``None``."""
    if parts is None or parts.recon_search is None:
        return None
    return ReconRankingWriter(os.path.join(cfg.train.output_dir, parts.recon_search["out"]),
                                  cfg.train.checkpointer.period)


def do_train(args, cfg) -> TrainerBase:
    """Upstream's training loop (see upstream's ``do_train`` for the expected config keys),
    with the trainer of :func:`build_trainer`; returns the trainer."""
    model = instantiate(cfg.model)
    logger.info("Model:\n{}".format(model))
    model.to(cfg.train.device)

    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)

    model = create_ddp_model(model, **cfg.train.ddp)
    trainer, parts = build_trainer(cfg, model, train_loader, optim)
    checkpointer = MTLCheckpointer(model, cfg.train.output_dir, optimizer=optim,
                                   trainer=trainer)
    main_process = comm.is_main_process()
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
        if main_process else None,
        recon_writer(cfg, parts),
        hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter),
                             period=cfg.train.log_period) if main_process else None,
    ])

    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    # a checkpoint stores the iteration that just finished: start at the next one
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return trainer


def main(args):
    """Upstream's ``main`` plus the synthetic datasets and the evaluator fix (module doc)."""
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    default_setup(cfg, args)
    register_if_named(dataset_names(cfg))
    prepare_evaluator(cfg)

    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        model = create_ddp_model(model)
        MTLCheckpointer(model).load(cfg.train.init_checkpoint)
        ret = do_test(cfg, model)
        print(ret)
        return ret
    return do_train(args, cfg)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines,
           machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))
