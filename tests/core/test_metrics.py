"""Segmentation, depth and normal meters against hand-computed values.

Every expected number is worked out in the comments next to the data, so a wrong formula
(IoU denominator, strict vs non-strict thresholds, pooled vs per-image averaging, median
convention) fails a test.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtl_plugins.core.metrics import (
    DepthMeter,
    NormalMeter,
    SegmentationMeter,
    angular_error_deg,
    confusion_matrix,
)

# ============================================================================ segmentation
# gt / pred, 3 classes, one ignored pixel (255, predicted as 2 -> must not count):
#   gt   = [[0, 0, 1, 1], [2, 2, 255, 1]]
#   pred = [[0, 1, 1, 1], [2, 0, 2,   2]]
# confusion (rows gt, cols pred): [[1,1,0],[0,2,1],[1,0,1]]
# TP = 1, 2, 1 (4 of 7 valid) -> pixel acc 4/7
# IoU0 = 1/(2+2-1) = 1/3, IoU1 = 2/(3+3-2) = 1/2, IoU2 = 1/(2+2-1) = 1/3 -> mIoU 7/18
# class acc = 1/2, 2/3, 1/2 -> mean acc 5/9
GT = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
PRED = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])


def test_confusion_matrix_by_hand() -> None:
    conf = confusion_matrix(PRED, GT, 3, ignore_index=255)
    assert conf.dtype == torch.int64
    assert conf.tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 1]]


def test_segmentation_metrics_by_hand() -> None:
    m = SegmentationMeter(3, ignore_index=255)
    m.update(PRED, GT)
    r = m.compute()
    assert r["mIoU"] == pytest.approx(100 * 7 / 18)
    assert r["pixel_acc"] == pytest.approx(100 * 4 / 7)
    assert r["mean_acc"] == pytest.approx(100 * 5 / 9)
    assert r["per_class_iou"] == pytest.approx([100 / 3, 50.0, 100 / 3])
    frac = SegmentationMeter(3, percent=False)
    frac.update(PRED, GT)
    assert frac.compute()["mIoU"] == pytest.approx(7 / 18)


def test_absent_class_is_excluded_but_false_positive_class_counts() -> None:
    m = SegmentationMeter(5, ignore_index=255)  # classes 3 and 4 never appear anywhere
    m.update(PRED, GT)
    r = m.compute()
    assert math.isnan(r["per_class_iou"][3]) and math.isnan(r["per_class_iou"][4])
    assert r["mIoU"] == pytest.approx(100 * 7 / 18)
    # now predict class 3 on one gt-0 pixel: IoU3 = 0 (union 1) and it is averaged in;
    # gt0 row becomes [0,1,0,1]: IoU0 = 0/(2+1-0) = 0
    pred = PRED.clone()
    pred[0, 0] = 3
    m = SegmentationMeter(5)
    m.update(pred, GT)
    r = m.compute()
    assert r["per_class_iou"][3] == 0.0 and math.isnan(r["per_class_iou"][4])
    assert r["mIoU"] == pytest.approx(100 * (0 + 0.5 + 1 / 3 + 0) / 4)
    assert r["pixel_acc"] == pytest.approx(100 * 3 / 7)
    assert r["mean_acc"] == pytest.approx(100 * (0 + 2 / 3 + 1 / 2) / 3)  # class 3 has no gt


def test_ignore_index_variants_and_logits() -> None:
    gt = torch.where(GT == 255, torch.tensor(-1), GT)  # MTAN convention
    m = SegmentationMeter(3, ignore_index=-1)
    logits = torch.nn.functional.one_hot(PRED, 3).permute(2, 0, 1).float()[None]  # [1,3,2,4]
    m.update(logits, gt[None])
    assert m.compute()["mIoU"] == pytest.approx(100 * 7 / 18)
    m = SegmentationMeter(3, ignore_index=-1)  # MMSeg layout: gt [N, 1, H, W]
    m.update(logits, gt[None, None])
    m.update(PRED[None, None], gt[None])  # labels [N, 1, H, W] vs gt [N, H, W]
    assert m.compute()["mIoU"] == pytest.approx(100 * 7 / 18)
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        SegmentationMeter(3, ignore_index=None).update(PRED, GT)
    with pytest.raises(ValueError, match="predicted labels"):
        SegmentationMeter(3).update(torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(ValueError, match="shape"):
        SegmentationMeter(3).update(PRED[0], GT)
    with pytest.raises(ValueError, match="before any update"):
        SegmentationMeter(3).compute()
    empty = SegmentationMeter(3)
    empty.update(torch.tensor([1]), torch.tensor([255]))
    with pytest.raises(ValueError, match="empty"):
        empty.compute()


def _numpy_seg(pred: np.ndarray, gt: np.ndarray, c: int, ignore: int) -> tuple[float, float]:
    conf = np.zeros((c, c), dtype=np.int64)
    keep = gt != ignore
    np.add.at(conf, (gt[keep], pred[keep]), 1)
    tp = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - tp
    iou = tp[union > 0] / union[union > 0]
    return 100 * iou.mean(), 100 * tp.sum() / conf.sum()


def test_segmentation_streaming_equals_one_shot_and_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    gt = torch.randint(0, 7, (6, 9, 11), generator=g)
    gt[torch.rand(gt.shape, generator=g) < 0.1] = 255
    pred = torch.randint(0, 7, gt.shape, generator=g)
    one = SegmentationMeter(7)
    one.update(pred, gt)
    stream = SegmentationMeter(7)
    for i in range(6):
        stream.update(pred[i], gt[i])
    assert torch.equal(one.confusion, stream.confusion)
    a, b = SegmentationMeter(7), SegmentationMeter(7)
    a.update(pred[:2], gt[:2])
    b.update(pred[2:], gt[2:])
    a.merge(b)
    assert torch.equal(a.confusion, one.confusion)
    miou, acc = _numpy_seg(pred.numpy(), gt.numpy(), 7, 255)
    r = one.compute()
    assert r["mIoU"] == pytest.approx(miou) and r["pixel_acc"] == pytest.approx(acc)


# =================================================================================== depth
# gt   = [[2, 0, 4], [nan, 1, 5]]   (0 and nan invalid -> 4 valid pixels)
# pred = [[1, 7, 5], [3, 1.2, 5]]
# |d-d*| = 1, 1, 0.2, 0        -> abs_err 2.2/4 = 0.55
# rel    = 0.5, 0.25, 0.2, 0   -> rel_err 0.95/4 = 0.2375
# sq     = 1, 1, 0.04, 0       -> rmse sqrt(2.04/4)
# ratio max(d/d*, d*/d) = 2, 1.25, 1.2, 1
#   δ1 (< 1.25, strict: 1.25 fails) = 2/4, δ2 (< 1.5625) = 3/4, δ3 (< 1.953125) = 3/4
D_GT = torch.tensor([[2.0, 0.0, 4.0], [math.nan, 1.0, 5.0]])
D_PRED = torch.tensor([[1.0, 7.0, 5.0], [3.0, 1.2, 5.0]])


def test_depth_by_hand() -> None:
    m = DepthMeter(log_rmse=True)
    m.update(D_PRED, D_GT)
    r = m.compute()
    assert m.num_valid == 4
    assert r["abs_err"] == pytest.approx(0.55)
    assert r["rel_err"] == pytest.approx(0.2375)
    assert r["rmse"] == pytest.approx(math.sqrt(0.51))
    log_sq = [math.log(1 / 2) ** 2, math.log(5 / 4) ** 2, math.log(1.2) ** 2, 0.0]
    assert r["log_rmse"] == pytest.approx(math.sqrt(sum(log_sq) / 4))
    assert (r["delta1"], r["delta2"], r["delta3"]) == pytest.approx((50.0, 75.0, 75.0))
    plain = DepthMeter(percent=False)
    plain.update(D_PRED, D_GT)
    rp = plain.compute()
    assert "log_rmse" not in rp and rp["delta1"] == pytest.approx(0.5)


def test_depth_validity_options() -> None:
    # invalid_value=5 drops the last pixel: abs (1+1+0.2)/3, rmse sqrt(2.04/3)
    m = DepthMeter(invalid_value=5.0)
    m.update(D_PRED, D_GT)
    r = m.compute()
    assert r["abs_err"] == pytest.approx(2.2 / 3) and r["rmse"] == pytest.approx(math.sqrt(2.04 / 3))
    m = DepthMeter(max_depth=4.5)  # same effect
    m.update(D_PRED, D_GT)
    assert m.compute()["abs_err"] == pytest.approx(2.2 / 3)
    m = DepthMeter(min_depth=1.0)  # gt 1 is now invalid: abs (1+1+0)/3
    m.update(D_PRED, D_GT)
    assert m.compute()["abs_err"] == pytest.approx(2 / 3)
    mask = torch.tensor([[False, True, True], [True, True, True]])  # drops the (2, 1) pixel
    m = DepthMeter()
    m.update(D_PRED, D_GT, mask=mask)
    assert m.compute()["abs_err"] == pytest.approx(1.2 / 3)
    # NaN / inf predictions on invalid pixels must not leak into the sums
    pred = D_PRED.clone()
    pred[0, 1] = math.nan
    pred[1, 0] = math.inf
    m = DepthMeter()
    m.update(pred, D_GT)
    assert m.compute()["abs_err"] == pytest.approx(0.55)
    # [N,1,H,W] predictions against [N,H,W] ground truth
    m = DepthMeter()
    m.update(D_PRED[None, None], D_GT[None])
    assert m.compute()["rmse"] == pytest.approx(math.sqrt(0.51))
    empty = DepthMeter()
    empty.update(torch.ones(3), torch.zeros(3))
    with pytest.raises(ValueError, match="no valid"):
        empty.compute()


def test_depth_pixel_vs_image_vs_batch_reduction() -> None:
    # image 0: gt [2, 4] pred [1, 5]  -> abs 1, 1;   image 1: gt [1, 0] pred [1.2, 9] -> abs 0.2
    # image 2: no valid pixel (skipped by "image")
    gt = torch.tensor([[2.0, 4.0], [1.0, 0.0], [0.0, 0.0]])
    pred = torch.tensor([[1.0, 5.0], [1.2, 9.0], [3.0, 3.0]])
    pix, img = DepthMeter(), DepthMeter(reduction="image")
    pix.update(pred, gt)
    img.update(pred, gt)
    rp, ri = pix.compute(), img.compute()
    assert rp["abs_err"] == pytest.approx(2.2 / 3)  # pooled over 3 pixels
    assert ri["abs_err"] == pytest.approx((1.0 + 0.2) / 2)  # per image, then mean
    assert rp["rmse"] == pytest.approx(math.sqrt(2.04 / 3))
    assert ri["rmse"] == pytest.approx((1.0 + 0.2) / 2)  # sqrt((1+1)/2)=1 and 0.2
    # rel: image 0 (0.5 + 0.25)/2 = 0.375, image 1 0.2
    assert ri["rel_err"] == pytest.approx((0.375 + 0.2) / 2)
    # δ1: image 0 ratios 2, 1.25 -> 0 %; image 1: 1.2 -> 100 %
    assert ri["delta1"] == pytest.approx(50.0) and rp["delta1"] == pytest.approx(100 / 3)
    assert img.num_valid == 2
    # "batch": per update() call pooled, then unweighted mean over calls (MTAN loop)
    bat = DepthMeter(reduction="batch")
    bat.update(pred[:1], gt[:1])  # abs 1.0
    bat.update(pred[1:], gt[1:])  # abs 0.2 (one valid pixel)
    assert bat.compute()["abs_err"] == pytest.approx(0.6)


def test_depth_streaming_equals_one_shot() -> None:
    g = torch.Generator().manual_seed(1)
    gt = torch.rand(5, 1, 7, 8, generator=g) * 10
    gt[torch.rand(gt.shape, generator=g) < 0.2] = 0
    pred = gt + torch.randn(gt.shape, generator=g)
    one, stream = DepthMeter(log_rmse=True), DepthMeter(log_rmse=True)
    one.update(pred, gt)
    for i in range(5):
        stream.update(pred[i : i + 1], gt[i : i + 1])
    a, b = one.compute(), stream.compute()
    assert a == pytest.approx(b, rel=1e-12)
    v = (gt > 0).numpy()
    p, t = pred.numpy()[v].astype(np.float64), gt.numpy()[v].astype(np.float64)
    assert a["abs_err"] == pytest.approx(np.mean(np.abs(p - t)))
    assert a["rmse"] == pytest.approx(np.sqrt(np.mean((p - t) ** 2)))
    merged = DepthMeter(log_rmse=True)
    half = DepthMeter(log_rmse=True)
    merged.update(pred[:2], gt[:2])
    half.update(pred[2:], gt[2:])
    merged.merge(half)
    assert merged.compute() == pytest.approx(a, rel=1e-12)


# ================================================================================= normals
def _vec(*rows: tuple) -> torch.Tensor:
    """[1, 3, K, 1] normals from K (x, y, z) rows (channel dim 1, as [N, 3, H, W])."""
    return torch.tensor(rows, dtype=torch.float32).T[None, :, :, None]


C20, S20 = math.cos(math.radians(20)), math.sin(math.radians(20))


def test_normals_known_angles() -> None:
    # errors 0°, 20°, 45° (unnormalised pred and gt), 90°, 180°, plus one pixel with a zero
    # ground truth (invalid) and one masked out.
    pred = _vec((1, 0, 0), (C20, S20, 0), (0, 5, 5), (0, 1, 0), (-1, 0, 0), (1, 0, 0), (0, 1, 0))
    gt = _vec((1, 0, 0), (1, 0, 0), (0, 0, 2), (1, 0, 0), (1, 0, 0), (0, 0, 0), (1, 0, 0))
    mask = torch.tensor([[[True], [True], [True], [True], [True], [True], [False]]])
    err = angular_error_deg(pred, gt)[0, :5, 0]
    assert err.tolist() == pytest.approx([0.0, 20.0, 45.0, 90.0, 180.0], abs=1e-5)  # f32 input
    m = NormalMeter()
    m.update(pred, gt, mask=mask)
    r = m.compute()
    assert m.num_valid == 5
    assert r["mean"] == pytest.approx((0 + 20 + 45 + 90 + 180) / 5)
    assert r["median"] == pytest.approx(45.0, abs=1e-4)  # odd count: the middle value
    assert r["rmse"] == pytest.approx(math.sqrt((0 + 400 + 2025 + 8100 + 32400) / 5))
    # strict "<": 0 -> 1 of 5 below 11.25; 0, 20 below 22.5 and below 30
    assert (r["11.25"], r["22.5"], r["30"]) == pytest.approx((20.0, 40.0, 40.0))


def test_normals_even_median_and_thresholds_at_the_edge() -> None:
    # errors 0, 45, 90, 180: median = (45 + 90)/2 = 67.5 (numpy convention)
    m = NormalMeter(thresholds=(45.0, 90.0))
    pred = _vec((1, 0, 0), (1, 1, 0), (0, 1, 0), (-1, 0, 0))
    m.update(pred, _vec(*[(1, 0, 0)] * 4))
    r = m.compute()
    assert r["median"] == pytest.approx(67.5, abs=1e-4)
    assert r["mean"] == pytest.approx(78.75)
    # a 45° error is not "within 45°" (strict), a 90° error not within 90°
    assert r["45"] == pytest.approx(25.0) and r["90"] == pytest.approx(50.0)


def test_normals_small_angles_zero_prediction_and_channel_last() -> None:
    pred = torch.tensor([[1.0, 1e-4, 0.0], [0.0, 0.0, 0.0]])  # channel last
    gt = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    err = angular_error_deg(pred, gt, channel_dim=-1)
    assert err[0].item() == pytest.approx(math.degrees(math.atan(1e-4)), rel=1e-6)  # acos(f32) -> 0
    assert err[1].item() == 90.0  # zero prediction
    m = NormalMeter(channel_dim=-1, median="histogram")
    m.update(pred, gt)
    assert m.compute()["mean"] == pytest.approx((err[0].item() + 90.0) / 2)


def _random_normals(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    gt = torch.randn(n, 3, 6, 7, generator=g)
    pred = gt + 0.6 * torch.randn(gt.shape, generator=g)
    gt[:, :, 0, 0] = 0  # invalid pixels
    return pred, gt


def test_normals_streaming_equals_one_shot_and_numpy() -> None:
    pred, gt = _random_normals(4, 2)
    one = NormalMeter()
    one.update(pred, gt)
    stream = NormalMeter()
    for i in range(4):
        stream.update(pred[i : i + 1], gt[i : i + 1])
    a, b = one.compute(), stream.compute()
    assert a == pytest.approx(b, rel=1e-9)
    # independent reference: arccos of the clipped dot product, numpy pooled statistics
    p = pred.double().numpy().transpose(0, 2, 3, 1).reshape(-1, 3)
    t = gt.double().numpy().transpose(0, 2, 3, 1).reshape(-1, 3)
    keep = np.linalg.norm(t, axis=1) > 0
    p = p[keep] / np.linalg.norm(p[keep], axis=1, keepdims=True)
    t = t[keep] / np.linalg.norm(t[keep], axis=1, keepdims=True)
    e = np.degrees(np.arccos(np.clip((p * t).sum(1), -1, 1)))
    assert one.num_valid == e.size == 4 * 41
    assert a["mean"] == pytest.approx(e.mean(), abs=1e-4)
    assert a["median"] == pytest.approx(np.median(e), abs=1e-4)
    for k, thr in (("11.25", 11.25), ("22.5", 22.5), ("30", 30.0)):
        assert a[k] == pytest.approx(100 * np.mean(e < thr))
    merged, other = NormalMeter(), NormalMeter()
    merged.update(pred[:1], gt[:1])
    other.update(pred[1:], gt[1:])
    merged.merge(other)
    assert merged.compute() == pytest.approx(a, rel=1e-9)


def test_normals_histogram_median_is_within_one_bin() -> None:
    pred, gt = _random_normals(4, 3)
    exact, hist = NormalMeter(), NormalMeter(median="histogram", bins_per_degree=10)
    for i in range(4):
        exact.update(pred[i : i + 1], gt[i : i + 1])
        hist.update(pred[i : i + 1], gt[i : i + 1])
    a, b = exact.compute(), hist.compute()
    assert abs(a["median"] - b["median"]) <= 0.1
    for k in ("mean", "rmse", "11.25", "22.5", "30"):
        assert a[k] == pytest.approx(b[k], rel=1e-12)  # exact in both modes
    h2 = NormalMeter(median="histogram", bins_per_degree=10)
    h2.update(pred[:2], gt[:2])
    h3 = NormalMeter(median="histogram", bins_per_degree=10)
    h3.update(pred[2:], gt[2:])
    h2.merge(h3)
    assert h2.compute() == pytest.approx(b)


def test_normals_image_and_batch_reduction() -> None:
    # image 0: errors 0, 90 (one invalid pixel) -> mean 45, median 45; image 1: 180 -> 180
    pred = torch.stack([_vec((1, 0, 0), (0, 1, 0), (1, 0, 0))[0],
                        _vec((-1, 0, 0), (1, 0, 0), (1, 0, 0))[0]])
    gt = torch.stack([_vec((1, 0, 0), (1, 0, 0), (0, 0, 0))[0],
                      _vec((1, 0, 0), (0, 0, 0), (0, 0, 0))[0]])
    img = NormalMeter(reduction="image")
    img.update(pred, gt)
    r = img.compute()
    assert r["mean"] == pytest.approx((45 + 180) / 2) and r["median"] == pytest.approx((45 + 180) / 2)
    assert r["11.25"] == pytest.approx((50 + 0) / 2)
    pix = NormalMeter()
    pix.update(pred, gt)
    assert pix.compute()["mean"] == pytest.approx(90.0) and pix.compute()["median"] == pytest.approx(90.0)
    bat = NormalMeter(reduction="batch")
    bat.update(pred[:1], gt[:1])
    bat.update(pred[1:], gt[1:])
    assert bat.compute() == pytest.approx(r)
    with pytest.raises(ValueError, match="no valid"):
        NormalMeter().compute()
