"""Multi-dataset round-robin loading in detectron2: a boxes-only and a boxes+masks dataset."""
import pytest

from mtl_plugins.core.tasks import MTLConfigError
from mtl_plugins.data.synthetic_shapes import write_coco_shapes

from .conftest import make_cfg

NAMES = ("mtl_d2_boxes_only", "mtl_d2_boxes_masks")


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    root = tmp_path_factory.mktemp("multi")
    for i, name in enumerate(NAMES):
        paths = write_coco_shapes(root, num_images=3 + i, size=(128, 160), seed=i, name=name)
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {}, str(paths["json_file"]), str(paths["image_root"]))
    yield NAMES
    for name in NAMES:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _cfg():
    cfg = make_cfg(**{"MULTI_DATASET.ENABLED": True,
                      "MULTI_DATASET.DATASET_TASKS": [f"{NAMES[0]}:detection"]})
    cfg.DATASETS.TRAIN = NAMES
    cfg.DATALOADER.ASPECT_RATIO_GROUPING = False
    cfg.SEED = 0
    return cfg


def test_loader_alternates_datasets_and_tags_their_tasks(two_datasets):
    from mtl_plugins.d2.multi_dataset import build_multi_dataset_train_loader

    loader = iter(build_multi_dataset_train_loader(_cfg()))
    tags = []
    for _ in range(4):
        batch = next(loader)
        assert len(batch) == 2
        per_image = {tuple(d["mtl_tasks"]) for d in batch}
        assert len(per_image) == 1  # one dataset per batch
        tags.append(per_image.pop())
    assert tags == [("detection",), ("detection", "mask")] * 2


def test_trainer_trains_without_mask_loss_on_the_boxes_only_dataset(two_datasets, tmp_path):
    from mtl_plugins.d2.trainer import MTLDefaultTrainer

    cfg = _cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    cfg.SOLVER.MAX_ITER = 2
    cfg.DATASETS.TEST = ()
    trainer = MTLDefaultTrainer(cfg)
    seen = []
    backward = trainer.controller.backward

    def record(losses, *args, **kwargs):
        seen.append(tuple(sorted(losses)))
        return backward(losses, *args, **kwargs)

    trainer.controller.backward = record
    trainer.train()
    assert seen[0] == ("detection",) and seen[1] == ("detection", "mask")


def test_bad_multi_dataset_keys_are_named(two_datasets):
    from mtl_plugins.d2.multi_dataset import build_multi_dataset_train_loader, dataset_tasks

    cfg = _cfg()
    cfg.MTL.MULTI_DATASET.DATASET_TASKS = ["mtl_d2_boxes_only:boxes"]
    with pytest.raises(MTLConfigError, match=r"unknown task name\(s\) \['boxes'\]"):
        dataset_tasks(cfg)
    cfg.MTL.MULTI_DATASET.DATASET_TASKS = ["nope:detection"]
    with pytest.raises(MTLConfigError, match="not in DATASETS.TRAIN"):
        dataset_tasks(cfg)
    cfg.MTL.MULTI_DATASET.DATASET_TASKS = []
    cfg.MTL.MULTI_DATASET.RATIOS = [1]
    with pytest.raises(MTLConfigError, match="RATIOS"):
        build_multi_dataset_train_loader(cfg)


MIXED = ("mtl_d2_mixed_boxes_only", "mtl_d2_mixed_boxes_masks")


@pytest.fixture(scope="module")
def mixed_datasets(tmp_path_factory):
    """Two datasets of landscape and portrait images (aspect-ratio grouping has two groups)."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import load_coco_json

    root = tmp_path_factory.mktemp("mixed")
    for i, name in enumerate(MIXED):
        parts = [write_coco_shapes(root, num_images=3, size=size, seed=2 * i + j,
                                   name=f"{name}_{j}")
                 for j, size in enumerate(((128, 160), (160, 128)))]
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        DatasetCatalog.register(name, lambda parts=parts: [
            d for p in parts for d in load_coco_json(str(p["json_file"]), str(p["image_root"]))])
    yield MIXED
    for name in MIXED:
        DatasetCatalog.remove(name)


@pytest.mark.parametrize("grouping", [False, True], ids=["plain", "aspect-grouping"])
def test_every_batch_comes_from_one_dataset_with_loader_workers(mixed_datasets, grouping):
    """Defect 4: with DATALOADER.NUM_WORKERS=2 (detectron2 splits the index stream across the
    workers) and with aspect-ratio grouping, each batch holds the images of one dataset, in
    the round-robin order; with grouping, of one orientation."""
    from mtl_plugins.d2.multi_dataset import build_multi_dataset_train_loader

    cfg = _cfg()
    cfg.DATASETS.TRAIN = MIXED
    cfg.MTL.MULTI_DATASET.DATASET_TASKS = [f"{MIXED[0]}:detection"]
    cfg.DATALOADER.NUM_WORKERS = 2
    cfg.DATALOADER.ASPECT_RATIO_GROUPING = grouping
    loader = iter(build_multi_dataset_train_loader(cfg))
    tags = []
    for _ in range(8):
        batch = next(loader)
        assert len(batch) == 2
        sources = {d["file_name"].split("_images")[0].rsplit("_", 1)[0] for d in batch}
        assert len(sources) == 1, sources  # one dataset per batch
        tags.append(tuple(batch[0]["mtl_tasks"]))
        if grouping:
            assert len({d["width"] > d["height"] for d in batch}) == 1
    assert tags == [("detection",), ("detection", "mask")] * 4
