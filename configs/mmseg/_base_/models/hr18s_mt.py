# HRNetV2-W18-Small-v2 (the survey's "HRNet-18") with all four branches as decoder input.
norm_cfg = dict(type='SyncBN', requires_grad=True)
data_preprocessor = dict(
    type='MultiTaskDataPreProcessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True, pad_val=0, seg_pad_val=255)
model = dict(
    type='MultiTaskSegmentor',
    tasks=['seg', 'depth'],
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='HRNet', norm_cfg=norm_cfg, norm_eval=False,
        extra=dict(
            stage1=dict(num_modules=1, num_branches=1, block='BOTTLENECK', num_blocks=(2,),
                        num_channels=(64,)),
            stage2=dict(num_modules=1, num_branches=2, block='BASIC', num_blocks=(2, 2),
                        num_channels=(18, 36)),
            stage3=dict(num_modules=3, num_branches=3, block='BASIC', num_blocks=(2, 2, 2),
                        num_channels=(18, 36, 72)),
            stage4=dict(num_modules=2, num_branches=4, block='BASIC', num_blocks=(2, 2, 2, 2),
                        num_channels=(18, 36, 72, 144))),
        init_cfg=dict(type='Pretrained', checkpoint='open-mmlab://msra/hrnetv2_w18_small')),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
