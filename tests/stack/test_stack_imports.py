"""The pinned stack imports in one process and collect_env reports it."""
import importlib

import pytest

from mtl_plugins import collect_env


@pytest.mark.parametrize("module", ["mmcv.ops", "mmseg.models", "detectron2.modeling",
                                    "detectron2.evaluation", "pycocotools.cocoeval",
                                    "cityscapesscripts.evaluation"])
def test_module_imports(module):
    importlib.import_module(module)


def test_mmcv_compiled_op_runs():
    import torch
    from mmcv.ops import nms

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float)
    scores = torch.tensor([0.9, 0.8, 0.7])
    _, keep = nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [0, 2]


def test_collect_env_reports_every_required_piece(capsys):
    assert collect_env.main(["--check"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "mmcv.ops", "mmsegmentation", "detectron2._C", "CUDA"):
        assert name in out
    results = collect_env.collect()
    assert results["mmcv.ops"][1] and results["detectron2"][1]
