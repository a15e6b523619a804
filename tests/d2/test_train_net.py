"""tools/train_net.py: one STA iteration on the synthetic CPU config, checkpoint, COCO eval."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_tool():
    spec = importlib.util.spec_from_file_location("mtl_d2_train_net",
                                                  ROOT / "tools" / "train_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_net_smoke_sta(tmp_path, monkeypatch):
    import torch
    from detectron2.engine import default_argument_parser

    monkeypatch.setenv("MTL_D2_SYNTHETIC_ROOT", str(tmp_path / "data"))
    tool = _load_tool()
    out = tmp_path / "out"
    args = default_argument_parser().parse_args([
        "--config-file", str(ROOT / "configs/d2/mask_rcnn_R_50_FPN_synthetic_cpu_sta.yaml"),
        "SOLVER.MAX_ITER", "1", "OUTPUT_DIR", str(out), "SEED", "0"])
    results = {}
    original = tool.Trainer.test.__func__

    def test(cls, cfg, model, evaluators=None):
        results.update(original(cls, cfg, model, evaluators))
        return results

    monkeypatch.setattr(tool.Trainer, "test", classmethod(test))
    tool.main(args)
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
