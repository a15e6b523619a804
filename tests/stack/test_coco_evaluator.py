"""detectron2's COCOEvaluator gives real bbox/segm AP on a tiny COCO dataset the test writes."""
import copy

import numpy as np
import pytest
import torch

from mtl_plugins.data.synthetic_shapes import write_coco_shapes


@pytest.fixture(scope="module")
def coco_dataset(tmp_path_factory):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    paths = write_coco_shapes(tmp_path_factory.mktemp("coco"), num_images=3, seed=1)
    name = "mtl_test_coco_eval_shapes"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(paths["json_file"]), str(paths["image_root"]))
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _predictions_from_gt(dataset_dicts, shift=0.0):
    """Turn ground truth into detectron2 model outputs (optionally shifting every box)."""
    from detectron2.structures import Boxes, BoxMode, Instances
    from pycocotools import mask as mask_utils

    outputs = []
    for d in dataset_dicts:
        inst = Instances((d["height"], d["width"]))
        boxes, masks, classes = [], [], []
        for ann in d["annotations"]:
            x0, y0, x1, y1 = BoxMode.convert(ann["bbox"], ann["bbox_mode"], BoxMode.XYXY_ABS)
            boxes.append([x0 + shift, y0, x1 + shift, y1])
            m = mask_utils.decode(ann["segmentation"]).astype(bool)
            masks.append(np.roll(m, int(shift), axis=1))
            classes.append(ann["category_id"])
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.scores = torch.linspace(0.99, 0.9, len(boxes))
        inst.pred_classes = torch.tensor(classes)
        inst.pred_masks = torch.from_numpy(np.stack(masks))
        outputs.append({"instances": inst})
    return outputs


def _evaluate(name, outputs, tmp_path):
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import COCOEvaluator

    evaluator = COCOEvaluator(name, tasks=("bbox", "segm"), distributed=False,
                              output_dir=str(tmp_path), use_fast_impl=False)
    evaluator.reset()
    dicts = DatasetCatalog.get(name)
    evaluator.process([{"image_id": d["image_id"]} for d in dicts], outputs)
    return evaluator.evaluate()


def test_perfect_predictions_score_100_ap(coco_dataset, tmp_path):
    from detectron2.data import DatasetCatalog

    dicts = copy.deepcopy(DatasetCatalog.get(coco_dataset))
    results = _evaluate(coco_dataset, _predictions_from_gt(dicts), tmp_path)
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert results["segm"]["AP"] == pytest.approx(100.0)


def test_shifted_predictions_score_between(coco_dataset, tmp_path):
    from detectron2.data import DatasetCatalog

    dicts = copy.deepcopy(DatasetCatalog.get(coco_dataset))
    results = _evaluate(coco_dataset, _predictions_from_gt(dicts, shift=6.0), tmp_path)
    for task in ("bbox", "segm"):
        assert 0.0 < results[task]["AP"] < 100.0
        assert results[task]["AP50"] >= results[task]["AP75"]
