"""Semantic-segmentation metrics from a streaming confusion matrix.

Convention (the one used by the MTAN / CAGrad / Nash-MTL / LibMTL lineage and by the
Vandenhende survey, paper 003 §4.1.1): one ``C x C`` confusion matrix is accumulated over the
**whole evaluation set** (rows: ground truth, columns: prediction), and the metrics are read
from it once at the end. Nothing is averaged per image or per batch.

- ``IoU_c = TP_c / (TP_c + FP_c + FN_c)`` for every class ``c``.
- ``mIoU`` is the mean of ``IoU_c`` over the classes whose union ``TP + FP + FN`` is non-zero.
  A class that never occurs in the ground truth **and** is never predicted has an undefined
  IoU (0/0); it is reported as NaN in ``per_class_iou`` and left out of the mean. A class that
  is predicted but absent from the ground truth has IoU 0 and *is* counted.
  The MTAN-lineage code (``torch.mean`` over all classes) returns NaN instead when a class is
  absent; both agree whenever every class has a non-empty union, which is the case on the
  standard NYUv2 / Cityscapes / PASCAL test sets.
- ``pixel_acc = Σ_c TP_c / N_valid`` (overall pixel accuracy).
- ``mean_acc``: mean over classes present in the ground truth of ``TP_c / N_gt,c`` (the
  "mean accuracy" of LIP parsing in paper 000, Table 5).
- Pixels whose ground truth equals ``ignore_index`` are skipped.

All ratio metrics are returned in percent (×100) by default, as the papers print them
(``percent=False`` gives fractions, as stored in the nash-mtl ``BASE`` arrays). Relative Δm
variants do not depend on this choice; the raw-difference ΔMTL of paper 001 does.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

from ..distributed import world_size

__all__ = ["SegmentationMeter", "confusion_matrix", "metrics_from_confusion"]


def _all_reduce_sum_(tensors: Sequence[torch.Tensor], group: Any = None) -> None:
    """Sum ``tensors`` in place over all ranks (no-op outside an initialised process group)."""
    if world_size() == 1:
        return
    for t in tensors:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=group)


def _sync_device(group: Any = None) -> torch.device:
    """Where a rank with no accumulated state allocates zeros for a collective."""
    backend = torch.distributed.get_backend(group)
    if "nccl" in str(backend).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def confusion_matrix(
    pred_labels: torch.Tensor,
    gt: torch.Tensor,
    num_classes: int,
    ignore_index: Optional[int] = 255,
) -> torch.Tensor:
    """Return the ``[num_classes, num_classes]`` int64 confusion matrix (rows = ground truth).

    Computed with one ``torch.bincount`` on the inputs' device. Raises ``ValueError`` when a
    non-ignored ground-truth label or a prediction lies outside ``[0, num_classes)``.
    """
    if pred_labels.shape != gt.shape:
        raise ValueError(
            f"pred_labels shape {tuple(pred_labels.shape)} != gt shape {tuple(gt.shape)}; "
            "pass class indices of the same shape (or logits [N, C, ...] to SegmentationMeter)"
        )
    if pred_labels.is_floating_point() or gt.is_floating_point():
        raise ValueError(
            f"expected integer label tensors, got pred {pred_labels.dtype} and gt {gt.dtype}"
        )
    gt = gt.reshape(-1).to(torch.int64)
    pred = pred_labels.reshape(-1).to(device=gt.device, dtype=torch.int64)
    if ignore_index is not None:
        keep = gt != ignore_index
        gt, pred = gt[keep], pred[keep]
    c = int(num_classes)
    if gt.numel():
        bad = torch.stack(
            [((gt < 0) | (gt >= c)).any(), ((pred < 0) | (pred >= c)).any()]
        ).tolist()  # one host sync for both checks
        if bad[0]:
            vals = torch.unique(gt[(gt < 0) | (gt >= c)])[:10].tolist()
            raise ValueError(
                f"ground-truth labels {vals} are outside [0, {c}) and are not "
                f"ignore_index={ignore_index!r}; set ignore_index or remap the labels"
            )
        if bad[1]:
            vals = torch.unique(pred[(pred < 0) | (pred >= c)])[:10].tolist()
            raise ValueError(f"predicted labels {vals} are outside [0, {c})")
    return torch.bincount(gt * c + pred, minlength=c * c).reshape(c, c)


def metrics_from_confusion(conf: torch.Tensor, percent: bool = True) -> dict[str, Any]:
    """mIoU, pixel accuracy, mean class accuracy and per-class values from a confusion matrix.

    See the module docstring for the conventions. Raises ``ValueError`` when ``conf`` holds no
    pixel.
    """
    h = conf.detach().to("cpu", torch.float64)
    total = float(h.sum())
    if total == 0:
        raise ValueError("the confusion matrix is empty: no valid (non-ignored) pixel was seen")
    tp = torch.diag(h)
    gt_count = h.sum(1)
    union = gt_count + h.sum(0) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))
    acc = torch.where(gt_count > 0, tp / gt_count.clamp_min(1), torch.full_like(tp, math.nan))
    scale = 100.0 if percent else 1.0
    present = ~torch.isnan(iou)
    return {
        "mIoU": float(iou[present].mean()) * scale,
        "pixel_acc": float(tp.sum()) / total * scale,
        "mean_acc": float(acc[~torch.isnan(acc)].mean()) * scale,
        "per_class_iou": [float(v) * scale for v in iou.tolist()],
        "per_class_acc": [float(v) * scale for v in acc.tolist()],
    }


class SegmentationMeter:
    """Streaming mIoU / pixel accuracy over a dataset.

    Args:
        num_classes: number of classes C.
        ignore_index: ground-truth value to skip (255 in Cityscapes / PASCAL / Vandenhende's
            NYUD loader, -1 in the MTAN NYUv2 / Cityscapes data). ``None``: skip nothing.
        percent: return ratios ×100 (default, as printed in the papers).

    ``update(pred, gt)`` accepts class indices of any shape equal to ``gt``'s, or logits /
    scores of shape ``[N, C, *gt.shape[1:]]`` (arg-max over dim 1 is taken). The confusion
    matrix is accumulated in int64 on the inputs' device with ``torch.bincount``; ``compute()``
    makes the single host transfer.

    Sources: confusion-matrix mIoU as in MTAN's ``ConfMatrix`` (Liu et al. 2019) and the
    survey's evaluation (paper 003 §4.1.1: "TP/FP/FN accumulated over the whole dataset").
    """

    def __init__(self, num_classes: int, ignore_index: Optional[int] = 255, percent: bool = True):
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes={num_classes!r}: expected a positive int")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.percent = percent
        self.confusion: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self.confusion = None

    @torch.no_grad()
    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """Add one batch. ``pred``: labels shaped like ``gt``, or scores ``[N, C, ...]``.

        A ground truth ``[N, 1, H, W]`` (MMSeg's layout) is accepted with scores
        ``[N, C, H, W]`` or labels ``[N, H, W]``; shapes must otherwise match.
        """
        if (
            pred.is_floating_point()
            and pred.dim() == gt.dim()
            and gt.dim() >= 2
            and gt.shape[1] == 1
            and pred.shape[1] == self.num_classes
        ):
            gt = gt.squeeze(1)
        if pred.dim() == gt.dim() + 1 and pred.shape[1] == self.num_classes:
            pred = pred.argmax(1)
        elif pred.is_floating_point():
            raise ValueError(
                f"float pred of shape {tuple(pred.shape)} with gt {tuple(gt.shape)}: expected "
                f"labels shaped like gt or scores [N, {self.num_classes}, ...]"
            )
        if pred.shape != gt.shape and pred.numel() == gt.numel() and pred.dim() and gt.dim() \
                and pred.shape[0] == gt.shape[0]:
            pred = pred.reshape(gt.shape)
        conf = confusion_matrix(pred, gt, self.num_classes, self.ignore_index)
        if self.confusion is None:
            self.confusion = conf
        else:
            self.confusion += conf.to(self.confusion.device)

    def merge(self, other: "SegmentationMeter") -> None:
        """Add the counts of ``other`` (same ``num_classes``) into this meter."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge num_classes {other.num_classes} into {self.num_classes}")
        if other.confusion is None:
            return
        if self.confusion is None:
            self.confusion = other.confusion.clone()
        else:
            self.confusion += other.confusion.to(self.confusion.device)

    def sync(self, group: Any = None, device: Optional[torch.device] = None) -> None:
        """Sum the confusion matrix over all ranks of ``group`` (no-op without a process group).

        Every rank must call it. A rank that saw no data contributes zeros; ``device`` picks
        where such a rank allocates them (default: the current CUDA device under NCCL, else CPU).
        """
        if world_size() == 1:
            return
        if self.confusion is None:
            dev = device or _sync_device(group)
            self.confusion = torch.zeros(
                self.num_classes, self.num_classes, dtype=torch.int64, device=dev
            )
        _all_reduce_sum_([self.confusion], group)

    def compute(self) -> dict[str, Any]:
        """Return ``{"mIoU", "pixel_acc", "mean_acc", "per_class_iou", "per_class_acc"}``."""
        if self.confusion is None:
            raise ValueError("SegmentationMeter.compute() called before any update()")
        return metrics_from_confusion(self.confusion, self.percent)
