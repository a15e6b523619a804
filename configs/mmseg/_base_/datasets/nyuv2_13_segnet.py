# NYUv2-13 for SegNet (paper 001 Tables 1, 5, 7): seg over 13 classes + depth (m).
# Paper 001 (~line 185): "NYUv2 is relatively small (795 training, 654 test images) ... Note
# that on semantic segmentation, we cluster 894 classes into 13 classes following [23] for
# SegNet and 40 classes for Resnet50 following [38]. For comparison, we use a different name
# for these two settings: NYUv2-13 and NYUv2-40."
# Data: the NYUD_MT archive (docs/mmseg_data.md 3.1) with the 40 -> 13 table NYU40_TO_13
# (num_classes=13). Input size: MTAN's NYUv2 arrays are 288x384 ([23]'s setting; the paper
# gives no size), so images and labels are resized 480x640 -> 288x384 (the same 3:4 aspect;
# nearest for labels; depth values in metres are not rescaled by a resize). Augmentation:
# horizontal flip only (the paper states none).
dataset_type = 'NYUv2MultiTaskDataset'
data_root = 'data/NYUD_MT'
tasks = ['seg', 'depth']
num_classes = 13
img_scale = (384, 288)  # (w, h), mmcv order
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadMultiTaskAnnotations', tasks=tasks),
    dict(type='MultiTaskResize', scale=img_scale, keep_ratio=False),
    dict(type='MultiTaskRandomFlip', prob=0.5),
    dict(type='PackMultiTaskInputs'),
]
# test: the image at 288x384, the labels at their original 480x640 (mmseg's convention:
# resize before loading the annotations; predictions are resized back to the original size)
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='MultiTaskResize', scale=img_scale, keep_ratio=False),
    dict(type='LoadMultiTaskAnnotations', tasks=tasks),
    dict(type='PackMultiTaskInputs'),
]
train_dataloader = dict(
    batch_size=2, num_workers=2, persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type=dataset_type, data_root=data_root, split='train', num_classes=num_classes,
                 tasks=tasks, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=2, persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root, split='val', num_classes=num_classes,
                 tasks=tasks, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='MultiTaskMetric', tasks=tasks)
test_evaluator = val_evaluator
