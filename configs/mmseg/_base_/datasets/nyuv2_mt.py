# NYUD-v2 multi-task in the layout of the MTI-Net / PAD-Net line (docs/mmseg_data.md):
# 795 train / 654 val images, 480x640, 40-class segmentation, depth (m), normals, edges.
# Augmentation of the survey (notes 4.5): flip, random zoom {1.0..1.5} with depth divided by
# the zoom, crop back to 480x640, photometric distortion. Test: single scale, no flip.
dataset_type = 'NYUv2MultiTaskDataset'
data_root = 'data/NYUD_MT'
tasks = ['seg', 'depth']
num_classes = 40
crop_size = (480, 640)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadMultiTaskAnnotations', tasks=tasks),
    dict(type='MultiTaskRandomFlip', prob=0.5),
    dict(type='RandomResize', scale=(640, 480), ratio_range=(1.0, 1.5), keep_ratio=True,
         resize_type='MultiTaskResize', scale_depth=True),
    dict(type='MultiTaskRandomCrop', crop_size=crop_size),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackMultiTaskInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadMultiTaskAnnotations', tasks=tasks),
    dict(type='PackMultiTaskInputs'),
]
train_dataloader = dict(
    batch_size=8, num_workers=4, persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type=dataset_type, data_root=data_root, split='train', num_classes=num_classes,
                 tasks=tasks, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=4, persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root, split='val', num_classes=num_classes,
                 tasks=tasks, pipeline=test_pipeline))
test_dataloader = val_dataloader
# depth RMSE pooled over valid pixels (notes 4.5, repo issue #1); histogram median for normals
val_evaluator = dict(type='MultiTaskMetric', tasks=tasks,
                     normal_cfg=dict(median='histogram'))
test_evaluator = val_evaluator
