# mmseg's Cityscapes 40k schedule (SGD lr 0.01, poly), batch 2 per GPU x 4 GPUs (paper 001
# gives no Cityscapes schedule: "Details of architectures and training strategies are reported
# in supplement materials", ~line 181, missing). 40000 x 8 / 2975 = 107.6 epochs for FT;
# STA / ISTA / FT+ run the same epochs = twice the steps (cityscapes_40k_x2.py).
optim_wrapper = dict(
    type='MTLOptimWrapper',
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=5e-4),
    mtl=dict(tasks=['seg', 'depth'], allocation=dict(mode='ft')))
param_scheduler = [dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=40000, by_epoch=False)]
train_cfg = dict(type='MTLIterBasedTrainLoop', max_iters=40000, val_interval=4000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=4000),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
