# The launch tests' model: the synthetic multi-task config made deterministic across process
# counts: GroupNorm (batch statistics would differ between 2 x b and 1 x 2b), no random flip,
# plain SGD (Adam's normalisation magnifies float-order noise in near-zero gradients), 32x32
# images, no void pixels (FillVoidPixels), two data-loader workers, every rank's state dumped after training (RankDumpHook).
_base_ = ['../../../configs/mmseg/synthetic/mtl_ft.py']
custom_imports = dict(imports=['mtl_plugins.mmseg', 'tests.mmseg.launch.support'],
                      allow_failed_imports=False)
norm_cfg = dict(type='GN', num_groups=4, requires_grad=True)
_head = dict(norm_cfg=norm_cfg)
model = dict(data_preprocessor=dict(size=(32, 32)),
             backbone=dict(norm_cfg=norm_cfg),
             decode_heads=dict(seg=_head, depth=_head, normal=_head))
_pipeline = [dict(type='LoadSyntheticScene'), dict(type='FillVoidPixels'),
             dict(type='PackMultiTaskInputs')]
train_dataloader = dict(batch_size=2, num_workers=2, persistent_workers=False,
                        sampler=dict(type='InfiniteSampler', shuffle=True),
                        dataset=dict(num_samples=16, img_size=(32, 32), pipeline=_pipeline))
val_dataloader = None
val_cfg = None
val_evaluator = None
test_dataloader = None
test_cfg = None
test_evaluator = None
optim_wrapper = dict(optimizer=dict(_delete_=True, type='SGD', lr=0.05, momentum=0.9))
param_scheduler = []
train_cfg = dict(type='MTLIterBasedTrainLoop', max_iters=2, val_interval=1000)
default_hooks = dict(checkpoint=dict(interval=1000), logger=dict(interval=1),
                     visualization=dict(type='SegVisualizationHook'))
custom_hooks = [dict(type='MTLHook', log_interval=1), dict(type='RankDumpHook', out_dir='')]
env_cfg = dict(dist_cfg=dict(backend='gloo'))
# DDP on CPU: mmengine passes device_ids=[LOCAL_RANK], which DDP accepts for GPU modules only
model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None,
                         broadcast_buffers=False)
