# NYUD-v2 (survey 003, Table V(a)): HRNet-18 MTINet with seg + depth as final tasks and
# normals + edges as auxiliary (deep-supervision) tasks, survey loss weights
# (seg 1, depth 1, normal 10, edge 50), FT training, Adam 1e-4, 100 epochs.
_base_ = ['../_base_/models/hr18s_mt.py', '../_base_/datasets/nyuv2_mt.py',
          '../_base_/schedules/nyuv2_100e.py', '../_base_/mtl_runtime.py']
aux = ['seg', 'depth', 'normal', 'edge']
model = dict(decoder=dict(type='MTINetHead', tasks=['seg', 'depth'], aux_tasks=aux,
                          in_channels=(18, 36, 72, 144), num_classes=40,
                          norm_cfg={{_base_.norm_cfg}}))
# the auxiliary tasks need their ground truth loaded too
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadMultiTaskAnnotations', tasks=aux),
    dict(type='MultiTaskRandomFlip', prob=0.5),
    dict(type='RandomResize', scale=(640, 480), ratio_range=(1.0, 1.5), keep_ratio=True,
         resize_type='MultiTaskResize', scale_depth=True),
    dict(type='MultiTaskRandomCrop', crop_size=(480, 640)),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackMultiTaskInputs'),
]
train_dataloader = dict(dataset=dict(tasks=aux, pipeline=train_pipeline))
