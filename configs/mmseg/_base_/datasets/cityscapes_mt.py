# Cityscapes multi-task (paper 001, Table 3): 19-class segmentation + disparity ("depth"
# field, pixels, (p - 1) / 256 for p > 0). 2975 train / 500 val.
dataset_type = 'CityscapesMultiTaskDataset'
data_root = 'data/cityscapes'
tasks = ['seg', 'depth']
crop_size = (512, 1024)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadMultiTaskAnnotations', tasks=tasks),
    # disparity is not rescaled with the image here (scale_depth=False): zooming changes
    # apparent size, not the stereo baseline; crops keep the native resolution
    dict(type='RandomResize', scale=(2048, 1024), ratio_range=(0.5, 2.0), keep_ratio=True,
         resize_type='MultiTaskResize'),
    dict(type='MultiTaskRandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='MultiTaskRandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackMultiTaskInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='MultiTaskResize', scale=(2048, 1024), keep_ratio=True),
    dict(type='LoadMultiTaskAnnotations', tasks=tasks),
    dict(type='PackMultiTaskInputs'),
]
train_dataloader = dict(
    batch_size=2, num_workers=4, persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type=dataset_type, data_root=data_root, split='train', num_classes=19,
                 tasks=tasks, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=4, persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root, split='val', num_classes=19,
                 tasks=tasks, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='MultiTaskMetric', tasks=tasks)
test_evaluator = val_evaluator
