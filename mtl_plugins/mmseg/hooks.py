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
"""
from __future__ import annotations

import os
from typing import Dict, Optional

from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmseg.registry import HOOKS

from ..core.controller import MTLController


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
                from ..core.tasks import MTLConfigError

                raise MTLConfigError(f"MTLHook.kpi_metrics[{task!r}]={name!r}: no such metric "
                                     f"among {sorted(metrics)}")
            kpis[task] = value / self.kpi_scale
        ctl.balancer.update_kpis(kpis)
