"""tools/train_net.py: one STA iteration on the synthetic CPU config, checkpoint, COCO eval."""
import json

from .conftest import run_train_net


def test_train_net_smoke_sta(tmp_path, monkeypatch):
    import torch

    out, results = run_train_net(tmp_path, monkeypatch,
                                 "mask_rcnn_R_50_FPN_synthetic_cpu_sta.yaml", "SOLVER.MAX_ITER", "1")
    assert (out / "model_final.pth").exists()
    assert (out / "inference" / "coco_instances_results.json").exists()
    metrics = {}
    for line in (out / "metrics.json").read_text().splitlines():
        metrics.update(json.loads(line))
    # COCOEvaluator (pycocotools' reference implementation) ran on both tasks
    assert set(results["bbox"]) >= {"AP", "AP50"} and set(results["segm"]) >= {"AP", "AP50"}
    assert "mtl/loss/detection" in metrics and "mtl/images/mask" in metrics
    ckpt = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    mtl = ckpt["trainer"]["_trainer"]["mtl"]  # the controller's state travels with the model
    assert mtl["_extra_state"]["allocator"]["mode"] == "sta"
