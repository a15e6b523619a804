"""Data side of the mmseg integration: datasets, transforms, packing, data preprocessor.

The NYUD_MT and Cityscapes fixtures are written by the tests in the real directory layouts
(a few 32×48 images), so no download is needed.
"""
import copy
import math
import os
import timeit

import cv2
import numpy as np
import pytest
import torch
from mmengine.structures import PixelData

from mmseg.utils import register_all_modules

register_all_modules()  # mmseg modules + default scope 'mmseg'

from mmseg.registry import DATASETS, MODELS, TRANSFORMS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402

from mtl_plugins.core.tasks import MTLConfigError  # noqa: E402
from mtl_plugins.mmseg import data_preprocessor, datasets, transforms  # noqa: E402,F401
from mtl_plugins.mmseg.datasets import (CITYSCAPES_LABELS, NYU13_CLASSES,  # noqa: E402
                                        NYU40_CLASSES, NYU40_TO_13, SYNTHETIC_CLASSES,
                                        render_synthetic_scene)
from mtl_plugins.mmseg.fields import IGNORE_VALUES, SAMPLE_FIELDS  # noqa: E402

H, W = 32, 48
NYU_STEMS = ("000001", "000002", "000003", "000004")
# stored NYU40 ids (0 = void) written into every seg map, one per column block
NYU_RAW_LABELS = np.array([0, 1, 2, 5, 23, 25, 40, 39, 9, 13, 22, 4], dtype=np.uint8)


def _unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _nyu_arrays(i):
    rng = np.random.default_rng(100 + i)
    img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    seg = np.repeat(NYU_RAW_LABELS, W // len(NYU_RAW_LABELS))[None, :].repeat(H, 0)
    depth = rng.uniform(0.5, 9.0, (H, W)).astype(np.float32)  # unique values: locate crops
    depth[:3, :5] = 0.0  # invalid
    normal = _unit(rng.normal(size=(H, W, 3)))
    normal[-2:, :] = 0.0  # invalid
    edge = (rng.random((H, W)) > 0.8).astype(np.float32)
    return img, seg.astype(np.uint8), depth, normal, edge


@pytest.fixture(scope="module")
def nyud_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("NYUD_MT")
    for sub in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
        (root / sub).mkdir()
    for i, stem in enumerate(NYU_STEMS):
        img, seg, depth, normal, edge = _nyu_arrays(i)
        cv2.imwrite(str(root / "images" / f"{stem}.jpg"), img)
        cv2.imwrite(str(root / "segmentation" / f"{stem}.png"), seg)
        np.save(root / "depth" / f"{stem}.npy", depth)
        np.save(root / "normals" / f"{stem}.npy", normal)
        np.save(root / "edge" / f"{stem}.npy", edge)
    (root / "gt_sets" / "train.txt").write_text("\n".join(NYU_STEMS[:3]) + "\n")
    (root / "gt_sets" / "val.txt").write_text(NYU_STEMS[3] + "\n")
    return root


CITY_FRAMES = (("aachen", "aachen_000000_000019"), ("aachen", "aachen_000001_000019"),
               ("bremen", "bremen_000000_000019"))
CITY_IDS = np.array([0, 7, 8, 9, 11, 23, 24, 26, 33, 3, 17, 21], dtype=np.uint8)
CITY_DISP = np.array([0, 1, 257, 300, 12801, 65535], dtype=np.uint16)


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    for city, frame in CITY_FRAMES:
        for top in ("leftImg8bit", "gtFine", "disparity"):
            (root / top / "train" / city).mkdir(parents=True, exist_ok=True)
        img = np.full((H, W, 3), 100, np.uint8)
        ids = np.repeat(CITY_IDS, W // len(CITY_IDS))[None, :].repeat(H, 0)
        disp = np.repeat(CITY_DISP, W // len(CITY_DISP))[None, :].repeat(H, 0)
        cv2.imwrite(str(root / "leftImg8bit/train" / city / f"{frame}_leftImg8bit.png"), img)
        cv2.imwrite(str(root / "gtFine/train" / city / f"{frame}_gtFine_labelIds.png"), ids)
        cv2.imwrite(str(root / "disparity/train" / city / f"{frame}_disparity.png"), disp)
    return root


def _run(pipeline_cfg, data_info):
    results = copy.deepcopy(data_info)
    for cfg in pipeline_cfg:
        results = TRANSFORMS.build(cfg)(results)
    return results


LOAD_ALL = [dict(type="LoadImageFromFile"),
            dict(type="LoadMultiTaskAnnotations", tasks=("seg", "depth", "normal", "edge"))]


# ---------------------------------------------------------------------------------------------
# NYUv2
# ---------------------------------------------------------------------------------------------
def test_nyu_dataset_lists_split_and_paths(nyud_root):
    ds = DATASETS.build(dict(type="NYUv2MultiTaskDataset", data_root=str(nyud_root),
                             split="train", tasks=("seg", "depth", "normal", "edge")))
    assert len(ds) == 3
    info = ds.get_data_info(1)
    assert info["img_path"] == str(nyud_root / "images" / "000002.jpg")
    assert info["seg_map_path"] == str(nyud_root / "segmentation" / "000002.png")
    assert info["depth_map_path"] == str(nyud_root / "depth" / "000002.npy")
    assert info["normal_map_path"] == str(nyud_root / "normals" / "000002.npy")
    assert info["edge_map_path"] == str(nyud_root / "edge" / "000002.npy")
    assert info["mtl_tasks"] == ("seg", "depth", "normal", "edge")
    assert info["reduce_zero_label"] is True and info["seg_fields"] == []
    assert ds.metainfo["classes"] == NYU40_CLASSES and len(ds.metainfo["palette"]) == 40
    assert ds.metainfo["mtl_tasks"] == ("seg", "depth", "normal", "edge")
    val = DATASETS.build(dict(type="NYUv2MultiTaskDataset", data_root=str(nyud_root),
                              split="val"))
    assert len(val) == 1 and val.get_data_info(0)["mtl_tasks"] == ("seg", "depth", "normal")
    # no split: every image
    assert len(DATASETS.build(dict(type="NYUv2MultiTaskDataset",
                                   data_root=str(nyud_root)))) == 4


def test_nyu_full_pipeline_moves_every_field_together(nyud_root):
    ds = DATASETS.build(dict(type="NYUv2MultiTaskDataset", data_root=str(nyud_root),
                             split="train", tasks=("seg", "depth", "normal", "edge")))
    info = ds.get_data_info(0)
    _, seg_raw, depth0, normal0, edge0 = _nyu_arrays(0)
    seg0 = np.where(seg_raw == 0, 255, seg_raw.astype(int) - 1)
    loaded = _run(LOAD_ALL, info)
    np.testing.assert_array_equal(loaded["gt_seg_map"], seg0)
    np.testing.assert_array_equal(loaded["gt_depth_map"], depth0)
    np.testing.assert_allclose(loaded["gt_normal_map"], normal0, atol=1e-6)
    np.testing.assert_array_equal(loaded["gt_edge_map"], edge0.astype(np.uint8))
    assert loaded["seg_fields"] == ["gt_seg_map", "gt_depth_map", "gt_normal_map",
                                    "gt_edge_map"]
    np.random.seed(3)
    packed = _run([dict(type="MultiTaskRandomFlip", prob=1.0),
                   dict(type="MultiTaskRandomCrop", crop_size=(24, 32)),
                   dict(type="PackMultiTaskInputs")], loaded)
    sample = packed["data_samples"]
    assert packed["inputs"].shape == (3, 24, 32)
    assert sample.gt_sem_seg.data.shape == (1, 24, 32)
    assert sample.gt_sem_seg.data.dtype == torch.int64
    assert sample.gt_depth_map.data.shape == (1, 24, 32)
    assert sample.gt_depth_map.data.dtype == torch.float32
    assert sample.gt_normal_map.data.shape == (3, 24, 32)
    assert sample.gt_normal_map.data.dtype == torch.float32
    assert sample.gt_edge_map.data.shape == (1, 24, 32)
    assert sample.metainfo["mtl_tasks"] == ("seg", "depth", "normal", "edge")
    assert sample.metainfo["flip"] is True
    # locate the crop in the flipped depth (unique values), then check every other field
    fd, fs = depth0[:, ::-1], seg0[:, ::-1]
    fn, fe = normal0[:, ::-1].copy(), edge0[:, ::-1]
    fn[..., 0] *= -1
    crop_d = sample.gt_depth_map.data[0].numpy()
    matches = [(y, x) for y in range(H - 24 + 1) for x in range(W - 32 + 1)
               if np.array_equal(fd[y:y + 24, x:x + 32], crop_d)]
    assert len(matches) == 1
    y, x = matches[0]
    np.testing.assert_array_equal(sample.gt_sem_seg.data[0].numpy(), fs[y:y + 24, x:x + 32])
    np.testing.assert_allclose(sample.gt_normal_map.data.numpy().transpose(1, 2, 0),
                               fn[y:y + 24, x:x + 32], atol=1e-6)
    np.testing.assert_array_equal(sample.gt_edge_map.data[0].numpy(), fe[y:y + 24, x:x + 32])
    img = cv2.imread(ds.get_data_info(0)["img_path"])[:, ::-1]
    np.testing.assert_array_equal(packed["inputs"].numpy().transpose(1, 2, 0),
                                  img[y:y + 24, x:x + 32])


def test_nyu_40_and_13_class_labels(nyud_root):
    ds40 = DATASETS.build(dict(type="NYUv2MultiTaskDataset", data_root=str(nyud_root),
                               split="val", tasks=("seg",)))
    load_seg = [dict(type="LoadMultiTaskAnnotations", tasks=("seg",))]
    seg40 = _run(load_seg, ds40.get_data_info(0))["gt_seg_map"]
    row = seg40[0, ::W // len(NYU_RAW_LABELS)]
    names40 = [NYU40_CLASSES[v] if v != 255 else None for v in row]
    assert names40 == [None, "wall", "floor", "chair", "books", "television", "otherprop",
                       "otherfurniture", "window", "blinds", "ceiling", "bed"]

    ds13 = DATASETS.build(dict(type="NYUv2MultiTaskDataset", data_root=str(nyud_root),
                               split="val", tasks=("seg",), num_classes=13))
    assert ds13.metainfo["classes"] == NYU13_CLASSES and len(ds13.metainfo["palette"]) == 13
    seg13 = _run(load_seg, ds13.get_data_info(0))["gt_seg_map"]
    row = seg13[0, ::W // len(NYU_RAW_LABELS)]
    names13 = [NYU13_CLASSES[v] if v != 255 else None for v in row]
    assert names13 == [None, "wall", "floor", "chair", "books", "tv", "objects", "furniture",
                       "window", "window", "ceiling", "bed"]
    assert set(np.unique(seg13)) <= set(range(13)) | {255}
    # mmseg's own LoadAnnotations reads the same labels through the dataset's label_map
    seg13_mmseg = _run([dict(type="LoadAnnotations")], ds13.get_data_info(0))["gt_seg_map"]
    np.testing.assert_array_equal(seg13_mmseg, seg13)
    # the table: every NYU40 class lands in the 13-class group its name says
    expected = {"wall": "wall", "floor": "floor", "bed": "bed", "chair": "chair",
                "sofa": "sofa", "table": "table", "desk": "table", "door": "wall",
                "window": "window", "curtain": "window", "picture": "picture",
                "ceiling": "ceiling", "books": "books", "television": "tv",
                "cabinet": "furniture", "bookshelf": "furniture", "dresser": "furniture",
                "night stand": "furniture", "lamp": "objects", "pillow": "objects",
                "floor mat": "floor"}
    for name, group in expected.items():
        assert NYU13_CLASSES[NYU40_TO_13[NYU40_CLASSES.index(name) + 1] - 1] == group, name
    # a class subset of the 13 is composed with the 40→13 table
    sub = DATASETS.build(dict(type="NYUv2MultiTaskDataset", data_root=str(nyud_root),
                              split="val", tasks=("seg",), num_classes=13,
                              metainfo=dict(classes=("floor", "wall"))))
    seg_sub = _run(load_seg, sub.get_data_info(0))["gt_seg_map"]
    row = seg_sub[0, ::W // len(NYU_RAW_LABELS)]
    assert row.tolist() == [255, 1, 0, 255, 255, 255, 255, 255, 255, 255, 255, 255]
    assert len(sub.metainfo["palette"]) == 2
    with pytest.raises(MTLConfigError, match="num_classes"):
        DATASETS.build(dict(type="NYUv2MultiTaskDataset", data_root=str(nyud_root),
                            num_classes=20))


def test_missing_annotation_file_error_and_partial_labels(nyud_root, tmp_path):
    import shutil
    root = tmp_path / "NYUD_MT"
    shutil.copytree(nyud_root, root)
    os.remove(root / "depth" / "000002.npy")
    with pytest.raises(FileNotFoundError) as err:
        DATASETS.build(dict(type="NYUv2MultiTaskDataset", data_root=str(root), split="train"))
    msg = str(err.value)
    assert "'depth'" in msg and str(root / "depth" / "000002.npy") in msg and "000002" in msg
    ds = DATASETS.build(dict(type="NYUv2MultiTaskDataset", data_root=str(root), split="train",
                             allow_missing=True))
    info = ds.get_data_info(1)
    assert info["mtl_tasks"] == ("seg", "normal") and "depth_map_path" not in info
    assert ds.get_data_info(0)["mtl_tasks"] == ("seg", "depth", "normal")
    packed = _run([dict(type="LoadImageFromFile"), dict(type="LoadMultiTaskAnnotations"),
                   dict(type="MultiTaskRandomCrop", crop_size=(16, 16), cat_max_ratio=0.75),
                   dict(type="PackMultiTaskInputs")], info)
    sample = packed["data_samples"]
    assert sample.metainfo["mtl_tasks"] == ("seg", "normal")
    assert "gt_depth_map" not in sample and "gt_normal_map" in sample
    # a sample without seg: mmseg's RandomCrop with cat_max_ratio fails, ours crops
    os.remove(root / "segmentation" / "000003.png")
    ds = DATASETS.build(dict(type="NYUv2MultiTaskDataset", data_root=str(root), split="train",
                             allow_missing=True))
    no_seg = _run([dict(type="LoadImageFromFile"), dict(type="LoadMultiTaskAnnotations")],
                  ds.get_data_info(2))
    assert no_seg["mtl_tasks"] == ("depth", "normal")
    with pytest.raises(KeyError):
        TRANSFORMS.build(dict(type="RandomCrop", crop_size=(16, 16), cat_max_ratio=0.75))(
            copy.deepcopy(no_seg))
    out = TRANSFORMS.build(dict(type="MultiTaskRandomCrop", crop_size=(16, 16),
                                cat_max_ratio=0.75))(no_seg)
    assert out["gt_depth_map"].shape == (16, 16) and out["gt_normal_map"].shape == (16, 16, 3)
    # missing image and missing split file
    os.remove(root / "images" / "000001.jpg")
    with pytest.raises(FileNotFoundError, match="image of sample '000001'"):
        DATASETS.build(dict(type="NYUv2MultiTaskDataset", data_root=str(root), split="train",
                            allow_missing=True))
    with pytest.raises(FileNotFoundError, match="split file"):
        DATASETS.build(dict(type="NYUv2MultiTaskDataset", data_root=str(root), split="test"))


def test_dataset_config_errors(nyud_root):
    with pytest.raises(MTLConfigError, match="dataset.tasks"):
        DATASETS.build(dict(type="NYUv2MultiTaskDataset", data_root=str(nyud_root),
                            tasks=("seg", "depht")))
    with pytest.raises(MTLConfigError, match="depth_map_path"):
        DATASETS.build(dict(type="MultiTaskSegDataset", data_root=str(nyud_root),
                            tasks=("seg", "depth"),
                            data_prefix=dict(img_path="images", seg_map_path="segmentation")))
    with pytest.raises(MTLConfigError, match="LoadMultiTaskAnnotations.tasks"):
        TRANSFORMS.build(dict(type="LoadMultiTaskAnnotations", tasks=("seg", "sal")))


def test_generic_dataset_with_png_depth_rgb_normals_and_edges(tmp_path):
    """MultiTaskSegDataset + the PNG decodings: depth in mm, RGB normals, 0/1/255 edges."""
    for sub in ("img", "seg", "depth", "normal", "edge"):
        (tmp_path / sub).mkdir()
    cv2.imwrite(str(tmp_path / "img" / "a.png"), np.zeros((4, 6, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "seg" / "a.png"), np.full((4, 6), 3, np.uint8))
    depth_mm = np.array([[0, 1500, 65535, 250, 1, 2000]] * 4, dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "depth" / "a.png"), depth_mm)
    normals = _unit([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.3, 0.4, 0.5],
                      [0.0, 0.0, 1.0], [-0.6, 0.0, 0.8]]] * 4)
    rgb = np.round((normals + 1.0) * 127.5).astype(np.uint8)
    rgb[:, 4] = 0  # black = invalid
    cv2.imwrite(str(tmp_path / "normal" / "a.png"), rgb[..., ::-1])  # cv2 writes BGR
    cv2.imwrite(str(tmp_path / "edge" / "a.png"),
                np.array([[0, 1, 255, 0, 1, 0]] * 4, np.uint8))
    ds = DATASETS.build(dict(
        type="MultiTaskSegDataset", data_root=str(tmp_path),
        tasks=("seg", "depth", "normal", "edge"), img_suffix=".png",
        data_prefix=dict(img_path="img", seg_map_path="seg", depth_map_path="depth",
                         normal_map_path="normal", edge_map_path="edge"),
        metainfo=dict(classes=tuple("abcd"))))
    assert len(ds) == 1
    out = _run([dict(type="LoadMultiTaskAnnotations", tasks=("seg", "depth", "normal", "edge"),
                     depth_scale=1000.0)], ds.get_data_info(0))
    np.testing.assert_allclose(out["gt_depth_map"][0], [0.0, 1.5, 65.535, 0.25, 0.001, 2.0],
                               rtol=1e-6)
    assert out["gt_depth_map"].dtype == np.float32
    n = out["gt_normal_map"]
    assert n.shape == (4, 6, 3) and n.dtype == np.float32
    np.testing.assert_array_equal(n[:, 4], 0.0)
    valid = np.delete(np.arange(6), 4)
    np.testing.assert_allclose(n[:, valid], normals[:, valid], atol=0.01)
    np.testing.assert_allclose(np.linalg.norm(n[:, valid], axis=-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(out["gt_edge_map"][0], [0, 1, 255, 0, 1, 0])
    np.testing.assert_array_equal(out["gt_seg_map"], 3)


# ---------------------------------------------------------------------------------------------
# Cityscapes
# ---------------------------------------------------------------------------------------------
def test_cityscapes_trainids_categories_and_disparity(cityscapes_root):
    ds = DATASETS.build(dict(type="CityscapesMultiTaskDataset", data_root=str(cityscapes_root),
                             split="train"))
    assert len(ds) == 3
    info = ds.get_data_info(2)
    assert info["img_path"].endswith("leftImg8bit/train/bremen/bremen_000000_000019"
                                     "_leftImg8bit.png")
    assert info["seg_map_path"].endswith("gtFine/train/bremen/bremen_000000_000019"
                                         "_gtFine_labelIds.png")
    assert info["depth_map_path"].endswith("disparity/train/bremen/bremen_000000_000019"
                                           "_disparity.png")
    assert info["mtl_tasks"] == ("seg", "depth") and len(ds.metainfo["classes"]) == 19
    out = _run([dict(type="LoadImageFromFile"),
                dict(type="LoadMultiTaskAnnotations", tasks=("seg", "depth"))], info)
    seg_row = out["gt_seg_map"][0, ::W // len(CITY_IDS)]
    # ids 0 7 8 9 11 23 24 26 33 3 17 21 → unlabeled road sidewalk parking building sky
    # person car bicycle out-of-roi pole vegetation
    assert seg_row.tolist() == [255, 0, 1, 255, 2, 10, 11, 13, 18, 255, 5, 8]
    disp_row = out["gt_depth_map"][0, ::W // len(CITY_DISP)]
    # p = 0 → invalid, 1 → 0 (also the invalid value), (p - 1) / 256 otherwise
    np.testing.assert_allclose(disp_row, [0.0, 0.0, 1.0, 299 / 256, 50.0, 65534 / 256])
    assert out["gt_depth_map"].dtype == np.float32
    # 7 categories (MTAN)
    ds7 = DATASETS.build(dict(type="CityscapesMultiTaskDataset",
                              data_root=str(cityscapes_root), split="train", num_classes=7))
    assert ds7.metainfo["classes"] == ("flat", "construction", "object", "nature", "sky",
                                       "human", "vehicle")
    seg7 = _run([dict(type="LoadMultiTaskAnnotations", tasks=("seg",))],
                ds7.get_data_info(0))["gt_seg_map"]
    assert seg7[0, ::W // len(CITY_IDS)].tolist() == [255, 0, 0, 0, 1, 4, 5, 6, 6, 255, 2, 3]
    with pytest.raises(MTLConfigError, match="only 'seg' and 'depth'"):
        DATASETS.build(dict(type="CityscapesMultiTaskDataset", data_root=str(cityscapes_root),
                            tasks=("seg", "normal")))


def test_cityscapes_table_matches_cityscapesscripts():
    labels = pytest.importorskip("cityscapesscripts.helpers.labels")
    ref = {lb.id: (lb.name, lb.trainId, lb.categoryId) for lb in labels.labels if lb.id >= 0}
    ours = {lid: (name, tid, cat) for name, lid, tid, cat in CITYSCAPES_LABELS}
    assert ours == ref


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------
def _toy_results():
    rng = np.random.default_rng(0)
    normal = _unit(rng.normal(size=(5, 7, 3)))
    normal[0, 0] = 0.0
    seg = rng.integers(0, 3, (5, 7)).astype(np.uint8)
    depth = np.where(seg == 1, 1.0, 2.0).astype(np.float32)
    return dict(img=rng.integers(0, 255, (5, 7, 3), dtype=np.uint8), gt_seg_map=seg,
                gt_depth_map=depth, gt_normal_map=normal,
                seg_fields=["gt_seg_map", "gt_depth_map", "gt_normal_map"])


@pytest.mark.parametrize("direction,negated", [("horizontal", (0,)), ("vertical", (1,)),
                                               ("diagonal", (0, 1))])
def test_flip_mirrors_normal_vectors(direction, negated):
    res = _toy_results()
    n0, seg0, depth0 = res["gt_normal_map"].copy(), res["gt_seg_map"].copy(), \
        res["gt_depth_map"].copy()
    out = TRANSFORMS.build(dict(type="MultiTaskRandomFlip", prob=1, direction=direction,
                                swap_seg_labels=[(1, 2)]))(res)
    flip = {"horizontal": lambda a: a[:, ::-1], "vertical": lambda a: a[::-1],
            "diagonal": lambda a: a[::-1, ::-1]}[direction]
    expected = flip(n0).copy()
    for axis in negated:
        expected[..., axis] *= -1
    np.testing.assert_array_equal(out["gt_normal_map"], expected)
    assert out["flip_direction"] == direction
    # the zero (invalid) vector stays exactly zero and moves with the mirror
    zero_at = np.argwhere((out["gt_normal_map"] == 0).all(-1))
    assert len(zero_at) == 1 and not np.signbit(out["gt_normal_map"]).any(axis=-1)[
        tuple(zero_at[0])]
    # label swap only in the seg map, depth values only mirrored
    swapped = flip(seg0).copy()
    swapped[flip(seg0) == 1], swapped[flip(seg0) == 2] = 2, 1
    np.testing.assert_array_equal(out["gt_seg_map"], swapped)
    np.testing.assert_array_equal(out["gt_depth_map"], flip(depth0))
    # mmseg's RandomFlip would mirror the map but not the vectors
    plain = TRANSFORMS.build(dict(type="RandomFlip", prob=1.0, direction=direction))(
        _toy_results())
    assert not np.array_equal(plain["gt_normal_map"], expected)


def test_resize_nearest_on_float_maps_and_pillow_backend():
    res = _toy_results()
    n0, d0 = res["gt_normal_map"].copy(), res["gt_depth_map"].copy()
    # mmseg's Resize with the pillow backend cannot resize float maps ...
    with pytest.raises(AssertionError, match="uint8"):
        TRANSFORMS.build(dict(type="Resize", scale=(14, 10), backend="pillow"))(
            copy.deepcopy(res))
    # ... ours resizes them with cv2, nearest
    out = TRANSFORMS.build(dict(type="MultiTaskResize", scale=(14, 10), backend="pillow"))(res)
    assert out["img"].shape == (10, 14, 3) and out["gt_normal_map"].shape == (10, 14, 3)
    assert out["gt_depth_map"].dtype == np.float32 and out["gt_normal_map"].dtype == np.float32
    assert set(np.unique(out["gt_depth_map"])) <= set(np.unique(d0))
    np.testing.assert_array_equal(out["gt_normal_map"][::2, ::2], n0)  # exact 2× nearest
    norms = np.linalg.norm(out["gt_normal_map"], axis=-1)
    assert np.all((np.abs(norms - 1) < 1e-5) | (norms == 0))
    # mmseg's Resize (cv2) on float maps: also nearest, dtype kept
    out_mm = TRANSFORMS.build(dict(type="Resize", scale=(14, 10)))(_toy_results())
    np.testing.assert_array_equal(out_mm["gt_normal_map"], out["gt_normal_map"])
    assert out_mm["gt_depth_map"].dtype == np.float32
    # MTI-Net's zoom: depth / zoom factor; via RandomResize(resize_type=...)
    zoom = TRANSFORMS.build(dict(type="RandomResize", scale=(14, 10), ratio_range=(1.0, 1.0),
                                 resize_type="MultiTaskResize", keep_ratio=False,
                                 scale_depth=True))(_toy_results())
    np.testing.assert_allclose(zoom["gt_depth_map"][::2, ::2], d0 / 2.0)


def test_pack_mtl_tasks_default_and_mismatch():
    res = _toy_results()
    res["img_path"] = "x.png"
    sample = TRANSFORMS.build(dict(type="PackMultiTaskInputs"))(copy.deepcopy(res))[
        "data_samples"]
    assert sample.metainfo["mtl_tasks"] == ("seg", "depth", "normal")
    assert set(SAMPLE_FIELDS[t] for t in ("seg", "depth", "normal")) <= set(sample.keys())
    np.testing.assert_array_equal(sample.gt_normal_map.data.numpy().transpose(1, 2, 0),
                                  res["gt_normal_map"])
    res["mtl_tasks"] = ("seg", "edge")
    with pytest.raises(KeyError, match="gt_edge_map"):
        TRANSFORMS.build(dict(type="PackMultiTaskInputs"))(res)


# ---------------------------------------------------------------------------------------------
# Data preprocessor
# ---------------------------------------------------------------------------------------------
def _packed(h, w, seed):
    rng = np.random.default_rng(seed)
    res = dict(img=rng.integers(1, 255, (h, w, 3), dtype=np.uint8),
               gt_seg_map=rng.integers(0, 5, (h, w)).astype(np.uint8),
               gt_depth_map=rng.uniform(1, 5, (h, w)).astype(np.float32),
               gt_normal_map=_unit(rng.normal(size=(h, w, 3))),
               gt_edge_map=rng.integers(0, 2, (h, w)).astype(np.uint8),
               img_shape=(h, w), ori_shape=(h, w))
    res["seg_fields"] = ["gt_seg_map", "gt_depth_map", "gt_normal_map", "gt_edge_map"]
    return TRANSFORMS.build(dict(type="PackMultiTaskInputs"))(res)


def test_data_preprocessor_pads_each_task_with_its_invalid_value():
    a, b = _packed(32, 48, 0), _packed(24, 40, 1)
    b_fields = {k: b["data_samples"].get(k).data.clone() for k in SAMPLE_FIELDS.values()}
    batch = dict(inputs=[a["inputs"], b["inputs"]],
                 data_samples=[a["data_samples"], b["data_samples"]])
    pre = MODELS.build(dict(type="MultiTaskDataPreProcessor", mean=[0.0] * 3, std=[1.0] * 3,
                            size_divisor=16, pad_val=0, seg_pad_val=255))
    out = pre(copy.deepcopy(batch), training=True)
    assert out["inputs"].shape == (2, 3, 32, 48)
    s = out["data_samples"][1]
    for task, name in SAMPLE_FIELDS.items():
        data = s.get(name).data
        assert data.shape[-2:] == (32, 48), name
        torch.testing.assert_close(data[:, :24, :40], b_fields[name])
        pad_val = IGNORE_VALUES[task]
        assert (data[:, 24:, :] == pad_val).all() and (data[:, :, 40:] == pad_val).all(), name
    assert (s.gt_depth_map.data[:, 24:] == 0).all() and (s.gt_normal_map.data[:, :, 40:] == 0).all()
    assert (s.gt_sem_seg.data[:, 24:] == 255).all() and (s.gt_edge_map.data[:, :, 40:] == 255).all()
    assert s.metainfo["padding_size"] == (0, 8, 0, 8) and tuple(s.metainfo["pad_shape"]) == (32, 48)
    assert s.metainfo["img_shape"] == (24, 40)
    assert (out["inputs"][1, :, 24:] == 0).all()
    # the first sample needs no padding
    torch.testing.assert_close(out["data_samples"][0].gt_depth_map.data,
                               a["data_samples"].gt_depth_map.data)
    # the caller's samples are left as they were
    assert batch["data_samples"][1].gt_depth_map.shape == (24, 40)
    # the trap this fixes: mmseg pads depth with seg_pad_val and leaves normals unpadded
    mm = MODELS.build(dict(type="SegDataPreProcessor", mean=[0.0] * 3, std=[1.0] * 3,
                           size_divisor=16, seg_pad_val=255))
    s_mm = mm(copy.deepcopy(batch), training=True)["data_samples"][1]
    assert (s_mm.gt_depth_map.data[:, 24:] == 255).all()
    assert s_mm.gt_normal_map.shape == (24, 40)
    # no size / size_divisor: pad to the largest image; test mode: GT untouched
    out2 = MODELS.build(dict(type="MultiTaskDataPreProcessor"))(copy.deepcopy(batch), True)
    assert out2["inputs"].shape == (2, 3, 32, 48)
    assert (out2["data_samples"][1].gt_normal_map.data[:, 24:] == 0).all()
    test_out = pre(dict(inputs=[a["inputs"]], data_samples=[a["data_samples"]]), False)
    assert test_out["inputs"].shape == (1, 3, 32, 48)
    with pytest.raises(MTLConfigError, match="task_pad_values"):
        MODELS.build(dict(type="MultiTaskDataPreProcessor", task_pad_values=dict(sal=0)))
    custom = MODELS.build(dict(type="MultiTaskDataPreProcessor", size_divisor=16,
                               task_pad_values=dict(depth=-1.0)))
    s_c = custom(copy.deepcopy(batch), True)["data_samples"][1]
    assert (s_c.gt_depth_map.data[:, 24:] == -1.0).all()


# ---------------------------------------------------------------------------------------------
# Synthetic scenes
# ---------------------------------------------------------------------------------------------
def test_synthetic_scene_geometry_is_consistent():
    size = (48, 64)
    f = 0.5 * size[1] / math.tan(math.radians(60.0) / 2)
    u = (np.arange(size[1]) + 0.5 - size[1] / 2) / f
    v = -(np.arange(size[0]) + 0.5 - size[0] / 2) / f
    rays = np.stack(np.broadcast_arrays(u[None, :], v[:, None], -1.0), -1)
    seen = set()
    for idx in range(12):
        s = render_synthetic_scene(7, idx, size)
        seg, depth, normal, edge = s["seg"], s["depth"], s["normal"], s["edge"]
        valid = seg != 255
        assert valid.mean() > 0.5
        assert set(np.unique(seg)) <= set(range(len(SYNTHETIC_CLASSES))) | {255}
        seen |= set(np.unique(seg[valid]).tolist())
        assert (depth[valid] > 0).all() and (depth[~valid] == 0).all()
        norms = np.linalg.norm(normal, axis=-1)
        np.testing.assert_allclose(norms[valid], 1.0, atol=1e-5)
        assert (normal[~valid] == 0).all()
        assert set(np.unique(edge)) <= {0, 1} and 0 < edge.mean() < 0.5
        # the floor: normal points up, = (0, cos pitch, sin pitch) in the camera frame
        floor = seg == 0
        assert floor.sum() > 20
        np.testing.assert_allclose(normal[floor], np.broadcast_to(
            [0.0, math.cos(s["pitch"]), math.sin(s["pitch"])], normal[floor].shape), atol=1e-6)
        # depth and normals agree: back-projected floor points lie on one plane n·P = −height
        pts = depth[..., None] * rays
        offsets = (pts[floor] * normal[floor]).sum(-1)
        assert offsets.std() < 1e-6 and -1.75 < offsets.mean() < -1.15
        # every wall pixel lies on a plane too (per instance)
        for inst in np.unique(s["instance"][seg == 1]):
            m = s["instance"] == inst
            off = (pts[m] * normal[m]).sum(-1)
            assert off.std() < 1e-6
        # normals face the camera
        assert ((pts[valid] * normal[valid]).sum(-1) < 0).all()
    assert seen >= {0, 1, 2}
    # the image carries the class: mean colour of boxes is redder than that of walls
    s = render_synthetic_scene(7, 0, size)
    img = s["img"].astype(float)
    box, wall = s["seg"] == 2, s["seg"] == 1
    if box.any():
        assert img[box][:, 0].mean() - img[box][:, 2].mean() > \
            img[wall][:, 0].mean() - img[wall][:, 2].mean()


def test_synthetic_deterministic_and_fast():
    a, b = render_synthetic_scene(3, 5), render_synthetic_scene(3, 5)
    for k in ("img", "seg", "depth", "normal", "edge"):
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["depth"], render_synthetic_scene(4, 5)["depth"])
    assert not np.array_equal(a["depth"], render_synthetic_scene(3, 6)["depth"])
    # < 5 ms per 64×64 sample on an idle core (~2 ms measured); generous bound for busy CI
    per = np.median([min(timeit.repeat(lambda i=i: render_synthetic_scene(0, i), number=1,
                                       repeat=3)) for i in range(10)])
    assert per < 0.02, per


def test_synthetic_dataset_pipeline_and_preprocessor():
    pipeline = [dict(type="LoadSyntheticScene"), dict(type="MultiTaskRandomFlip", prob=0.5),
                dict(type="RandomResize", scale=(64, 64), ratio_range=(1.0, 1.5),
                     resize_type="MultiTaskResize", keep_ratio=True),
                dict(type="MultiTaskRandomCrop", crop_size=(48, 48), cat_max_ratio=0.9),
                dict(type="PhotoMetricDistortion"), dict(type="PackMultiTaskInputs")]
    ds = DATASETS.build(dict(type="SyntheticScenesDataset", num_samples=6, seed=1,
                             img_size=(64, 64), tasks=("seg", "depth", "normal", "edge"),
                             pipeline=pipeline))
    assert len(ds) == 6 and ds.metainfo["classes"] == SYNTHETIC_CLASSES
    info = ds.get_data_info(4)
    assert info["sample_idx"] == 4 and info["scene_idx"] == 4 and info["scene_seed"] == 1
    items = [ds[i] for i in range(4)]
    for it in items:
        s = it["data_samples"]
        assert it["inputs"].shape == (3, 48, 48)
        assert s.metainfo["mtl_tasks"] == ("seg", "depth", "normal", "edge")
        seg, depth = s.gt_sem_seg.data, s.gt_depth_map.data
        assert seg.shape == depth.shape == (1, 48, 48) and s.gt_normal_map.shape == (48, 48)
        assert ((depth > 0) == (seg != 255)).all()
    pre = MODELS.build(dict(type="MultiTaskDataPreProcessor", mean=[123.7, 116.3, 103.5],
                            std=[58.4, 57.1, 57.4], bgr_to_rgb=True, size=(56, 56)))
    batch = pre(dict(inputs=[it["inputs"] for it in items],
                     data_samples=[it["data_samples"] for it in items]), training=True)
    assert batch["inputs"].shape == (4, 3, 56, 56)
    assert (batch["data_samples"][0].gt_depth_map.data[:, 48:] == 0).all()
    # the image loaded by LoadSyntheticScene is BGR (as LoadImageFromFile gives)
    r = TRANSFORMS.build(dict(type="LoadSyntheticScene", tasks=("depth",)))(
        copy.deepcopy(ds.get_data_info(0)))
    np.testing.assert_array_equal(r["img"][..., ::-1], render_synthetic_scene(1, 0)["img"])
    assert r["mtl_tasks"] == ("depth",) and r["seg_fields"] == ["gt_depth_map"]
    assert "gt_seg_map" not in r
    # a different seed gives a different dataset
    other = DATASETS.build(dict(type="SyntheticScenesDataset", num_samples=2, seed=2,
                                pipeline=[dict(type="LoadSyntheticScene")]))
    assert not np.array_equal(other[0]["img"], DATASETS.build(dict(
        type="SyntheticScenesDataset", num_samples=2, seed=1,
        pipeline=[dict(type="LoadSyntheticScene")]))[0]["img"])
    with pytest.raises(MTLConfigError, match="num_samples"):
        DATASETS.build(dict(type="SyntheticScenesDataset", num_samples=0))


def test_sample_fields_are_pixeldata_on_segdatasample():
    packed = _packed(8, 8, 0)
    s = packed["data_samples"]
    assert isinstance(s, SegDataSample)
    for name in SAMPLE_FIELDS.values():
        assert isinstance(s.get(name), PixelData)
