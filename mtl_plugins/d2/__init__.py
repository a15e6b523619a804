"""Detectron2 integration of mtl_plugins (needs detectron2).

Importing this package registers ``MTLGeneralizedRCNN`` (META_ARCH_REGISTRY), ``MTLRPN``
(PROPOSAL_GENERATOR_REGISTRY) and ``MTLStandardROIHeads`` (ROI_HEADS_REGISTRY). See
``docs/d2.md``.
"""
from .config import (DEFAULT_TASK_LOSSES, add_mtl_config, build_mtl_controller,
                     check_mtl_config, group_task_losses, merge_config_file,
                     structure_model_configs, task_loss_mapping)
from .modeling import MTLGeneralizedRCNN, MTLRPN, MTLStandardROIHeads, TaskFeatures
from .model_side import ModelSideMTLRCNN
from .trainer import MTLCheckpointer, MTLDefaultTrainer, MTLTrainer, split_task_parameters

__all__ = [
    "DEFAULT_TASK_LOSSES", "add_mtl_config", "build_mtl_controller", "check_mtl_config",
    "group_task_losses", "merge_config_file", "task_loss_mapping", "MTLGeneralizedRCNN", "MTLRPN",
    "MTLStandardROIHeads", "ModelSideMTLRCNN", "MTLDefaultTrainer", "MTLTrainer", "split_task_parameters",
    "MTLCheckpointer", "TaskFeatures", "structure_model_configs",
]
