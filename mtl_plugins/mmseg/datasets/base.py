"""``MultiTaskSegDataset``: mmseg's ``BaseSegDataset`` with one annotation directory per task.

Each sample is a file stem (``ann_file`` lists one per line, or every ``img_suffix`` file under
``data_prefix['img_path']`` is taken); its annotation for task ``t`` is
``data_prefix[PATH_KEYS[t]] / (stem + <t>_suffix)``. ``load_data_list`` yields dicts with
``img_path``, one ``<task>_map_path`` per task the sample has, ``mtl_tasks`` (those tasks),
``label_map``, ``reduce_zero_label``, ``depth_decoding`` and ``seg_fields=[]`` — the input of
:class:`~mtl_plugins.mmseg.transforms.LoadMultiTaskAnnotations`.
"""
from __future__ import annotations

import os.path as osp
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import mmengine
import mmengine.fileio as fileio
from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS

from ...core.tasks import MTLConfigError, check_task_names
from ..fields import TASKS_KEY, check_dense_tasks
from ..transforms import DEPTH_DECODINGS, PATH_KEYS

SUFFIX_ARGS: Dict[str, str] = {
    "seg": "seg_map_suffix", "depth": "depth_map_suffix", "normal": "normal_map_suffix",
    "edge": "edge_map_suffix"}


@DATASETS.register_module()
class MultiTaskSegDataset(BaseSegDataset):
    """A dense multi-task dataset: one image directory and one annotation directory per task.

    Args:
        tasks: the dense tasks of the dataset (subset of ``('seg', 'depth', 'normal', 'edge')``).
        data_prefix: ``dict(img_path=..., seg_map_path=..., depth_map_path=...,
            normal_map_path=..., edge_map_path=...)``; only the keys of ``tasks`` are needed.
            Relative paths are joined to ``data_root``.
        img_suffix, seg_map_suffix, depth_map_suffix, normal_map_suffix, edge_map_suffix: the
            file name of a sample's image/annotation is ``stem + suffix``.
        ann_file: a split list, one stem per line (may contain sub-directories); relative to
            ``data_root``. Empty: every ``img_suffix`` file under ``img_path`` (recursive).
        allow_missing: ``False``: a missing annotation file raises ``FileNotFoundError`` naming
            the file, the task and the sample. ``True``: the task is dropped from that sample's
            ``mtl_tasks`` (partial labels). A missing image is always an error.
        depth_decoding: stored in each sample for ``LoadMultiTaskAnnotations`` (``'scale'`` or
            ``'cityscapes_disparity'``).
        check_files: check that the annotation files exist while listing the samples (needed for
            ``allow_missing``; turn off for remote storage where it is slow).
        **kwargs: ``BaseSegDataset`` arguments (``metainfo``, ``data_root``, ``pipeline``,
            ``reduce_zero_label``, ``ignore_index``, ``test_mode``, ``indices``, ``backend_args``,
            ...).

    The dataset ``metainfo`` also holds ``mtl_tasks`` (the dataset's tasks): combine datasets of
    different tasks/classes with ``ConcatDataset(ignore_keys=['classes', 'palette',
    'mtl_tasks', ...])``.
    """

    def __init__(self,
                 tasks: Sequence[str] = ("seg", "depth", "normal"),
                 data_prefix: dict = dict(img_path="", seg_map_path="", depth_map_path="",
                                          normal_map_path="", edge_map_path=""),
                 img_suffix: str = ".jpg",
                 seg_map_suffix: str = ".png",
                 depth_map_suffix: str = ".png",
                 normal_map_suffix: str = ".png",
                 edge_map_suffix: str = ".png",
                 allow_missing: bool = False,
                 depth_decoding: str = "scale",
                 check_files: bool = True,
                 metainfo: Optional[dict] = None,
                 **kwargs) -> None:
        self.tasks: Tuple[str, ...] = check_dense_tasks(
            check_task_names(tasks, "dataset.tasks"), "dataset.tasks")
        self.suffixes = {"seg": seg_map_suffix, "depth": depth_map_suffix,
                         "normal": normal_map_suffix, "edge": edge_map_suffix}
        self.allow_missing = bool(allow_missing)
        self.check_files = bool(check_files)
        if self.allow_missing and not self.check_files:
            raise MTLConfigError(f"{type(self).__name__}: allow_missing=True needs "
                                 "check_files=True (missing files are found while listing)")
        if depth_decoding not in DEPTH_DECODINGS:
            raise MTLConfigError(f"{type(self).__name__}.depth_decoding={depth_decoding!r}: "
                                 f"expected one of {DEPTH_DECODINGS}")
        self.depth_decoding = depth_decoding
        metainfo = dict(metainfo or {})
        if "seg" not in self.tasks and "classes" not in metainfo \
                and self.METAINFO.get("classes") is None:
            metainfo["classes"] = ()  # no seg task: mmseg's test_mode check wants `classes`
        super().__init__(data_prefix=data_prefix, img_suffix=img_suffix,
                         seg_map_suffix=seg_map_suffix, metainfo=metainfo, **kwargs)
        self._metainfo[TASKS_KEY] = self.tasks

    # -- listing -------------------------------------------------------------------------------
    def _check_prefixes(self) -> None:
        name = type(self).__name__
        missing = [k for k in ["img_path"] + [PATH_KEYS[t] for t in self.tasks]
                   if not isinstance(self.data_prefix.get(k, None), str)]
        if missing:
            raise MTLConfigError(
                f"{name}.data_prefix={self.data_prefix!r}: missing {missing} for tasks "
                f"{list(self.tasks)}; expected dict(img_path=..., "
                + ", ".join(f"{PATH_KEYS[t]}=..." for t in self.tasks) + ")")

    def list_stems(self) -> List[str]:
        """Sample stems from ``ann_file`` or by scanning the image directory (sorted)."""
        img_dir = self.data_prefix["img_path"]
        if self.ann_file and not osp.isdir(self.ann_file):
            if not fileio.exists(self.ann_file, backend_args=self.backend_args):
                raise FileNotFoundError(
                    f"{type(self).__name__}: split file (ann_file) not found: {self.ann_file}")
            lines = mmengine.list_from_file(self.ann_file, backend_args=self.backend_args)
            return [ln.strip() for ln in lines if ln.strip()]
        n = len(self.img_suffix)
        return sorted(f[:-n] for f in fileio.list_dir_or_file(
            dir_path=img_dir, list_dir=False, suffix=self.img_suffix, recursive=True,
            backend_args=self.backend_args))

    def _exists(self, path: str) -> bool:
        return fileio.exists(path, backend_args=self.backend_args)

    def make_data_info(self, stem: str) -> dict:
        """The data info of one sample: every path of the dataset's tasks, ``mtl_tasks``."""
        name = type(self).__name__
        img_path = osp.join(self.data_prefix["img_path"], stem + self.img_suffix)
        if self.check_files and not self._exists(img_path):
            raise FileNotFoundError(f"{name}: image of sample {stem!r} not found: {img_path}")
        info = dict(img_path=img_path)
        tasks = []
        for task in self.tasks:
            path = osp.join(self.data_prefix[PATH_KEYS[task]], stem + self.suffixes[task])
            if self.check_files and not self._exists(path):
                if self.allow_missing:
                    continue
                raise FileNotFoundError(
                    f"{name}: annotation file for task {task!r} of sample {stem!r} not found: "
                    f"{path} (set allow_missing=True to train with partial labels)")
            info[PATH_KEYS[task]] = path
            tasks.append(task)
        info.update(label_map=self.label_map, reduce_zero_label=self.reduce_zero_label,
                    depth_decoding=self.depth_decoding, seg_fields=[])
        info[TASKS_KEY] = tuple(tasks)
        return info

    def load_data_list(self) -> List[dict]:
        self._check_prefixes()
        return [self.make_data_info(stem) for stem in self.list_stems()]


class ClassRemapMixin:
    """Datasets whose stored label ids are mapped to their classes by a fixed table.

    ``raw_to_base`` maps the label ids left after ``reduce_zero_label`` to the dataset's base
    classes (255 = void), or is ``None`` (ids are the classes). mmseg's class-subset mechanism
    (``metainfo=dict(classes=[subset])``) is composed on top, so the dataset's ``label_map`` is
    one table that both ``LoadMultiTaskAnnotations`` and mmseg's ``LoadAnnotations`` apply.
    Call :meth:`_class_metainfo` before ``BaseSegDataset.__init__``.
    """

    def _class_metainfo(self, classes: Sequence[str], palette: Sequence,
                        raw_to_base: Optional[Mapping[int, int]],
                        metainfo: Optional[dict]) -> dict:
        self._base_classes: Tuple[str, ...] = tuple(classes)
        self._base_palette: List = [list(c) for c in palette]
        self._raw_to_base: Optional[Dict[int, int]] = (
            None if raw_to_base is None else {int(k): int(v) for k, v in raw_to_base.items()})
        meta = dict(classes=self._base_classes, palette=self._base_palette)
        user = dict(metainfo or {})
        if "classes" in user and "palette" not in user:
            meta.pop("palette")  # derived from the base palette in _update_palette
        meta.update(user)
        return meta

    def get_label_map(self, new_classes: Optional[Sequence] = None):
        """Stored id → final id (instance-level override of mmseg's classmethod)."""
        base = list(self._base_classes)
        subset = None
        if new_classes is not None and list(new_classes) != base:
            if not set(new_classes).issubset(base):
                raise ValueError(f"new classes {list(new_classes)} is not a subset of classes "
                                 f"{base} of {type(self).__name__}.")
            subset = {i: (list(new_classes).index(c) if c in new_classes else 255)
                      for i, c in enumerate(base)}
        if self._raw_to_base is None:
            return subset
        return {raw: (255 if b == 255 else (subset[b] if subset else b))
                for raw, b in self._raw_to_base.items()}

    def _update_palette(self) -> list:
        classes = list(self._metainfo.get("classes", []))
        palette = self._metainfo.get("palette", None)
        if palette is not None and len(palette) == len(classes):
            return palette
        base = list(self._base_classes)
        return [self._base_palette[base.index(c)] for c in classes]
