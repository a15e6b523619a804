"""CPU smoke run of *model-side* MTL for upstream's unchanged ``lazyconfig_train_net.py``:
the model (``ModelSideMTLRCNN``) allocates, balances and aggregates inside its forward, so a
plain ``SimpleTrainer`` trains it. STA with PCGrad here; other methods by overrides::

    python .venv/share/detectron2/tools/lazyconfig_train_net.py \
        --config-file configs/d2/lazy/mask_rcnn_R_50_FPN_synthetic_cpu_model_side.py \
        model.mtl.allocation.mode=ista model.mtl.aggregator=null model.mtl.balancer=uncertainty
"""
from mtl_plugins.d2 import ModelSideMTLRCNN
from mtl_plugins.d2.data import register_synthetic_shapes

from .mask_rcnn_R_50_FPN_synthetic_cpu import (dataloader, lr_multiplier, model, optimizer,
                                               train)

register_synthetic_shapes()  # upstream's script registers no dataset of ours

model._target_ = ModelSideMTLRCNN
model.mtl = dict(
    allocation=dict(mode="sta", k=1, seed=0, gap=1),
    balancer=None,
    aggregator="pcgrad",
    level="parameter",
    task_reduction="sum",
    gradsplit=None,
    amp=False,  # True with train.amp.enabled=True (AMPTrainer) and an aggregator
)
del train["mtl"]
# learnable loss weights (uncertainty, GradNorm) are model parameters here: no weight decay
optimizer.params.overrides = {"log_vars": {"weight_decay": 0.0},
                              "weights_param": {"weight_decay": 0.0}}  # no trainer-side MTL: any trainer runs this model
dataloader.evaluator.use_fast_impl = False  # pure pycocotools (no detectron2._C needed)
train.output_dir = "./output/lazy/mask_rcnn_R_50_FPN_synthetic_cpu_model_side"
