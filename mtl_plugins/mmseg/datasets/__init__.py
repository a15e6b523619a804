"""Multi-task datasets for MMSegmentation 1.x (registered in ``mmseg.registry.DATASETS``).

Importing this package registers ``MultiTaskSegDataset``, ``NYUv2MultiTaskDataset``,
``CityscapesMultiTaskDataset``, ``SyntheticScenesDataset`` and the ``LoadSyntheticScene``
transform. See ``docs/mmseg_data.md``.
"""
from .base import ClassRemapMixin, MultiTaskSegDataset
from .cityscapes import (CITYSCAPES7_CLASSES, CITYSCAPES19_CLASSES, CITYSCAPES_LABELS,
                         CityscapesMultiTaskDataset, labelid_to_category, labelid_to_trainid)
from .nyuv2 import NYU13_CLASSES, NYU40_CLASSES, NYU40_TO_13, NYUv2MultiTaskDataset
from .synthetic import (SYNTHETIC_CLASSES, LoadSyntheticScene, SyntheticScenesDataset,
                        render_synthetic_scene)

__all__ = [
    "MultiTaskSegDataset", "ClassRemapMixin",
    "NYUv2MultiTaskDataset", "NYU40_CLASSES", "NYU13_CLASSES", "NYU40_TO_13",
    "CityscapesMultiTaskDataset", "CITYSCAPES_LABELS", "CITYSCAPES19_CLASSES",
    "CITYSCAPES7_CLASSES", "labelid_to_trainid", "labelid_to_category",
    "SyntheticScenesDataset", "LoadSyntheticScene", "render_synthetic_scene", "SYNTHETIC_CLASSES",
]
