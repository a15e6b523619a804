"""Paper 001 (STA/ISTA), COCO row, baseline, as a LazyConfig: detectron2's model-zoo
``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py`` (16 images per batch, SGD lr 0.02,
90k iterations, ImageNet weights) with the MTL modules that restrict each loss to the images
allocated to its task. Tasks: detection = RPN + box losses, mask = loss_mask.

    python tools/lazyconfig_train_net.py \
        --config-file configs/d2/lazy/mask_rcnn_R_50_FPN_1x_coco_ft.py --num-gpus 8
"""
from detectron2 import model_zoo

from mtl_plugins.d2 import (DEFAULT_TASK_LOSSES, MTLGeneralizedRCNN, MTLRPN,
                            MTLStandardROIHeads)

_zoo = model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py")
dataloader = _zoo.dataloader
optimizer = _zoo.optimizer
lr_multiplier = _zoo.lr_multiplier
train = _zoo.train
model = _zoo.model

_TASKS = ["detection", "mask"]
model._target_ = MTLGeneralizedRCNN
model.proposal_generator._target_ = MTLRPN
model.roi_heads._target_ = MTLStandardROIHeads
# the model's loss → task map; must equal train.mtl.task_losses (None = these built-in groups)
model.mtl_task_losses = {t: list(DEFAULT_TASK_LOSSES[t]) for t in _TASKS}

train.mtl = dict(
    tasks=_TASKS,
    task_losses=None,
    allocation=dict(mode="ft", k=1, seed=0, gap=1),  # gap: mode="gap" only
    balancer=None,
    aggregator=None,
    level="parameter",
    task_reduction="sum",  # detectron2's summed loss dict (FT == vanilla detectron2)
    gradsplit=None,
    recon_search=None,
)
train.output_dir = "./output/lazy/mask_rcnn_R_50_FPN_1x_coco_ft"
