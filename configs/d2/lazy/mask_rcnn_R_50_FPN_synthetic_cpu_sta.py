"""CPU smoke run, STA (one random task per image per step)."""
from .mask_rcnn_R_50_FPN_synthetic_cpu import (dataloader, lr_multiplier, model, optimizer,
                                               train)

train.mtl.allocation.mode = "sta"
train.output_dir = "./output/lazy/mask_rcnn_R_50_FPN_synthetic_cpu_sta"
