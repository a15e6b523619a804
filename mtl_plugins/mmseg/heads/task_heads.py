"""Single-task decode heads for the non-segmentation dense tasks: depth, normals, edges.

They are mmseg ``FCNHead`` subclasses: the same conv stack and config keys (``in_channels``,
``channels``, ``num_convs``, ``kernel_size``, ``concat_input``, ``dilation``, ``in_index``,
``input_transform``, ``dropout_ratio``, ``norm_cfg``, ``act_cfg``, ``align_corners``,
``init_cfg``), the same ``loss(inputs, batch_data_samples, train_cfg) -> dict`` and
``predict(inputs, batch_img_metas, test_cfg) -> Tensor`` as every mmseg decode head, so they
plug into ``EncoderDecoder``-like segmentors next to a stock seg head (FCNHead, ASPPHead ...).

Differences from a seg head:

- the output has the task's channels (depth 1, normal 3, edge 1) and ``num_classes`` is
  fixed to that number (``loss_decode`` is not accepted: the loss is the task's own);
- the target is read from the task's data-sample field (``gt_depth_map``, ``gt_normal_map``,
  ``gt_edge_map``); the prediction is upsampled (bilinear) to the target size;
- the loss is one key, ``loss_depth`` / ``loss_normal`` / ``loss_edge``, times
  ``loss_weight``, pooled over the samples allocated to the task (metainfo ``mtl_alloc``;
  absent = every annotated sample). No allocated sample → a zero loss still connected to
  the graph;
- ``predict`` returns depth (raw), unit normals (L2-normalised) or edge logits at input size.
"""
from __future__ import annotations

from typing import List, Optional

from mmengine.model import BaseModule
from mmseg.models.decode_heads import FCNHead
from mmseg.models.utils import resize
from mmseg.registry import MODELS
from torch import Tensor

from ...core.tasks import MTLConfigError
from ...core.unit_vectors import unit_vectors
from ..fields import CHANNELS
from .targets import DEFAULT_LOSS_WEIGHTS, TaskLoss, stack_targets


class _DenseTaskHead(FCNHead):
    """FCNHead with a fixed task, its own dense loss and allocation-aware pooling."""

    task: str = ""

    def __init__(self, loss_weight: Optional[float] = None, **kwargs) -> None:
        cls = type(self).__name__
        if "loss_decode" in kwargs:
            raise MTLConfigError(f"{cls}: loss_decode is not supported; the loss is fixed "
                                 f"({TaskLoss(self.task).name}), scale it with loss_weight")
        ch = CHANNELS[self.task]
        for key in ("num_classes", "out_channels"):
            if kwargs.get(key, ch) != ch:
                raise MTLConfigError(f"{cls}: {key}={kwargs[key]!r}: a {self.task} head has "
                                     f"{ch} output channel(s)")
        kwargs["num_classes"] = ch
        kwargs["out_channels"] = ch
        kwargs["loss_decode"] = []  # no mmseg loss module: the task loss is computed here
        if ch == 1:
            kwargs.setdefault("threshold", 0.5)  # unused; silences BaseDecodeHead's warning
        super().__init__(**kwargs)
        self.loss_weight = float(DEFAULT_LOSS_WEIGHTS[self.task] if loss_weight is None
                                 else loss_weight)

    def _task_loss(self) -> TaskLoss:  # pragma: no cover - overridden
        raise NotImplementedError

    def loss_by_feat(self, seg_logits: Tensor, batch_data_samples) -> dict:
        return dense_task_loss(seg_logits, batch_data_samples, self._task_loss(),
                               self.loss_weight, self.align_corners)


def dense_task_loss(logits: Tensor, batch_data_samples, loss_fn: TaskLoss, weight: float,
                    align_corners: bool) -> dict:
    """``{loss name: weight * loss}`` of one task's prediction, pooled over allocated samples."""
    gt, mask = stack_targets(batch_data_samples, loss_fn.task, device=logits.device)
    if gt is not None:
        logits = resize(logits, size=gt.shape[2:], mode="bilinear", align_corners=align_corners)
    return {loss_fn.name: weight * loss_fn.masked(logits, gt, mask)}


@MODELS.register_module()
class DepthHead(_DenseTaskHead):
    """Depth regression head (L1 over valid pixels; 1 output channel, raw depth).

    Args:
        loss_weight: weight of ``loss_depth`` (default 1.0, survey NYUD).
        depth_invalid: GT value meaning "no depth" (0.0).
        max_depth: GT depths above it are invalid too (None: no bound); set it when the
            batch is padded with mmseg's ``seg_pad_val=255``.
        **kwargs: FCNHead / BaseDecodeHead arguments (``in_channels``, ``channels``, ...).
    """

    task = "depth"

    def __init__(self, loss_weight: Optional[float] = None, depth_invalid: float = 0.0,
                 max_depth: Optional[float] = None, **kwargs) -> None:
        self.depth_invalid = depth_invalid
        self.max_depth = max_depth
        super().__init__(loss_weight=loss_weight, **kwargs)

    def _task_loss(self) -> TaskLoss:
        return TaskLoss("depth", depth_invalid=self.depth_invalid, max_depth=self.max_depth)


@MODELS.register_module()
class NormalHead(_DenseTaskHead):
    """Surface-normal head (3 channels; the loss and ``predict`` L2-normalise the output).

    Args:
        loss_weight: weight of ``loss_normal`` (default 10.0, survey NYUD auxiliary weight).
        normal_loss: ``'l1'`` (survey: L1 on the normalised prediction, per valid element)
            or ``'cosine'`` (1 - cos per valid pixel).
    """

    task = "normal"

    def __init__(self, loss_weight: Optional[float] = None, normal_loss: str = "l1",
                 **kwargs) -> None:
        self.normal_loss = normal_loss
        TaskLoss("normal", normal_loss=normal_loss)  # validate early
        super().__init__(loss_weight=loss_weight, **kwargs)

    def _task_loss(self) -> TaskLoss:
        return TaskLoss("normal", normal_loss=self.normal_loss)

    def predict_by_feat(self, seg_logits: Tensor, batch_img_metas: List[dict]) -> Tensor:
        out = super().predict_by_feat(seg_logits, batch_img_metas)
        return unit_vectors(out)


@MODELS.register_module()
class EdgeHead(_DenseTaskHead):
    """Edge head (1 logit channel; weighted BCE with a fixed positive weight).

    Args:
        loss_weight: weight of ``loss_edge`` (default 50.0, survey NYUD/PASCAL weight).
        pos_weight: weight of edge pixels in the BCE (survey 0.95; non-edge pixels 0.05).
        edge_ignore: GT value that is ignored (255).
    """

    task = "edge"

    def __init__(self, loss_weight: Optional[float] = None, pos_weight: float = 0.95,
                 edge_ignore: int = 255, **kwargs) -> None:
        self.pos_weight = float(pos_weight)
        self.edge_ignore = edge_ignore
        TaskLoss("edge", edge_pos_weight=pos_weight)  # validate early
        super().__init__(loss_weight=loss_weight, **kwargs)

    def _task_loss(self) -> TaskLoss:
        return TaskLoss("edge", edge_pos_weight=self.pos_weight, edge_ignore=self.edge_ignore)


@MODELS.register_module()
class TaskHead(BaseModule):
    """Any mmseg decode head (ASPP, PSP, UPer, ...) as the head of a depth, normal or edge task.

    ``dict(type='TaskHead', task='depth', head=dict(type='ASPPHead', in_channels=2048,
    channels=256, dilations=(1, 12, 24, 36), ...))``: the inner head is built with the task's
    number of output channels and used for its features and upsampling; the loss is the
    task's own (the same as :class:`DepthHead` / :class:`NormalHead` / :class:`EdgeHead`), so
    the "DeepLab-like" per-task heads of MTI-Net's ResNet baselines (paper 001, NYUv2-40 and
    Cityscapes) are one config each.

    Args:
        task: ``'depth'``, ``'normal'`` or ``'edge'``.
        head: the inner mmseg decode-head config (its ``loss_decode`` is not used).
        loss_weight: default: the survey's weight for the task (depth 1, normal 10, edge 50).
        loss_cfg: task-loss options (``depth_invalid``, ``max_depth``, ``normal_loss``,
            ``edge_pos_weight``, ``edge_ignore``).
    """

    def __init__(self, task: str, head: dict, loss_weight: Optional[float] = None,
                 loss_cfg: Optional[dict] = None, init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if task not in ("depth", "normal", "edge"):
            raise MTLConfigError(f"TaskHead.task={task!r}: expected 'depth', 'normal' or "
                                 "'edge' (segmentation uses the mmseg head directly)")
        ch = CHANNELS[task]
        inner = dict(head, num_classes=ch, out_channels=ch)
        if ch == 1:
            inner.setdefault("threshold", 0.5)
        self.task = task
        self.head = MODELS.build(inner)
        self.align_corners = self.head.align_corners
        self.task_loss = TaskLoss(task, **dict(loss_cfg or {}))
        self.loss_weight = float(DEFAULT_LOSS_WEIGHTS[task] if loss_weight is None
                                 else loss_weight)

    def forward(self, inputs: List[Tensor]) -> Tensor:
        return self.head(inputs)

    def loss(self, inputs: List[Tensor], batch_data_samples, train_cfg=None) -> dict:
        return dense_task_loss(self.forward(inputs), batch_data_samples, self.task_loss,
                               self.loss_weight, self.align_corners)

    def predict(self, inputs: List[Tensor], batch_img_metas: List[dict], test_cfg=None) -> Tensor:
        out = self.head.predict(inputs, batch_img_metas, test_cfg)
        return unit_vectors(out) if self.task == "normal" else out
