"""Paper 001, COCO row, STA: every image trains one random task (detection or mask) per step.
Same schedule as the baseline: 90k iterations = 90k optimizer steps (paper 001, line ~252: "All
hyper-parameters follow the default configuration in detectron2")."""
from .mask_rcnn_R_50_FPN_1x_coco_ft import dataloader, lr_multiplier, model, optimizer, train

train.mtl.allocation.mode = "sta"
train.output_dir = "./output/lazy/mask_rcnn_R_50_FPN_1x_coco_sta"
