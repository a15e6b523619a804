"""A COCO-format instance-segmentation dataset of synthetic shapes, written to disk.

Each image holds a few filled rectangles and ellipses on a textured background; every shape
is one instance with its box, polygon-free RLE mask and category (``rectangle`` or
``ellipse``). Used by the tests and by the CPU smoke configs, so detectron2's and mmdet's
COCO loaders and pycocotools' evaluation run on real files without any download.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

CATEGORIES = [{"id": 1, "name": "rectangle"}, {"id": 2, "name": "ellipse"}]


def _shape_mask(rng: np.random.Generator, h: int, w: int) -> Tuple[np.ndarray, int]:
    """One random shape as a boolean mask and its category id."""
    cat = int(rng.integers(1, 3))
    bh, bw = int(rng.integers(h // 6, h // 2)), int(rng.integers(w // 6, w // 2))
    y0, x0 = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
    mask = np.zeros((h, w), dtype=bool)
    if cat == 1:
        mask[y0:y0 + bh, x0:x0 + bw] = True
    else:
        yy, xx = np.mgrid[0:h, 0:w]
        cy, cx, ry, rx = y0 + bh / 2, x0 + bw / 2, bh / 2, bw / 2
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return mask, cat


def make_image(rng: np.random.Generator, h: int, w: int, max_shapes: int
               ) -> Tuple[np.ndarray, List[Tuple[np.ndarray, int]]]:
    """An RGB uint8 image and its list of (mask, category) instances (non-overlapping)."""
    img = (rng.normal(100, 15, size=(h, w, 3))).clip(0, 255).astype(np.uint8)
    occupied = np.zeros((h, w), dtype=bool)
    instances: List[Tuple[np.ndarray, int]] = []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        mask, cat = _shape_mask(rng, h, w)
        mask &= ~occupied
        if mask.sum() < 16:
            continue
        occupied |= mask
        color = np.array([200, 60, 60] if cat == 1 else [60, 60, 200], dtype=np.uint8)
        img[mask] = color
        instances.append((mask, cat))
    return img, instances


def write_coco_shapes(root: Path | str, num_images: int = 4, size: Tuple[int, int] = (128, 160),
                      max_shapes: int = 3, seed: int = 0, name: str = "shapes"
                      ) -> Dict[str, Path]:
    """Write ``num_images`` PNG images and ``<name>.json`` in COCO format under ``root``.

    Returns ``{"image_root": ..., "json_file": ...}``.
    """
    from PIL import Image
    from pycocotools import mask as mask_utils

    root = Path(root)
    image_root = root / f"{name}_images"
    image_root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        img, instances = make_image(rng, h, w, max_shapes)
        file_name = f"{image_id:06d}.png"
        Image.fromarray(img).save(image_root / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for mask, cat in instances:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                "bbox": [x, y, bw, bh], "area": float(mask.sum()), "iscrowd": 0,
                "segmentation": rle,
            })
    json_file = root / f"{name}.json"
    json_file.write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return {"image_root": image_root, "json_file": json_file}
