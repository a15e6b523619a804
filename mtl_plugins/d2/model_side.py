"""Model-side MTL: the R-CNN runs the MTL step itself, under any detectron2 trainer.

:class:`ModelSideMTLRCNN` is :class:`~mtl_plugins.d2.modeling.MTLGeneralizedRCNN` holding its
own :class:`~mtl_plugins.core.controller.MTLController`, so that an unmodified trainer
(detectron2's ``SimpleTrainer`` / ``AMPTrainer``, e.g. upstream's
``tools/lazyconfig_train_net.py``) trains it with task allocation, loss balancing and gradient
surgery. Each training ``forward``:

1. finishes the previous step's bookkeeping (``controller.after_step``, Maximum Roaming's
   step) if still pending: normally a global optimizer step post-hook ran it right after the
   trainer's ``optimizer.step()``, on every rank (so a checkpoint written after the step
   holds it; a single process's ``state_dict()`` finishes a pending one too — not under DDP,
   where fvcore takes the state on rank 0 only and the bookkeeping runs collectives);
2. asks the allocator which batch this step trains: the trainer's batch when a new one is
   due (FT/STA: always; its plan is drawn), else a *held* one (ISTA: each of the next
   ``ceil(T/k) − 1`` forwards trains the held batch's next sub-step; ``mode="gap"``: the
   held block's replays, :mod:`mtl_plugins.core.allocation`), and then the batch the
   trainer passes is skipped — every trainer iteration is one optimizer step, so
   ``train.max_iter``, the LR schedule and the checkpoint/eval periods count optimizer steps
   as with :class:`~mtl_plugins.d2.trainer.MTLTrainer`;
3. runs the allocated forward and groups the loss dict per task;
4. without an aggregator: returns ``{"loss_mtl_<task>": λ_t l_t}`` (zero for absent tasks:
   the same keys every step), so the trainer's summed backward is the balanced loss;
   with an aggregator (paper-specified surgery, parameter or representation level): computes
   the task gradients and their aggregate itself (``controller.backward``), and returns the
   detached ``λ_t l_t`` plus ``"loss_mtl_surrogate"``: a term of value 0 whose gradient with
   respect to every trained parameter *is* the aggregate (:class:`GradientCarrier`). The
   trainer's ``zero_grad(); losses.backward(); optimizer.step()`` then applies the aggregate.

Under DDP the engine all-reduces the task gradients before aggregating (every rank holds the
same aggregate), and DDP's own all-reduce of the surrogate's gradients averages identical
values; without an aggregator each task's term is weighted by ``W / c_t`` (``c_t`` of the W
ranks have the task), so that DDP's mean is the engine's per-task rule. A rank whose batch
has no task runs the same step with empty losses (it joins every collective; its zero losses
keep every head in DDP's backward). A step where no image has any task gives, in a single
process, no gradient at all (the optimizer leaves the weights alone); under DDP, when no rank
has a task, every parameter gets a zero gradient (the trainer cannot be told to skip the
step, so momentum and weight decay still act).

Under ``AMPTrainer`` (``model.mtl.amp=True``) the task backward passes use the
controller's loss scaler; the surrogate multiplies by the ``GradScaler`` scale it receives,
which ``GradScaler`` divides out again; a step whose task gradients overflowed gives one
parameter an ``inf`` gradient, so that ``GradScaler`` skips it on every rank.

The controller's state (learnable weights, aggregator state, allocation RNG and ISTA
position, loss scale) is in the model's ``state_dict`` (``mtl_controller.*``, tensor-only for
``DetectionCheckpointer``), so checkpoints and ``--resume`` carry it. The ISTA batch held in
memory is not checkpointed: resuming mid-batch drops its remaining sub-steps (the held plans
are in the checkpoint; with no data for them, the first forward after the resume drops them
and trains the trainer's batch).
"""
from __future__ import annotations

import weakref
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..core.allocation import HeldBatches
from ..core.backward import BackwardResult, task_rank_counts
from ..core.controller import MTLController
from ..core.structure.from_config import structure_aggregator
from ..core.tasks import MTLConfigError
from .config import build_mtl_controller, group_task_losses, structure_configs
from .events import mtl_scalars
from .inputs import allocate_inputs, available_tasks
from .lazy import build_mtl_from_dict
from .modeling import MTLGeneralizedRCNN
from .trainer import split_task_parameters

SURROGATE_KEY = "loss_mtl_surrogate"
LOSS_PREFIX = "loss_mtl_"


#: a ``grad_output`` above this (``GradScaler``'s scale, which never overflows on the carrier
#: alone) is answered with non-finite gradients, so that ``GradScaler`` backs off
SCALE_LIMIT = 2.0 ** 64


class GradientCarrier(torch.autograd.Function):
    """``apply(grads, *params)``: a zero scalar whose backward gives ``params[i]`` the
    gradient ``grads[i] · grad_output`` (``None`` entries: no gradient).

    Under ``AMPTrainer``, ``grad_output`` is ``GradScaler``'s scale. The carried gradients are
    float32 and never overflow, so ``GradScaler`` would double its scale forever (to ``inf``
    after ~220k iterations, skipping every step from then on); a scale above
    :data:`SCALE_LIMIT` therefore yields non-finite gradients: that step is skipped and the
    scale halves (one skipped step per ``growth_interval`` once the limit is reached).
    """

    @staticmethod
    def forward(ctx, grads: List[Optional[torch.Tensor]], *params: torch.Tensor) -> torch.Tensor:
        ctx.grads = grads
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("the MTL surrogate loss was back-propagated twice; its "
                               "gradients are handed out once")
        factor = torch.where(grad_output.abs() > SCALE_LIMIT,
                             torch.full_like(grad_output, float("inf")), grad_output)
        scaled = [None if g is None else g.mul_(factor.to(g.dtype)) for g in grads]
        return (None, *scaled)


def _world_size() -> int:
    return comm.get_world_size()


@META_ARCH_REGISTRY.register()
class ModelSideMTLRCNN(MTLGeneralizedRCNN):
    """:class:`MTLGeneralizedRCNN` that runs the MTL step inside ``forward`` (see the module
    docstring).

    Args:
        mtl: the MTL settings: a dict with the keys of ``train.mtl`` in
            ``docs/d2_lazyconfig.md`` (``allocation``, ``balancer``, ``aggregator``, ``level``,
            ``task_reduction``, ``gradsplit``...) plus ``amp`` (the task backward passes
            run under autocast: ``train.amp.enabled=True``), or a built
            :class:`MTLController`.
        mtl_task_losses, **kwargs: as :class:`MTLGeneralizedRCNN`.
    """

    @configurable
    def __init__(self, *, mtl: Mapping[str, Any] | MTLController, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        gradsplit = None
        if isinstance(mtl, MTLController):
            controller = mtl
        else:
            cfg = dict(mtl)
            amp = cfg.pop("amp", False)
            if not isinstance(amp, bool):
                raise MTLConfigError(f"model.mtl.amp={amp!r}: expected True (the forward runs "
                                     "under autocast: train.amp.enabled=True) or False")
            if cfg.get("task_losses") is not None:
                raise MTLConfigError("model.mtl.task_losses: the model's loss groups are "
                                     "model.mtl_task_losses; leave model.mtl.task_losses out")
            if cfg.get("recon_search") is not None:
                raise MTLConfigError(
                    "model.mtl.recon_search: the Recon search writes its ranking from a "
                    "trainer hook; use train.mtl with tools/lazyconfig_train_net.py")
            cfg.setdefault("tasks", list(self.mtl_tasks))
            cfg["task_losses"] = {t: list(k) for t, k in self.mtl_task_losses.items()}
            controller, _, gradsplit, _ = build_mtl_from_dict(
                cfg, amp=amp, rank=comm.get_rank(), key="model.mtl")
        if tuple(controller.task_names) != self.mtl_tasks:
            raise MTLConfigError(
                f"model.mtl.tasks={list(controller.task_names)}; expected the tasks of "
                f"mtl_task_losses {list(self.mtl_tasks)} in the same order")
        self.check_level(controller.engine.level, "model.mtl.level")
        if controller.needs_post_step_losses:
            raise MTLConfigError("mtl (an MTLController): FAMO with update='after_step' needs "
                                 "the losses recomputed after the step; expected "
                                 "update='next_forward'")
        self.mtl_controller = controller
        self._split = self._split_parameters(gradsplit)
        self._held = HeldBatches(controller.allocator)
        self._pending: Optional[Dict[str, torch.Tensor]] = None
        self._skipped = False
        #: the engine's result of the last step with an aggregator (Gramian, loss scale)
        self.last_result: Optional[BackwardResult] = None
        self._features: List[torch.Tensor] = []
        if controller.engine.level == "representation":
            self.backbone.register_forward_hook(self._record_features)
        # the step's bookkeeping right after the optimizer step, on every rank (it runs
        # collectives under DDP), so that a checkpoint written after it includes it; a single
        # process also finishes it when saved (e.g. a step GradScaler skipped: no
        # optimizer.step). fvcore saves on rank 0 only: no collective may run there.
        ref = weakref.ref(self)
        self._step_hook = register_optimizer_step_post_hook(
            lambda optimizer, args, kwargs: _finish_step_of(ref))
        self.register_state_dict_pre_hook(lambda module, prefix, keep_vars:
                                          comm.get_world_size() == 1
                                          and module._finish_previous_step())

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["mtl"] = build_mtl_controller(cfg)
        if any(c is not None for c in structure_configs(cfg)):
            raise MTLConfigError("MTL.GRADSPLIT / MTL.RECON_SEARCH with ModelSideMTLRCNN: "
                                 "use MTLGeneralizedRCNN with tools/train_net.py")
        return ret

    # ------------------------------------------------------------------ parameters
    def _split_parameters(self, gradsplit: Optional[dict]):
        """``(shared, {task: params})`` without the controller's own parameters (parameter
        objects survive ``.to(device)``); GradSplit wraps the aggregator here, so that its
        state is in the model's state dict from the start (checkpoints load into a fresh
        model)."""
        own = {id(p) for p in self.mtl_controller.parameters()}
        shared, task_params = split_task_parameters(self, self.mtl_task_losses)
        shared = [p for p in shared if id(p) not in own]
        if gradsplit is not None:
            if gradsplit.get("separate_optimizers"):
                raise MTLConfigError(
                    "model.mtl.gradsplit.separate_optimizers=True: the per-task optimizer "
                    "steps are the trainer's; use train.mtl with tools/lazyconfig_train_net.py")
            ctl = self.mtl_controller
            ctl.set_aggregator(structure_aggregator(
                self, shared, ctl.task_names, ctl.aggregator, gradsplit=gradsplit,
                key="model.mtl"))
        return shared, task_params

    def _record_features(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if module.training:
            values = output.values() if isinstance(output, Mapping) else [output]
            self._features = [v for v in values if isinstance(v, torch.Tensor)]

    # ------------------------------------------------------------------ the step
    def forward(self, batched_inputs):
        if not self.training or not torch.is_grad_enabled():
            # evaluation, or a loss-only forward (e.g. a validation-loss hook): no MTL step
            return super().forward(batched_inputs)
        if any(isinstance(x, Mapping) and "mtl_alloc" in x for x in batched_inputs):
            raise MTLConfigError(
                "batched_inputs carry 'mtl_alloc' (an MTLTrainer allocates them) while the "
                "model allocates itself (ModelSideMTLRCNN); use MTLGeneralizedRCNN with "
                "MTLTrainer, or this model with a plain SimpleTrainer/AMPTrainer")
        self._finish_previous_step()
        self._check_autocast()
        ctl = self.mtl_controller
        data, mask = self._batch_of_step(batched_inputs)
        self._features = []
        loss_dict = super().forward(allocate_inputs(data, mask, ctl.task_names))
        task_losses = group_task_losses(loss_dict, self.mtl_task_losses)
        counts = [int(c) for c in mask.sum(0).tolist()]
        losses = {t: task_losses[t] for t, c in zip(ctl.task_names, counts) if c > 0}
        # the same keys every step and on every rank (detectron2 gathers the dicts by key);
        # an absent task's zero stays connected to its head (DDP expects every parameter)
        out = {LOSS_PREFIX + t: task_losses[t].reshape(()) * 0.0 for t in ctl.task_names}
        if not losses and _world_size() == 1:
            return self._empty_step(out, loss_dict, task_losses, counts)
        shared, task_params = self._split
        for p in self.parameters():  # stale gradients of the previous step
            p.grad = None
        if ctl.aggregator is None:
            result = None
            out.update(self._balanced(losses, shared))
        else:
            result = self._aggregated(losses, shared, task_params)
            out.update({LOSS_PREFIX + t: v for t, v in result.weighted_losses.items()})
            out = {k: v.detach() for k, v in out.items()}
            out[SURROGATE_KEY] = self._take_grads(self._overflow_marker(result))
        self._pending = {t: v.detach() for t, v in losses.items()}
        self._skipped = result is not None and (result.found_inf or result.empty)
        self._write_events(loss_dict, task_losses, counts, result)
        self._features = []
        return out

    def _empty_step(self, out: Dict[str, torch.Tensor], loss_dict, task_losses,
                    counts: List[int]) -> Dict[str, torch.Tensor]:
        """A single process's step where no image has any task: the losses are detached
        zeros and the surrogate gives no parameter a gradient, so the optimizer leaves every
        weight alone (momentum and weight decay included); ``after_step`` follows as for any
        step (the balancer is called, as every step), Maximum Roaming does not step."""
        self.mtl_controller.balanced_losses({}, self._split[0])
        self._write_events(loss_dict, task_losses, counts, None)
        self._pending, self._skipped = {}, True
        params = [p for p in self.parameters() if p.requires_grad]
        carrier = GradientCarrier.apply([None] * len(params), *params)
        return {**{k: v.detach() for k, v in out.items()}, SURROGATE_KEY: carrier}

    def _check_autocast(self) -> None:
        ctl = self.mtl_controller
        if ctl.aggregator is None:
            return  # one summed backward: the trainer's GradScaler scales it
        device = self.device.type
        autocast = torch.is_autocast_enabled(device)
        if ctl.loss_scaler is not None and not autocast:
            raise MTLConfigError("model.mtl.amp=True expects the forward under autocast "
                                 "(train.amp.enabled=True, AMPTrainer)")
        if autocast and ctl.loss_scaler is None and \
                torch.get_autocast_dtype(device) == torch.float16:
            raise MTLConfigError("model.mtl.amp=False under float16 autocast: the per-task "
                                 "backward passes would underflow unscaled; expected "
                                 "model.mtl.amp=True with train.amp.enabled=True")

    def _batch_of_step(self, batched_inputs: List[Mapping]
                       ) -> Tuple[List[Mapping], torch.Tensor]:
        """``(data, mask)`` of this step: the trainer's batch when the allocator wants a new
        one, else the next sub-step of a held batch (the trainer's batch is skipped)."""
        held = self._held
        held.drop_lost()  # resumed inside a batch: its data is gone
        if held.allocator.wants_batch:
            inputs = list(batched_inputs)
            held.add(inputs, available_tasks(inputs, self.mtl_controller.task_names))
        return held.next_step()

    def _finish_previous_step(self) -> None:
        if self._pending is None:
            return
        self.mtl_controller.after_step(self._pending, stepped=not self._skipped)
        if not self._skipped:
            self.after_optimizer_step()
        self._pending = None

    def _balanced(self, losses: Dict[str, torch.Tensor],
                  shared: List[nn.Parameter]) -> Dict[str, torch.Tensor]:
        """``{"loss_mtl_<task>": λ_t l_t}`` and the surrogate key (carrying any gradient the
        controller's parameters received in the forward; else a constant zero). Under DDP each task's term is
        weighted by ``W / c_t`` (``c_t`` of the W ranks have the task), so that DDP's mean over
        all ranks is the task's mean over the ranks that have it: the engine's rule
        (:mod:`mtl_plugins.core.backward`)."""
        weighted = self.mtl_controller.balanced_losses(losses, shared)
        world = _world_size()
        if world > 1:
            tasks = self.mtl_controller.task_names
            counts = dict(zip(tasks, task_rank_counts([t in weighted for t in tasks],
                                                      self.device)))
            weighted = {t: v * (world / counts[t]) for t, v in weighted.items()}
        out = {LOSS_PREFIX + t: v for t, v in weighted.items()}
        carried = self._take_grads(list(self.mtl_controller.parameters()), always=False)
        out[SURROGATE_KEY] = carried if carried is not None else \
            torch.zeros((), device=self.device)
        return out

    def _aggregated(self, losses: Dict[str, torch.Tensor], shared: List[nn.Parameter],
                    task_params: Dict[str, List[nn.Parameter]]) -> BackwardResult:
        """The engine's aggregate, written to ``.grad`` (float32 surgery outside autocast)."""
        with torch.autocast(self.device.type, enabled=False):
            result = self.mtl_controller.backward(losses, shared, task_params,
                                                  features=self._features or None)
        self.last_result = result
        return result

    def _overflow_marker(self, result: BackwardResult) -> List[nn.Parameter]:
        """The parameters to carry; after an overflow of the task gradients the smallest one
        gets an ``inf`` gradient instead of all: ``GradScaler`` then skips the step on every
        rank (no parameter moves, momentum and weight decay included) and backs off."""
        params = [p for p in self.parameters() if p.requires_grad]
        if result.found_inf:
            for p in params:
                p.grad = None
            smallest = min(params, key=lambda p: p.numel())
            smallest.grad = torch.full_like(smallest, float("inf"))
        return params

    def _take_grads(self, params: Sequence[nn.Parameter],
                    always: bool = True) -> Optional[torch.Tensor]:
        """Moves the ``.grad`` written during the forward into a :class:`GradientCarrier`
        term (the trainer zeroes ``.grad`` before its backward). Under DDP every parameter
        gets a gradient (zeros where none), as DDP's reducer waits for all of them."""
        params = [p for p in params if p.requires_grad]
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        if _world_size() > 1:
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        if not params or (not always and all(g is None for g in grads)):
            return None
        return GradientCarrier.apply(grads, *params)

    def _write_events(self, loss_dict: Mapping[str, torch.Tensor],
                      task_losses: Mapping[str, torch.Tensor], counts: Sequence[int],
                      result: Optional[BackwardResult]) -> None:
        if not comm.is_main_process():
            return
        try:
            storage = get_event_storage()
        except AssertionError:  # called outside a trainer
            return
        scalars = mtl_scalars(self.mtl_controller, task_losses, counts, result)
        scalars.update({k: float(v.detach()) for k, v in loss_dict.items()})
        storage.put_scalars(**scalars, smoothing_hint=False)


def _finish_step_of(ref: "weakref.ref[ModelSideMTLRCNN]") -> None:
    """The global optimizer step post-hook of one model: finish its pending MTL step (a
    no-op when none is pending, e.g. another optimizer of the process stepped)."""
    model = ref()
    if model is not None and model.training:
        model._finish_previous_step()
