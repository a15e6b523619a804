"""NYUD-v2 for multi-task learning, in the ``NYUD_MT`` layout of the MTI-Net / PAD-Net line.

Layout (``data_root`` = the extracted ``NYUD_MT`` directory; 795 train / 654 val images, 480×640)::

    NYUD_MT/
    ├── images/          <stem>.jpg
    ├── segmentation/    <stem>.png   uint8, 0 = void, 1..40 = the 40 classes of Gupta et al. 2013
    ├── depth/           <stem>.npy   float32 [H, W], metres, 0 = invalid
    ├── normals/         <stem>.npy   float32 [H, W, 3], x right (flip negates channel 0)
    ├── edge/            <stem>.npy   float32 [H, W], 0/1
    └── gt_sets/         train.txt (795 stems), val.txt (654 stems)

Sources: the ``NYUD_MT`` loader of Vandenhende et al.'s Multi-Task-Learning-PyTorch
(``data/nyud.py``: ``images/*.jpg``, ``segmentation/*.png``, ``depth|normals|edge/*.npy``,
``gt_sets/{split}.txt``; seg label 0 → ignore and the others −1) and its ``RandomHorizontalFlip``
(negates ``normals[..., 0]``); notes ``seed-survey.md`` §4.1. ASTMT's older archive stores
normals as ``.jpg`` (``2 v / 255 − 1``), edges as ``.png`` and seg/depth as ``.mat``: change the
suffixes (``.mat`` is not supported; convert to ``.png``/``.npy``). Depth as a 16-bit PNG in
millimetres also works (``depth_map_suffix='.png'``,
``LoadMultiTaskAnnotations(depth_scale=1000)``).

Classes: ``num_classes=40`` (default; Gupta et al. 2013, names as in FCN's
``data/nyud/classes.txt``) or ``13`` (the 13 classes of Couprie et al. 2013 / Eigen & Fergus
2015 used by SegNet-MTAN and paper 001's NYUv2-13), reached from the 40 classes with
:data:`NYU40_TO_13`.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from mmseg.registry import DATASETS

from ...core.tasks import MTLConfigError
from .base import ClassRemapMixin, MultiTaskSegDataset

NYU40_CLASSES: Tuple[str, ...] = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "refridgerator", "television", "paper", "towel",
    "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
    "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop")

NYU13_CLASSES: Tuple[str, ...] = (
    "bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa", "table",
    "tv", "wall", "window")

#: ``NYU40_TO_13[i]`` = the 13-class id (1..13, 0 = void) of the 40-class id ``i`` (1..40,
#: 0 = void). Source: the table derived from ``class13Mapping.mat`` of
#: github.com/ankurhanda/nyuv2-meta-data (894 raw NYU labels → 13), as printed e.g. in
#: apple/ml-hypersim (``NYU40_SEMANTIC_ID_TO_NYU13_SEMANTIC_ID``); our notes
#: (seed-sta-gradsplit.md A.10) only say "894 raw classes clustered to 13 following MTAN".
#: Checked by hand against the class names: wall/door → wall, blinds/curtain → window,
#: desk → table, floor mat → floor, cabinet/bookshelf/counter/shelves/dresser/refridgerator/
#: night stand/otherfurniture → furniture, the remaining small objects → objects.
NYU40_TO_13: Tuple[int, ...] = (
    0, 12, 5, 6, 1, 4, 9, 10, 12, 13, 6, 8, 6, 13, 10, 6, 13, 6, 7, 7, 5, 7, 3, 2, 6, 11, 7, 7, 7,
    7, 7, 7, 6, 7, 7, 7, 7, 7, 7, 6, 7)


def voc_palette(n: int) -> List[List[int]]:
    """The PASCAL VOC colour map (bit-interleaved), without the black entry 0."""
    palette = []
    for i in range(1, n + 1):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append([r, g, b])
    return palette


NYU40_PALETTE = voc_palette(40)
#: 13-class colours after the SceneNet (McCormac et al. 2017) colour code, bed ... window
NYU13_PALETTE = [
    [0, 0, 255], [233, 89, 48], [0, 218, 0], [149, 0, 240], [222, 241, 24], [255, 206, 206],
    [0, 224, 229], [106, 136, 204], [117, 29, 41], [240, 35, 235], [0, 167, 156],
    [249, 139, 0], [225, 229, 194]]


@DATASETS.register_module()
class NYUv2MultiTaskDataset(ClassRemapMixin, MultiTaskSegDataset):
    """NYUD-v2 (``NYUD_MT`` layout) with seg (40 or 13 classes), depth, normals, edges.

    Args:
        split: ``'train'`` or ``'val'`` → ``ann_file='gt_sets/{split}.txt'`` (when ``ann_file``
            is not given). Neither: every image under ``images/``.
        num_classes: 40 (default) or 13; another value needs ``class_mapping`` and
            ``class_names``.
        class_mapping: sequence of 41 ints, 40-class id (0 = void) → target id (1..N, 0 = void).
            Default for 13 classes: :data:`NYU40_TO_13`.
        class_names: names of the N target classes (default for 13: :data:`NYU13_CLASSES`).
        tasks: default ``('seg', 'depth', 'normal')``; add ``'edge'`` for the edge maps.
        data_prefix, *_suffix: default to the NYUD_MT layout above.
        **kwargs: :class:`MultiTaskSegDataset` / ``BaseSegDataset`` arguments (``data_root``,
            ``pipeline``, ``allow_missing``, ``metainfo`` (a subset of the classes), ...).

    Labels: the PNG's 0 (void) becomes 255 and 1..40 become 0..39 (``reduce_zero_label=True``);
    for 13 classes the dataset's ``label_map`` then maps 0..39 → 0..12 (void → 255), so mmseg's
    own ``LoadAnnotations`` gives the same labels as ``LoadMultiTaskAnnotations``.
    """

    METAINFO = dict(classes=NYU40_CLASSES, palette=NYU40_PALETTE)

    def __init__(self,
                 split: Optional[str] = None,
                 num_classes: int = 40,
                 class_mapping: Optional[Sequence[int]] = None,
                 class_names: Optional[Sequence[str]] = None,
                 tasks: Sequence[str] = ("seg", "depth", "normal"),
                 data_prefix: dict = dict(img_path="images", seg_map_path="segmentation",
                                          depth_map_path="depth", normal_map_path="normals",
                                          edge_map_path="edge"),
                 img_suffix: str = ".jpg",
                 seg_map_suffix: str = ".png",
                 depth_map_suffix: str = ".npy",
                 normal_map_suffix: str = ".npy",
                 edge_map_suffix: str = ".npy",
                 ann_file: str = "",
                 reduce_zero_label: bool = True,
                 metainfo: Optional[dict] = None,
                 **kwargs) -> None:
        name = type(self).__name__
        if num_classes == 40 and class_mapping is None:
            names: Tuple[str, ...] = tuple(class_names or NYU40_CLASSES)
            palette = NYU40_PALETTE
            raw_to_base: Optional[Dict[int, int]] = None
        else:
            if class_mapping is None and num_classes != 13:
                raise MTLConfigError(f"{name}.num_classes={num_classes!r}: expected 40 or 13 "
                                     "(or give class_mapping and class_names)")
            mapping = [int(m) for m in (NYU40_TO_13 if class_mapping is None else class_mapping)]
            names = tuple(class_names or (NYU13_CLASSES if num_classes == 13 else ()))
            if len(mapping) != 41:
                raise MTLConfigError(f"{name}.class_mapping has {len(mapping)} entries; expected "
                                     "41 (40-class ids 0..40, 0 = void)")
            if any(not 0 <= m <= num_classes for m in mapping):
                raise MTLConfigError(f"{name}.class_mapping={mapping}: values must lie in "
                                     f"0..{num_classes} (0 = void)")
            if len(names) != num_classes:
                raise MTLConfigError(f"{name}.class_names: {len(names)} names for "
                                     f"num_classes={num_classes}")
            palette = NYU13_PALETTE if names == NYU13_CLASSES else voc_palette(num_classes)
            # reduced 40-class label i (0..39, i.e. stored id i + 1) → target label (255 = void)
            raw_to_base = {i: (mapping[i + 1] - 1 if mapping[i + 1] > 0 else 255)
                           for i in range(40)}
        self.num_classes = len(names)
        self.split = split
        if split is not None and not ann_file:
            ann_file = f"gt_sets/{split}.txt"
        meta = self._class_metainfo(names, palette, raw_to_base, metainfo)
        super().__init__(tasks=tasks, data_prefix=data_prefix, img_suffix=img_suffix,
                         seg_map_suffix=seg_map_suffix, depth_map_suffix=depth_map_suffix,
                         normal_map_suffix=normal_map_suffix, edge_map_suffix=edge_map_suffix,
                         ann_file=ann_file, reduce_zero_label=reduce_zero_label, metainfo=meta,
                         **kwargs)
