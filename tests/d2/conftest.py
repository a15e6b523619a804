"""Shared fixtures of the detectron2 integration tests: a tiny COCO dataset, small configs,
the training scripts run in-process."""
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

from mtl_plugins.data.synthetic_shapes import write_coco_shapes  # noqa: E402

DATASET = "mtl_d2_test_shapes"
ROOT = Path(__file__).resolve().parents[2]


def load_script(path, name):
    """A training script (``tools/*.py``) imported as a module, to call its ``main(args)``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_train_net(tmp_path, monkeypatch, config, *opts):
    """``tools/train_net.py --config-file configs/d2/<config> OUTPUT_DIR <tmp>/out *opts`` on
    the synthetic data; returns ``(output dir, COCOEvaluator results of the final test)``."""
    from detectron2.engine import default_argument_parser

    monkeypatch.setenv("MTL_D2_SYNTHETIC_ROOT", str(tmp_path / "data"))
    tool = load_script(ROOT / "tools" / "train_net.py", "mtl_d2_train_net")
    out = tmp_path / "out"
    args = default_argument_parser().parse_args([
        "--config-file", str(ROOT / "configs" / "d2" / config), "OUTPUT_DIR", str(out),
        "SEED", "0", *opts])
    results = {}
    original = tool.Trainer.test.__func__

    def test(cls, cfg, model, evaluators=None):
        results.update(original(cls, cfg, model, evaluators))
        return results

    monkeypatch.setattr(tool.Trainer, "test", classmethod(test))
    tool.main(args)
    return out, results


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    paths = write_coco_shapes(tmp_path_factory.mktemp("d2shapes"), num_images=4, size=(128, 160))
    if DATASET in DatasetCatalog.list():
        DatasetCatalog.remove(DATASET)
        MetadataCatalog.remove(DATASET)
    register_coco_instances(DATASET, {}, str(paths["json_file"]), str(paths["image_root"]))
    yield DATASET
    DatasetCatalog.remove(DATASET)
    MetadataCatalog.remove(DATASET)


def make_cfg(**mtl):
    """A CPU Mask R-CNN R50-FPN config with the MTL modules, sized for 128x160 images."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    from mtl_plugins.d2 import add_mtl_config

    cfg = get_cfg()
    add_mtl_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file(
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"))
    cfg.MODEL.META_ARCHITECTURE = "MTLGeneralizedRCNN"
    cfg.MODEL.PROPOSAL_GENERATOR.NAME = "MTLRPN"
    cfg.MODEL.ROI_HEADS.NAME = "MTLStandardROIHeads"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    cfg.MODEL.BACKBONE.FREEZE_AT = 4  # train res5 + FPN only: cheap CPU backward
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 100
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 200
    cfg.INPUT.MIN_SIZE_TRAIN = (128,)
    cfg.INPUT.MAX_SIZE_TRAIN = 160
    cfg.INPUT.MIN_SIZE_TEST = 128
    cfg.INPUT.MAX_SIZE_TEST = 160
    cfg.INPUT.MASK_FORMAT = "bitmask"  # the synthetic dataset stores RLE masks
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.BASE_LR = 0.001
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.CHECKPOINT_PERIOD = 100000
    cfg.TEST.EVAL_PERIOD = 0
    for key, value in mtl.items():
        node = cfg.MTL
        *parents, leaf = key.split(".")
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, type(cfg)(value) if isinstance(value, dict) else value)
    return cfg
