"""Per-image task allocation inside detectron2's R-CNN: meta-arch, RPN and ROI heads subclasses.

Every training input may carry ``"mtl_alloc"``: the tuple of task names this image trains at
this step (absent = every task). :class:`MTLGeneralizedRCNN` reads it and hands it, for the
duration of one forward, to its proposal generator and ROI heads, which compute each loss
only over the images allocated to the loss's task (``MTL.TASK_LOSSES``):

- RPN (:class:`MTLRPN`): detectron2's ``RPN.losses`` on the allocated images' anchors only,
  so its per-image normaliser ``batch_size_per_image * num_images`` counts allocated images.
- Box head (:class:`MTLStandardROIHeads`): ``_forward_box`` on the allocated images'
  sampled proposals (the others are replaced by empty ``Instances``): ``loss_cls`` is the mean
  over their ROIs, ``loss_box_reg`` is divided by their ROI count, as detectron2 does.
- Mask / keypoint heads: ``_forward_mask`` / ``_forward_keypoint`` on the allocated images'
  foreground ROIs: ``loss_mask`` is exactly detectron2's ``mask_rcnn_loss`` over those ROIs.

A task with no allocated image gives detectron2's own empty-input value: zero, finite and
connected to the head's parameters (``0 * sum(predictions)``). Inference is unchanged.
The heads only run on the ROIs that carry a loss, so non-allocated images cost no head
compute (the heads have no batch statistics; ``train_on_pred_boxes`` only refines the boxes of
the images allocated to the box loss's task).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, FrozenSet, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, PROPOSAL_GENERATOR_REGISTRY, \
    ROI_HEADS_REGISTRY
from detectron2.modeling.meta_arch.rcnn import GeneralizedRCNN
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.modeling.roi_heads.roi_heads import StandardROIHeads

from ..core.tasks import MTLConfigError, check_known_tasks
from .config import loss_owner, task_loss_mapping

RPN_LOSSES = ("loss_rpn_cls", "loss_rpn_loc")
BOX_LOSSES = ("loss_cls", "loss_box_reg")
MASK_LOSSES = ("loss_mask",)
KEYPOINT_LOSSES = ("loss_keypoint",)


class ImageAllocation:
    """The allocation of one forward: each image's tasks and the task of each loss key."""

    def __init__(self, image_tasks: Sequence[FrozenSet[str]], owner: Mapping[str, str]) -> None:
        self.image_tasks = list(image_tasks)
        self.owner = dict(owner)

    def images_for(self, loss_keys: Sequence[str]) -> Optional[Dict[str, List[bool]]]:
        """``{task: [image allocated?]}`` for the tasks owning ``loss_keys``; ``None`` when
        every image is allocated to all of them (the unmodified detectron2 path)."""
        tasks = []
        for k in loss_keys:
            t = self.owner.get(k)
            if t is not None and t not in tasks:
                tasks.append(t)
        out = {t: [t in img for img in self.image_tasks] for t in tasks}
        if all(all(keep) for keep in out.values()):
            return None
        return out


class MTLAllocationMixin:
    """Gives a detectron2 module the per-forward :class:`ImageAllocation` (``None`` = all)."""

    _mtl_alloc: Optional[ImageAllocation] = None

    def _allocated_images(self, loss_keys: Sequence[str]) -> Optional[Dict[str, List[bool]]]:
        if not self.training or self._mtl_alloc is None:
            return None
        return self._mtl_alloc.images_for(loss_keys)

    def _keys_of(self, task: str, losses: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        owner = self._mtl_alloc.owner
        return {k: v for k, v in losses.items() if owner.get(k, task) == task}


@PROPOSAL_GENERATOR_REGISTRY.register()
class MTLRPN(MTLAllocationMixin, RPN):
    """detectron2's RPN whose losses cover only the images allocated to their task."""

    def losses(self, anchors, pred_objectness_logits: List[torch.Tensor],
               gt_labels: List[torch.Tensor], pred_anchor_deltas: List[torch.Tensor],
               gt_boxes: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        alloc = self._allocated_images(RPN_LOSSES)
        if alloc is None:
            return super().losses(anchors, pred_objectness_logits, gt_labels,
                                  pred_anchor_deltas, gt_boxes)
        out: Dict[str, torch.Tensor] = {}
        for task, keep in alloc.items():
            idx = [i for i, k in enumerate(keep) if k]
            if not idx:  # zero, connected to the RPN head's outputs
                zero = sum(x.sum() for x in pred_objectness_logits) * 0.0 + \
                    sum(x.sum() for x in pred_anchor_deltas) * 0.0
                losses = {k: zero for k in RPN_LOSSES}
            else:
                sel = torch.as_tensor(idx, device=pred_objectness_logits[0].device)
                losses = super().losses(anchors, [x[sel] for x in pred_objectness_logits],
                                        [gt_labels[i] for i in idx],
                                        [x[sel] for x in pred_anchor_deltas],
                                        [gt_boxes[i] for i in idx])
            out.update(self._keys_of(task, losses))
        return out


@ROI_HEADS_REGISTRY.register()
class MTLStandardROIHeads(MTLAllocationMixin, StandardROIHeads):
    """``StandardROIHeads`` whose box, mask and keypoint losses cover only the images
    allocated to their task (see the module docstring)."""

    def _per_task(self, branch, loss_keys: Sequence[str], features: Dict[str, torch.Tensor],
                  instances: List):
        alloc = self._allocated_images(loss_keys)
        if alloc is None:
            return branch(features, instances)
        out: Dict[str, torch.Tensor] = {}
        for task, keep in alloc.items():
            # empty Instances keep each image's position (the poolers index images by it)
            subset = [x if k else x[:0] for x, k in zip(instances, keep)]
            out.update(self._keys_of(task, branch(features, subset)))
        return out

    def _forward_box(self, features, proposals):
        return self._per_task(super()._forward_box, BOX_LOSSES, features, proposals)

    def _forward_mask(self, features, instances):
        if not self.mask_on:
            return super()._forward_mask(features, instances)
        return self._per_task(super()._forward_mask, MASK_LOSSES, features, instances)

    def _forward_keypoint(self, features, instances):
        if not self.keypoint_on:
            return super()._forward_keypoint(features, instances)
        return self._per_task(super()._forward_keypoint, KEYPOINT_LOSSES, features, instances)


@META_ARCH_REGISTRY.register()
class MTLGeneralizedRCNN(GeneralizedRCNN):
    """``GeneralizedRCNN`` that reads each training input's ``"mtl_alloc"`` (tuple of task
    names; absent = all tasks) and restricts every loss to the images allocated to its task.

    Needs ``MODEL.PROPOSAL_GENERATOR.NAME: MTLRPN`` and ``MODEL.ROI_HEADS.NAME:
    MTLStandardROIHeads`` as soon as some image is not allocated every task.
    """

    @configurable
    def __init__(self, *, mtl_task_losses: Mapping[str, Sequence[str]], **kwargs) -> None:
        super().__init__(**kwargs)
        self.mtl_task_losses = {t: tuple(k) for t, k in mtl_task_losses.items()}
        self.mtl_tasks: Tuple[str, ...] = tuple(self.mtl_task_losses)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["mtl_task_losses"] = task_loss_mapping(cfg)
        return ret

    def _image_allocation(self, batched_inputs) -> Optional[ImageAllocation]:
        image_tasks = []
        restricted = False
        for i, x in enumerate(batched_inputs):
            alloc = x.get("mtl_alloc") if isinstance(x, Mapping) else None
            if alloc is None:
                image_tasks.append(frozenset(self.mtl_tasks))
                continue
            alloc = (alloc,) if isinstance(alloc, str) else tuple(alloc)
            check_known_tasks(alloc, self.mtl_tasks, key=f"batched_inputs[{i}]['mtl_alloc']")
            image_tasks.append(frozenset(alloc))
            restricted |= len(image_tasks[-1]) < len(self.mtl_tasks)
        if not restricted:
            return None
        return ImageAllocation(image_tasks, loss_owner(self.mtl_task_losses))

    @contextmanager
    def _allocated(self, alloc: Optional[ImageAllocation]) -> Iterator[None]:
        parts = {"MODEL.PROPOSAL_GENERATOR.NAME": ("proposal_generator", "MTLRPN"),
                 "MODEL.ROI_HEADS.NAME": ("roi_heads", "MTLStandardROIHeads")}
        modules = []
        for key, (attr, name) in parts.items():
            module = getattr(self, attr, None)
            if module is None:
                continue
            if not isinstance(module, MTLAllocationMixin):
                # precomputed proposals have no loss to restrict
                if alloc is not None and type(module).__name__ != "PrecomputedProposals":
                    raise MTLConfigError(
                        f"{key}={type(module).__name__!r} cannot restrict its losses to the "
                        f"allocated images; expected {name!r} (or another mtl_plugins.d2 "
                        "module) with MODEL.META_ARCHITECTURE='MTLGeneralizedRCNN'")
                continue
            modules.append(module)
        for m in modules:
            m._mtl_alloc = alloc
        try:
            yield
        finally:
            for m in modules:
                m._mtl_alloc = None

    def forward(self, batched_inputs):
        if not self.training:
            return super().forward(batched_inputs)
        with self._allocated(self._image_allocation(batched_inputs)):
            return super().forward(batched_inputs)
