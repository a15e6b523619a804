"""CPU smoke run, FT with PCGrad on the shared parameters (backbone + FPN): one backward per
task, conflicting gradients projected."""
from .mask_rcnn_R_50_FPN_synthetic_cpu import (dataloader, lr_multiplier, model, optimizer,
                                               train)

train.mtl.aggregator = "pcgrad"
train.output_dir = "./output/lazy/mask_rcnn_R_50_FPN_synthetic_cpu_pcgrad"
