"""Cityscapes for multi-task learning: semantic segmentation + disparity ("depth").

Layout (``data_root`` = the Cityscapes root: ``leftImg8bit_trainvaltest.zip``,
``gtFine_trainvaltest.zip`` and ``disparity_trainvaltest.zip`` extracted side by side)::

    cityscapes/
    ├── leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    ├── gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
    └── disparity/{train,val,test}/<city>/<city>_<seq>_<frame>_disparity.png

* **seg**: the raw ``labelIds`` PNG is mapped by the dataset's ``label_map`` (applied by
  ``LoadMultiTaskAnnotations`` and by mmseg's ``LoadAnnotations`` alike): ``num_classes=19``
  → the 19 ``trainId`` classes (paper 001 Table 3, mmseg's CityscapesDataset; no need to run
  ``createTrainIdLabelImgs``), ``num_classes=7`` → the 7 non-void ``categoryId`` groups (flat,
  construction, object, nature, sky, human, vehicle) of SegNet-MTAN's 7-class Cityscapes
  [inferred: MTAN ships pre-processed 7-class labels; the 7 non-void categories are the natural
  reading]. Everything else → 255. Table: cityscapesScripts ``helpers/labels.py``.
* **depth**: Cityscapes has no metric depth; the "depth" task holds **disparity in pixels**, as
  paper 001 (Table 3, "disparity L1 [px]") and MTAN ("inverse depth") use it. The 16-bit PNG
  value ``p`` decodes to ``(p - 1) / 256`` for ``p > 0``; ``p = 0`` is invalid (→ 0.0, the depth
  ignore value; so is ``p = 1``, disparity 0). Source: cityscapesScripts README.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

from mmseg.registry import DATASETS

from ...core.tasks import MTLConfigError
from .base import ClassRemapMixin, MultiTaskSegDataset

#: (name, labelId, trainId, categoryId) for labelIds 0..33 (cityscapesScripts helpers/labels.py)
CITYSCAPES_LABELS: Tuple[Tuple[str, int, int, int], ...] = (
    ("unlabeled", 0, 255, 0), ("ego vehicle", 1, 255, 0), ("rectification border", 2, 255, 0),
    ("out of roi", 3, 255, 0), ("static", 4, 255, 0), ("dynamic", 5, 255, 0),
    ("ground", 6, 255, 0), ("road", 7, 0, 1), ("sidewalk", 8, 1, 1), ("parking", 9, 255, 1),
    ("rail track", 10, 255, 1), ("building", 11, 2, 2), ("wall", 12, 3, 2), ("fence", 13, 4, 2),
    ("guard rail", 14, 255, 2), ("bridge", 15, 255, 2), ("tunnel", 16, 255, 2),
    ("pole", 17, 5, 3), ("polegroup", 18, 255, 3), ("traffic light", 19, 6, 3),
    ("traffic sign", 20, 7, 3), ("vegetation", 21, 8, 4), ("terrain", 22, 9, 4),
    ("sky", 23, 10, 5), ("person", 24, 11, 6), ("rider", 25, 12, 6), ("car", 26, 13, 7),
    ("truck", 27, 14, 7), ("bus", 28, 15, 7), ("caravan", 29, 255, 7), ("trailer", 30, 255, 7),
    ("train", 31, 16, 7), ("motorcycle", 32, 17, 7), ("bicycle", 33, 18, 7))

CITYSCAPES19_CLASSES: Tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle")
CITYSCAPES19_PALETTE = [
    [128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153],
    [153, 153, 153], [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152],
    [70, 130, 180], [220, 20, 60], [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100],
    [0, 80, 100], [0, 0, 230], [119, 11, 32]]
CITYSCAPES7_CLASSES: Tuple[str, ...] = (
    "flat", "construction", "object", "nature", "sky", "human", "vehicle")
CITYSCAPES7_PALETTE = [
    [128, 64, 128], [70, 70, 70], [153, 153, 153], [107, 142, 35], [70, 130, 180],
    [220, 20, 60], [0, 0, 142]]


def labelid_to_trainid() -> Dict[int, int]:
    """labelId → trainId (0..18, 255 ignore) for every id 0..255 (unknown ids → 255)."""
    table = {i: 255 for i in range(256)}
    table.update({lid: tid for _, lid, tid, _ in CITYSCAPES_LABELS})
    return table


def labelid_to_category() -> Dict[int, int]:
    """labelId → 7-class category id (categoryId − 1, 0..6; void and unknown → 255)."""
    table = {i: 255 for i in range(256)}
    table.update({lid: (cat - 1 if cat > 0 else 255) for _, lid, _, cat in CITYSCAPES_LABELS})
    return table


@DATASETS.register_module()
class CityscapesMultiTaskDataset(ClassRemapMixin, MultiTaskSegDataset):
    """Cityscapes with ``seg`` (19 trainId classes or 7 categories, from ``labelIds``) and
    ``depth`` (= disparity in pixels).

    Args:
        split: ``'train'`` (2975), ``'val'`` (500) or ``'test'``: sets ``data_prefix`` to
            ``leftImg8bit/{split}``, ``gtFine/{split}``, ``disparity/{split}`` unless
            ``data_prefix`` is given.
        num_classes: 19 (default) or 7.
        tasks: ``('seg', 'depth')`` (default) or a subset.
        seg_map_suffix: default ``'_gtFine_labelIds.png'`` (raw ids, mapped here). To use
            pre-computed ``_gtFine_labelTrainIds.png`` files, pass that suffix and
            ``num_classes=19`` with ``use_train_ids=True`` (no mapping).
        **kwargs: :class:`MultiTaskSegDataset` / ``BaseSegDataset`` arguments.

    Samples are found by scanning ``leftImg8bit/{split}`` recursively (stems
    ``<city>/<city>_<seq>_<frame>``), or from ``ann_file`` (one such stem per line).
    """

    METAINFO = dict(classes=CITYSCAPES19_CLASSES, palette=CITYSCAPES19_PALETTE)

    def __init__(self,
                 split: str = "train",
                 num_classes: int = 19,
                 tasks: Sequence[str] = ("seg", "depth"),
                 data_prefix: Optional[dict] = None,
                 img_suffix: str = "_leftImg8bit.png",
                 seg_map_suffix: str = "_gtFine_labelIds.png",
                 depth_map_suffix: str = "_disparity.png",
                 use_train_ids: bool = False,
                 metainfo: Optional[dict] = None,
                 **kwargs) -> None:
        name = type(self).__name__
        if num_classes == 19:
            classes, palette = CITYSCAPES19_CLASSES, CITYSCAPES19_PALETTE
            raw_map = None if use_train_ids else labelid_to_trainid()
        elif num_classes == 7:
            if use_train_ids:
                raise MTLConfigError(f"{name}: use_train_ids=True needs num_classes=19")
            classes, palette = CITYSCAPES7_CLASSES, CITYSCAPES7_PALETTE
            raw_map = labelid_to_category()
        else:
            raise MTLConfigError(f"{name}.num_classes={num_classes!r}: expected 19 or 7")
        bad = [t for t in tasks if t not in ("seg", "depth")]
        if bad:
            raise MTLConfigError(f"{name}.tasks={list(tasks)!r}: Cityscapes has only 'seg' and "
                                 f"'depth' (disparity), not {bad}")
        self.num_classes = num_classes
        self.split = split
        if data_prefix is None:
            data_prefix = dict(img_path=f"leftImg8bit/{split}", seg_map_path=f"gtFine/{split}",
                               depth_map_path=f"disparity/{split}")
        meta = self._class_metainfo(classes, palette, raw_map, metainfo)
        kwargs.setdefault("reduce_zero_label", False)
        kwargs.setdefault("depth_decoding", "cityscapes_disparity")
        super().__init__(tasks=tasks, data_prefix=data_prefix, img_suffix=img_suffix,
                         seg_map_suffix=seg_map_suffix, depth_map_suffix=depth_map_suffix,
                         metainfo=meta, **kwargs)
