"""One Mask R-CNN R50-FPN training step on CPU through detectron2's own model code."""
import numpy as np
import torch

from mtl_plugins.data.synthetic_shapes import make_image


def _build_cfg():
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 200
    return cfg


def _instances(h, w, instances):
    from detectron2.structures import BitMasks, Boxes, Instances

    inst = Instances((h, w))
    masks = torch.from_numpy(np.stack([m for m, _ in instances]))
    inst.gt_masks = BitMasks(masks)
    inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
    inst.gt_classes = torch.tensor([c - 1 for _, c in instances], dtype=torch.int64)
    return inst


def test_mask_rcnn_r50_fpn_training_step_on_cpu():
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(_build_cfg())
    model.train()
    rng = np.random.default_rng(0)
    h, w = 128, 160
    batch = []
    for _ in range(2):
        img, instances = make_image(rng, h, w, max_shapes=3)
        batch.append({"image": torch.from_numpy(img[:, :, ::-1].copy()).permute(2, 0, 1),
                      "height": h, "width": w, "instances": _instances(h, w, instances)})
    from detectron2.utils.events import EventStorage

    with EventStorage(0):
        losses = model(batch)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    before = model.roi_heads.mask_head.predictor.weight.detach().clone()
    total.backward()
    assert model.roi_heads.mask_head.predictor.weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(before, model.roi_heads.mask_head.predictor.weight)

    model.eval()
    with torch.no_grad():
        out = model([{"image": batch[0]["image"], "height": h, "width": w}])
    assert "instances" in out[0]
