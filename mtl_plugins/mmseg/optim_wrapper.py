"""``MTLOptimWrapper``: MMEngine's ``OptimWrapper`` driven by per-task losses.

Config::

    optim_wrapper = dict(
        type='MTLOptimWrapper',
        optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=5e-4),
        clip_grad=None,
        mtl=dict(tasks=['seg', 'depth'],
                 allocation=dict(mode='ista', k=1, seed=0),   # ft | sta | ista | gap (+gap=G)
                 balancer='uncertainty',                      # or dict(type=..., ...)
                 aggregator=None,                             # or 'pcgrad', dict(type='cagrad', c=0.5)
                 level='parameter',                           # or 'representation'
                 task_reduction='sum'),
        amp=False)                                            # or True / dict(init_scale=...)

``update_params`` receives the :class:`~mtl_plugins.mmseg.segmentor.TaskLosses` returned by
``MultiTaskSegmentor.parse_losses`` (under mmengine's DDP wrapper too) and hands them to a
:class:`~mtl_plugins.core.controller.MTLController` (balancing → aggregation → ``.grad``).
It keeps ``OptimWrapper`` behaviour: gradient clipping in ``step``, ``accumulative_counts``
for the plain summed path, ``state_dict`` (the controller's state — learnable loss weights,
aggregator state, allocation RNG and ISTA position, loss scale — is saved under key ``mtl``).
The learnable balancing parameters are added to the optimizer as their own parameter group
(no weight decay).

Structure-changing methods (``docs/mmseg.md``) in ``mtl``:

- ``gradsplit=dict(modules=['backbone.layer4.*'], relation=None, split_norm_affine=False)``:
  GradSplit (paper 000) wraps the configured aggregator (or the plain sum) in
  :class:`~mtl_plugins.core.structure.GradSplit`; the layout is built at the first
  ``update_params`` from the model and the same shared-parameter list the engine receives.
- ``recon_search=dict(modules=None, S=-0.02, out='recon_ranking.json')``: Recon stage 1
  (paper 004) wraps the aggregator in a :class:`~mtl_plugins.core.structure.ConflictRecorder`
  (outermost: it sees every column of G); ``MTLHook`` writes the ranking (``out``, relative
  to the work dir) at each checkpoint and at the end of training.

Their state (relation, conflict counts) is in ``state_dict()['mtl']``; a checkpoint loaded
before the first step (``--resume``) is applied to them once they are built. A model with
``roaming`` (Maximum Roaming) has ``roaming.step()`` called after every optimizer step.

AMP has its own switch (``amp=True``): mmseg's ``tools/train.py --amp`` only converts a
plain ``OptimWrapper``. The forward then runs under ``autocast`` (``amp_dtype``, float16 by
default) and the engine scales each task loss, unscales the task gradients before
aggregation, and skips the optimizer step on overflow.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Dict, Iterator, Mapping, Optional

import torch
from mmengine.dist import get_rank
from mmengine.optim import OptimWrapper
from mmseg.registry import OPTIM_WRAPPERS
from torch import nn

from ..core.backward import BackwardResult
from ..core.controller import MTLController
from ..core.distributed import check_ddp_for_task_passes, has_sync_bn
from ..core.structure import ConflictRecorder
from ..core.structure.from_config import (CPUConflictRecorder, check_gradsplit_cfg,
                                          check_recon_search_cfg, structure_aggregator)
from ..core.structure.separate_optim import step_task_optimizers
from ..core.tasks import MTLConfigError

MTL_KEYS = ("tasks", "allocation", "balancer", "aggregator", "level", "task_reduction", "vjp",
            "gramian_kernel", "gradsplit", "recon_search", "check_exercised")
#: engine keys whose errors start with ``key=value``: named with their config path
_ENGINE_KEYS = ("level=", "task_reduction=", "vjp=", "gramian_kernel=")
_AGG = "aggregator."


@OPTIM_WRAPPERS.register_module()
class MTLOptimWrapper(OptimWrapper):
    """See the module docstring.

    Args:
        optimizer: the torch optimizer (built by mmengine from ``optimizer=dict(...)``).
        mtl: ``dict(tasks=[...], allocation=..., balancer=..., aggregator=..., level=...,
            task_reduction=...)``.
        amp: ``False``, ``True`` or ``DynamicLossScaler`` arguments.
        amp_dtype: ``"float16"`` or ``"bfloat16"`` for ``autocast``.
        accumulative_counts, clip_grad: as ``OptimWrapper``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, mtl: Mapping[str, Any],
                 amp: bool | Mapping[str, Any] = False, amp_dtype: str = "float16",
                 accumulative_counts: int = 1, clip_grad: Optional[dict] = None) -> None:
        super().__init__(optimizer, accumulative_counts=accumulative_counts, clip_grad=clip_grad)
        mtl = dict(mtl)
        unknown = sorted(set(mtl) - set(MTL_KEYS))
        if unknown:
            raise MTLConfigError(f"optim_wrapper.mtl: unknown key(s) {unknown}; expected "
                                 f"{list(MTL_KEYS)}")
        if "tasks" not in mtl:
            raise MTLConfigError("optim_wrapper.mtl.tasks is missing: list the model's tasks, "
                                 "e.g. tasks=['seg', 'depth']")
        if amp_dtype not in ("float16", "bfloat16"):
            raise MTLConfigError(f"optim_wrapper.amp_dtype={amp_dtype!r}: expected 'float16' "
                                 "or 'bfloat16'")
        gradsplit = mtl.pop("gradsplit", None)
        recon_search = mtl.pop("recon_search", None)
        try:
            self.controller = MTLController(mtl.pop("tasks"), amp=amp, rank=get_rank(), **mtl)
        except MTLConfigError as err:
            if str(err).startswith(_ENGINE_KEYS):
                raise MTLConfigError(f"optim_wrapper.mtl.{err}") from None
            raise
        self.controller.config_keys = {k: f"optim_wrapper.mtl.{k}" for k in
                                       ("balancer", "aggregator", "check_exercised")}
        self._gradsplit_cfg = None if gradsplit is None else check_gradsplit_cfg(
            gradsplit, self.controller.task_names, "optim_wrapper.mtl.gradsplit")
        self._recon_cfg = None if recon_search is None else check_recon_search_cfg(
            recon_search, "optim_wrapper.mtl.recon_search")
        self._structure_pending = self._gradsplit_cfg is not None or self._recon_cfg is not None
        self._pending_state: Optional[Dict[str, Any]] = None
        if self.controller.needs_post_step_losses:
            raise MTLConfigError(
                "optim_wrapper.mtl.balancer: FAMO with update='after_step' needs the losses "
                "recomputed on the same batch after each step, which MMEngine's train step "
                "does not do; use balancer=dict(type='famo', update='next_forward')")
        if (self.controller.aggregator is not None or self._structure_pending) and \
                accumulative_counts != 1:
            raise MTLConfigError(
                f"optim_wrapper.accumulative_counts={accumulative_counts}: gradient "
                "accumulation with an aggregator would aggregate each micro-batch separately; "
                "expected 1 (or aggregator=None)")
        self.amp = bool(amp)
        self.amp_dtype = getattr(torch, amp_dtype)
        extra = [p for p in self.controller.parameters() if p.requires_grad]
        if extra:
            self.optimizer.add_param_group({"params": extra, "weight_decay": 0.0})
        self.last_result: Optional[BackwardResult] = None
        # set by MTLHook.before_train once it checked it can drive the balancer
        self.balancer_driver: Optional[str] = None
        self._sync_bn: Optional[bool] = None

    # ------------------------------------------------------------------ forward context
    @contextmanager
    def optim_context(self, model: nn.Module) -> Iterator[None]:
        """``OptimWrapper``'s context, plus ``no_sync`` under DDP when an aggregator runs
        (the engine all-reduces the task gradients itself) and ``autocast`` with AMP."""
        with ExitStack() as stack:
            surgery = self.controller.aggregator is not None or self._structure_pending
            if hasattr(model, "no_sync"):
                if surgery:
                    check_ddp_for_task_passes(model, "model_wrapper_cfg")
                if surgery or not self.should_sync():
                    stack.enter_context(model.no_sync())
            if self.amp:
                device = "cuda" if torch.cuda.is_available() else "cpu"
                stack.enter_context(torch.autocast(device_type=device, dtype=self.amp_dtype))
            yield

    # ------------------------------------------------------------------ update
    def update_params(self, loss: Any, step_kwargs: Optional[Dict] = None,
                      zero_kwargs: Optional[Dict] = None) -> None:
        """Per-task backward through the controller, then ``step``/``zero_grad``."""
        from .segmentor import TaskLosses

        if not isinstance(loss, TaskLosses):
            raise MTLConfigError(
                "MTLOptimWrapper.update_params: expected the per-task losses of "
                f"MultiTaskSegmentor.parse_losses, got {type(loss).__name__}; use "
                "model=dict(type='MultiTaskSegmentor', ...) with this optimizer wrapper")
        ctl = self.controller
        if tuple(loss.tasks) != tuple(ctl.task_names):
            raise MTLConfigError(
                f"optim_wrapper.mtl.tasks={list(ctl.task_names)} does not match the model's "
                f"tasks {list(loss.tasks)}; use the same list, in the same order")
        if ctl.allocator.mode != "ft" and not loss.allocated:
            raise MTLConfigError(
                f"optim_wrapper.mtl.allocation.mode={ctl.allocator.mode!r} needs the "
                "allocation loop: set train_cfg=dict(type='MTLIterBasedTrainLoop', ...) or "
                "dict(type='MTLEpochBasedTrainLoop', ...)")
        if getattr(loss, "per_task_features", False) and ctl.engine.level == "representation":
            raise MTLConfigError(
                "optim_wrapper.mtl.level='representation' needs one shared feature tensor, "
                "but the model runs its backbone once per task (model.roaming / model.recon); "
                "use level='parameter'")
        driver = ctl.balancer.required_driver()
        if driver is not None and self.balancer_driver != driver:
            what = "epoch ends" if driver == "epoch_end" else "validation KPIs (kpi_metrics)"
            raise MTLConfigError(
                f"optim_wrapper.mtl.balancer={type(ctl.balancer).__name__}: its weights move "
                f"only on {what}, which reach it through the MTLHook; expected "
                "custom_hooks=[dict(type='MTLHook', ...)] (configs/mmseg/_base_/mtl_runtime.py)")
        if self._structure_pending:
            self._build_structure(loss)
            ctl = self.controller
        self._move_controller(loss)
        if self._sync_bn is None:  # after the runner's BN conversions, before the first step
            self._sync_bn = has_sync_bn(getattr(loss, "model", None))
        ctl.engine.sync_bn = self._sync_bn
        # (mmengine divides by a loss factor of 1 without accumulation: no op per task then)
        losses = {t: self.scale_loss(v) for t, v in loss.items()} \
            if self._accumulative_counts != 1 else dict(loss)
        keepalive = getattr(loss, "keepalive", None)
        self.last_result = ctl.backward(losses, loss.shared_params, loss.task_params,
                                        features=loss.features, keepalive=keepalive)
        self._inner_count += 1
        stepped = False
        if self.should_update():
            if not (self.last_result.found_inf or self.last_result.empty):
                # gradsplit.separate_optimizers: each task's step with its own state
                if not step_task_optimizers(self.optimizer, ctl.aggregator, losses,
                                            loss.shared_params, loss.task_params,
                                            step=lambda: self.step(**(step_kwargs or {}))):
                    self.step(**(step_kwargs or {}))
                stepped = True
            self.zero_grad(**(zero_kwargs or {}))
        ctl.after_step(loss, stepped=stepped)
        roaming = getattr(getattr(loss, "model", None), "roaming", None)
        if stepped and roaming is not None:
            roaming.step()  # Maximum Roaming counts optimizer steps (skipped steps do not)

    # ------------------------------------------------------------------ structure methods
    def _build_structure(self, loss: Any) -> None:
        """GradSplit / Recon search around the configured aggregator, once, with the model
        and the engine's shared parameters of the first step."""
        model = getattr(loss, "model", None)
        if model is None:
            raise MTLConfigError(
                "optim_wrapper.mtl.gradsplit/recon_search need the model's module tree: the "
                "losses must come from MultiTaskSegmentor.parse_losses (TaskLosses.model)")
        ctl = self.controller
        agg = structure_aggregator(model, loss.shared_params, ctl.task_names, ctl.aggregator,
                                   gradsplit=self._gradsplit_cfg, recon_search=self._recon_cfg,
                                   key="optim_wrapper.mtl")
        ctl.set_aggregator(agg)  # a submodule of the controller: in its state_dict
        self._structure_pending = False
        if self._pending_state is not None:
            agg.load_state_dict(self._pending_state)
            self._pending_state = None

    @property
    def conflict_recorder(self) -> Optional[ConflictRecorder]:
        """The Recon search's recorder (``None`` before the first step or without it)."""
        agg = self.controller.aggregator
        return agg if isinstance(agg, ConflictRecorder) else None

    @property
    def recon_search_out(self) -> Optional[str]:
        return None if self._recon_cfg is None else self._recon_cfg["out"]

    def _move_controller(self, loss: Any) -> None:
        device = loss.shared_params[0].device
        pinned = set()
        for m in self.controller.modules():
            if isinstance(m, CPUConflictRecorder):
                pinned.update(id(b) for b in m.buffers(recurse=False))
        if any(p.device != device for p in self.controller.parameters()) or any(
                b.device != device for b in self.controller.buffers() if id(b) not in pinned):
            self.controller.to(device)

    def zero_grad(self, **kwargs) -> None:
        kwargs.setdefault("set_to_none", True)
        self.optimizer.zero_grad(**kwargs)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["mtl"] = self.controller.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        mtl = state_dict.pop("mtl", None)
        if mtl is not None:
            if self._structure_pending:
                self._load_before_structure(mtl)
            else:
                self.controller.load_state_dict(mtl)
        super().load_state_dict(state_dict)

    def _load_before_structure(self, mtl: Mapping[str, Any]) -> None:
        """Resume before the first step: the GradSplit/Recon aggregator does not exist yet;
        load everything else now and keep its state for :meth:`_build_structure`."""
        agg = {k[len(_AGG):]: v for k, v in mtl.items() if k.startswith(_AGG)}
        rest = {k: v for k, v in mtl.items() if not k.startswith(_AGG)}
        missing, unexpected = self.controller.load_state_dict(rest, strict=False)
        missing = [k for k in missing if not k.startswith(_AGG)]
        if missing or unexpected:
            raise RuntimeError(f"MTLOptimWrapper.load_state_dict: controller state mismatch "
                               f"(missing {missing}, unexpected {unexpected})")
        self._pending_state = agg or None
