"""Decoder heads of the mmseg integration, registered in ``mmseg.registry.MODELS``.

- single-task heads (mmseg decode heads): :class:`DepthHead`, :class:`NormalHead`,
  :class:`EdgeHead`, and :class:`TaskHead` (any mmseg decode head, e.g. ASPP, for one of
  those tasks); segmentation uses any stock mmseg decode head;
- multi-task decoders (:class:`MultiTaskDecoder` interface): :class:`PADNetHead`,
  :class:`MTINetHead`.

See ``docs/heads.md``.
"""
from .base import MultiTaskDecoder
from .mtinet import FeaturePropagation, MTINetHead
from .padnet import PADNetHead
from .targets import DEFAULT_LOSS_WEIGHTS, LOSS_NAMES, TaskLoss, allocated_mask, stack_targets
from .task_heads import DepthHead, EdgeHead, NormalHead, TaskHead

__all__ = [
    "MultiTaskDecoder", "PADNetHead", "MTINetHead", "FeaturePropagation", "DepthHead",
    "NormalHead", "EdgeHead", "TaskHead", "TaskLoss", "LOSS_NAMES", "DEFAULT_LOSS_WEIGHTS",
    "allocated_mask", "stack_targets",
]
