# A small dilated ResNet-18 (16 base channels, output stride 8) with one FCN-style head per
# task: sized for CPU runs on 64x64 synthetic scenes.
norm_cfg = dict(type='BN', requires_grad=True)
data_preprocessor = dict(
    type='MultiTaskDataPreProcessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True, pad_val=0, seg_pad_val=255, size=(64, 64))
head = dict(in_channels=128, channels=32, num_convs=1, in_index=0, concat_input=False,
            dropout_ratio=0.0, norm_cfg=norm_cfg, align_corners=False)
model = dict(
    type='MultiTaskSegmentor',
    tasks=['seg', 'depth', 'normal'],
    data_preprocessor=data_preprocessor,
    backbone=dict(type='ResNetV1c', depth=18, stem_channels=16, base_channels=16, num_stages=4,
                  out_indices=(3,), dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1),
                  norm_cfg=norm_cfg, norm_eval=False, contract_dilation=True),
    decode_heads=dict(
        seg=dict(type='FCNHead', num_classes=5, **head,
                 loss_decode=dict(type='CrossEntropyLoss', avg_non_ignore=True, loss_weight=1.0)),
        depth=dict(type='DepthHead', loss_weight=1.0, **head),
        normal=dict(type='NormalHead', loss_weight=1.0, **head)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
