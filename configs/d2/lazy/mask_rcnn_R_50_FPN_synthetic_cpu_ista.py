"""CPU smoke run, ISTA: two optimizer steps per batch (each image trains one task, then the
other)."""
from .mask_rcnn_R_50_FPN_synthetic_cpu import (dataloader, lr_multiplier, model, optimizer,
                                               train)

train.mtl.allocation.mode = "ista"
train.output_dir = "./output/lazy/mask_rcnn_R_50_FPN_synthetic_cpu_ista"
