"""``MultiTaskDecoder``: the interface of decoders that predict several dense tasks at once.

A multi-task decoder takes the backbone's feature maps and returns every task's output; the
segmentor calls it like a decode head:

- ``tasks``: tuple of the tasks with a final output (the decoder's predictions);
- ``aux_tasks``: tuple of the tasks with initial (deep-supervised) predictions, always a
  superset of ``tasks`` (auxiliary-only tasks, e.g. normals and edges next to final seg and
  depth, train the shared layers but have no final output);
- ``loss_tasks``: every task with a loss term (= ``aux_tasks``, tasks first);
- ``loss(inputs, batch_data_samples, train_cfg) -> dict``: keys ``f'{t}.loss_xxx'`` for the
  final prediction of task t, ``f'{t}.init.loss_xxx'`` (PAD-Net) or
  ``f'{t}.init.s{k}.loss_xxx'`` (MTI-Net, scale k = 0 (1/4) … 3 (1/32)) for deep
  supervision, plus ``'seg.acc_seg'`` (logging only: no ``loss`` in the name). **Every key of
  task t starts with** ``f'{t}.'``; the per-task loss is the sum of its ``loss`` keys;
- ``predict(inputs, batch_img_metas, test_cfg) -> {task: Tensor [B, C, H, W]}`` at input
  size (``pad_shape``/``img_shape`` like mmseg heads): seg logits, depth, unit normals, edge
  logits;
- ``task_parameters() -> {task: [params]}``: for each task of ``loss_tasks`` the parameters
  that only that task's loss reaches (e.g. its final head, its 1×1 initial-prediction convs,
  the distillation messages into it). Every other parameter is shared (``shared_parameters``).

Losses: ``mtl_plugins.core.losses`` per task (:class:`~.targets.TaskLoss`), weighted by
``loss_weights[t]`` for the final output and ``loss_weights[t] · deep_sup_weight · scale
weight`` for every initial prediction (survey: the same weights). Each term pools over the
samples allocated to the task (metainfo ``mtl_alloc``); no allocated sample → zero loss that
stays connected to the graph.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from mmengine.model import BaseModule
from torch import Tensor, nn

from ...core.tasks import MTLConfigError, check_task_names
from ...core.unit_vectors import unit_vectors
from ..fields import CHANNELS, check_dense_tasks
from .blocks import resize_to
from .targets import DEFAULT_LOSS_WEIGHTS, TaskLoss, seg_accuracy, stack_targets

DecoderOutput = Dict[str, Dict]


class MultiTaskDecoder(BaseModule):
    """Base class of PAD-Net / MTI-Net style decoders (see the module docstring).

    Args:
        tasks: tasks with a final output (subset of seg/depth/normal/edge).
        aux_tasks: tasks with initial predictions; ``tasks`` are always included
            (``None`` = ``tasks``). Order: ``tasks`` first, then the others as given.
        num_classes: seg classes (required when ``seg`` is among the tasks).
        loss_weights: ``{task: weight}`` overriding the survey defaults
            (seg 1, depth 1, normal 10, edge 50).
        deep_sup_weight: global factor on every initial-prediction term (1.0 = survey).
        ignore_index, depth_invalid, max_depth, normal_loss, edge_pos_weight: loss options
            (see :class:`~.targets.TaskLoss`).
        align_corners: of every bilinear resize.
        init_cfg: mmengine init config.
    """

    def __init__(self, tasks: Sequence[str], aux_tasks: Optional[Sequence[str]] = None,
                 num_classes: Optional[int] = None,
                 loss_weights: Optional[Mapping[str, float]] = None,
                 deep_sup_weight: float = 1.0, ignore_index: int = 255,
                 depth_invalid: float = 0.0, max_depth: Optional[float] = None,
                 normal_loss: str = "l1", edge_pos_weight: float = 0.95,
                 align_corners: bool = False, init_cfg=None) -> None:
        super().__init__(init_cfg)
        tasks = check_dense_tasks(check_task_names(tasks, "tasks"), "tasks")
        extra = () if aux_tasks is None else check_dense_tasks(
            check_task_names(aux_tasks, "aux_tasks"), "aux_tasks")
        self.tasks: Tuple[str, ...] = tasks
        self.aux_tasks: Tuple[str, ...] = tasks + tuple(t for t in extra if t not in tasks)
        if "seg" in self.aux_tasks:
            if not isinstance(num_classes, int) or num_classes < 2:
                raise MTLConfigError(f"num_classes={num_classes!r}: 'seg' is a task, expected "
                                     "the number of classes (int >= 2)")
        self.num_classes = num_classes
        self.out_channels: Dict[str, int] = {
            t: (num_classes if t == "seg" else CHANNELS[t]) for t in self.aux_tasks}
        weights = dict(DEFAULT_LOSS_WEIGHTS)
        for k, v in dict(loss_weights or {}).items():
            if k not in CHANNELS:
                raise MTLConfigError(f"loss_weights: unknown task {k!r}; expected one of "
                                     f"{list(CHANNELS)}")
            if not isinstance(v, (int, float)) or v < 0:
                raise MTLConfigError(f"loss_weights[{k!r}]={v!r}: expected a number >= 0")
            weights[k] = float(v)
        self.loss_weights: Dict[str, float] = {t: weights[t] for t in self.aux_tasks}
        if not isinstance(deep_sup_weight, (int, float)) or deep_sup_weight < 0:
            raise MTLConfigError(f"deep_sup_weight={deep_sup_weight!r}: expected a number >= 0")
        self.deep_sup_weight = float(deep_sup_weight)
        self.ignore_index = ignore_index
        self.align_corners = align_corners
        self.task_losses: Dict[str, TaskLoss] = {
            t: TaskLoss(t, ignore_index=ignore_index, depth_invalid=depth_invalid,
                        max_depth=max_depth, normal_loss=normal_loss,
                        edge_pos_weight=edge_pos_weight)
            for t in self.aux_tasks}

    # ------------------------------------------------------------------ interface
    @property
    def loss_tasks(self) -> Tuple[str, ...]:
        return self.aux_tasks

    def forward(self, inputs: Sequence[Tensor]) -> DecoderOutput:
        """Return ``{'final': {task: Tensor}, 'init': {scale_key: {task: Tensor}}}``.

        ``scale_key`` is ``''`` for a single deep-supervision level (keys ``t.init.loss_x``)
        or e.g. ``'s0'`` (keys ``t.init.s0.loss_x``). Tensors are at feature resolution.
        """
        raise NotImplementedError

    def init_weights_for(self, scale_key: str) -> float:
        """Factor of the deep-supervision terms of ``scale_key`` (besides deep_sup_weight)."""
        return 1.0

    def task_parameters(self) -> Dict[str, List[nn.Parameter]]:
        """``{task: params reached only by that task's loss}`` for every task of ``loss_tasks``."""
        raise NotImplementedError

    def shared_parameters(self) -> List[nn.Parameter]:
        """The decoder's parameters that are in no task's ``task_parameters()``."""
        owned = {id(p) for ps in self.task_parameters().values() for p in ps}
        return [p for p in self.parameters() if id(p) not in owned]

    # ------------------------------------------------------------------ loss / predict
    def loss(self, inputs: Sequence[Tensor], batch_data_samples, train_cfg=None) -> dict:
        out = self.forward(inputs)
        device = next(iter(out["final"].values())).device
        targets = {t: stack_targets(batch_data_samples, t, device=device) for t in self.loss_tasks}
        losses: Dict[str, Tensor] = {}
        for t, pred in out["final"].items():
            gt, mask = targets[t]
            fn = self.task_losses[t]
            if gt is not None:
                pred = resize_to(pred, gt.shape[2:], self.align_corners)
            losses[f"{t}.{fn.name}"] = self.loss_weights[t] * fn.masked(pred, gt, mask)
            if t == "seg" and gt is not None:
                losses["seg.acc_seg"] = seg_accuracy(pred, gt, mask, self.ignore_index)
        for key, preds in out["init"].items():
            factor = self.deep_sup_weight * self.init_weights_for(key)
            scope = "init" if key == "" else f"init.{key}"
            for t, pred in preds.items():
                gt, mask = targets[t]
                fn = self.task_losses[t]
                if gt is not None:
                    pred = resize_to(pred, gt.shape[2:], self.align_corners)
                losses[f"{t}.{scope}.{fn.name}"] = (
                    self.loss_weights[t] * factor * fn.masked(pred, gt, mask))
        return losses

    def predict(self, inputs: Sequence[Tensor], batch_img_metas: List[dict],
                test_cfg=None) -> Dict[str, Tensor]:
        out = self.forward(inputs)
        size = _output_size(batch_img_metas)
        preds: Dict[str, Tensor] = {}
        for t in self.tasks:
            p = resize_to(out["final"][t], size, self.align_corners)
            if t == "normal":
                p = unit_vectors(p)
            preds[t] = p
        return preds


def _output_size(batch_img_metas: List[dict]) -> Tuple[int, int]:
    """Prediction size like mmseg's ``BaseDecodeHead.predict_by_feat``."""
    meta = batch_img_metas[0]
    if isinstance(meta.get("img_shape"), torch.Size):
        size = meta["img_shape"]
    elif "pad_shape" in meta:
        size = meta["pad_shape"][:2]
    else:
        size = meta["img_shape"][:2]
    return tuple(int(s) for s in size)


def select_inputs(inputs: Sequence[Tensor], in_index) -> List[Tensor]:
    if isinstance(in_index, int):
        return [inputs[in_index]]
    return [inputs[i] for i in in_index]


def params_of(*modules: Optional[nn.Module]) -> List[nn.Parameter]:
    out: List[nn.Parameter] = []
    for m in modules:
        if m is not None:
            out.extend(m.parameters())
    return out
