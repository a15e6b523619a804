"""``MultiTaskMetric``: every dense task's metrics in one MMEngine evaluator, plus Δm.

``val_evaluator = dict(type='MultiTaskMetric', tasks=['seg', 'depth', 'normal'],
baseline_file='work_dirs/stl.json', delta_variant='main_metric')``

- ``seg``: mIoU, pixel accuracy, mean class accuracy (confusion matrix over the dataset,
  ``ignore_index`` 255, classes from ``dataset_meta['classes']``: the same numbers as mmseg's
  ``IoUMetric``);
- ``depth``: abs err, rel err, RMSE, δ1-δ3 over valid pixels (ground truth > 0), pooled over
  the dataset (``depth_cfg`` goes to :class:`~mtl_plugins.core.metrics.DepthMeter`);
- ``normal``: mean / median angle error and % within 11.25 / 22.5 / 30 degrees
  (``normal_cfg`` goes to :class:`~mtl_plugins.core.metrics.NormalMeter`);
- Δm (``baseline_file``: JSON ``{task: {metric: value}}`` of single-task baselines, e.g. written
  by this metric with ``dump_file``) in the variant ``delta_variant`` (docs/delta_m.md).

Metric names are ``<task>/<metric>`` (``seg/mIoU``, ``depth/abs_err``, ``normal/mean``,
``delta_m``). A sample without a task's ground truth (partial labels) is skipped for that
task. Per-sample meters are the collected results, so multi-process evaluation merges them.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence

from mmengine.evaluator import BaseMetric
from mmengine.logging import print_log
from mmseg.registry import METRICS

from ..core.metrics import (DepthMeter, NormalMeter, SegmentationMeter, delta_m,
                            format_delta_table, load_baseline)
from ..core.tasks import MTLConfigError
from .fields import PRED_FIELDS, SAMPLE_FIELDS, TASKS_KEY, check_dense_tasks

MAIN_METRICS = {"seg": "mIoU", "depth": "abs_err", "normal": "mean"}


@METRICS.register_module()
class MultiTaskMetric(BaseMetric):
    """See the module docstring."""

    default_prefix: Optional[str] = None

    def __init__(self, tasks: Sequence[str], ignore_index: int = 255,
                 depth_cfg: Optional[dict] = None, normal_cfg: Optional[dict] = None,
                 baseline_file: Optional[str] = None, delta_variant: str = "main_metric",
                 main_metrics: Optional[Dict[str, str]] = None, dump_file: Optional[str] = None,
                 collect_device: str = "cpu", prefix: Optional[str] = None) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.tasks = check_dense_tasks(tasks, key="val_evaluator.tasks")
        unsupported = [t for t in self.tasks if t not in MAIN_METRICS]
        if unsupported:
            raise MTLConfigError(f"val_evaluator.tasks: no metric for {unsupported}; "
                                 f"supported: {sorted(MAIN_METRICS)}")
        self.ignore_index = ignore_index
        self.depth_cfg = dict(depth_cfg or {})
        self.normal_cfg = dict(normal_cfg or {})
        self.baseline = load_baseline(baseline_file) if baseline_file else None
        self.delta_variant = delta_variant
        self.main_metrics = {**MAIN_METRICS, **(main_metrics or {})}
        self.dump_file = dump_file

    def _num_classes(self) -> int:
        classes = (self.dataset_meta or {}).get("classes")
        if not classes:
            raise MTLConfigError("MultiTaskMetric: dataset_meta has no 'classes'; the "
                                 "segmentation task needs the dataset's class list")
        return len(classes)

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        for ds in data_samples:
            annotated = ds.get(TASKS_KEY, self.tasks)
            meters: Dict[str, Any] = {}
            for t in self.tasks:
                gt, pred = ds.get(SAMPLE_FIELDS[t]), ds.get(PRED_FIELDS[t])
                if t not in annotated or gt is None or pred is None:
                    continue
                gt, pred = gt["data"], pred["data"]
                if t == "seg":
                    meter = SegmentationMeter(self._num_classes(), ignore_index=self.ignore_index)
                    meter.update(pred.squeeze(0).cpu(), gt.squeeze(0).cpu())
                elif t == "depth":
                    meter = DepthMeter(**self.depth_cfg)
                    meter.update(pred.float().cpu().unsqueeze(0), gt.float().cpu().unsqueeze(0))
                else:
                    meter = NormalMeter(**self.normal_cfg)
                    meter.update(pred.float().cpu().unsqueeze(0), gt.float().cpu().unsqueeze(0))
                meters[t] = meter
            self.results.append(meters)

    def compute_metrics(self, results: List[Dict[str, Any]]) -> Dict[str, float]:
        merged: Dict[str, Any] = {}
        for sample in results:
            for t, meter in sample.items():
                if t in merged:
                    merged[t].merge(meter)
                else:
                    merged[t] = meter
        table: Dict[str, Dict[str, float]] = {}
        for t in self.tasks:
            if t not in merged:
                print_log(f"MultiTaskMetric: no validation sample has '{t}' ground truth",
                          logger="current")
                continue
            values = merged[t].compute()
            table[t] = {k: float(v) for k, v in values.items() if not isinstance(v, list)}
        out = {f"{t}/{k}": v for t, vals in table.items() for k, v in vals.items()}
        if self.dump_file:
            with open(self.dump_file, "w") as f:
                json.dump(table, f, indent=1)
        if self.baseline is not None:
            main = {t: self.main_metrics[t] for t in table}
            out["delta_m"] = delta_m(table, self.baseline, variant=self.delta_variant,
                                     main_metrics=main)
            print_log("\n" + format_delta_table(table, self.baseline, variant=self.delta_variant,
                                                main_metrics=main), logger="current")
        return out
