"""Evaluation metrics for dense multi-task learning and the Δm summaries of the papers.

Pure PyTorch / Python (no detectron2, mmseg or mmengine import).

- :class:`SegmentationMeter`: streaming confusion matrix -> mIoU, pixel accuracy, mean class
  accuracy, per-class IoU (``segmentation.py``).
- :class:`DepthMeter`: abs / rel error, RMSE, log RMSE, δ<1.25^k over valid pixels
  (``depth.py``).
- :class:`NormalMeter`: angular error mean / median / RMSE and % within 11.25°, 22.5°, 30°
  (``normals.py``).
- Δm variants (``delta_m.py``): (a) :func:`delta_m_main_metric` (Maninis / survey 003),
  (b) :func:`delta_m_flat` (CAGrad / Nash-MTL), (c) :func:`delta_m_task_mean` (Recon / LibMTL),
  (d) :func:`delta_m_raw_diff` (paper 001's printed ΔMTL), the dispatcher :func:`delta_m`,
  :data:`HIGHER_IS_BETTER`, :func:`load_baseline` and :func:`format_delta_table`.

See docs/metrics.md and docs/delta_m.md.
"""
from .delta_m import (
    HIGHER_IS_BETTER,
    VARIANTS,
    check_metric_table,
    delta_m,
    delta_m_flat,
    delta_m_main_metric,
    delta_m_raw_diff,
    delta_m_task_mean,
    format_delta_table,
    load_baseline,
    metric_direction,
    signed_changes,
)
from .depth import DepthMeter
from .normals import NormalMeter, angular_error_deg
from .segmentation import SegmentationMeter, confusion_matrix, metrics_from_confusion

__all__ = [
    "SegmentationMeter",
    "confusion_matrix",
    "metrics_from_confusion",
    "DepthMeter",
    "NormalMeter",
    "angular_error_deg",
    "HIGHER_IS_BETTER",
    "VARIANTS",
    "metric_direction",
    "check_metric_table",
    "load_baseline",
    "signed_changes",
    "delta_m",
    "delta_m_main_metric",
    "delta_m_flat",
    "delta_m_task_mean",
    "delta_m_raw_diff",
    "format_delta_table",
]
