# SegNet NYUv2-13 schedule of MTAN [23] (paper 001 gives none: "Details of architectures and
# training strategies are reported in supplement materials", 001_*.txt ~line 181, and the
# supplement is missing): Adam lr 1e-4 (no weight decay), batch 2, 200 epochs, the lr halved
# after 100 epochs (notes seed-sta-gradsplit.md A.10: "MTAN SegNet NYUv2-13 (lorenmt/mtan):
# Adam lr 1e-4, StepLR(step 100, γ 0.5), 200 epochs, batch 2").
# Full Task: 795 images / batch 2 = 397.5 optimizer steps per epoch -> 200 epochs = 79500
# steps, the halving at 100 epochs = step 39750. Iterations count optimizer steps
# (mtl_plugins/mmseg/loops.py). STA / ISTA / FT+ / the gap runs use nyuv2_segnet_200e_x2.py.
optim_wrapper = dict(
    type='MTLOptimWrapper',
    optimizer=dict(type='Adam', lr=1e-4, weight_decay=0.0),
    mtl=dict(tasks=['seg', 'depth'], allocation=dict(mode='ft')))
param_scheduler = [dict(type='MultiStepLR', milestones=[39750], gamma=0.5, begin=0, end=79500,
                        by_epoch=False)]
train_cfg = dict(type='MTLIterBasedTrainLoop', max_iters=79500, val_interval=3975)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=3975),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
