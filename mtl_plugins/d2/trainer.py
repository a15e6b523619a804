"""``MTLTrainer``: detectron2's ``SimpleTrainer`` driven by an :class:`MTLController`.

Per trainer iteration, which is one optimizer step in every allocation mode,
:meth:`MTLTrainer.run_step`

1. when the allocator wants a new batch (FT/STA: every iteration; ISTA: after the
   ``ceil(T/k)`` sub-steps of the previous one; ``mode="gap"``: see
   :mod:`mtl_plugins.core.allocation`), draws the next data batch, reads which tasks each
   image is annotated for (``"mtl_tasks"`` of each input, a tuple of task names; absent = all
   tasks) and draws its allocation plan, whose sub-step count is agreed over the DDP ranks
   (every rank makes the largest number of sub-steps of any rank: the extra sub-steps of a
   rank whose plan is shorter allocate nothing, see below); the batch is held in memory
   while it has sub-steps left;
2. trains the step the allocator names (a sub-step of a new or of a held batch): tags each
   input with ``"mtl_alloc"`` (its allocated tasks), runs the forward
   (:class:`~mtl_plugins.d2.modeling.MTLGeneralizedRCNN` restricts every loss to the images
   allocated to its task), sums the loss dict per task (``MTL.TASK_LOSSES``), calls
   ``controller.backward(losses, shared_params, task_params, keepalive=...)`` (balancing,
   gradient aggregation, AMP), makes a real ``optimizer.step()`` unless a gradient
   overflowed or no rank had any task (``result.empty``), and ``controller.after_step(losses)``.
   ISTA's sub-steps reuse the same batch (same augmented tensors).

A (sub-)step where no image of this rank has any task still runs the backward under DDP:
an empty ``losses`` and, as ``keepalive``, the zero losses of the absent tasks (connected
to their heads), so that every rank joins every collective and DDP's backward reaches every
parameter. A single process skips such a step (no optimizer step; metrics and
``after_step`` as for any step).

Parameters: the backbone (with the FPN) is shared; every other module belongs to the task
of the losses it produces (:func:`split_task_parameters`): RPN → task of ``loss_rpn_*``
(``detection`` by default), box head and predictor → task of ``loss_cls``/``loss_box_reg``,
mask head → task of ``loss_mask``, keypoint head → ``loss_keypoint``, semantic head →
``loss_sem_seg``. A module whose losses span several tasks is shared. Recon's per-task copies
(``MTL.RECON``) belong to their task.

Maximum Roaming (``MTL.ROAMING``): after every real optimizer step (ISTA: every sub-step; not
after a step skipped for an AMP overflow) the trainer calls the model's
``after_optimizer_step()``, which advances the roaming schedule.

Checkpoints: :class:`MTLCheckpointer` (used by :class:`MTLDefaultTrainer`) is detectron2's
``DetectionCheckpointer`` that also loads weights of the un-converted model into Recon's
copies, including model-zoo ``.pkl`` files matched by name heuristics.

``SOLVER.MAX_ITER`` (``train.max_iter``), the LR schedule (stepped by detectron2's
``LRScheduler`` hook after every iteration), ``SOLVER.CHECKPOINT_PERIOD``,
``TEST.EVAL_PERIOD`` and the iteration counter all count optimizer steps: an ISTA run of N
iterations makes N optimizer steps (N/2 batches with two tasks and ``k = 1``) and N scheduler
steps. Training stops at ``MAX_ITER`` even inside a batch's sub-steps.

Resume: the data of held batches is not checkpointed. A checkpoint written inside an ISTA
batch (or a gap block) holds its plan; the resumed trainer has no data for it, drops its
remaining sub-steps (a log line says so) and starts the next iteration with a new batch.
A checkpoint at a block boundary (``CHECKPOINT_PERIOD`` a multiple of ``ceil(T/k)·gap``
with fully annotated data) loses nothing.

The controller is owned by the trainer and saved in the trainer's ``state_dict`` under
``"mtl"`` (``DefaultTrainer``'s ``DetectionCheckpointer(..., trainer=...)`` writes it into
every checkpoint and ``resume_or_load(resume=True)`` restores it: learnable loss weights,
aggregator state, allocation RNG, loss scale). Its learnable parameters (e.g. uncertainty
weighting) are added to the optimizer as their own parameter group without weight decay.
"""
from __future__ import annotations

import logging
import os
import time
import weakref
from contextlib import ExitStack
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from detectron2.engine import DefaultTrainer, HookBase, SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import nn

from ..core.allocation import DROPPED_ON_RESUME, HeldBatches
from ..core.backward import BackwardResult
from ..core.controller import MTLController
from ..core.distributed import check_ddp_for_task_passes, has_sync_bn
from ..core.structure import ConflictRecorder
from ..core.structure.recon import route_pretrained, router_task_parameters, unrouted_state_dict
from ..core.structure.from_config import structure_aggregator
from ..core.structure.separate_optim import step_task_optimizers
from ..core.tasks import MTLConfigError
from .config import (build_mtl_controller, check_balancer_acts, group_task_losses,
                     loss_owner, structure_configs, task_loss_mapping)
from .events import mtl_scalars
from .inputs import allocate_inputs, available_tasks

#: module (attribute path of the meta-architecture) → the loss keys it produces
MODULE_LOSSES: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("proposal_generator", ("loss_rpn_cls", "loss_rpn_loc")),
    ("roi_heads.box_head", ("loss_cls", "loss_box_reg")),
    ("roi_heads.box_predictor", ("loss_cls", "loss_box_reg")),
    ("roi_heads.mask_head", ("loss_mask",)),
    ("roi_heads.keypoint_head", ("loss_keypoint",)),
    ("sem_seg_head", ("loss_sem_seg",)),
)


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (``model`` itself if none)."""
    return model.module if hasattr(model, "module") and hasattr(model, "no_sync") else model


def _get(module: nn.Module, path: str) -> Optional[nn.Module]:
    for part in path.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def split_task_parameters(model: nn.Module, mapping: Mapping[str, Sequence[str]]
                          ) -> Tuple[List[nn.Parameter], Dict[str, List[nn.Parameter]]]:
    """``(shared, {task: params})`` for a detectron2 R-CNN model (see the module docstring)."""
    model = unwrap_ddp(model)
    owner = loss_owner(mapping)
    task_params: Dict[str, List[nn.Parameter]] = {t: [] for t in mapping}
    assigned = set()
    for path, keys in MODULE_LOSSES:
        module = _get(model, path)
        if module is None:
            continue
        tasks = {owner[k] for k in keys if k in owner}
        if len(tasks) != 1:
            continue
        task = tasks.pop()
        for p in module.parameters():
            if p.requires_grad and id(p) not in assigned:
                assigned.add(id(p))
                task_params[task].append(p)
    for task, params in router_task_parameters(model, list(mapping)).items():
        for p in params:  # Recon's copies (paper 004, θ_t^cf): task-specific
            if p.requires_grad and id(p) not in assigned:
                assigned.add(id(p))
                task_params[task].append(p)
    shared = [p for p in model.parameters() if p.requires_grad and id(p) not in assigned]
    return shared, task_params


#: what :func:`check_allocation_model` asks for, by config system
ALLOCATION_MODEL = {
    "yacs": "MODEL.META_ARCHITECTURE: MTLGeneralizedRCNN (with MODEL.PROPOSAL_GENERATOR.NAME: "
            "MTLRPN and MODEL.ROI_HEADS.NAME: MTLStandardROIHeads)",
    "lazy": "model._target_=mtl_plugins.d2.MTLGeneralizedRCNN (with MTLRPN and "
            "MTLStandardROIHeads)",
}


def check_allocation_model(model: nn.Module, mode: str, mode_key: str, source: str) -> None:
    """Refuse STA/ISTA (``mode`` at config key ``mode_key``) with a model that ignores the
    allocation (no ``mtl_task_losses``, e.g. detectron2's ``GeneralizedRCNN``: each loss
    covers every image, and a task trains whenever any image has it: random whole-task
    dropout instead of per-image allocation). ``source`` (``"yacs"`` or ``"lazy"``) picks how
    the error spells the model to use."""
    model = unwrap_ddp(model)
    if mode != "ft" and getattr(model, "mtl_task_losses", None) is None:
        raise MTLConfigError(
            f"{mode_key}={mode!r} needs a model that restricts its losses to the allocated "
            f"images; model is {type(model).__name__}, expected {ALLOCATION_MODEL[source]}")


def absent_term(task_losses: Mapping[str, torch.Tensor],
                present: Mapping[str, torch.Tensor]) -> Optional[torch.Tensor]:
    """The sum of the losses of the tasks absent from ``present`` (each a zero connected to
    its head): the engine's ``keepalive`` term, so that DDP's backward reaches every head;
    ``None`` when every task is present."""
    absent = [v.reshape(()) for t, v in task_losses.items() if t not in present]
    return torch.stack(absent).sum() if absent else None


class MTLTrainer(SimpleTrainer):
    """See the module docstring.

    Args:
        model, data_loader, optimizer: as :class:`SimpleTrainer` (the model may be DDP).
        controller: the :class:`MTLController` (its tasks are the keys of ``task_losses``).
        task_losses: ``{task: loss keys}`` (:func:`~mtl_plugins.d2.config.task_loss_mapping`).
        amp_dtype: ``autocast`` dtype when the controller has a loss scaler.
    """

    def __init__(self, model: nn.Module, data_loader, optimizer: torch.optim.Optimizer,
                 controller: MTLController, task_losses: Mapping[str, Sequence[str]],
                 amp_dtype: torch.dtype = torch.float16, gradsplit: Optional[dict] = None,
                 recon_search: Optional[dict] = None) -> None:
        super().__init__(model, data_loader, optimizer)
        if tuple(task_losses) != tuple(controller.task_names):
            raise MTLConfigError(
                f"MTL.TASK_LOSSES covers tasks {list(task_losses)}, the controller has "
                f"{list(controller.task_names)}; expected the same tasks in the same order")
        if controller.needs_post_step_losses:
            raise MTLConfigError(
                "MTL.BALANCER: FAMO with update='after_step' needs the losses recomputed after "
                "each step, which MTLTrainer does not do; use update='next_forward'")
        check_balancer_acts(controller, "MTL.BALANCER", "MTL.BALANCER_ARGS.period")
        self.controller = controller
        self.task_losses = {t: tuple(k) for t, k in task_losses.items()}
        self.amp_dtype = amp_dtype
        device = next(unwrap_ddp(model).parameters()).device
        controller.to(device)
        self.shared_params, self.task_params = split_task_parameters(model, self.task_losses)
        if gradsplit is not None or recon_search is not None:  # wrap the aggregator (core)
            controller.set_aggregator(structure_aggregator(
                unwrap_ddp(model), self.shared_params, controller.task_names,
                controller.aggregator, gradsplit=gradsplit, recon_search=recon_search,
                key="MTL"))
        extra = [p for p in controller.parameters() if p.requires_grad]
        known = {id(p) for g in optimizer.param_groups for p in g["params"]}
        extra = [p for p in extra if id(p) not in known]
        if extra:
            optimizer.add_param_group({"params": extra, "weight_decay": 0.0})
        self._features: List[torch.Tensor] = []
        controller.engine.sync_bn = has_sync_bn(unwrap_ddp(model))
        check_level = getattr(unwrap_ddp(model), "check_level", None)
        if check_level is not None:
            check_level(controller.engine.level, "MTL.LEVEL")
        if controller.engine.level == "representation":
            backbone = getattr(unwrap_ddp(model), "backbone", None)
            if backbone is None:
                raise MTLConfigError("MTL.LEVEL='representation' needs a model with a "
                                     "`backbone` whose outputs all heads start from")
            backbone.register_forward_hook(self._record_features)
        self.last_result = None
        self._held = HeldBatches(controller.allocator)

    # ------------------------------------------------------------------ helpers
    def _record_features(self, module, inputs, output) -> None:
        if module.training:
            values = output.values() if isinstance(output, Mapping) else [output]
            self._features = [v for v in values if isinstance(v, torch.Tensor)]

    def _forward_context(self) -> ExitStack:
        stack = ExitStack()
        ctl = self.controller
        if hasattr(self.model, "no_sync") and (ctl.aggregator is not None
                                               or ctl.engine.level == "representation"):
            check_ddp_for_task_passes(self.model, "train.ddp")
            stack.enter_context(self.model.no_sync())  # the engine all-reduces itself
        if ctl.loss_scaler is not None:
            device = next(unwrap_ddp(self.model).parameters()).device.type
            stack.enter_context(torch.autocast(device_type=device, dtype=self.amp_dtype))
        return stack

    # ------------------------------------------------------------------ the step
    def run_step(self) -> None:
        """One optimizer step: a sub-step of a new or held batch (see the module doc)."""
        assert self.model.training, "[MTLTrainer] model was changed to eval mode!"
        ctl = self.controller
        tasks = ctl.task_names
        if self._held.drop_lost():
            logging.getLogger(__name__).info(DROPPED_ON_RESUME)
        data_time = 0.0
        if ctl.allocator.wants_batch:
            start = time.perf_counter()
            batch = next(self._data_loader_iter)
            data_time = time.perf_counter() - start
            self._held.add(batch, available_tasks(batch, tasks), agree=self._agree)
        data, mask = self._held.next_step()
        self._features = []
        with self._forward_context():
            loss_dict = self.model(allocate_inputs(data, mask, tasks))
        task_losses = group_task_losses(loss_dict, self.task_losses)
        counts = mask.sum(0).tolist()
        losses = {t: task_losses[t] for t, c in zip(tasks, counts) if c > 0}
        self.optimizer.zero_grad(set_to_none=True)
        result = self._backward(losses, absent_term(task_losses, losses))
        self.last_result = result
        self._write_mtl_metrics(loss_dict, task_losses, counts, result, data_time)
        if not (result.found_inf or result.empty):
            # MTL.GRADSPLIT.SEPARATE_OPTIMIZERS: each task's step with its own state
            if not step_task_optimizers(self.optimizer, ctl.aggregator, losses,
                                        self.shared_params, self.task_params):
                self.optimizer.step()
            self._after_optimizer_step()
        ctl.after_step(losses, stepped=not (result.found_inf or result.empty))
        self._features = []

    def _agree(self, n_steps: int) -> int:
        """The sub-steps of a new batch on every rank: the most any rank's plan has (ISTA:
        ``ceil(T_i / k)`` depends on the tasks the rank's images are annotated for; every rank
        must make as many backward passes and optimizer steps). ``n_steps`` in a single
        process."""
        if comm.get_world_size() == 1:
            return n_steps
        device = next(unwrap_ddp(self.model).parameters()).device
        count = torch.tensor([n_steps], device=device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        return int(count.item())

    def _backward(self, losses: Dict[str, torch.Tensor],
                  keepalive: Optional[torch.Tensor]) -> BackwardResult:
        """``controller.backward`` of one (sub-)step. Under DDP every rank calls it, also
        with no task (``losses`` empty: the engine joins the collectives and ``keepalive``
        keeps the absent heads in DDP's backward); a single process with no task has
        nothing to train and gets an empty result (the optimizer step is skipped), after
        calling the balancer as every step does (RLW draws its weights there)."""
        if not losses and comm.get_world_size() == 1:
            self.controller.balanced_losses(losses, self.shared_params)
            return BackwardResult([], empty=True)
        return self.controller.backward(losses, self.shared_params, self.task_params,
                                        features=self._features or None, keepalive=keepalive)

    def _after_optimizer_step(self) -> None:
        """The model's hook after a real optimizer step (Maximum Roaming's schedule)."""
        hook = getattr(unwrap_ddp(self.model), "after_optimizer_step", None)
        if hook is not None:
            hook()

    def _write_mtl_metrics(self, loss_dict, task_losses, counts, result, data_time) -> None:
        if not result.found_inf:  # detectron2's own logging (raises on a non-finite loss)
            self._write_metrics(loss_dict, data_time)
        if not comm.is_main_process():
            return
        scalars = mtl_scalars(self.controller, task_losses, counts, result)
        get_event_storage().put_scalars(**scalars, smoothing_hint=False)

    # ------------------------------------------------------------------ state
    def state_dict(self):
        ret = super().state_dict()
        ret["mtl"] = self.controller.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "mtl" in state_dict:
            self.controller.load_state_dict(state_dict["mtl"])


class MTLDefaultTrainer(DefaultTrainer):
    """``DefaultTrainer`` whose inner trainer is :class:`MTLTrainer` built from ``cfg.MTL``.

    ``DefaultTrainer`` hard-codes ``SimpleTrainer``/``AMPTrainer``; this subclass replaces it
    after construction (and rebuilds the LR scheduler when the controller added a parameter
    group). Evaluation, hooks and checkpointing are ``DefaultTrainer``'s.
    """

    def __init__(self, cfg) -> None:
        gradsplit, recon_search = structure_configs(cfg)
        # read by build_hooks(), which DefaultTrainer.__init__ calls
        self._recon_out = None if recon_search is None else os.path.join(
            cfg.OUTPUT_DIR, recon_search["out"])
        super().__init__(cfg)
        old = self._trainer
        groups = len(old.optimizer.param_groups)
        controller = build_mtl_controller(cfg)
        check_allocation_model(old.model, controller.allocator.mode, "MTL.ALLOCATION.MODE",
                               "yacs")
        # the upstream trainer's loader iterator (and its running workers) is reused: a new
        # iterator would start a second set of workers, and shutting the first set down
        # blocks for seconds per worker (DATALOADER.NUM_WORKERS > 0)
        self._trainer = MTLTrainer(old.model, old._data_loader_iter, old.optimizer,
                                   controller, task_loss_mapping(cfg),
                                   gradsplit=gradsplit, recon_search=recon_search)
        self._trainer.data_loader = old.data_loader
        del old
        if len(self._trainer.optimizer.param_groups) != groups:
            self.scheduler = self.build_lr_scheduler(self.cfg, self._trainer.optimizer)

    @property
    def controller(self) -> MTLController:
        return self._trainer.controller

    def build_hooks(self):
        """Upstream's hooks, plus the Recon search's ranking writer when it is on.

        (Called by ``DefaultTrainer.__init__`` right after it made ``self.checkpointer``,
        which becomes an :class:`MTLCheckpointer` here, before the checkpoint hook takes it.)
        """
        old = self.checkpointer
        self.checkpointer = MTLCheckpointer(old.model, old.save_dir,
                                            save_to_disk=old.save_to_disk,
                                            trainer=weakref.proxy(self))
        hooks = super().build_hooks()
        if self._recon_out is not None:
            hooks.append(ReconRankingWriter(self._recon_out, self.cfg.SOLVER.CHECKPOINT_PERIOD))
        return hooks

    @classmethod
    def build_train_loader(cls, cfg):
        """Upstream's loader, or the multi-dataset one (``MTL.MULTI_DATASET.ENABLED``)."""
        if cfg.MTL.MULTI_DATASET.ENABLED:
            from .multi_dataset import build_multi_dataset_train_loader

            return build_multi_dataset_train_loader(cfg)
        return super().build_train_loader(cfg)

    # detectron2 v0.6's DefaultTrainer checkpoints only the iteration and the hooks; main
    # also saves the inner trainer (optimizer). Do the latter, so the MTL state is saved.
    def state_dict(self):
        ret = super().state_dict()
        ret.setdefault("_trainer", self._trainer.state_dict())
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:  # (idempotent where DefaultTrainer already loaded it)
            self._trainer.load_state_dict(state_dict["_trainer"])


class MTLCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that loads weights of the un-converted model into Recon's
    per-task copies (paper 004: every copy starts from the pretrained module).

    Un-routed entries (``<m>.weight``) become every copy's (``<m>.copies.<t>.weight``) before
    fvcore's shape check and ``load_state_dict`` (the routers' own load hook does the same for
    a plain ``load_state_dict``). Files loaded by name-matching heuristics (model-zoo ``.pkl``,
    Caffe2, pycls) are first aligned against the un-converted model's names.
    """

    def _load_model(self, checkpoint):
        state = checkpoint.pop("model")
        if checkpoint.get("matching_heuristics", False):
            self._convert_ndarray_to_tensor(state)
            state = align_and_update_state_dicts(
                unrouted_state_dict(self.model), state,
                c2_conversion=checkpoint.get("__author__", None) == "Caffe2")
        return super()._load_model(dict(checkpoint, model=route_pretrained(self.model, state),
                                        matching_heuristics=False))


class ReconRankingWriter(HookBase):
    """Writes the Recon search's layer ranking (JSON) every ``period`` iterations and at the
    end of training, on the main process."""

    def __init__(self, path: str, period: int) -> None:
        self.path = path
        self.period = period

    def _write(self) -> None:
        # the MTLTrainer itself, or the one inside MTLDefaultTrainer
        recorder = getattr(self.trainer, "_trainer", self.trainer).controller.aggregator
        if comm.is_main_process() and isinstance(recorder, ConflictRecorder):
            recorder.to_json(self.path)

    def after_step(self) -> None:
        if self.period > 0 and (self.trainer.iter + 1) % self.period == 0:
            self._write()

    def after_train(self) -> None:
        self._write()
