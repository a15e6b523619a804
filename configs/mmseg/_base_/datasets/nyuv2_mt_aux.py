# NYUD-v2 with normals and edges loaded as auxiliary (deep-supervision) targets beside the
# final seg + depth: the survey's PAD-Net / MTI-Net setting.
_base_ = ['./nyuv2_mt.py']
aux_tasks = ['seg', 'depth', 'normal', 'edge']
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadMultiTaskAnnotations', tasks=aux_tasks),
    dict(type='MultiTaskRandomFlip', prob=0.5),
    dict(type='RandomResize', scale=(640, 480), ratio_range=(1.0, 1.5), keep_ratio=True,
         resize_type='MultiTaskResize', scale_depth=True),
    dict(type='MultiTaskRandomCrop', crop_size={{_base_.crop_size}}),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackMultiTaskInputs'),
]
train_dataloader = dict(dataset=dict(tasks=aux_tasks, pipeline=train_pipeline))
