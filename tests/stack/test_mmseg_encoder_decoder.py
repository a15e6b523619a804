"""An mmseg EncoderDecoder forward/backward through mmseg's own registry and loss path."""
import torch


def test_encoder_decoder_forward_backward():
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    from mmseg.utils import register_all_modules

    register_all_modules()
    norm = dict(type="BN", requires_grad=True)
    from mmengine.config import ConfigDict

    model = MODELS.build(ConfigDict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=[0.0] * 3, std=[1.0] * 3,
                               size=(64, 64), pad_val=0, seg_pad_val=255),
        backbone=dict(type="ResNetV1c", depth=18, num_stages=4, out_indices=(3,),
                      norm_cfg=norm, dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1)),
        decode_head=dict(type="FCNHead", in_channels=512, channels=32, num_convs=1,
                         num_classes=5, in_index=0, norm_cfg=norm, align_corners=False,
                         loss_decode=dict(type="CrossEntropyLoss", loss_weight=1.0)),
        train_cfg=dict(), test_cfg=dict(mode="whole")))
    torch.manual_seed(0)
    inputs, samples = [], []
    for _ in range(2):
        inputs.append(torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8))
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=torch.randint(0, 5, (1, 64, 64)))
        s.set_metainfo(dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64)))
        samples.append(s)
    data = model.data_preprocessor(dict(inputs=inputs, data_samples=samples), training=True)
    losses = model(**data, mode="loss")
    loss, log_vars = model.parse_losses(losses)
    assert torch.isfinite(loss) and "decode.loss_ce" in log_vars
    loss.backward()
    assert model.backbone.stem[0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        preds = model(**model.data_preprocessor(dict(inputs=inputs, data_samples=samples)),
                      mode="predict")
    assert preds[0].pred_sem_seg.data.shape == (1, 64, 64)
