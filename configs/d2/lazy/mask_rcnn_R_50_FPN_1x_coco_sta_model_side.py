"""Paper 001, COCO row, STA, as *model-side* MTL: runs under upstream's unchanged
``lazyconfig_train_net.py`` (``SimpleTrainer``/``AMPTrainer``); the model draws the allocation
itself. For ISTA: ``model.mtl.allocation.mode=ista`` (each batch is then held for its 2
sub-steps and the loader's batches in between are skipped: ``train.max_iter`` counts
optimizer steps, as with the trainer-side configs)."""
from mtl_plugins.d2 import ModelSideMTLRCNN

from .mask_rcnn_R_50_FPN_1x_coco_ft import dataloader, lr_multiplier, model, optimizer, train

model._target_ = ModelSideMTLRCNN
model.mtl = dict(allocation=dict(mode="sta", k=1, seed=0, gap=1), balancer=None, aggregator=None,
                 level="parameter", task_reduction="sum", amp=False)
del train["mtl"]
# learnable loss weights (uncertainty, GradNorm) are model parameters here: no weight decay
optimizer.params.overrides = {"log_vars": {"weight_decay": 0.0},
                              "weights_param": {"weight_decay": 0.0}}
train.output_dir = "./output/lazy/mask_rcnn_R_50_FPN_1x_coco_sta_model_side"
