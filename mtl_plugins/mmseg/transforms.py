"""Data transforms for multi-task dense prediction in MMSegmentation 1.x.

Every transform here keeps the conventions of :mod:`mtl_plugins.mmseg.fields`: one results key per
task (``gt_seg_map``, ``gt_depth_map``, ``gt_normal_map``, ``gt_edge_map``), each listed in
``results['seg_fields']`` so that mmseg's geometric transforms (``Resize``, ``RandomResize``,
``RandomCrop``) move all of them with the image, and one invalid value per task
(:data:`~mtl_plugins.mmseg.fields.IGNORE_VALUES`).

Registered in ``mmseg.registry.TRANSFORMS``:

* ``LoadMultiTaskAnnotations``: reads ``seg_map_path``/``depth_map_path``/``normal_map_path``/
  ``edge_map_path`` into the results keys and sets ``results['mtl_tasks']``;
* ``MultiTaskRandomFlip``: mmseg's ``RandomFlip`` that also mirrors the normal *vectors* (negates
  x for a horizontal flip, y for a vertical one) and swaps seg labels only in the seg map;
* ``MultiTaskRandomCrop``: mmseg's ``RandomCrop`` that still works on samples without a seg map
  when ``cat_max_ratio < 1`` (partial labels);
* ``MultiTaskResize``: mmseg's ``Resize`` that resizes float maps (depth, normals) with cv2 even
  when ``backend='pillow'`` (Pillow refuses non-uint8 arrays), optionally divides depth by the
  zoom factor (the MTI-Net NYUD augmentation);
* ``PackMultiTaskInputs``: mmseg's ``PackSegInputs`` plus ``gt_normal_map`` ([3, H, W] float)
  and the ``mtl_tasks`` metainfo.

Checked against mmseg 1.2.2 / mmcv 2.1.0 (see ``tests/mmseg/test_data.py``):
``Resize``/``RandomResize`` resize every seg field with ``interpolation='nearest'`` and keep the
dtype (float32 depth and normals stay float32, unit normals stay unit, invalid zeros are not
blended), ``RandomCrop`` slices every seg field (any dtype / channel count) and its
``cat_max_ratio`` test reads only ``gt_seg_map``; ``PhotoMetricDistortion`` touches only ``img``.
Not supported for normals: ``RandomRotate``/``RandomRotFlip`` (they fill depth/normals with
``seg_pad_val`` and do not rotate the vectors).
"""
from __future__ import annotations

import io
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import mmcv
import mmengine.fileio as fileio
import numpy as np
from mmcv.transforms import BaseTransform, to_tensor
from mmengine.structures import PixelData

from mmseg.datasets.transforms import PackSegInputs, RandomCrop, RandomFlip, Resize
from mmseg.registry import TRANSFORMS

from ..core.tasks import MTLConfigError, check_task_names
from .fields import (IGNORE_VALUES, KNOWN_TASKS, RESULTS_KEYS, SAMPLE_FIELDS, TASKS_KEY,
                     check_dense_tasks)

#: results key holding each task's annotation path (set by the datasets)
PATH_KEYS: Dict[str, str] = {
    "seg": "seg_map_path", "depth": "depth_map_path", "normal": "normal_map_path",
    "edge": "edge_map_path"}

DEPTH_DECODINGS = ("scale", "cityscapes_disparity")
NORMAL_DECODINGS = ("rgb", "npy")


def _add_seg_field(results: dict, key: str) -> None:
    fields = results.setdefault("seg_fields", [])
    if key not in fields:
        fields.append(key)


def _label_lut(label_map: Union[Mapping[int, int], Sequence[int]]) -> np.ndarray:
    """A 256-entry uint8 look-up table: identity except where ``label_map`` says otherwise."""
    lut = np.arange(256, dtype=np.uint8)
    items = label_map.items() if isinstance(label_map, Mapping) else enumerate(label_map)
    for old, new in items:
        old, new = int(old), int(new)
        if not (0 <= old <= 255 and 0 <= new <= 255):
            raise MTLConfigError(
                f"seg_label_map: entry {old}->{new} is outside 0..255 (uint8 label maps)")
        lut[old] = new
    return lut


def tasks_present(results: Mapping) -> Tuple[str, ...]:
    """Tasks whose results key exists in ``results`` (in :data:`KNOWN_TASKS` order)."""
    return tuple(t for t in KNOWN_TASKS if RESULTS_KEYS[t] in results)


@TRANSFORMS.register_module()
class LoadMultiTaskAnnotations(BaseTransform):
    """Load the dense annotations of the tasks a sample has, in the conventions of ``fields.py``.

    Required keys: ``<task>_map_path`` for every task to load (``seg_map_path``,
    ``depth_map_path``, ``normal_map_path``, ``edge_map_path``). Optional: ``mtl_tasks`` (the tasks
    the dataset says the sample is annotated for; partial labels), ``reduce_zero_label``,
    ``label_map``, ``depth_decoding``, ``seg_fields``.

    Added keys: ``gt_seg_map`` (uint8 [H, W], 255 = ignore), ``gt_depth_map`` (float32 [H, W],
    metres or disparity pixels, 0 = invalid), ``gt_normal_map`` (float32 [H, W, 3], unit vectors
    (x right, y up, z towards the camera), zero vector = invalid), ``gt_edge_map`` (uint8 [H, W],
    0/1, 255 = ignore); each is appended to ``seg_fields``. ``mtl_tasks`` is set to the tasks
    actually loaded.

    Which tasks are loaded: ``tasks`` ∩ ``results['mtl_tasks']`` when the dataset sets
    ``mtl_tasks``, else ``tasks`` (and a missing path key is an error).

    Args:
        tasks: tasks to load, a subset of ``('seg', 'depth', 'normal', 'edge')``.
        depth_scale: integer-coded depth maps (16-bit PNG) are divided by it; 1000 turns
            millimetres into metres. Float maps (``.npy``, float TIFF) are taken as they are.
        depth_decoding: ``'scale'`` (value / ``depth_scale``) or ``'cityscapes_disparity'``
            (``(p - 1) / 256`` for ``p > 0``, 0 invalid). ``None``: use
            ``results['depth_decoding']`` (set by the datasets), defaulting to ``'scale'``.
        reduce_zero_label: as mmseg's ``LoadAnnotations``: label 0 → 255, others −1. ``None``:
            use ``results['reduce_zero_label']`` (set by the datasets), defaulting to ``False``.
        seg_label_map: ``{old: new}`` (or a sequence indexed by old label) applied after
            ``reduce_zero_label``; labels not listed keep their value. ``None``: use
            ``results['label_map']`` (set by the datasets) when present.
        normal_decoding: ``'rgb'``: an 8-bit RGB image decoded as ``v / 127.5 - 1``; black
            pixels (0, 0, 0) and vectors of norm < 0.5 are invalid (zero vector). ``'npy'``: a
            float array [H, W, 3] (or [3, H, W]) read with numpy. A ``.npy`` file is always read
            with numpy, whatever this says.
        normalize_normals: rescale valid normals to unit length (quantisation, resampling).
        imdecode_backend: backend for 8-bit images (seg, edge, RGB normals); 16-bit depth PNGs
            are always decoded with cv2 (Pillow does not keep uint16 reliably).
        backend_args: mmengine file backend arguments.
    """

    def __init__(self,
                 tasks: Sequence[str] = ("seg", "depth", "normal"),
                 depth_scale: float = 1000.0,
                 depth_decoding: Optional[str] = None,
                 reduce_zero_label: Optional[bool] = None,
                 seg_label_map: Optional[Union[Mapping[int, int], Sequence[int]]] = None,
                 normal_decoding: str = "rgb",
                 normalize_normals: bool = True,
                 imdecode_backend: str = "pillow",
                 backend_args: Optional[dict] = None) -> None:
        super().__init__()
        self.tasks = check_dense_tasks(check_task_names(tasks, "LoadMultiTaskAnnotations.tasks"),
                                       "LoadMultiTaskAnnotations.tasks")
        if not float(depth_scale) > 0:
            raise MTLConfigError(
                f"LoadMultiTaskAnnotations.depth_scale={depth_scale!r}: expected a positive number")
        self.depth_scale = float(depth_scale)
        if depth_decoding is not None and depth_decoding not in DEPTH_DECODINGS:
            raise MTLConfigError(
                f"LoadMultiTaskAnnotations.depth_decoding={depth_decoding!r}: expected None or "
                f"one of {DEPTH_DECODINGS}")
        self.depth_decoding = depth_decoding
        if normal_decoding not in NORMAL_DECODINGS:
            raise MTLConfigError(
                f"LoadMultiTaskAnnotations.normal_decoding={normal_decoding!r}: expected one of "
                f"{NORMAL_DECODINGS}")
        self.normal_decoding = normal_decoding
        self.normalize_normals = bool(normalize_normals)
        self.reduce_zero_label = reduce_zero_label
        self.seg_label_map = seg_label_map
        self._seg_lut = None if seg_label_map is None else _label_lut(seg_label_map)
        self.imdecode_backend = imdecode_backend
        self.backend_args = backend_args.copy() if backend_args else None

    # -- reading -------------------------------------------------------------------------------
    def _get_bytes(self, path: str, task: str) -> bytes:
        try:
            return fileio.get(path, backend_args=self.backend_args)
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"LoadMultiTaskAnnotations: annotation file for task {task!r} not found: "
                f"{path}") from exc

    def _read(self, path: str, task: str, flag: str, backend: str,
              channel_order: str = "bgr") -> np.ndarray:
        data = self._get_bytes(path, task)
        if str(path).lower().endswith(".npy"):
            return np.load(io.BytesIO(data), allow_pickle=False)
        arr = mmcv.imfrombytes(data, flag=flag, channel_order=channel_order, backend=backend)
        if arr is None:
            raise ValueError(f"LoadMultiTaskAnnotations: cannot decode {path} (task {task!r})")
        return arr

    # -- per task ------------------------------------------------------------------------------
    def _load_seg(self, results: dict, path: str) -> np.ndarray:
        seg = np.asarray(self._read(path, "seg", "unchanged", self.imdecode_backend)).squeeze()
        if seg.ndim != 2:
            raise ValueError(f"LoadMultiTaskAnnotations: seg map {path} has shape {seg.shape}; "
                             "expected a single-channel label image")
        if seg.dtype != np.uint8:
            if np.issubdtype(seg.dtype, np.floating):
                seg = np.rint(seg)
            if seg.size and (seg.min() < 0 or seg.max() > 255):
                raise ValueError(f"LoadMultiTaskAnnotations: seg map {path} has labels outside "
                                 f"0..255 ({seg.min()}..{seg.max()}); expected uint8 labels")
            seg = seg.astype(np.uint8)
        reduce_zero = self.reduce_zero_label
        if reduce_zero is None:
            reduce_zero = bool(results.get("reduce_zero_label", False))
        if reduce_zero:
            lut = np.arange(256, dtype=np.int32) - 1
            lut[0] = 255
            lut[255] = 255
            seg = lut.astype(np.uint8)[seg]
        lut = self._seg_lut
        if lut is None and results.get("label_map") is not None:
            lut = _label_lut(results["label_map"])
        if lut is not None:
            seg = lut[seg]
        return np.ascontiguousarray(seg)

    def _load_depth(self, results: dict, path: str) -> np.ndarray:
        decoding = self.depth_decoding or results.get("depth_decoding", "scale")
        if decoding not in DEPTH_DECODINGS:
            raise MTLConfigError(f"results['depth_decoding']={decoding!r}: expected one of "
                                 f"{DEPTH_DECODINGS}")
        raw = np.asarray(self._read(path, "depth", "unchanged", "cv2"))
        if raw.ndim == 3 and raw.shape[-1] == 1:
            raw = raw[..., 0]
        if raw.ndim != 2:
            raise ValueError(f"LoadMultiTaskAnnotations: depth map {path} has shape "
                             f"{raw.shape}; expected [H, W]")
        if decoding == "cityscapes_disparity":
            # Cityscapes disparity PNGs: d = (p - 1) / 256 for p > 0, p = 0 is invalid
            # (cityscapesScripts README, "disparity" section).
            p = raw.astype(np.float32)
            depth = np.where(p > 0, (p - 1.0) / 256.0, 0.0).astype(np.float32)
        elif np.issubdtype(raw.dtype, np.integer):
            depth = raw.astype(np.float32) / np.float32(self.depth_scale)
        else:
            depth = raw.astype(np.float32)
        depth[~np.isfinite(depth) | (depth < 0)] = IGNORE_VALUES["depth"]
        return depth

    def _load_normal(self, results: dict, path: str) -> np.ndarray:
        is_npy = self.normal_decoding == "npy" or str(path).lower().endswith(".npy")
        if is_npy:
            data = self._get_bytes(path, "normal")
            arr = np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32)
            if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
                arr = arr.transpose(1, 2, 0)
            arr = np.ascontiguousarray(arr)
            arr[~np.isfinite(arr)] = 0.0
            invalid = np.zeros(arr.shape[:2], dtype=bool)
            min_norm = 1e-6
        else:
            raw = np.asarray(self._read(path, "normal", "color", self.imdecode_backend,
                                        channel_order="rgb"))
            if raw.dtype != np.uint8:
                raise ValueError(f"LoadMultiTaskAnnotations: RGB normal map {path} is "
                                 f"{raw.dtype}; expected 8-bit (use .npy for float normals)")
            invalid = (raw == 0).all(axis=-1)
            arr = raw.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
            min_norm = 0.5
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"LoadMultiTaskAnnotations: normal map {path} has shape "
                             f"{arr.shape}; expected [H, W, 3]")
        norm = np.linalg.norm(arr, axis=-1)
        invalid |= norm < min_norm
        if self.normalize_normals:
            arr = arr / np.where(invalid, 1.0, norm)[..., None]
        arr[invalid] = IGNORE_VALUES["normal"]
        return arr.astype(np.float32, copy=False)

    def _load_edge(self, results: dict, path: str) -> np.ndarray:
        raw = np.asarray(self._read(path, "edge", "unchanged", self.imdecode_backend)).squeeze()
        if raw.ndim != 2:
            raise ValueError(f"LoadMultiTaskAnnotations: edge map {path} has shape {raw.shape}; "
                             "expected [H, W]")
        if np.issubdtype(raw.dtype, np.floating):
            # float maps (NYUD_MT .npy): 0/1 (soft values binarised at 0.5), 255 = ignore
            edge = (raw > 0.5).astype(np.uint8)
            edge[raw == IGNORE_VALUES["edge"]] = IGNORE_VALUES["edge"]
            return edge
        # integer maps: 0 = no edge, 1 = edge, 255 = ignore
        return raw.astype(np.uint8)

    # -- transform -----------------------------------------------------------------------------
    def _tasks_to_load(self, results: dict) -> Tuple[str, ...]:
        if TASKS_KEY in results:
            annotated = tuple(results[TASKS_KEY])
            return tuple(t for t in annotated if t in self.tasks)
        missing = [PATH_KEYS[t] for t in self.tasks if not results.get(PATH_KEYS[t])]
        if missing:
            raise KeyError(
                f"LoadMultiTaskAnnotations(tasks={list(self.tasks)}): results lack {missing} "
                f"(image {results.get('img_path')!r}); use a multi-task dataset or restrict "
                "`tasks`")
        return self.tasks

    def transform(self, results: dict) -> dict:
        loaders = {"seg": self._load_seg, "depth": self._load_depth,
                   "normal": self._load_normal, "edge": self._load_edge}
        loaded = []
        for task in self._tasks_to_load(results):
            path = results.get(PATH_KEYS[task])
            if not path:
                raise KeyError(
                    f"LoadMultiTaskAnnotations: sample {results.get('img_path')!r} is annotated "
                    f"for task {task!r} but results[{PATH_KEYS[task]!r}] is missing")
            key = RESULTS_KEYS[task]
            results[key] = loaders[task](results, path)
            _add_seg_field(results, key)
            loaded.append(task)
        results[TASKS_KEY] = tuple(loaded)
        return results

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(tasks={self.tasks}, depth_scale={self.depth_scale}, "
                f"depth_decoding={self.depth_decoding!r}, "
                f"reduce_zero_label={self.reduce_zero_label}, "
                f"normal_decoding={self.normal_decoding!r}, "
                f"imdecode_backend={self.imdecode_backend!r})")


def flip_normals(normals: np.ndarray, direction: str) -> np.ndarray:
    """Mirror a [H, W, 3] normal map that has already been flipped spatially: negate x for
    ``'horizontal'``, y for ``'vertical'``, both for ``'diagonal'`` (zero vectors stay zero)."""
    axes = {"horizontal": (0,), "vertical": (1,), "diagonal": (0, 1)}[direction]
    out = np.array(normals, dtype=np.float32, copy=True)
    for a in axes:
        out[..., a] = -out[..., a]
    out[out == 0] = 0.0  # no negative zeros
    return out


@TRANSFORMS.register_module()
class MultiTaskRandomFlip(RandomFlip):
    """mmseg's ``RandomFlip`` for multi-task samples.

    Flips ``img`` and every key of ``seg_fields`` (as mmseg does), then mirrors the normal
    vectors: a horizontal flip negates the x component of ``gt_normal_map``, a vertical flip the y
    component, a diagonal flip both. ``swap_seg_labels`` is applied to ``gt_seg_map`` only (mmseg
    would apply it to every seg field, i.e. to depth values and normal components too).

    Args:
        prob: flip probability (float or list of floats, as mmcv's ``RandomFlip``).
        direction: ``'horizontal'``, ``'vertical'``, ``'diagonal'`` or a list of them.
        swap_seg_labels: label pairs swapped in the seg map after flipping.
    """

    def __init__(self, prob: Union[float, Sequence[float]] = 0.5,
                 direction: Union[str, Sequence[str]] = "horizontal",
                 swap_seg_labels: Optional[Sequence] = None) -> None:
        if isinstance(prob, (int, float)) and not isinstance(prob, bool):
            prob = float(prob)  # mmcv only accepts float or list (an int 1 would break it)
        elif isinstance(prob, (list, tuple)):
            prob = [float(p) for p in prob]
        if isinstance(direction, tuple):
            direction = list(direction)
        super().__init__(prob=prob, direction=direction, swap_seg_labels=swap_seg_labels)

    def _flip(self, results: dict) -> None:
        direction = results["flip_direction"]
        results["img"] = mmcv.imflip(results["img"], direction=direction)
        if results.get("gt_bboxes", None) is not None:
            results["gt_bboxes"] = self._flip_bbox(results["gt_bboxes"],
                                                   results["img"].shape[:2], direction)
        for key in results.get("seg_fields", []):
            if results.get(key, None) is None:
                continue
            if key == RESULTS_KEYS["seg"]:
                # mmcv's _flip_seg_map flips and applies swap_seg_labels
                results[key] = self._flip_seg_map(results[key], direction=direction).copy()
                results["swap_seg_labels"] = self.swap_seg_labels
            else:
                results[key] = mmcv.imflip(results[key], direction=direction).copy()
        if results.get(RESULTS_KEYS["normal"], None) is not None:
            results[RESULTS_KEYS["normal"]] = flip_normals(results[RESULTS_KEYS["normal"]],
                                                           direction)


@TRANSFORMS.register_module()
class MultiTaskRandomCrop(RandomCrop):
    """mmseg's ``RandomCrop`` that accepts samples without a seg map.

    With ``cat_max_ratio < 1`` mmseg's crop reads ``gt_seg_map`` unconditionally (KeyError on a
    depth-only sample of a partially labelled dataset); here such samples get a plain random crop.
    Cropping itself is mmseg's (slices every seg field: float depth, [H, W, 3] normals, edges).
    """

    def crop_bbox(self, results: dict) -> tuple:
        if self.cat_max_ratio >= 1.0 or RESULTS_KEYS["seg"] in results:
            return super().crop_bbox(results)
        ratio = self.cat_max_ratio
        self.cat_max_ratio = 1.0
        try:
            return super().crop_bbox(results)
        finally:
            self.cat_max_ratio = ratio


@TRANSFORMS.register_module()
class MultiTaskResize(Resize):
    """mmseg's ``Resize`` (nearest for every seg field) made safe for float maps.

    * mmcv's Pillow backend only accepts uint8 arrays: with ``backend='pillow'`` mmseg's Resize
      fails on float depth/normal maps. Here non-uint8 seg fields are always resized with cv2
      (nearest), the image and uint8 label maps with the configured backend.
    * ``scale_depth=True`` divides ``gt_depth_map`` by the zoom factor (geometric mean of the x/y
      scale factors), the NYUD augmentation of MTI-Net ("zooming makes objects look closer").
      Default ``False`` (mmseg's behaviour: depth values unchanged).

    Use it directly or through ``RandomResize(..., resize_type='MultiTaskResize')``.
    """

    def __init__(self, *args, scale_depth: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scale_depth = bool(scale_depth)

    def _resize_seg(self, results: dict) -> None:
        for key in results.get("seg_fields", []):
            value = results.get(key, None)
            if value is None:
                continue
            backend = self.backend if value.dtype == np.uint8 else "cv2"
            if self.keep_ratio:
                out = mmcv.imrescale(value, results["scale"], interpolation="nearest",
                                     backend=backend)
            else:
                out = mmcv.imresize(value, results["scale"], interpolation="nearest",
                                    backend=backend)
            results[key] = out
        depth_key = RESULTS_KEYS["depth"]
        if self.scale_depth and results.get(depth_key, None) is not None:
            sx, sy = results["scale_factor"]
            zoom = float(np.sqrt(sx * sy))
            results[depth_key] = (results[depth_key] / np.float32(zoom)).astype(np.float32)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", scale_depth={self.scale_depth})"


@TRANSFORMS.register_module()
class PackMultiTaskInputs(PackSegInputs):
    """mmseg's ``PackSegInputs`` plus surface normals and the ``mtl_tasks`` metainfo.

    Packs (as ``PixelData`` under the names of ``fields.SAMPLE_FIELDS``):
    ``gt_seg_map → gt_sem_seg`` (int64 [1, H, W]), ``gt_depth_map`` (float32 [1, H, W]),
    ``gt_normal_map`` (float32 [3, H, W]), ``gt_edge_map`` (int64 [1, H, W]).
    Metainfo ``mtl_tasks``: ``results['mtl_tasks']`` when present (every listed task must have
    its field: a mismatch is an error), else the tasks whose fields exist.
    """

    def __init__(self,
                 meta_keys: Sequence[str] = ("img_path", "seg_map_path", "ori_shape", "img_shape",
                                             "pad_shape", "scale_factor", "flip",
                                             "flip_direction", "reduce_zero_label",
                                             TASKS_KEY)) -> None:
        meta_keys = tuple(meta_keys)
        if TASKS_KEY not in meta_keys:
            meta_keys = meta_keys + (TASKS_KEY,)
        super().__init__(meta_keys=meta_keys)

    def transform(self, results: dict) -> dict:
        present = tasks_present(results)
        if TASKS_KEY in results:
            tasks = tuple(results[TASKS_KEY])
            missing = [t for t in tasks if t not in present]
            if missing:
                raise KeyError(
                    f"PackMultiTaskInputs: sample {results.get('img_path')!r} lists tasks "
                    f"{list(tasks)} in {TASKS_KEY!r} but has no "
                    f"{[RESULTS_KEYS[t] for t in missing]} (is the loading transform restricted "
                    "to fewer tasks?)")
        else:
            tasks = present
        depth_key = RESULTS_KEYS["depth"]
        if depth_key in results:
            results[depth_key] = np.ascontiguousarray(results[depth_key], dtype=np.float32)
        packed = super().transform(results)
        sample = packed["data_samples"]
        normal = results.get(RESULTS_KEYS["normal"], None)
        if normal is not None:
            normal = np.ascontiguousarray(np.asarray(normal, dtype=np.float32).transpose(2, 0, 1))
            sample.set_data({SAMPLE_FIELDS["normal"]: PixelData(data=to_tensor(normal))})
        sample.set_metainfo({TASKS_KEY: tasks})
        return packed
