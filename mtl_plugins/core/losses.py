"""Per-pixel dense-prediction losses with invalid masking and per-sample pooling.

Pure PyTorch (no framework import). Every loss returns a :class:`DenseLoss`: the summed
per-pixel loss of each sample and the number of elements it was summed over, so that a
caller can pool over all samples (:meth:`DenseLoss.mean`) or only over the samples a task
is allocated to (:meth:`DenseLoss.masked`, STA/ISTA). Pooling is element-wise ("pixel
pooled"): ``Σ_i sum_i / Σ_i count_i``, which is the usual batch mean over valid pixels and
equals the loss of the allocated samples alone.

Conventions follow ``mtl_plugins.mmseg.fields`` and the survey's losses (notes §4.2, the
losses MTI-Net and the survey share):

============  =====================================  ===========================================
function      per-element loss                       count (denominator)
============  =====================================  ===========================================
seg_ce        softmax cross-entropy                  valid pixels (label != ignore)
depth_l1      ``|pred - gt|``                        valid pixels (gt != invalid, finite,
                                                     optionally gt <= max_depth)
normal_l1     ``Σ_c |n̂_c - g_c|``, n̂ = pred/‖pred‖   3 × valid pixels (valid *elements*)
normal_cos    ``1 - <n̂, ĝ>``                         valid pixels
edge_bce      ``w·softplus(-x)`` on edge pixels,      all non-ignored pixels
              ``(1-w)·softplus(x)`` elsewhere
============  =====================================  ===========================================

Invalid pixels never reach the arithmetic (``torch.where`` with a sanitised target), so
NaN/inf in the ignored region of a target, or a pad value such as 255, cannot leak into the
loss or its gradient. A batch (or an allocation) with nothing valid gives ``0`` that is still
connected to the graph, never NaN.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .unit_vectors import unit_vectors

__all__ = ["DenseLoss", "seg_ce", "depth_l1", "normal_l1", "normal_cosine", "edge_bce"]


@dataclass
class DenseLoss:
    """Summed loss and element count per sample.

    Attributes:
        sum_per_sample: ``[B]`` summed per-element loss over each sample's valid elements
            (carries the graph).
        count_per_sample: ``[B]`` number of valid elements of each sample (no graph).
    """

    sum_per_sample: Tensor
    count_per_sample: Tensor

    def __post_init__(self) -> None:
        s, c = self.sum_per_sample, self.count_per_sample
        if s.dim() != 1 or s.shape != c.shape:
            raise ValueError(
                f"DenseLoss: sum_per_sample {tuple(self.sum_per_sample.shape)} and "
                f"count_per_sample {tuple(self.count_per_sample.shape)} must both be [B]")

    @property
    def batch_size(self) -> int:
        return int(self.sum_per_sample.shape[0])

    def mean(self) -> Tensor:
        """``Σ sum / Σ count`` over the batch; 0 (graph kept) when nothing is valid."""
        count = self.count_per_sample.to(self.sum_per_sample.dtype).sum()
        return self.sum_per_sample.sum() / count.clamp(min=1.0)

    def masked(self, sample_mask: Optional[Tensor]) -> Tensor:
        """Pooled mean over the samples where ``sample_mask`` ([B] bool) is True.

        Equals the loss computed on the allocated samples alone. With no allocated sample
        (or no valid element among them) the result is 0, finite and connected to the graph
        (its gradient is zero). ``None`` means every sample.
        """
        if sample_mask is None:
            return self.mean()
        sample_mask = torch.as_tensor(sample_mask, device=self.sum_per_sample.device)
        if sample_mask.shape != self.sum_per_sample.shape:
            raise ValueError(f"DenseLoss.masked: sample_mask {tuple(sample_mask.shape)} must be "
                             f"[B] = {tuple(self.sum_per_sample.shape)}")
        sample_mask = sample_mask.to(torch.bool)
        total = torch.where(sample_mask, self.sum_per_sample,
                            torch.zeros_like(self.sum_per_sample)).sum()
        count = torch.where(sample_mask, self.count_per_sample,
                            torch.zeros_like(self.count_per_sample))
        return total / count.to(total.dtype).sum().clamp(min=1.0)

    def per_sample(self) -> Tensor:
        """``[B]`` per-sample mean (0 for a sample without valid elements)."""
        count = self.count_per_sample.to(self.sum_per_sample.dtype)
        return self.sum_per_sample / count.clamp(min=1.0)


def _as_b1hw(gt: Tensor, name: str) -> Tensor:
    if gt.dim() == 3:
        gt = gt.unsqueeze(1)
    if gt.dim() != 4 or gt.shape[1] != 1:
        raise ValueError(f"{name}: target must be [B,H,W] or [B,1,H,W], got {tuple(gt.shape)}")
    return gt


def _check_spatial(pred: Tensor, gt: Tensor, name: str) -> None:
    if pred.dim() != 4:
        raise ValueError(f"{name}: prediction must be [B,C,H,W], got {tuple(pred.shape)}")
    if pred.shape[0] != gt.shape[0] or pred.shape[2:] != gt.shape[2:]:
        raise ValueError(f"{name}: prediction {tuple(pred.shape)} and target {tuple(gt.shape)} "
                         "must share batch and spatial size (resize the prediction first)")


def _reduce(per_elem: Tensor, valid: Tensor) -> DenseLoss:
    """Sum ``per_elem`` over valid elements per sample; ``valid`` has the same shape."""
    per_elem = torch.where(valid, per_elem, torch.zeros_like(per_elem))
    b = per_elem.shape[0]
    return DenseLoss(per_elem.reshape(b, -1).sum(1), valid.reshape(b, -1).sum(1))


def seg_ce(logits: Tensor, gt: Tensor, ignore: int = 255) -> DenseLoss:
    """Softmax cross-entropy, averaged over labelled pixels (label != ``ignore``).

    Args:
        logits: ``[B, K, H, W]``.
        gt: ``[B, H, W]`` or ``[B, 1, H, W]`` integer labels; ``ignore`` marks unlabelled pixels.
    """
    gt = _as_b1hw(gt, "seg_ce")
    _check_spatial(logits, gt, "seg_ce")
    gt = gt[:, 0].long()
    valid = gt != ignore
    safe = torch.where(valid, gt, torch.zeros_like(gt))
    per_pixel = F.cross_entropy(logits, safe, reduction="none")
    return _reduce(per_pixel, valid)


def depth_l1(pred: Tensor, gt: Tensor, invalid: float = 0.0,
             max_depth: Optional[float] = None) -> DenseLoss:
    """L1 depth loss over valid pixels.

    Valid: ``gt != invalid``, finite, and ``gt <= max_depth`` when given (use it to drop a
    pad value such as mmseg's ``seg_pad_val=255`` padding of ``gt_depth_map``).

    Args:
        pred: ``[B, 1, H, W]``.
        gt: ``[B, H, W]`` or ``[B, 1, H, W]`` depth.
    """
    gt = _as_b1hw(gt, "depth_l1").to(pred.dtype)
    _check_spatial(pred, gt, "depth_l1")
    if pred.shape[1] != 1:
        raise ValueError(f"depth_l1: prediction must have 1 channel, got {tuple(pred.shape)}")
    valid = torch.isfinite(gt) & (gt != invalid)
    if max_depth is not None:
        valid &= gt <= max_depth
    safe = torch.where(valid, gt, torch.zeros_like(gt))
    return _reduce((pred - safe).abs(), valid)


def _normal_valid(gt: Tensor, tol: float = 1e-3) -> Tensor:
    """[B,1,H,W] valid pixels: non-zero, finite, every component in [-1, 1] (+tol).

    A unit normal never has a component outside [-1, 1]; a pad value (e.g. 255) therefore
    marks the pixel invalid, like the zero vector does.
    """
    finite = torch.isfinite(gt).all(1, keepdim=True)
    safe = torch.where(torch.isfinite(gt), gt, torch.zeros_like(gt))
    nonzero = (safe != 0).any(1, keepdim=True)
    in_range = (safe.abs() <= 1.0 + tol).all(1, keepdim=True)
    return finite & nonzero & in_range


def _check_normals(pred: Tensor, gt: Tensor, name: str) -> None:
    if gt.dim() != 4 or gt.shape[1] != 3 or pred.dim() != 4 or pred.shape[1] != 3:
        raise ValueError(f"{name}: prediction and target must be [B,3,H,W], got "
                         f"{tuple(pred.shape)} and {tuple(gt.shape)}")
    _check_spatial(pred, gt, name)


def normal_l1(pred: Tensor, gt: Tensor) -> DenseLoss:
    """L1 between the L2-normalised prediction and the GT normal, per valid element.

    As in the survey/MTI-Net: ``Σ_valid Σ_c |n̂_c - g_c| / (3·#valid pixels)``. Valid pixels:
    the GT vector is non-zero (zero vector = no normal), finite and within [-1, 1].

    Args:
        pred: ``[B, 3, H, W]`` raw normal prediction (normalised here).
        gt: ``[B, 3, H, W]`` unit normals, zero vector where invalid.
    """
    _check_normals(pred, gt, "normal_l1")
    gt = gt.to(pred.dtype)
    valid = _normal_valid(gt).expand_as(gt)
    safe = torch.where(valid, gt, torch.zeros_like(gt))
    n = unit_vectors(pred)
    return _reduce((n - safe).abs(), valid)


def normal_cosine(pred: Tensor, gt: Tensor) -> DenseLoss:
    """``1 - cos(pred, gt)`` per valid pixel (both normalised); validity as :func:`normal_l1`."""
    _check_normals(pred, gt, "normal_cosine")
    gt = gt.to(pred.dtype)
    valid = _normal_valid(gt)
    safe = torch.where(valid.expand_as(gt), gt, torch.zeros_like(gt))
    n = unit_vectors(pred)
    g = unit_vectors(safe)
    cos = (n * g).sum(1, keepdim=True)
    return _reduce(1.0 - cos, valid)


def edge_bce(logits: Tensor, gt: Tensor, pos_weight: float = 0.95, ignore: int = 255) -> DenseLoss:
    """Weighted binary cross-entropy for edges (survey/MTI-Net, fixed positive weight).

    ``(w·Σ_edge -log σ(x) + (1-w)·Σ_non-edge -log(1-σ(x))) / #non-ignored pixels``; a target
    pixel is an edge when ``gt > 0.5`` and ignored when ``gt == ignore``.

    Args:
        logits: ``[B, 1, H, W]``.
        gt: ``[B, H, W]`` or ``[B, 1, H, W]`` in {0, 1} (or {0, 255-ignore, 1}).
    """
    if not 0.0 <= pos_weight <= 1.0:
        raise ValueError(f"edge_bce: pos_weight={pos_weight!r}: expected a value in [0, 1]")
    gt = _as_b1hw(gt, "edge_bce")
    _check_spatial(logits, gt, "edge_bce")
    if logits.shape[1] != 1:
        raise ValueError(f"edge_bce: logits must have 1 channel, got {tuple(logits.shape)}")
    gt = gt.to(logits.dtype)
    valid = torch.isfinite(gt) & (gt != ignore)
    pos = valid & (gt > 0.5)
    per_pixel = torch.where(pos, pos_weight * F.softplus(-logits),
                            (1.0 - pos_weight) * F.softplus(logits))
    return _reduce(per_pixel, valid)
