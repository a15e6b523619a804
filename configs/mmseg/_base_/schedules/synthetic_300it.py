# 300 optimizer steps with Adam (iterations count optimizer steps: ISTA's sub-steps too).
optim_wrapper = dict(
    type='MTLOptimWrapper',
    optimizer=dict(type='Adam', lr=2e-3, weight_decay=1e-4),
    mtl=dict(tasks=['seg', 'depth', 'normal'], allocation=dict(mode='ft')))
param_scheduler = [dict(type='PolyLR', eta_min=1e-5, power=0.9, begin=0, end=300, by_epoch=False)]
train_cfg = dict(type='MTLIterBasedTrainLoop', max_iters=300, val_interval=300)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=20, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=300),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
randomness = dict(seed=0)
