"""Targets, allocation masks and per-task dense losses shared by every head of this package.

- :func:`allocated_mask`: which samples of a batch train task ``t`` (``mtl_alloc``, else
  ``mtl_tasks``, else all; see ``mtl_plugins.mmseg.fields``);
- :func:`stack_targets`: the batch's ``[B, C, H, W]`` target for a task, read from the
  data-sample field of :data:`~mtl_plugins.mmseg.fields.SAMPLE_FIELDS`; a sample without the
  field gets the task's ignore value and is never counted;
- :class:`TaskLoss`: the per-task loss (``mtl_plugins.core.losses``) with its options, and
  :func:`LOSS_NAMES` for the key of each task (``loss_ce``, ``loss_depth`` ...).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ...core import losses as L
from ...core.tasks import MTLConfigError
from ..fields import ALLOC_KEY, CHANNELS, IGNORE_VALUES, SAMPLE_FIELDS, TASKS_KEY

LOSS_NAMES: Dict[str, str] = {
    "seg": "loss_ce", "depth": "loss_depth", "normal": "loss_normal", "edge": "loss_edge"}

#: Survey defaults (notes §3.2): NYUD seg 1, depth 1; auxiliary normals 10, edge 50.
DEFAULT_LOSS_WEIGHTS: Dict[str, float] = {"seg": 1.0, "depth": 1.0, "normal": 10.0, "edge": 50.0}


def _metainfo(sample) -> dict:
    return getattr(sample, "metainfo", None) or {}


def allocated_mask(batch_data_samples: Sequence, task: str,
                   device: Optional[torch.device] = None) -> Tensor:
    """``[B]`` bool: sample i trains ``task`` in this step.

    ``mtl_alloc`` (tuple of task names) decides when present; otherwise ``mtl_tasks`` (the
    annotated tasks); otherwise every sample whose data sample carries the task's field.
    """
    flags: List[bool] = []
    field = SAMPLE_FIELDS[task]
    for sample in batch_data_samples:
        meta = _metainfo(sample)
        if ALLOC_KEY in meta:
            flag = task in tuple(meta[ALLOC_KEY])
        elif TASKS_KEY in meta:
            flag = task in tuple(meta[TASKS_KEY])
        else:
            flag = field in sample
        flags.append(bool(flag))
    return torch.tensor(flags, dtype=torch.bool, device=device)


def stack_targets(batch_data_samples: Sequence, task: str, device: torch.device,
                  mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Return ``(gt [B, C, H, W], mask [B] bool)`` for ``task``.

    ``mask`` (default: :func:`allocated_mask`) is and-ed with "the sample has the field".
    Samples without the field get the ignore value. A sample that is allocated (or declared
    annotated) for ``task`` but has no field is a data error and raises ``MTLConfigError``.
    """
    field = SAMPLE_FIELDS[task]
    if mask is None:
        mask = allocated_mask(batch_data_samples, task, device=device)
    mask = mask.to(device=device, dtype=torch.bool)
    present = [field in s for s in batch_data_samples]
    ref = next((getattr(s, field).data for s, p in zip(batch_data_samples, present) if p), None)
    if ref is None:
        if bool(mask.any()):
            raise MTLConfigError(
                f"task {task!r}: samples are allocated to it but none has the field {field!r}")
        return None, mask
    gts = []
    for i, (s, p) in enumerate(zip(batch_data_samples, present)):
        if p:
            data = getattr(s, field).data
            if data.shape != ref.shape:
                raise MTLConfigError(
                    f"task {task!r}: field {field!r} has shape {tuple(data.shape)} in sample {i} "
                    f"but {tuple(ref.shape)} in another; pad the batch to one size")
            gts.append(data)
        else:
            if bool(mask[i]):
                raise MTLConfigError(
                    f"task {task!r}: sample {i} is allocated to it (metainfo "
                    f"{ALLOC_KEY}/{TASKS_KEY}) but has no field {field!r}")
            gts.append(torch.full_like(ref, IGNORE_VALUES[task]))
    gt = torch.stack([g.to(device) for g in gts], dim=0)
    if gt.shape[1] != CHANNELS[task]:
        raise MTLConfigError(f"task {task!r}: field {field!r} must have {CHANNELS[task]} "
                             f"channel(s), got {tuple(gt.shape[1:])}")
    mask = mask & torch.tensor(present, dtype=torch.bool, device=device)
    return gt, mask


class TaskLoss:
    """The dense loss of one task, per :mod:`mtl_plugins.core.losses`.

    Args:
        task: ``seg``, ``depth``, ``normal`` or ``edge``.
        ignore_index: seg ignore label (255).
        depth_invalid: depth value meaning "no depth" (0.0).
        max_depth: depths above it are invalid too (None: no bound). Set it (e.g. 20.0 for
            NYUD) when the batch is padded with mmseg's ``seg_pad_val=255``.
        normal_loss: ``'l1'`` (survey) or ``'cosine'``.
        edge_pos_weight: positive weight of the edge BCE (survey 0.95).
        edge_ignore: edge ignore value (255).
    """

    def __init__(self, task: str, ignore_index: int = 255, depth_invalid: float = 0.0,
                 max_depth: Optional[float] = None, normal_loss: str = "l1",
                 edge_pos_weight: float = 0.95, edge_ignore: int = 255) -> None:
        if task not in LOSS_NAMES:
            raise MTLConfigError(f"task={task!r}: expected one of {list(LOSS_NAMES)}")
        if normal_loss not in ("l1", "cosine"):
            raise MTLConfigError(f"normal_loss={normal_loss!r}: expected 'l1' or 'cosine'")
        if not 0.0 <= float(edge_pos_weight) <= 1.0:
            raise MTLConfigError(f"edge_pos_weight={edge_pos_weight!r}: expected a value in [0, 1]")
        self.task = task
        self.name = LOSS_NAMES[task]
        self.ignore_index = ignore_index
        self.depth_invalid = depth_invalid
        self.max_depth = max_depth
        self.normal_loss = normal_loss
        self.edge_pos_weight = float(edge_pos_weight)
        self.edge_ignore = edge_ignore

    def __call__(self, pred: Tensor, gt: Tensor) -> L.DenseLoss:
        if self.task == "seg":
            return L.seg_ce(pred, gt, ignore=self.ignore_index)
        if self.task == "depth":
            return L.depth_l1(pred, gt, invalid=self.depth_invalid, max_depth=self.max_depth)
        if self.task == "normal":
            fn = L.normal_l1 if self.normal_loss == "l1" else L.normal_cosine
            return fn(pred, gt)
        return L.edge_bce(pred, gt, pos_weight=self.edge_pos_weight, ignore=self.edge_ignore)

    def masked(self, pred: Tensor, gt: Optional[Tensor], mask: Tensor) -> Tensor:
        """Loss pooled over the allocated samples; ``0 * pred.sum()`` when there is no target."""
        if gt is None:
            return pred.sum() * 0.0
        return self(pred, gt).masked(mask)


def seg_accuracy(logits: Tensor, gt: Tensor, mask: Tensor, ignore_index: int = 255) -> Tensor:
    """Pixel accuracy (%) over labelled pixels of allocated samples (logging only, no graph)."""
    with torch.no_grad():
        label = gt[:, 0].long()
        valid = (label != ignore_index) & mask[:, None, None]
        correct = (logits.argmax(1) == label) & valid
        return correct.sum().float() * 100.0 / valid.sum().clamp(min=1).float()
