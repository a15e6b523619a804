"""MMEngine hooks of the MTL optimizer wrapper's controller: balancing updates and logging.

``custom_hooks = [dict(type='MTLHook', log_interval=50, kpi_metrics=None)]``:

- after every training epoch: the balancer's epoch update (DWA's loss ratios). For
  iteration-based runs DWA takes ``period=N`` iterations instead (``balancer.period``);
- after every validation: DTP's KPIs from the validation metrics, ``kpi_metrics={task:
  metric_name}`` mapping a task to a metric in percent (e.g. ``seg='seg/mIoU'``,
  ``depth='depth/delta1'``), divided by ``kpi_scale`` (default 100) into [0, 1];
- every ``log_interval`` iterations: each task's current weight (``train/mtl_weight/<task>``)
  and, when an aggregator ran, the pairwise cosine similarity of the task gradients
  (``train/mtl_cos/<a>-<b>``) from the Gramian the engine already computed (no extra cost).
  They go to ``runner.message_hub``, so the logger and every visualizer backend record them.
- Recon search (``optim_wrapper.mtl.recon_search``): the conflict ranking is written to
  ``out`` (relative to the work dir) at every checkpoint and at the end of training.
- Maximum Roaming with a plain ``OptimWrapper`` (no MTL wrapper): ``roaming.step()`` after
  each optimizer step (``MTLOptimWrapper`` does it itself).
- Maximum Roaming's Δ in epochs (``model.roaming.interval_epochs``, the default 0.1): before
  training, converted to optimizer steps from the train dataloader: ``len(dataset) /
  (batch_size · world_size · accumulative_counts)``, times ``ceil(T/k)`` under ISTA (its
  sub-steps are optimizer steps).
"""
from __future__ import annotations

import os
from typing import Dict, Optional

from mmengine.dist import get_world_size, is_main_process
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.runner import EpochBasedTrainLoop
from mmseg.registry import HOOKS

from ..core.allocation import steps_per_batch
from ..core.controller import MTLController
from ..core.structure.roaming import optimizer_steps_per_epoch
from ..core.tasks import MTLConfigError


def _controller(runner) -> Optional[MTLController]:
    return getattr(runner.optim_wrapper, "controller", None)


@HOOKS.register_module()
class MTLHook(Hook):
    """See the module docstring."""

    priority = "BELOW_NORMAL"

    def __init__(self, log_interval: int = 50, kpi_metrics: Optional[Dict[str, str]] = None,
                 kpi_scale: float = 100.0) -> None:
        self.log_interval = log_interval
        self.kpi_metrics = dict(kpi_metrics or {})
        self.kpi_scale = kpi_scale

    def before_train(self, runner) -> None:
        """Refuse a balancer this run cannot drive (DWA per epoch in an iteration loop, DTP
        without KPIs), then tell the optimizer wrapper that its driver is in place."""
        self._set_roaming_interval(runner)
        ctl = _controller(runner)
        if ctl is None:
            return
        driver = ctl.balancer.required_driver()
        if driver == "epoch_end" and not isinstance(runner.train_loop, EpochBasedTrainLoop):
            raise MTLConfigError(
                "optim_wrapper.mtl.balancer: DWA with period=None closes a period at every "
                f"epoch end, but train_cfg type {type(runner.train_loop).__name__} closes an "
                "epoch only when training ends; expected an epoch-based loop "
                "(MTLEpochBasedTrainLoop) or balancer=dict(type='dwa', period=<iterations>)")
        if driver == "kpis":
            self._check_kpi_source(runner, ctl.task_names)
        runner.optim_wrapper.balancer_driver = driver

    def _check_kpi_source(self, runner, tasks) -> None:
        if sorted(self.kpi_metrics) != sorted(tasks):
            raise MTLConfigError(
                f"custom_hooks MTLHook.kpi_metrics={self.kpi_metrics}: DTP needs a validation "
                f"metric for every task of {list(tasks)}, e.g. kpi_metrics=dict(seg='seg/mIoU', "
                "depth='depth/delta1', ...)")
        loop = runner.train_loop
        end = loop.max_epochs if isinstance(loop, EpochBasedTrainLoop) else loop.max_iters
        if runner._val_loop is None or loop.val_interval >= end:
            raise MTLConfigError(
                f"train_cfg.val_interval={loop.val_interval} (run length {end}): DTP takes its "
                "KPIs from validation, so it needs a val_dataloader/val_evaluator and a "
                "val_interval shorter than the run; otherwise its weights never leave "
                "init_weight")

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        ctl = _controller(runner)
        if ctl is None:
            self._step_roaming_plain(runner)
        if ctl is None or not self.every_n_train_iters(runner, self.log_interval):
            return
        hub = runner.message_hub
        for task, weight in ctl.current_weights().items():
            hub.update_scalar(f"train/mtl_weight/{task}", weight)
        result = getattr(runner.optim_wrapper, "last_result", None)
        cos = result.cosines() if result is not None else None
        if cos is not None:
            for i, a in enumerate(result.tasks):
                for j in range(i + 1, len(result.tasks)):
                    hub.update_scalar(f"train/mtl_cos/{a}-{result.tasks[j]}", float(cos[i, j]))

    @staticmethod
    def _set_roaming_interval(runner) -> None:
        """Maximum Roaming's Δ from epochs to optimizer steps (paper 002: c = ⌊E/Δ⌋)."""
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        roaming = getattr(model, "roaming", None)
        if roaming is None or roaming.interval_epochs is None:
            return
        loader = runner.train_dataloader
        batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None)
        ctl = _controller(runner)
        sub_steps = 1 if ctl is None else steps_per_batch(
            ctl.allocator.mode, ctl.allocator.num_tasks, ctl.allocator.k)
        try:
            spe = optimizer_steps_per_epoch(
                len(loader.dataset), batch_size, get_world_size(),
                int(getattr(runner.optim_wrapper, "_accumulative_counts", 1)), sub_steps)
        except MTLConfigError as e:
            raise MTLConfigError(f"model.roaming.interval_epochs={roaming.interval_epochs}: "
                                 f"cannot count the optimizer steps of an epoch of "
                                 f"train_dataloader ({e}); expected a sized dataset and a batch "
                                 "size, or Δ in optimizer steps (model.roaming.interval=N)") \
                from None
        steps = roaming.set_steps_per_epoch(spe)
        runner.logger.info(f"MaximumRoaming: Δ = {roaming.interval_epochs} epoch = {steps} "
                           f"optimizer steps ({spe:g} per epoch); "
                           f"{roaming.updates_to_finish()} roaming updates to finish the plan "
                           f"= {roaming.updates_to_finish() * steps} steps")

    @staticmethod
    def _step_roaming_plain(runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        roaming = getattr(model, "roaming", None)
        wrapper = runner.optim_wrapper
        if roaming is not None and getattr(wrapper, "should_update", lambda: True)():
            roaming.step()

    @staticmethod
    def write_recon_ranking(runner) -> Optional[str]:
        """Write the Recon search ranking (if the optimizer wrapper runs one); its path."""
        wrapper = runner.optim_wrapper
        recorder = getattr(wrapper, "conflict_recorder", None)
        if recorder is None:
            return None
        path = wrapper.recon_search_out
        if not os.path.isabs(path):
            path = os.path.join(runner.work_dir, path)
        if is_main_process():
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            recorder.to_json(path)
            runner.logger.info(f"Recon search: conflict ranking of {len(recorder.layers)} "
                               f"layers over {int(recorder.iterations)} iterations -> {path}")
        return path

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        self.write_recon_ranking(runner)

    def after_train(self, runner) -> None:
        self.write_recon_ranking(runner)

    def after_train_epoch(self, runner) -> None:
        ctl = _controller(runner)
        if ctl is not None:
            ctl.on_epoch_end()

    def after_val_epoch(self, runner, metrics: Optional[Dict[str, float]] = None) -> None:
        ctl = _controller(runner)
        if ctl is None or not self.kpi_metrics or not metrics:
            return
        kpis = {}
        for task, name in self.kpi_metrics.items():
            value = metrics.get(name)
            if value is None:
                raise MTLConfigError(f"MTLHook.kpi_metrics[{task!r}]={name!r}: no such metric "
                                     f"among {sorted(metrics)}")
            kpis[task] = value / self.kpi_scale
        ctl.balancer.update_kpis(kpis)
