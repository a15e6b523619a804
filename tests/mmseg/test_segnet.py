"""SegNet (paper 001's NYUv2-13 trunk, MTAN's layout) and the NYUv2-13 configs end to end:
the config's data pipeline on a small NYUD_MT tree, the reduced-width model through the real
MultiTaskSegmentor and MTLOptimWrapper (a train step, predict shapes, checkpoint round trip),
the full-width parameter count against hand-computed / published numbers, config errors."""
import copy
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config, ConfigDict

import mtl_plugins.mmseg  # noqa: F401  (registers everything)
from mtl_plugins.core.tasks import MTLConfigError
from mtl_plugins.mmseg.fields import ALLOC_KEY

ROOT = Path(__file__).resolve().parents[2]
NYU13 = ROOT / "configs" / "mmseg" / "nyuv2"
FULL_H, FULL_W = 480, 640  # NYUD_MT images
STEMS = ("000001", "000002", "000003")


def _registry():
    from mmseg.registry import DATASETS, MODELS, OPTIM_WRAPPERS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    return DATASETS, MODELS, OPTIM_WRAPPERS


def _narrow(model_cfg, width):
    """The config's model with SegNet and its heads at ``width`` channels (CPU-sized)."""
    cfg = copy.deepcopy(model_cfg)
    cfg.backbone.base_channels = width
    for head in cfg.decode_heads.values():
        head.in_channels = head.channels = width
    return cfg


@pytest.fixture(scope="module")
def nyud_root(tmp_path_factory):
    """A 3-image NYUD_MT tree at the real 480x640 size; NYU-40 labels in column bands."""
    root = tmp_path_factory.mktemp("NYUD_MT")
    for sub in ("images", "segmentation", "depth", "gt_sets"):
        (root / sub).mkdir()
    rng = np.random.default_rng(0)
    bands = np.array([0, 1, 2, 5, 23, 25, 40, 39], dtype=np.uint8)  # void, wall, floor, ...
    for stem in STEMS:
        cv2.imwrite(str(root / "images" / f"{stem}.jpg"),
                    rng.integers(0, 256, (FULL_H, FULL_W, 3), dtype=np.uint8))
        seg = np.repeat(bands, FULL_W // len(bands))[None].repeat(FULL_H, 0)
        cv2.imwrite(str(root / "segmentation" / f"{stem}.png"), seg)
        depth = rng.uniform(0.5, 9.0, (FULL_H, FULL_W)).astype(np.float32)
        depth[:40, :40] = 0.0  # invalid
        np.save(root / "depth" / f"{stem}.npy", depth)
    (root / "gt_sets" / "train.txt").write_text("\n".join(STEMS[:2]) + "\n")
    (root / "gt_sets" / "val.txt").write_text(STEMS[2] + "\n")
    return root


def test_nyuv2_13_config_trains_and_predicts_through_the_segmentor(nyud_root):
    DATASETS, MODELS, OPTIM_WRAPPERS = _registry()
    cfg = Config.fromfile(str(NYU13 / "segnet_nyuv2_13_ista.py"))

    # data: the config's pipelines on NYUD_MT, 40 -> 13 classes, 288x384 inputs
    train_ds = DATASETS.build(dict(cfg.train_dataloader.dataset, data_root=str(nyud_root)))
    val_ds = DATASETS.build(dict(cfg.val_dataloader.dataset, data_root=str(nyud_root)))
    assert len(train_ds) == 2 and len(val_ds) == 1
    samples = [train_ds[i] for i in range(2)]
    for s in samples:
        assert s["inputs"].shape == (3, 288, 384)
        seg = s["data_samples"].gt_sem_seg.data
        assert seg.shape == (1, 288, 384)
        assert set(seg.unique().tolist()) <= set(range(13)) | {255}
        depth = s["data_samples"].gt_depth_map.data
        assert depth.shape == (1, 288, 384)
        assert depth.max() <= 9.0 and depth.min() == 0.0  # metres kept, invalid stays 0
    val = val_ds[0]
    assert val["inputs"].shape == (3, 288, 384)
    assert val["data_samples"].gt_sem_seg.data.shape == (1, FULL_H, FULL_W)  # scored at 480x640

    # model: the config's, narrowed; a real optimizer-wrapper step with an STA-like allocation
    # on 64x96 crops of the pipeline's samples (CPU time; the runner test below trains and
    # validates at the full 288x384 / 480x640)
    torch.manual_seed(0)
    model = MODELS.build(_narrow(cfg.model, 4))
    model.init_weights()
    opt_cfg = dict(cfg.optim_wrapper.optimizer)
    assert opt_cfg.pop("type") == "Adam"
    wrapper = OPTIM_WRAPPERS.build(dict(
        type=cfg.optim_wrapper.type, mtl=cfg.optim_wrapper.mtl,
        optimizer=torch.optim.Adam(model.parameters(), **opt_cfg)))
    batch = dict(inputs=[], data_samples=[])
    for s, alloc in zip(samples, (("seg",), ("depth",))):
        img, ds = _crop(s, 64, 96)
        ds.set_metainfo({ALLOC_KEY: alloc})
        batch["inputs"].append(img)
        batch["data_samples"].append(ds)
    model.train()
    data = model.data_preprocessor(batch, training=True)
    losses, _ = model.parse_losses(model(**data, mode="loss"))
    assert set(losses) == {"seg", "depth"} and all(torch.isfinite(v) for v in losses.values())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrapper.update_params(losses)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert "backbone.encoder.0.0.weight" in changed and "backbone.decoder.0.0.weight" in changed
    assert any(n.startswith("decode_heads.seg.") for n in changed)
    assert any(n.startswith("decode_heads.depth.") for n in changed)

    # predict: per-task outputs resized to the original size (here twice the input's)
    model.eval()
    img, ds = _crop(samples[0], 64, 96)
    ds.set_metainfo(dict(ori_shape=(128, 192)))
    vdata = model.data_preprocessor(dict(inputs=[img], data_samples=[ds]), training=False)
    with torch.no_grad():
        out = model(**vdata, mode="predict")[0]
    assert out.pred_sem_seg.data.shape == (1, 128, 192)
    assert out.seg_logits.data.shape == (13, 128, 192)
    assert out.pred_depth_map.data.shape == (1, 128, 192)

    # checkpoint round trip: a fresh model loads the trained weights and BN statistics
    other = MODELS.build(_narrow(cfg.model, 4)).eval()
    other.load_state_dict(copy.deepcopy(model.state_dict()))
    x = vdata["inputs"]
    with torch.no_grad():
        assert torch.equal(model.backbone(x)[0], other.backbone(x)[0])


def _crop(packed, h, w):
    """The top-left ``h x w`` of a packed sample: ``(inputs, SegDataSample)``."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    src = packed["data_samples"]
    ds = SegDataSample()
    ds.gt_sem_seg = PixelData(data=src.gt_sem_seg.data[:, :h, :w])
    ds.set_data({"gt_depth_map": PixelData(data=src.gt_depth_map.data[:, :h, :w])})
    meta = dict(src.metainfo, img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                flip=False)
    ds.set_metainfo(meta)
    return packed["inputs"][:, :h, :w].contiguous(), ds


def _conv3(cin, cout):
    return 9 * cin * cout + cout  # 3x3 kernel + bias


def test_full_width_parameter_count():
    """Hand count of the full model of the NYUv2-13 configs. The encoder's 13 convs are
    VGG-16's: 14,714,688 weights and biases, VGG-16's published conv-layer total
    (138,357,544 parameters minus its three FC layers' 123,642,856)."""
    _, MODELS, _ = _registry()
    model = MODELS.build(Config.fromfile(str(NYU13 / "segnet_nyuv2_13_ft.py")).model)
    enc = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
           (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
    dec = [(512, 512), (512, 512), (512, 512),            # stage 5: 512 -> 512
           (512, 256), (256, 256), (256, 256),            # stage 4: 512 -> 256
           (256, 128), (128, 128), (128, 128),            # stage 3: 256 -> 128
           (128, 64), (64, 64),                           # stage 2: 128 -> 64
           (64, 64), (64, 64)]                            # stage 1: 64 -> 64
    enc_convs = sum(_conv3(i, o) for i, o in enc)
    assert enc_convs == 138_357_544 - 123_642_856 == 14_714_688
    bn = sum(2 * o for _, o in enc + dec)
    trunk = enc_convs + sum(_conv3(i, o) for i, o in dec) + bn
    assert sum(p.numel() for p in model.backbone.parameters()) == trunk == 24_943_296
    # heads: 3x3 conv 64->64 (+bias), then a 1x1 conv to 13 classes / 1 depth channel
    seg_head = _conv3(64, 64) + 64 * 13 + 13
    depth_head = _conv3(64, 64) + 64 * 1 + 1
    assert sum(p.numel() for p in model.decode_heads["seg"].parameters()) == seg_head
    assert sum(p.numel() for p in model.decode_heads["depth"].parameters()) == depth_head
    assert sum(p.numel() for p in model.parameters()) == trunk + seg_head + depth_head


def test_segnet_unpools_with_the_encoder_indices_and_refuses_bad_input():
    _, MODELS, _ = _registry()
    net = MODELS.build(dict(type="SegNet", base_channels=2)).eval()
    assert net.widths == (2, 4, 8, 16, 16) and net.downsample == 32
    with torch.no_grad():
        out = net(torch.randn(2, 3, 64, 96))
    assert isinstance(out, tuple) and out[0].shape == (2, 2, 64, 96)
    with pytest.raises(MTLConfigError, match=r"input of 48x96; .*multiples of 32"):
        net(torch.randn(1, 3, 48, 96))
    with pytest.raises(MTLConfigError, match=r"model.backbone.base_channels=0"):
        MODELS.build(dict(type="SegNet", base_channels=0))
    with pytest.raises(MTLConfigError, match=r"model.backbone.stage_convs=\(2, 2\)"):
        MODELS.build(dict(type="SegNet", stage_convs=(2, 2)))


def test_segnet_default_init_is_xavier_normal_with_zero_bias():
    _, MODELS, _ = _registry()
    torch.manual_seed(0)
    net = MODELS.build(ConfigDict(type="SegNet", base_channels=16))
    net.init_weights()
    conv = net.encoder[2][3]  # 3x3 conv 64 -> 64 at width 16
    assert conv.weight.shape == (64, 64, 3, 3)
    fan = 9 * (64 + 64)
    assert conv.weight.std().item() == pytest.approx((2.0 / fan) ** 0.5, rel=0.05)
    assert torch.count_nonzero(conv.bias) == 0


def test_nyuv2_13_ista_config_runs_in_mmengines_runner(nyud_root, tmp_path):
    """The whole config (loop, hooks, evaluator) for 2 optimizer steps = 1 ISTA batch, then
    validation against the 480x640 labels."""
    from mmengine.runner import Runner

    _registry()
    cfg = Config.fromfile(str(NYU13 / "segnet_nyuv2_13_ista.py"))
    cfg.model = _narrow(cfg.model, 2)
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[key].dataset.data_root = str(nyud_root)
        cfg[key].num_workers = 0
        cfg[key].persistent_workers = False
        for t in cfg[key].dataset.pipeline:  # CPU time: 64x96 inputs (labels of val: 480x640)
            if t.type == "MultiTaskResize":
                t.scale = (96, 64)
    cfg.train_cfg.max_iters = cfg.train_cfg.val_interval = 2
    cfg.param_scheduler[0].end = 2
    cfg.param_scheduler[0].milestones = [1]
    cfg.default_hooks.checkpoint.interval = 2
    cfg.default_hooks.visualization = dict(type="SegVisualizationHook", draw=False)
    cfg.work_dir = str(tmp_path)
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.iter == 2
    assert runner.optim_wrapper.controller.allocator.mode == "ista"
    metrics = runner.val_loop.run()
    assert "seg/mIoU" in metrics and any(k.startswith("depth/") for k in metrics)
