# The survey's NYUD schedule (notes 4.5): Adam lr 1e-4, weight decay 1e-4, batch 8, 100 epochs
# (795 images / 8 = 100 iterations per epoch -> 10000 optimizer steps), poly (power 0.9).
# STA / ISTA on NYUv2-40 keep these 10000 optimizer steps (iterations count optimizer steps,
# ISTA's sub-steps too): paper 001 (~line 286) "In Mask R-CNN on Cityscapes and NYUv2-40
# experiments, STA and ISTA run for the same steps".
optim_wrapper = dict(
    type='MTLOptimWrapper',
    optimizer=dict(type='Adam', lr=1e-4, weight_decay=1e-4),
    mtl=dict(tasks=['seg', 'depth'], allocation=dict(mode='ft')))
param_scheduler = [dict(type='PolyLR', eta_min=0, power=0.9, begin=0, end=10000, by_epoch=False)]
train_cfg = dict(type='MTLIterBasedTrainLoop', max_iters=10000, val_interval=1000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=1000),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
