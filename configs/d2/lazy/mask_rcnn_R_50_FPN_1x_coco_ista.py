"""Paper 001, COCO row, ISTA: each batch is used for 2 sub-steps (each image trains one task,
then the other), each a real optimizer step. Iterations (LR schedule, max_iter, checkpoints)
count data batches: 90k batches = 180k optimizer steps. For equal optimizer steps with the
baseline, halve ``train.max_iter`` (the LR milestones of ``lr_multiplier`` are relative)."""
from .mask_rcnn_R_50_FPN_1x_coco_ft import dataloader, lr_multiplier, model, optimizer, train

train.mtl.allocation.mode = "ista"
train.output_dir = "./output/lazy/mask_rcnn_R_50_FPN_1x_coco_ista"
