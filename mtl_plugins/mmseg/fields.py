"""Names shared by every mmseg piece of mtl_plugins: tasks, data-sample fields, ignore values.

A multi-task sample moves through mmseg's pipeline as a results dict and ends as a
``SegDataSample``. Each dense task has one field, listed here once:

============  ===================  ====================  ===========  =================
task          results key          data-sample field     shape        invalid / ignore
============  ===================  ====================  ===========  =================
``seg``       ``gt_seg_map``       ``gt_sem_seg``        [1, H, W]    255
``depth``     ``gt_depth_map``     ``gt_depth_map``      [1, H, W]    0.0 (no depth)
``normal``    ``gt_normal_map``    ``gt_normal_map``     [3, H, W]    0.0 (zero vector)
``edge``      ``gt_edge_map``      ``gt_edge_map``       [1, H, W]    255
============  ===================  ====================  ===========  =================

Per-sample metainfo keys:

- ``mtl_tasks``: tuple of the task names the sample is annotated for (set by the dataset;
  multi-dataset batches mix samples with different sets);
- ``mtl_alloc``: tuple of the task names allocated to the sample for the current optimizer
  step (set by the allocation loop; absent means "every annotated task", i.e. FT).
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

from ..core.tasks import MTLConfigError

RESULTS_KEYS: Dict[str, str] = {
    "seg": "gt_seg_map", "depth": "gt_depth_map", "normal": "gt_normal_map", "edge": "gt_edge_map"}
SAMPLE_FIELDS: Dict[str, str] = {
    "seg": "gt_sem_seg", "depth": "gt_depth_map", "normal": "gt_normal_map", "edge": "gt_edge_map"}
PRED_FIELDS: Dict[str, str] = {
    "seg": "pred_sem_seg", "depth": "pred_depth_map", "normal": "pred_normal_map",
    "edge": "pred_edge_map"}
IGNORE_VALUES: Dict[str, float] = {"seg": 255, "depth": 0.0, "normal": 0.0, "edge": 255}
CHANNELS: Dict[str, int] = {"seg": 1, "depth": 1, "normal": 3, "edge": 1}
KNOWN_TASKS: Tuple[str, ...] = tuple(SAMPLE_FIELDS)

TASKS_KEY = "mtl_tasks"
ALLOC_KEY = "mtl_alloc"


def check_dense_tasks(tasks: Sequence[str], key: str) -> Tuple[str, ...]:
    """Raise ``MTLConfigError`` naming ``key`` if a task is not one of :data:`KNOWN_TASKS`."""
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in KNOWN_TASKS]
    if unknown:
        raise MTLConfigError(
            f"{key}: unknown task name(s) {unknown!r}; expected a subset of {list(KNOWN_TASKS)}")
    return tasks
