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

Maximum Roaming (paper 002) and Recon stage 2 (paper 004), ``mtl_roaming`` / ``mtl_recon``
(``MTL.ROAMING.*`` / ``MTL.RECON.*``): the backbone (+ FPN) becomes task-conditioned (per-task
channel masks / per-task copies of some modules) and runs once per task under a
:class:`~mtl_plugins.core.structure.context.TaskContext`. Every branch reads the features of
the task owning its losses (:class:`TaskFeatures`): the RPN those of the RPN losses' task
(its proposals serve every branch), the box head those of ``loss_cls``'s task, the mask and
keypoint heads those of their task, at the same sampled proposals (training) or detected boxes
(inference). In training, a task allocated to no image of the batch is not forwarded (its
branch has no ROI); the RPN's task always is (it makes the proposals).
"""
from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from typing import Callable, Dict, FrozenSet, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, PROPOSAL_GENERATOR_REGISTRY, \
    ROI_HEADS_REGISTRY
from detectron2.modeling.meta_arch.rcnn import GeneralizedRCNN
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.modeling.roi_heads.roi_heads import StandardROIHeads
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..compat.tensor_state import install_tensor_state
from ..core.structure import MaximumRoaming, ReconTransform, TaskContext, run_per_task
from ..core.structure.from_config import build_recon, build_roaming
from ..core.tasks import MTLConfigError, check_known_tasks
from .config import (loss_owner, roaming_steps_per_epoch, structure_model_configs,
                     task_loss_mapping)

RPN_LOSSES = ("loss_rpn_cls", "loss_rpn_loc")
BOX_LOSSES = ("loss_cls", "loss_box_reg")
MASK_LOSSES = ("loss_mask",)
KEYPOINT_LOSSES = ("loss_keypoint",)
#: the branches of an R-CNN that read backbone features, with the losses they produce
BRANCH_LOSSES: Dict[str, Tuple[str, ...]] = {"rpn": RPN_LOSSES, "box": BOX_LOSSES,
                                             "mask": MASK_LOSSES, "keypoint": KEYPOINT_LOSSES}
#: (roaming key, recon key, yacs spelling) of the errors, by where the settings came from
STRUCTURE_KEYS = {"kwargs": ("mtl_roaming", "mtl_recon", False),
                  "yacs": ("MTL.ROAMING", "MTL.RECON", True)}


class TaskFeatures(dict):
    """``{task: backbone features}`` of one forward, each computed under its task's masks /
    copies, and ``branch_tasks``: the task whose features each branch reads."""

    def __init__(self, features: Mapping[str, Dict[str, torch.Tensor]],
                 branch_tasks: Mapping[str, str]) -> None:
        super().__init__(features)
        self.branch_tasks = dict(branch_tasks)

    def branch(self, name: str) -> Dict[str, torch.Tensor]:
        """The features of ``name``'s task; a task not forwarded this step (allocated to no
        image) gives its branch no ROI, so any task's features serve its empty forward."""
        task = self.branch_tasks[name]
        return self[task] if task in self else next(iter(self.values()))


def branch_features(features, branch: str):
    """``features`` itself, or the branch's task features of a :class:`TaskFeatures`."""
    return features.branch(branch) if isinstance(features, TaskFeatures) else features


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
        features = branch_features(features, "box")
        return self._per_task(super()._forward_box, BOX_LOSSES, features, proposals)

    def _forward_mask(self, features, instances):
        if not self.mask_on:
            return super()._forward_mask(features, instances)
        features = branch_features(features, "mask")
        return self._per_task(super()._forward_mask, MASK_LOSSES, features, instances)

    def _forward_keypoint(self, features, instances):
        if not self.keypoint_on:
            return super()._forward_keypoint(features, instances)
        features = branch_features(features, "keypoint")
        return self._per_task(super()._forward_keypoint, KEYPOINT_LOSSES, features, instances)


@META_ARCH_REGISTRY.register()
class MTLGeneralizedRCNN(GeneralizedRCNN):
    """``GeneralizedRCNN`` that reads each training input's ``"mtl_alloc"`` (tuple of task
    names; absent = all tasks) and restricts every loss to the images allocated to its task.

    Needs ``MODEL.PROPOSAL_GENERATOR.NAME: MTLRPN`` and ``MODEL.ROI_HEADS.NAME:
    MTLStandardROIHeads`` as soon as some image is not allocated every task.

    Args:
        mtl_task_losses: ``{task: loss keys}`` (``MTL.TASKS`` / ``MTL.TASK_LOSSES``).
        mtl_roaming: Maximum Roaming over backbone layers, ``dict(layers=[names or patterns],
            p, interval=1, completion=1.0, init='exact', seed=0)`` (``MTL.ROAMING.*``); the
            submodule ``roaming`` (masks, visited sets, counters and RNG are checkpointed).
        mtl_recon: Recon stage 2 on backbone modules, ``dict(ranking=path, topk=K,
            init='copy')`` or ``dict(modules=[names or patterns], init='copy')``
            (``MTL.RECON.*``); ``recon`` is then the
            :class:`~mtl_plugins.core.structure.recon.ReconTransform`.
        mtl_steps_per_epoch: optimizer steps per training epoch, to convert Maximum
            Roaming's Δ from epochs (``interval_epochs``, default 0.1, paper 002) to steps: a
            number, or a function returning it, called at the first optimizer step (the yacs
            config passes :func:`~mtl_plugins.d2.config.roaming_steps_per_epoch`, which reads
            ``DATASETS.TRAIN`` and ``SOLVER.IMS_PER_BATCH``: building the model for
            evaluation needs no training data). Without it, a roaming step in epochs refuses
            to run.
        mtl_config_source: ``"kwargs"`` or ``"yacs"``: how errors spell the keys.

    With either, the backbone runs once per task (see the module docstring) and
    :meth:`after_optimizer_step` must follow every real optimizer step (``MTLTrainer`` calls
    it).
    """

    @configurable
    def __init__(self, *, mtl_task_losses: Mapping[str, Sequence[str]],
                 mtl_roaming: Optional[Mapping] = None, mtl_recon: Optional[Mapping] = None,
                 mtl_config_source: str = "kwargs",
                 mtl_steps_per_epoch: Optional[float | Callable[[], Optional[float]]] = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.mtl_task_losses = {t: tuple(k) for t, k in mtl_task_losses.items()}
        self.mtl_tasks: Tuple[str, ...] = tuple(self.mtl_task_losses)
        self.task_context: Optional[TaskContext] = None
        self.recon: Optional[ReconTransform] = None
        self.roaming: Optional[MaximumRoaming] = None
        self._branch_tasks: Dict[str, str] = {}
        if mtl_config_source not in STRUCTURE_KEYS:
            raise MTLConfigError(f"mtl_config_source={mtl_config_source!r}: expected one of "
                                 f"{list(STRUCTURE_KEYS)}")
        if mtl_roaming is not None or mtl_recon is not None:
            self._build_structure(mtl_roaming, mtl_recon, STRUCTURE_KEYS[mtl_config_source])
        self._steps_per_epoch: Optional[Callable[[], Optional[float]]] = None
        if self.roaming is not None and self.roaming.interval_epochs is not None:
            if callable(mtl_steps_per_epoch):
                self._steps_per_epoch = mtl_steps_per_epoch
            elif mtl_steps_per_epoch is not None:
                self._set_roaming_interval(mtl_steps_per_epoch)
        install_tensor_state(self)  # DetectionCheckpointer accepts tensors only

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["mtl_task_losses"] = task_loss_mapping(cfg)
        ret["mtl_roaming"], ret["mtl_recon"] = structure_model_configs(cfg)
        ret["mtl_config_source"] = "yacs"
        ret["mtl_steps_per_epoch"] = functools.partial(roaming_steps_per_epoch, cfg.clone())
        return ret

    # ------------------------------------------------------------------ roaming / recon
    def _build_structure(self, roaming: Optional[Mapping], recon: Optional[Mapping],
                         keys: Tuple[str, str, bool]) -> None:
        roaming_key, recon_key, upper = keys
        key = roaming_key if roaming is not None else recon_key
        if not isinstance(self.roi_heads, MTLStandardROIHeads):
            raise MTLConfigError(
                f"{key} with MODEL.ROI_HEADS.NAME={type(self.roi_heads).__name__!r}: the heads "
                "must read their task's features; expected 'MTLStandardROIHeads'")
        self._branch_tasks = self._owner_of_branches(key)
        self.task_context = TaskContext(self.mtl_tasks)
        if recon is not None:  # first: roaming patterns may then reach into the copies
            # θ_sh: the trainer's shared parameters are the backbone's (trainable ones)
            shared = [p for p in self.backbone.parameters() if p.requires_grad]
            self.recon = build_recon(self, recon, self.mtl_tasks, self.task_context,
                                     recon_key, upper, shared_params=shared)
            self._check_in_backbone(self.recon.converted, recon_key)
            logging.getLogger(__name__).info(
                f"Recon: {len(self.recon.converted)} module(s) made task-specific "
                f"{self.recon.converted}: {self.recon.report.describe()}")
        if roaming is not None:
            self._roaming_key = roaming_key
            self.roaming = build_roaming(self, roaming, self.mtl_tasks, self.task_context,
                                         roaming_key, upper)
            self._check_in_backbone(self.roaming.layer_names, roaming_key)

    def _owner_of_branches(self, key: str) -> Dict[str, str]:
        """``{branch: task}``: the one task owning each enabled branch's losses."""
        enabled = {"rpn": self.proposal_generator is not None, "box": True,
                   "mask": self.roi_heads.mask_on, "keypoint": self.roi_heads.keypoint_on}
        owner = loss_owner(self.mtl_task_losses)
        out: Dict[str, str] = {}
        for branch, keys in BRANCH_LOSSES.items():
            if not enabled[branch]:
                continue
            tasks = sorted({owner[k] for k in keys if k in owner})
            if len(tasks) != 1:
                raise MTLConfigError(
                    f"MTL.TASK_LOSSES: the {branch} branch's losses {list(keys)} belong to "
                    f"tasks {tasks}; with {key} every branch reads one task's features: "
                    "expected its loss keys in exactly one task")
            out[branch] = tasks[0]
        return out

    @staticmethod
    def _check_in_backbone(names: Sequence[str], key: str) -> None:
        outside = [n for n in names if not n.startswith("backbone.")]
        if outside:
            raise MTLConfigError(
                f"{key}: {outside} are not backbone modules; expected names under 'backbone.' "
                "(the heads are task-specific already and run outside the task context)")

    def check_level(self, level: str, key: str) -> None:
        """Refuse representation-level aggregation when the backbone runs once per task
        (Maximum Roaming / Recon stage 2): there is no single shared representation."""
        if level == "representation" and self.task_context is not None:
            raise MTLConfigError(
                f"{key}='representation' with Maximum Roaming / Recon: the backbone runs once "
                "per task, so there is no single shared representation; expected "
                f"{key}='parameter'")

    def after_optimizer_step(self) -> int:
        """Call after every real optimizer step (not after one skipped for an AMP overflow):
        Maximum Roaming's step (paper 002, eq. 4, every Δ steps). Returns the swaps done.
        The first call converts Δ from epochs to optimizer steps (``mtl_steps_per_epoch``)."""
        if self.roaming is None:
            return 0
        if self.roaming.interval is None and self._steps_per_epoch is not None:
            steps_per_epoch = self._steps_per_epoch()
            if steps_per_epoch is not None:
                self._set_roaming_interval(steps_per_epoch)
        return self.roaming.step()

    def _set_roaming_interval(self, steps_per_epoch: float) -> None:
        steps = self.roaming.set_steps_per_epoch(steps_per_epoch)
        logging.getLogger(__name__).info(
            f"MaximumRoaming: Δ = {self.roaming.interval_epochs} epoch = {steps} optimizer "
            f"steps ({steps_per_epoch:g} per epoch); the plan takes "
            f"{self.roaming.updates_to_finish()} updates = "
            f"{self.roaming.updates_to_finish() * steps} steps")

    def task_features(self, images: torch.Tensor, tasks: Sequence[str]) -> TaskFeatures:
        """The backbone (+ FPN) features of ``images``, once per task of ``tasks`` under that
        task's masks / copies (paper 002 eq. 2; paper 004 Algorithm 1, stage 2)."""
        if self.task_context is None:
            raise RuntimeError("task_features: the model has no roaming/recon; use backbone")
        order = [t for t in self.mtl_tasks if t in tasks]
        return TaskFeatures(run_per_task(self.task_context, lambda t: self.backbone(images),
                                         order), self._branch_tasks)

    def _tasks_of(self, branches: Sequence[str],
                  alloc: Optional[ImageAllocation] = None) -> List[str]:
        """The tasks to forward for ``branches``: the RPN's always (its proposals serve every
        branch), the others when some image is allocated to them; at least one. Under DDP
        with Recon copies every task: a copy left out of the graph on one rank would stall
        DDP's gradient reduction (its zero loss reaches the copy only through a forward)."""
        every = alloc is None or (self.recon is not None and comm.get_world_size() > 1)
        tasks = []
        for branch in branches:
            task = self._branch_tasks.get(branch)
            if task is None:
                continue
            if branch == "rpn" or every or any(task in i for i in alloc.image_tasks):
                tasks.append(task)
        return tasks or [self._branch_tasks["box"]]

    def _proposals(self, images, features: TaskFeatures, batched_inputs, gt_instances):
        if self.proposal_generator is None:
            return [x["proposals"].to(self.device) for x in batched_inputs], {}
        return self.proposal_generator(images, features.branch("rpn"), gt_instances)

    def _forward_per_task(self, batched_inputs, alloc: Optional[ImageAllocation]):
        """Training: GeneralizedRCNN's forward with per-task backbone features."""
        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs] \
            if "instances" in batched_inputs[0] else None
        features = self.task_features(images.tensor, self._tasks_of(list(BRANCH_LOSSES), alloc))
        if self.roaming is not None:  # a mask that did not act is a config error
            self.roaming.check_applied(self._roaming_key)
        proposals, proposal_losses = self._proposals(images, features, batched_inputs,
                                                     gt_instances)
        _, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
        if self.vis_period > 0 and get_event_storage().iter % self.vis_period == 0:
            self.visualize_training(batched_inputs, proposals)
        return {**detector_losses, **proposal_losses}

    def inference(self, batched_inputs, detected_instances=None, do_postprocess: bool = True):
        """GeneralizedRCNN's inference; with roaming/recon, boxes from the box task's features
        and masks / keypoints from their task's features at those boxes."""
        if self.task_context is None:
            return super().inference(batched_inputs, detected_instances, do_postprocess)
        images = self.preprocess_image(batched_inputs)
        branches = list(BRANCH_LOSSES) if detected_instances is None else ["mask", "keypoint"]
        features = self.task_features(images.tensor, self._tasks_of(branches))
        if detected_instances is None:
            proposals, _ = self._proposals(images, features, batched_inputs, None)
            results, _ = self.roi_heads(images, features, proposals, None)
        else:
            results = self.roi_heads.forward_with_given_boxes(
                features, [x.to(self.device) for x in detected_instances])
        if do_postprocess:
            return GeneralizedRCNN._postprocess(results, batched_inputs, images.image_sizes)
        return results

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
            return super().forward(batched_inputs)  # -> self.inference
        alloc = self._image_allocation(batched_inputs)
        with self._allocated(alloc):
            if self.task_context is None:
                return super().forward(batched_inputs)
            return self._forward_per_task(batched_inputs, alloc)
