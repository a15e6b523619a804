# Dilated ResNet-50 (output stride 8) with one DeepLab ASPP head per task: the "ResNet50 +
# deeplab-like heads following MTI-Net" of paper 001 (NYUv2-40, Cityscapes).
# ImageNet initialisation as in mmseg's deeplabv3 configs.
norm_cfg = dict(type='SyncBN', requires_grad=True)
data_preprocessor = dict(
    type='MultiTaskDataPreProcessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True, pad_val=0, seg_pad_val=255)
aspp = dict(type='ASPPHead', in_channels=2048, in_index=3, channels=256,
            dilations=(1, 12, 24, 36), dropout_ratio=0.1, norm_cfg=norm_cfg, align_corners=False)
model = dict(
    type='MultiTaskSegmentor',
    tasks=['seg', 'depth'],
    data_preprocessor=data_preprocessor,
    backbone=dict(type='ResNetV1c', depth=50, num_stages=4, out_indices=(0, 1, 2, 3),
                  dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1), norm_cfg=norm_cfg,
                  norm_eval=False, style='pytorch', contract_dilation=True,
                  init_cfg=dict(type='Pretrained', checkpoint='open-mmlab://resnet50_v1c')),
    decode_heads=dict(
        seg=dict(aspp, num_classes=40,
                 loss_decode=dict(type='CrossEntropyLoss', avg_non_ignore=True, loss_weight=1.0)),
        depth=dict(type='TaskHead', task='depth', head=aspp, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
