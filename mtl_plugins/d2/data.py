"""The synthetic-shapes COCO dataset of the CPU smoke configs, registered by name.

``register_synthetic_shapes()`` (or ``register_if_named(names)``) registers ``mtl_synthetic_shapes_train`` (8 images) and
``mtl_synthetic_shapes_val`` (4 images) from ``root`` (default: the environment variable
``MTL_D2_SYNTHETIC_ROOT``, else ``datasets/mtl_synthetic_shapes``), writing the images and
COCO json there first when they are missing. Masks are RLE: use ``INPUT.MASK_FORMAT:
bitmask``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterable, Optional

from ..data.synthetic_shapes import write_coco_shapes

ENV_ROOT = "MTL_D2_SYNTHETIC_ROOT"
SPLITS = {"mtl_synthetic_shapes_train": dict(num_images=8, seed=0, name="train"),
          "mtl_synthetic_shapes_val": dict(num_images=4, seed=1, name="val")}


def register_synthetic_shapes(root: Optional[str | Path] = None) -> Dict[str, Path]:
    """Register the synthetic splits (idempotent); returns ``{dataset name: json file}``."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    root = Path(root or os.environ.get(ENV_ROOT) or "datasets/mtl_synthetic_shapes")
    out = {}
    for name, spec in SPLITS.items():
        json_file = root / f"{spec['name']}.json"
        image_root = root / f"{spec['name']}_images"
        if not json_file.exists():
            write_coco_shapes(root, num_images=spec["num_images"], size=(128, 160),
                              seed=spec["seed"], name=spec["name"])
        if name not in DatasetCatalog.list():
            register_coco_instances(name, {}, str(json_file), str(image_root))
        out[name] = json_file
    return out


def register_if_named(dataset_names: Iterable[str]) -> None:
    """:func:`register_synthetic_shapes` when ``dataset_names`` name one of its splits (the
    training scripts call it with the datasets of the config)."""
    if any(name in SPLITS for name in dataset_names):
        register_synthetic_shapes()

