"""CPU smoke run, GradSplit (paper 000) on every conv of res5, the last backbone stage (paper
000 §3.1: "we apply GradSplit to the last layer (e.g., Layer4 of ResNet-50) of the shared
backbone"), with one optimizer state per task (§4.1: "We used separate optimizers for tasks").
``relation=None`` is the identity (GradSplit_τ=inf); a relation file written by
``tools/gradsplit_relations.py --out`` may be given instead::

    python tools/lazyconfig_train_net.py \
        --config-file configs/d2/lazy/mask_rcnn_R_50_FPN_synthetic_cpu_gradsplit.py
"""
from .mask_rcnn_R_50_FPN_synthetic_cpu import (dataloader, lr_multiplier, model, optimizer,
                                               train)

train.mtl.gradsplit = dict(modules=["backbone.bottom_up.res5.*"], relation=None,
                           separate_optimizers=True)
train.output_dir = "./output/lazy/mask_rcnn_R_50_FPN_synthetic_cpu_gradsplit"
