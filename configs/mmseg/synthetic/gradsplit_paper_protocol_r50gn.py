# GradSplit with paper 000's training protocol (§4.1, Implementation details, ~lines 140-150),
# on the project's synthetic scenes split into one single-task dataset per task (the paper's
# human datasets PA-100k / Market-1501 / MPII / LIP and its attribute, ReID and pose heads are
# not part of this project). It reproduces the protocol of the GradSplit rows of Tables 2 and
# 3 (schedule, optimizer settings, round-robin single-task batches, separate task optimizers,
# ResNet-50-GN backbone, split layer4), not their numbers.
#
# Quoted settings (paper 000, §4.1):
# - "We train the network using a linear warm-up for the initial 3 epochs and then switch to
#   cosine learning rate decay with 10 annealing cycles [23] for the remaining 100 epochs."
# - "Each epoch includes 1,000 major iterations, in which we learn each task sequentially."
#   -> one major iteration = T runner iterations (one single-task batch per task, round
#   robin: "Round-Robin Batch-Level Update", §3.2); an epoch = 1000 * T optimizer steps.
# - "We set the initial learning rate to 0.001 and batch size to 64."
# - "We used separate optimizers for tasks following [18]." -> gradsplit.separate_optimizers
# - "The ResNet-18-GN and ResNet-50-GN [44] pre-trained on ImageNet [6] are used as the shared
#   backbone networks." -> ResNet-50 with GroupNorm (32 groups) in the shared backbone
#   (§3.2: "we use group normalization (GN) [44] in the shared backbone").
# - "we apply GradSplit to the last layer (e.g., Layer4 of ResNet-50)" (§3.1) -> layer4.*
# Not stated (decisions): the optimizer type (Adam, no weight decay), the warm-up start
# (1e-3 x the base rate), the cosine floor (0), equal cycles of 10 epochs restarting at the
# base rate (SGDR [23] with T_mult = 1), the ImageNet R-50-GN weights (set
# model.backbone.init_cfg; none here: no download).
_base_ = ['../_base_/models/resnet18_tiny_heads.py', '../_base_/datasets/synthetic_scenes.py',
          '../_base_/schedules/synthetic_300it.py', '../_base_/mtl_runtime.py']

num_tasks = 3                    # seg, depth, normal: one dataset each
major_iters_per_epoch = 1000     # paper: "Each epoch includes 1,000 major iterations"
epoch_iters = major_iters_per_epoch * num_tasks   # optimizer steps per epoch
warmup_epochs = 3
cosine_epochs = 100
cycles = 10
warmup_iters = warmup_epochs * epoch_iters        # 9000
cycle_iters = cosine_epochs // cycles * epoch_iters  # 30000
max_iters = (warmup_epochs + cosine_epochs) * epoch_iters  # 309000
batch_size = 64

gn = dict(type='GN', num_groups=32, requires_grad=True)
model = dict(
    backbone=dict(_delete_=True, type='ResNet', depth=50, num_stages=4, out_indices=(3,),
                  dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1), norm_cfg=gn, norm_eval=False,
                  contract_dilation=True, init_cfg=None),
    decode_heads=dict(seg=dict(in_channels=2048), depth=dict(in_channels=2048),
                      normal=dict(in_channels=2048)))

_train_pipeline = {{_base_.train_pipeline}}
_single = dict(type='SyntheticScenesDataset', num_samples=512, img_size=(64, 64),
               pipeline=_train_pipeline)
train_dataloader = dict(
    _delete_=True, batch_size=batch_size, num_workers=0, persistent_workers=False,
    sampler=dict(type='MultiDatasetSampler', batch_size=batch_size, ratios=None),
    dataset=dict(type='ConcatDataset', ignore_keys=['mtl_tasks'],
                 datasets=[dict(_single, seed=10, tasks=['seg']),
                           dict(_single, seed=11, tasks=['depth']),
                           dict(_single, seed=12, tasks=['normal'])]))

optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='Adam', lr=1e-3, weight_decay=0.0),
    mtl=dict(gradsplit=dict(modules=['backbone.layer4.*'],
                            relation=[[1, 0, 1], [0, 1, 1], [1, 1, 1]],
                            separate_optimizers=True)))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, end_factor=1.0, begin=0, end=warmup_iters,
         by_epoch=False),
    dict(type='CosineRestartLR', periods=[cycle_iters] * cycles, restart_weights=[1.0] * cycles,
         eta_min=0.0, begin=warmup_iters, end=max_iters, by_epoch=False),
]
train_cfg = dict(type='MTLIterBasedTrainLoop', max_iters=max_iters, val_interval=epoch_iters)
default_hooks = dict(checkpoint=dict(type='CheckpointHook', by_epoch=False,
                                     interval=epoch_iters))
