"""CPU smoke run (FT) on the synthetic-shapes COCO dataset, sized like
``configs/d2/mask_rcnn_R_50_FPN_synthetic_cpu.yaml``: random init, 128x160 images, res5 + FPN +
heads trained, 4 iterations of 2 images. ``tools/lazyconfig_train_net.py`` registers
``mtl_synthetic_shapes_{train,val}`` (written under ``$MTL_D2_SYNTHETIC_ROOT`` on first use)::

    python tools/lazyconfig_train_net.py \
        --config-file configs/d2/lazy/mask_rcnn_R_50_FPN_synthetic_cpu.py
"""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from fvcore.common.param_scheduler import MultiStepParamScheduler

from .mask_rcnn_R_50_FPN_1x_coco_ft import dataloader, model, optimizer, train

train.device = "cpu"
train.init_checkpoint = ""  # random init: no download
train.max_iter = 4
train.checkpointer.period = 2
train.eval_period = 0  # evaluation once, after the last iteration
train.log_period = 1
train.output_dir = "./output/lazy/mask_rcnn_R_50_FPN_synthetic_cpu_ft"

# random init (stages 1-3 frozen, hence unnormalised) diverges within 4 ISTA iterations at
# the yacs smoke config's 1e-3 (and 1e-4); a smoke run only has to run every step
optimizer.lr = 1e-5
# no warmup, x0.1 after 3 of the 4 iterations (relative: scales with train.max_iter)
lr_multiplier = L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[3, 4])

_resnet = model.backbone.bottom_up
_resnet.freeze_at = 4  # train res5 + FPN + heads only: a cheap CPU backward
_resnet.stem.norm = "BN"  # random init: FrozenBN would leave the activations unnormalised
_resnet.stages.norm = "BN"
model.proposal_generator.pre_nms_topk = (200, 200)
model.proposal_generator.post_nms_topk = (100, 100)
model.roi_heads.num_classes = 2
model.roi_heads.batch_size_per_image = 32
# keep every detection: an untrained model's foreground scores underflow to 0
model.roi_heads.box_predictor.test_score_thresh = -1.0
model.roi_heads.box_predictor.test_topk_per_image = 20

dataloader.train.dataset.names = "mtl_synthetic_shapes_train"
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(128,), sample_style="choice", max_size=160),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.mapper.instance_mask_format = "bitmask"  # the synthetic json stores RLE
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = 0
dataloader.test.dataset.names = "mtl_synthetic_shapes_val"
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=128,
                                                                max_size=160)]
dataloader.test.num_workers = 0
dataloader.evaluator.tasks = ("bbox", "segm")  # both, even before the model predicts masks
dataloader.evaluator.output_dir = "${...train.output_dir}/inference"
