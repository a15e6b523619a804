# SegNet (Badrinarayanan et al. 2017) shared by seg + depth, in the multi-task layout of MTAN's
# NYUv2-13 experiments: paper 001 (001_*.txt ~line 181) "For NYUv2, we examine on two
# architectures in MTL: SegNet [2] following Uncertainty weights [18] and Resnet50 [15] with
# deeplab-like heads [5] following MTI-Net [38]. ... Details of architectures and training
# strategies are reported in supplement materials" (the supplement is not available; notes
# seed-sta-gradsplit.md A.7/A.10). Trunk: VGG-16 encoder + mirrored decoder with pooling-index
# un-pooling, 64 channels at input resolution (mtl_plugins/mmseg/models/segnet.py).
# Heads (MTAN's prediction layer; notes seed-roaming-recon.md: "Per-task heads are a 3x3x64x64
# conv followed by a 1x1 conv"): a 3x3 conv 64->64 then a 1x1 conv to the task's channels, no
# norm/activation between them (FCNHead with num_convs=1, norm_cfg=None, act_cfg=None).
# Trained from scratch (Xavier init), as SegNet-MTAN.
norm_cfg = dict(type='BN', requires_grad=True)
# MTAN's NYUv2 arrays hold images in [0, 1]: scale by 1/255, no mean subtraction
data_preprocessor = dict(
    type='MultiTaskDataPreProcessor', mean=[0.0, 0.0, 0.0], std=[255.0, 255.0, 255.0],
    bgr_to_rgb=True, pad_val=0, seg_pad_val=255, size_divisor=32)
head = dict(in_channels=64, channels=64, num_convs=1, kernel_size=3, in_index=0,
            concat_input=False, dropout_ratio=0.0, norm_cfg=None, act_cfg=None,
            align_corners=False)
model = dict(
    type='MultiTaskSegmentor',
    tasks=['seg', 'depth'],
    data_preprocessor=data_preprocessor,
    backbone=dict(type='SegNet', in_channels=3, base_channels=64, stage_convs=(2, 2, 3, 3, 3),
                  norm_cfg=norm_cfg),
    decode_heads=dict(
        # seg: MTAN's log-softmax + NLL (ignore void) = cross-entropy over labelled pixels
        seg=dict(type='FCNHead', num_classes=13, **head,
                 loss_decode=dict(type='CrossEntropyLoss', avg_non_ignore=True, loss_weight=1.0)),
        # depth: L1 over the pixels with valid (non-zero) depth, as MTAN
        depth=dict(type='DepthHead', loss_weight=1.0, **head)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
