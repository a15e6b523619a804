"""Per-image allocation inside the model: every loss covers exactly the allocated images."""
import numpy as np
import pytest
import torch

from mtl_plugins.data.synthetic_shapes import make_image

from .conftest import make_cfg


def _batch(n=2, h=128, w=160, seed=0):
    from detectron2.structures import BitMasks, Instances

    rng = np.random.default_rng(seed)
    batch = []
    for _ in range(n):
        img, shapes = make_image(rng, h, w, max_shapes=3)
        inst = Instances((h, w))
        inst.gt_masks = BitMasks(torch.from_numpy(np.stack([m for m, _ in shapes])))
        inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
        inst.gt_classes = torch.tensor([c - 1 for _, c in shapes], dtype=torch.int64)
        batch.append({"image": torch.from_numpy(img[:, :, ::-1].copy()).permute(2, 0, 1),
                      "height": h, "width": w, "instances": inst})
    return batch


@pytest.fixture(scope="module")
def setup():
    """A fixed model, its features and fixed sampled proposals for a batch of two images."""
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)
    model = build_model(make_cfg())
    model.train()
    batch = _batch()
    gt = [x["instances"] for x in batch]
    with EventStorage(0), torch.no_grad():
        images = model.preprocess_image(batch)
        features = model.backbone(images.tensor)
    proposals = []
    gen = torch.Generator().manual_seed(1)
    for inst in gt:  # jittered ground truth and random boxes: fixed proposals
        boxes = inst.gt_boxes.tensor
        jitter = boxes.repeat(4, 1) + torch.randn(len(boxes) * 4, 4, generator=gen) * 4
        rand = torch.rand(20, 2, generator=gen) * torch.tensor([100.0, 80.0])
        rand = torch.cat([rand, rand + 20 + torch.rand(20, 2, generator=gen) * 40], 1)
        p = Instances(inst.image_size)
        p.proposal_boxes = Boxes(torch.cat([jitter, rand]).clamp(min=0, max=127))
        p.objectness_logits = torch.zeros(len(p.proposal_boxes))
        proposals.append(p)
    torch.manual_seed(2)
    with EventStorage(0):
        sampled = model.roi_heads.label_and_sample_proposals(proposals, gt)
    return model, images, features, gt, sampled


def _alloc(model, *image_tasks):
    from mtl_plugins.d2.config import loss_owner
    from mtl_plugins.d2.modeling import ImageAllocation

    return ImageAllocation([frozenset(t) for t in image_tasks], loss_owner(model.mtl_task_losses))


def test_mask_loss_equals_mask_rcnn_loss_on_allocated_images(setup):
    from detectron2.modeling.roi_heads.mask_head import mask_rcnn_loss
    from detectron2.modeling.roi_heads.roi_heads import select_foreground_proposals
    from detectron2.utils.events import EventStorage

    model, _, features, _, sampled = setup
    heads = model.roi_heads
    with EventStorage(0):
        # by hand: detectron2's mask_rcnn_loss on the foreground ROIs of image 1 only
        fg, _ = select_foreground_proposals(sampled, heads.num_classes)
        assert len(fg[0]) > 0 and len(fg[1]) > 0
        pooled = heads.mask_pooler([features[f] for f in heads.mask_in_features],
                                   [x.proposal_boxes for x in fg])
        logits = heads.mask_head.layers(pooled)
        expected = mask_rcnn_loss(logits[len(fg[0]):], [fg[1]])
        full = mask_rcnn_loss(logits, fg)
        heads._mtl_alloc = _alloc(model, {"detection"}, {"detection", "mask"})
        try:
            got = heads._forward_mask(features, sampled)["loss_mask"]
        finally:
            heads._mtl_alloc = None
        unrestricted = heads._forward_mask(features, sampled)["loss_mask"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unrestricted, full, rtol=1e-5, atol=1e-6)
    assert abs(float(got) - float(full)) > 1e-6  # the restriction changes the value


def test_box_losses_cover_only_detection_images(setup):
    from detectron2.utils.events import EventStorage

    model, _, features, _, sampled = setup
    heads = model.roi_heads
    with EventStorage(0):
        feats = heads.box_pooler([features[f] for f in heads.box_in_features],
                                 [x.proposal_boxes for x in sampled])
        scores, deltas = heads.box_predictor(heads.box_head(feats))
        n0 = len(sampled[0])
        expected = heads.box_predictor.losses((scores[:n0], deltas[:n0]), [sampled[0]])
        heads._mtl_alloc = _alloc(model, {"detection"}, {"mask"})
        try:
            got = heads._forward_box(features, sampled)
        finally:
            heads._mtl_alloc = None
    assert set(got) == {"loss_cls", "loss_box_reg"}
    for k in got:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)


def test_rpn_losses_keep_per_image_normalisation(setup):
    from detectron2.utils.events import EventStorage

    model, images, features, gt, _ = setup
    rpn = model.proposal_generator

    def losses(*image_tasks):
        rpn._mtl_alloc = _alloc(model, *image_tasks) if image_tasks else None
        torch.manual_seed(3)  # the same anchor sampling every time
        try:
            with EventStorage(0):
                return rpn(images, features, gt)[1]
        finally:
            rpn._mtl_alloc = None

    full = losses()
    first = losses({"detection"}, {"mask"})
    second = losses({"mask"}, {"detection"})
    for k in ("loss_rpn_cls", "loss_rpn_loc"):
        # normaliser = batch_size_per_image * allocated images: the halves average to the whole
        torch.testing.assert_close((first[k] + second[k]) / 2, full[k], rtol=1e-5, atol=1e-7)
        assert not torch.allclose(first[k], full[k])


def test_task_without_images_gives_connected_zero(setup):
    from detectron2.utils.events import EventStorage

    model, images, _, gt, _ = setup
    batch = _batch()
    for x in batch:
        x["mtl_alloc"] = ("detection",)
    with EventStorage(0):
        losses = model(batch)
    assert float(losses["loss_mask"]) == 0.0
    assert losses["loss_mask"].requires_grad
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss_mask"].backward()
    grad = model.roi_heads.mask_head.predictor.weight.grad
    assert grad is not None and float(grad.abs().sum()) == 0.0
    model.zero_grad(set_to_none=True)

    for x in batch:
        x["mtl_alloc"] = ("mask",)
    with EventStorage(0):
        losses = model(batch)
    for k in ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"):
        assert float(losses[k]) == 0.0 and losses[k].requires_grad, k
    assert float(losses["loss_mask"]) > 0


def test_unknown_allocated_task_is_rejected(setup):
    from detectron2.utils.events import EventStorage

    from mtl_plugins.core.tasks import MTLConfigError

    model = setup[0]
    batch = _batch(n=1)
    batch[0]["mtl_alloc"] = ("depth",)
    with EventStorage(0), pytest.raises(MTLConfigError, match="mtl_alloc"):
        model(batch)
