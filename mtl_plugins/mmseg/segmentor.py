"""A multi-task segmentor for MMSegmentation 1.x: one backbone (+ neck), one head per task.

``MultiTaskSegmentor`` is mmseg's ``EncoderDecoder`` generalised to several dense tasks
(semantic segmentation, depth, surface normals, edges):

- ``decode_heads=dict(seg=..., depth=...)``: one independent head per task (any mmseg decode
  head for ``seg``; ``DepthHead``/``NormalHead``/``EdgeHead`` of ``mtl_plugins.mmseg.heads``),
- or ``decoder=dict(type='PADNetHead'|'MTINetHead', tasks=...)``: one decoder-focused head
  that predicts every task jointly (survey 003, Sec. 2.3).

Training (``loss``): every task's loss keys carry the prefix ``"<task>."``. Allocation is
applied by *label masking*: for a sample not allocated task t this step (metainfo
``mtl_alloc``, set by :class:`~mtl_plugins.mmseg.loops.MTLIterBasedTrainLoop`) or not
annotated for it (``mtl_tasks``), the task's ground truth is replaced by its ignore value
before the head computes its loss, so any pixel-pooled mmseg loss becomes the mean over the
allocated samples (paper 001, notes A.8). A task allocated to no sample of the batch has no
loss this step; under DDP its head still runs (every head on every rank, in the same order:
SyncBN heads run their collectives alike and DDP's backward reaches every parameter), and its
output enters the backward as a zero-weighted ``keepalive`` term. A single process skips it.
Segmentation losses must average over non-ignored pixels (``avg_non_ignore=True`` for mmseg's
``CrossEntropyLoss``), otherwise masked samples still count in the denominator: the segmentor
refuses such a config.

``parse_losses`` returns a :class:`TaskLosses` dict ``{task: scalar}`` (mmseg's logging is
unchanged), carrying the shared and task-specific parameters and the shared features, which
:class:`~mtl_plugins.mmseg.optim_wrapper.MTLOptimWrapper` hands to the core backward engine.
This is the interception point that holds under mmengine's DDP wrapper too (its
``train_step`` calls the module's ``parse_losses``).

Inference (``predict``): fills ``pred_sem_seg``/``seg_logits`` (seg), ``pred_depth_map``,
``pred_normal_map`` and ``pred_edge_map`` in each ``SegDataSample``, at the original image
size, undoing padding and test-time flips (flipping normals back negates their x or y).

Structure-changing methods (``docs/mmseg.md``, "Structure-changing methods"):

- ``roaming=dict(layers=[...], p=0.5, interval_epochs=0.1)``: Maximum Roaming (paper 002),
  built as the submodule ``roaming`` (its masks, visited sets, counter and RNG are in the
  model's checkpoint); the optimizer wrapper calls ``roaming.step()`` after every optimizer
  step. Δ in epochs (default 0.1, the paper's) is converted to steps by ``MTLHook`` before
  training; ``interval=N`` gives it in optimizer steps.
- ``recon=dict(ranking='ranking.json', topk=2)`` or ``recon=dict(modules=[...])``: Recon
  stage 2 (paper 004): the named modules become per-task copies at build time; the copies are
  each task's task-specific parameters.

With either, the backbone (+ neck) runs once per task, under that task's masks/copies, in
``loss`` and in ``predict`` (T forward passes; no single shared feature tensor, so the
wrapper's ``level='representation'`` is refused).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from mmengine.dist import get_world_size
from mmengine.logging import print_log
from mmengine.structures import PixelData
from mmseg.models.segmentors.base import BaseSegmentor
from mmseg.models.utils import resize
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from torch import Tensor, nn

from ..compat.tensor_state import install_tensor_state
from ..core.structure import MaximumRoaming, TaskContext
from ..core.structure.from_config import build_recon, build_roaming
from ..core.structure.recon import copies_initialised_as_one
from ..core.structure.context import run_per_task
from ..core.tasks import MTLConfigError, check_task_names
from ..core.unit_vectors import unit_vectors
from .fields import (ALLOC_KEY, IGNORE_VALUES, PRED_FIELDS, SAMPLE_FIELDS, TASKS_KEY,
                     check_dense_tasks)


class TaskLosses(dict):
    """``{task: scalar loss}`` plus what the MTL optimizer wrapper needs for the backward.

    Attributes:
        shared_params: parameters shared by every task (backbone, neck, shared decoder part).
        task_params: ``{task: parameters used by that task only}``.
        features: the backbone/neck outputs every head starts from (representation level).
        tasks: every task the model trains (present or not this step): ``model.tasks`` plus a
            joint decoder's auxiliary tasks (``loss_tasks``).
        allocated: whether the batch carried allocation masks (``mtl_alloc``).
        model: the segmentor that produced the losses (for methods that need the module
            tree: GradSplit's layout, Recon's conflict search, Maximum Roaming's step).
        per_task_features: the backbone ran once per task (Maximum Roaming / Recon stage 2):
            ``features`` is ``None`` (no single shared representation).
        keepalive: under DDP, a zero-weighted scalar connected to the heads of the tasks
            without a loss this step (``None`` when every head has a loss).

    A plain ``OptimWrapper`` can still consume it: ``loss / n`` scales every task and
    ``backward()`` back-propagates the sum (Full Task training).
    """

    shared_params: List[nn.Parameter]
    task_params: Dict[str, List[nn.Parameter]]
    features: List[Tensor]
    tasks: Tuple[str, ...]
    allocated: bool
    model: Optional[nn.Module] = None
    per_task_features: bool = False
    keepalive: Optional[Tensor] = None

    def _with(self, values: Dict[str, Tensor]) -> "TaskLosses":
        out = TaskLosses(values)
        out.__dict__.update(self.__dict__)
        return out

    def total(self) -> Tensor:
        terms = [v.reshape(()) for v in self.values()]
        if self.keepalive is not None:
            terms.append(self.keepalive.reshape(()) * 0.0)
        return torch.stack(terms).sum()

    def __truediv__(self, factor: float) -> "TaskLosses":
        return self._with({t: v / factor for t, v in self.items()})

    def backward(self, **kwargs) -> None:
        self.total().backward(**kwargs)


def _task_prefix(key: str) -> str:
    return key.split(".", 1)[0]


def _zero_term(output) -> Tensor:
    """``0 ·`` the sum of every tensor in a (nested) head output: a zero that keeps the head
    in the graph with exactly zero gradients (no NaN from a loss over no valid pixel)."""
    if isinstance(output, Tensor):
        return output.float().sum() * 0.0
    values = output.values() if isinstance(output, Mapping) else output
    return torch.stack([_zero_term(v) for v in values]).sum()


@MODELS.register_module()
class MultiTaskSegmentor(BaseSegmentor):
    """One backbone (+ neck) and a head per dense task; see the module docstring.

    Args:
        backbone: mmseg backbone config.
        tasks: the model's task names (subset of ``seg``, ``depth``, ``normal``, ``edge``): the
            tasks it predicts. A joint decoder may train more (its auxiliary tasks, e.g.
            PAD-Net's normals and edges): ``loss_tasks`` lists every trained task, and the
            optimizer wrapper's ``mtl.tasks`` must equal it.
        decode_heads: ``{task: head config}`` with exactly the keys of ``tasks``.
        decoder: a joint multi-task decoder config (PAD-Net, MTI-Net) instead.
        neck: optional neck config.
        align_corners: for resizing predictions to the original size.
        roaming: Maximum Roaming, ``dict(layers=[names or patterns], p=0.5,
            interval_epochs=0.1 | interval=N, completion=1.0, init='exact', seed=0)``
            (``layers``: the modules whose output is masked, e.g. the norms
            ``'backbone.*.bn*'``).
        recon: Recon stage 2, ``dict(ranking='path.json', topk=2, init='copy')`` (a ranking
            of the search stage, ``optim_wrapper.mtl.recon_search``) or
            ``dict(modules=[names or patterns], init='copy')``.
    """

    def __init__(self, backbone: dict, tasks: Sequence[str],
                 decode_heads: Optional[Mapping[str, dict]] = None,
                 decoder: Optional[dict] = None, neck: Optional[dict] = None,
                 train_cfg: Optional[dict] = None, test_cfg: Optional[dict] = None,
                 data_preprocessor: Optional[dict] = None, align_corners: bool = False,
                 init_cfg: Optional[dict] = None, roaming: Optional[dict] = None,
                 recon: Optional[dict] = None) -> None:
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.tasks = check_dense_tasks(check_task_names(tasks, key="model.tasks"),
                                       key="model.tasks")
        self.backbone = MODELS.build(backbone)
        if neck is not None:
            self.neck = MODELS.build(neck)
        if (decode_heads is None) == (decoder is None):
            raise MTLConfigError(
                "model: give exactly one of decode_heads=dict(task=head, ...) or "
                f"decoder=dict(type=..., tasks=...); got decode_heads={decode_heads!r}, "
                f"decoder={decoder!r}")
        if decode_heads is not None:
            heads = dict(decode_heads)
            missing = [t for t in self.tasks if t not in heads]
            extra = [t for t in heads if t not in self.tasks]
            if missing or extra:
                raise MTLConfigError(
                    f"model.decode_heads: keys {sorted(heads)} do not match model.tasks "
                    f"{list(self.tasks)} (missing: {missing}, not a task: {extra})")
            self.decode_heads = nn.ModuleDict({t: MODELS.build(heads[t]) for t in self.tasks})
            self.decoder = None
            self.loss_tasks = self.tasks
            self._check_seg_loss_averaging()
        else:
            self.decode_heads = None
            self.decoder = MODELS.build(decoder)
            dec_tasks = tuple(getattr(self.decoder, "tasks", ()))
            missing = [t for t in self.tasks if t not in dec_tasks]
            if missing:
                raise MTLConfigError(
                    f"model.decoder: predicts tasks {list(dec_tasks)}, but model.tasks "
                    f"{list(self.tasks)} also needs {missing}")
            # auxiliary (deep-supervision-only) tasks train too: they are tasks of the loss
            self.loss_tasks = tuple(getattr(self.decoder, "loss_tasks", dec_tasks))
        self.train_cfg = train_cfg
        self.test_cfg = test_cfg
        self.align_corners = align_corners
        self._task_context: Optional[TaskContext] = None
        self._recon = None
        self.roaming: Optional[MaximumRoaming] = None
        if roaming is not None or recon is not None:
            self._build_structure(roaming, recon)
        # tensor-only state dict: mmengine broadcasts every entry of it from rank 0 after
        # init_weights under DDP, and Maximum Roaming's RNG and layer names are not tensors
        install_tensor_state(self)

    # ------------------------------------------------------------------ structure methods
    def _build_structure(self, roaming: Optional[dict], recon: Optional[dict]) -> None:
        key = "model.roaming" if roaming is not None else "model.recon"
        if self.decoder is not None:
            raise MTLConfigError(
                f"{key}: needs decode_heads=dict(task=head, ...) (one head per task reading "
                "its own task-conditioned features); a joint decoder is not supported")
        self._task_context = TaskContext(self.tasks)
        if recon is not None:  # first: roaming patterns may then reach into the copies
            self._build_recon(dict(recon))
        if roaming is not None:
            self._build_roaming(dict(roaming))

    def _build_roaming(self, cfg: dict) -> None:
        roaming = build_roaming(self, cfg, self.tasks, self._task_context, "model.roaming")
        self.roaming = roaming
        delta = (f"interval={roaming.interval} steps" if roaming.interval_epochs is None else
                 f"interval_epochs={roaming.interval_epochs} (converted to steps by MTLHook)")
        print_log(f"MaximumRoaming: {len(roaming.layer_names)} masked layers, p={roaming.p}, "
                  f"{delta}, {roaming.updates_to_finish()} roaming updates to finish",
                  logger="current")

    def _build_recon(self, cfg: dict) -> None:
        shared = self.mtl_parameters()[0]  # θ_sh before the conversion
        self._recon = build_recon(self, cfg, self.tasks, self._task_context, "model.recon",
                                  shared_params=shared)
        tr = self._recon
        print_log(f"Recon: {len(tr.converted)} module(s) made task-specific {tr.converted}; "
                  f"parameters {tr.params_before} -> {tr.params_after}: "
                  f"{tr.report.describe()}", logger="current")

    def init_weights(self) -> None:
        """mmengine's initialisation; Recon's ``init='copy'`` copies start identical, from the
        initialisation of the un-converted module (paper 004, Sec. 4; see
        :func:`~mtl_plugins.core.structure.recon.copies_initialised_as_one`)."""
        if self._recon is None:
            super().init_weights()
            return
        with copies_initialised_as_one(self):
            super().init_weights()

    @property
    def task_conditioned(self) -> bool:
        """The backbone runs once per task (Maximum Roaming and/or Recon stage 2)."""
        return self._task_context is not None

    @property
    def recon(self):
        """The :class:`~mtl_plugins.core.structure.recon.ReconTransform`, or ``None``."""
        return self._recon

    def _recon_task_params(self) -> Dict[str, List[nn.Parameter]]:
        if self._recon is None:
            return {}
        # looked up each time: a norm inside a copy may have been converted (SyncBN)
        return {t: [p for r in self._recon.routers.values() for p in r.copies[t].parameters()]
                for t in self.tasks}

    def task_features(self, inputs: Tensor, tasks: Optional[Sequence[str]] = None
                      ) -> Dict[str, List[Tensor]]:
        """``{task: backbone (+ neck) features}``, one forward per task under its
        masks/copies (requires ``roaming`` or ``recon``)."""
        if self._task_context is None:
            raise RuntimeError("task_features: the model has no roaming/recon; use "
                               "extract_feat")
        return run_per_task(self._task_context, lambda t: self.extract_feat(inputs), tasks)

    # ------------------------------------------------------------------ config checks
    def _check_seg_loss_averaging(self) -> None:
        head = self.decode_heads["seg"] if "seg" in self.decode_heads else None
        if head is None:
            return
        losses = head.loss_decode if isinstance(head.loss_decode, nn.ModuleList) else [head.loss_decode]
        for loss in losses:
            if getattr(loss, "avg_non_ignore", True) is False:
                raise MTLConfigError(
                    f"model.decode_heads.seg.loss_decode ({type(loss).__name__}): "
                    "avg_non_ignore=False averages over ignored pixels too, so masking "
                    "unallocated or unlabelled samples would shrink the loss; expected "
                    "avg_non_ignore=True")

    # ------------------------------------------------------------------ parameters
    def mtl_parameters(self) -> Tuple[List[nn.Parameter], Dict[str, List[nn.Parameter]]]:
        """``(shared, {task: task-only})`` split of the trainable parameters."""
        if self.decode_heads is not None:
            copies = self._recon_task_params()
            task_params = {t: [p for p in self.decode_heads[t].parameters() if p.requires_grad]
                           + [p for p in copies.get(t, ()) if p.requires_grad]
                           for t in self.tasks}
        else:
            task_params = {t: [p for p in ps if p.requires_grad]
                           for t, ps in self.decoder.task_parameters().items()
                           if t in self.loss_tasks}
        own = {id(p) for ps in task_params.values() for p in ps}
        shared = [p for p in self.parameters() if p.requires_grad and id(p) not in own]
        return shared, task_params

    # ------------------------------------------------------------------ features
    def extract_feat(self, inputs: Tensor) -> List[Tensor]:
        x = self.backbone(inputs)
        if self.with_neck:
            x = self.neck(x)
        return list(x)

    def encode_decode(self, inputs: Tensor, batch_img_metas: List[dict]) -> Dict[str, Tensor]:
        """Per-task raw predictions at input size."""
        if self._task_context is not None:
            return run_per_task(
                self._task_context,
                lambda t: self.decode_heads[t].predict(self.extract_feat(inputs),
                                                       batch_img_metas, self.test_cfg),
                self.tasks)
        x = self.extract_feat(inputs)
        if self.decoder is not None:
            preds = self.decoder.predict(x, batch_img_metas, self.test_cfg)
            return {t: preds[t] for t in self.tasks}
        return {t: self.decode_heads[t].predict(x, batch_img_metas, self.test_cfg)
                for t in self.tasks}

    # ------------------------------------------------------------------ allocation
    def _allocation(self, data_samples: List[SegDataSample]) -> Tuple[Dict[str, List[bool]], bool]:
        """``{task: [sample trains task]}`` and whether allocation masks were present."""
        allocated = any(ALLOC_KEY in ds.metainfo for ds in data_samples)
        out: Dict[str, List[bool]] = {}
        for t in self.loss_tasks:
            flags = []
            for ds in data_samples:
                annotated = t in ds.metainfo.get(TASKS_KEY, self.loss_tasks)
                chosen = t in ds.metainfo.get(ALLOC_KEY, self.loss_tasks)
                flags.append(annotated and chosen and SAMPLE_FIELDS[t] in ds)
            out[t] = flags
        return out, allocated

    def _masked_samples(self, data_samples: List[SegDataSample], task: str,
                        flags: List[bool]) -> List[SegDataSample]:
        """Copies of the samples whose ``task`` field is ignore-filled where not allocated.

        A copy shares the sample's metainfo values and other fields (the losses only read
        them): ``SegDataSample(metainfo=...)`` deep-copies the metainfo, ~0.1 ms a sample,
        which on a GPU was ~0.1 of a small mmseg STA step (docs/benchmarks.md)."""
        if all(flags):
            return data_samples
        field = SAMPLE_FIELDS[task]
        template = next(ds.get(field) for ds, f in zip(data_samples, flags) if f)
        out = []
        for ds, keep in zip(data_samples, flags):
            if keep:
                out.append(ds)
                continue
            masked = SegDataSample()
            for key, value in ds.metainfo_items():
                masked.set_field(value, key, field_type="metainfo")
            for other in ds.keys():
                masked.set_field(ds.get(other), other)
            shape = ds.get(field).data.shape if field in ds else template.data.shape
            like = template.data
            masked.set_field(PixelData(data=torch.full(shape, IGNORE_VALUES[task],
                                                       dtype=like.dtype, device=like.device)),
                             field)
            out.append(masked)
        return out

    # ------------------------------------------------------------------ training
    def loss(self, inputs: Tensor, data_samples: List[SegDataSample]) -> Dict[str, Tensor]:
        flags, allocated = self._allocation(data_samples)
        self._last_allocated = allocated
        present = [t for t in self.loss_tasks if any(flags[t])]
        distributed = get_world_size() > 1
        if not present and not distributed:
            raise ValueError(
                "MultiTaskSegmentor.loss: no sample of the batch is annotated and allocated "
                f"for any task of {list(self.loss_tasks)}; check the dataset's 'mtl_tasks' and the "
                "pipeline's annotation loading")
        # under DDP every head runs on every rank (module docstring); the absent ones only
        # feed the zero-weighted keepalive term
        run = self.loss_tasks if distributed else present
        losses: Dict[str, Tensor] = {}
        dormant: List[Tensor] = []
        if self._task_context is not None:  # Maximum Roaming / Recon: one trunk pass per task
            feats = self.task_features(inputs, run)
            self._last_features = None
            if self.roaming is not None:  # a mask that did not act is a config error
                self.roaming.check_applied("model.roaming")
        else:
            x = self.extract_feat(inputs)
            self._last_features = x
            feats = {t: x for t in run}
        if self.decoder is not None:
            samples = data_samples
            for t in present:
                samples = self._masked_samples(samples, t, flags[t])
            for key, value in self.decoder.loss(x, samples, self.train_cfg).items():
                if _task_prefix(key) in present:
                    losses[key] = value
                elif "loss" in key:
                    dormant.append(value)
        else:
            for t in run:
                if t not in present:
                    dormant.append(_zero_term(self.decode_heads[t].forward(feats[t])))
                    continue
                head_losses = self.decode_heads[t].loss(
                    feats[t], self._masked_samples(data_samples, t, flags[t]), self.train_cfg)
                for key, value in head_losses.items():
                    losses[f"{t}.{key}"] = value
        self._last_keepalive = _zero_term(dormant) if dormant else None
        return losses

    def parse_losses(self, losses: Dict[str, Tensor]) -> Tuple[TaskLosses, Dict[str, Tensor]]:
        """mmseg's logging, and the per-task losses for the MTL optimizer wrapper."""
        keepalive = getattr(self, "_last_keepalive", None)
        self._last_keepalive = None
        # a DDP rank whose batch has no task logs a zero loss (mmengine needs a 'loss' entry)
        _, log_vars = super().parse_losses(losses or {"loss": torch.zeros(())})
        grouped: Dict[str, List[Tensor]] = {}
        for key, value in losses.items():
            if "loss" not in key:
                continue
            task = _task_prefix(key)
            if task not in self.loss_tasks:
                raise MTLConfigError(
                    f"loss key {key!r}: its prefix {task!r} is not a task of the model "
                    f"{list(self.loss_tasks)}; task heads must prefix their loss keys with "
                    "'<task>.'")
            values = value if isinstance(value, (list, tuple)) else [value]
            grouped.setdefault(task, []).extend(v.mean() for v in values)
        task_losses = TaskLosses({t: torch.stack(v).sum() for t, v in grouped.items()})
        for t, v in task_losses.items():
            log_vars[f"{t}.loss"] = v.detach()
        shared, task_params = self.mtl_parameters()
        task_losses.shared_params = shared
        task_losses.task_params = task_params
        task_losses.features = getattr(self, "_last_features", [])
        task_losses.tasks = self.loss_tasks
        task_losses.allocated = getattr(self, "_last_allocated", False)
        task_losses.model = self
        task_losses.per_task_features = self._task_context is not None
        task_losses.keepalive = keepalive
        self._last_features = []
        return task_losses, log_vars

    # ------------------------------------------------------------------ inference
    def predict(self, inputs: Tensor, data_samples: Optional[List[SegDataSample]] = None
                ) -> List[SegDataSample]:
        if data_samples is not None:
            metas = [ds.metainfo for ds in data_samples]
        else:
            metas = [dict(ori_shape=inputs.shape[2:], img_shape=inputs.shape[2:],
                          pad_shape=inputs.shape[2:], padding_size=[0, 0, 0, 0])] * inputs.shape[0]
        if self.test_cfg is not None and self.test_cfg.get("mode", "whole") != "whole":
            raise MTLConfigError(f"model.test_cfg.mode={self.test_cfg.get('mode')!r}: only "
                                 "'whole' inference is supported by MultiTaskSegmentor")
        preds = self.encode_decode(inputs, metas)
        return self.postprocess_multi(preds, data_samples, metas)

    def _restore(self, pred: Tensor, meta: dict, task: str) -> Tensor:
        """Crop padding, undo a test-time flip, resize to the original shape ([C, H, W])."""
        _, _, h, w = pred.shape
        left, right, top, bottom = meta.get("img_padding_size", meta.get("padding_size", [0] * 4))
        pred = pred[:, :, top:h - bottom, left:w - right]
        if meta.get("flip", False):
            vertical = meta.get("flip_direction") == "vertical"
            pred = pred.flip(dims=(2,) if vertical else (3,))
            if task == "normal":
                pred = pred.clone()
                pred[:, 1 if vertical else 0] *= -1
        pred = resize(pred, size=meta["ori_shape"], mode="bilinear",
                      align_corners=self.align_corners, warning=False)
        return pred.squeeze(0)

    def postprocess_multi(self, preds: Dict[str, Tensor],
                          data_samples: Optional[List[SegDataSample]],
                          metas: List[dict]) -> List[SegDataSample]:
        n = next(iter(preds.values())).shape[0]
        if data_samples is None:
            data_samples = [SegDataSample() for _ in range(n)]
        for i, ds in enumerate(data_samples):
            for t, pred in preds.items():
                p = self._restore(pred[i:i + 1], metas[i], t)
                if t == "seg":
                    ds.set_data({"seg_logits": PixelData(data=p),
                                 "pred_sem_seg": PixelData(data=p.argmax(0, keepdim=True))})
                elif t == "normal":
                    ds.set_data({PRED_FIELDS[t]: PixelData(data=unit_vectors(p, dim=0))})
                elif t == "edge":
                    ds.set_data({PRED_FIELDS[t]: PixelData(data=p.sigmoid())})
                else:
                    ds.set_data({PRED_FIELDS[t]: PixelData(data=p)})
        return data_samples

    def _forward(self, inputs: Tensor, data_samples: Optional[List[SegDataSample]] = None
                 ) -> Dict[str, Tensor]:
        metas = [ds.metainfo for ds in data_samples] if data_samples is not None else [
            dict(img_shape=inputs.shape[2:])] * inputs.shape[0]
        return self.encode_decode(inputs, metas)
