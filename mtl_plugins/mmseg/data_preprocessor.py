"""``MultiTaskDataPreProcessor``: mmseg's ``SegDataPreProcessor`` with one pad value per task.

mmseg 1.2.2's ``stack_batch`` (``mmseg/utils/misc.py``) pads ``gt_sem_seg``, ``gt_edge_map`` *and*
``gt_depth_map`` with ``seg_pad_val`` (255): padded depth pixels read as 255 m, and it does not pad
``gt_normal_map`` at all (the batch then has fields of mixed sizes). Here each task field is padded
with its own invalid value from :data:`~mtl_plugins.mmseg.fields.IGNORE_VALUES` (seg 255 — or
``seg_pad_val`` —, depth 0.0, normal 0.0, edge 255), with exactly the padding geometry mmseg chose
for the image (right/bottom, ``size`` or ``size_divisor``).

Implementation: the task fields are taken off the data samples, mmseg's own ``forward`` runs
(device cast, BGR→RGB, normalisation, image padding, metainfo ``img_shape``/``padding_size``), then
each field is padded by that sample's ``padding_size`` and put back.
"""
from __future__ import annotations

from numbers import Number
from typing import Any, Dict, Mapping, Optional

import torch.nn.functional as F
from mmseg.models.data_preprocessor import SegDataPreProcessor
from mmseg.registry import MODELS

from ..core.tasks import MTLConfigError
from .fields import IGNORE_VALUES, SAMPLE_FIELDS, check_dense_tasks


@MODELS.register_module()
class MultiTaskDataPreProcessor(SegDataPreProcessor):
    """``SegDataPreProcessor`` that pads every task field with that task's invalid value.

    Args (besides those of ``SegDataPreProcessor``: ``mean``, ``std``, ``size``, ``size_divisor``,
    ``pad_val``, ``seg_pad_val``, ``bgr_to_rgb``, ``rgb_to_bgr``, ``batch_augments``, ``test_cfg``):
        task_pad_values: ``{task: value}`` overriding the defaults, which are
            ``fields.IGNORE_VALUES`` with ``seg`` = ``seg_pad_val``.

    When neither ``size`` nor ``size_divisor`` is given, training batches are padded to the
    largest image of the batch (mmseg would raise an assertion error).
    Ground truth is padded only in training (``training=True``), as in mmseg; in test mode the
    images must have one size (or ``test_cfg`` pads the images only).
    """

    def __init__(self, *args, task_pad_values: Optional[Mapping[str, Number]] = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.size is None and self.size_divisor is None:
            self.size_divisor = 1
        pad_values: Dict[str, float] = dict(IGNORE_VALUES)
        pad_values["seg"] = self.seg_pad_val
        if task_pad_values:
            check_dense_tasks(task_pad_values, "MultiTaskDataPreProcessor.task_pad_values")
            for task, value in task_pad_values.items():
                if not isinstance(value, Number):
                    raise MTLConfigError(
                        f"MultiTaskDataPreProcessor.task_pad_values[{task!r}]={value!r}: "
                        "expected a number")
                pad_values[task] = value
        self.task_pad_values = pad_values
        self._field_pad_values = {SAMPLE_FIELDS[t]: v for t, v in pad_values.items()}

    def forward(self, data: dict, training: bool = False) -> Dict[str, Any]:
        if not training or data.get("data_samples", None) is None:
            return super().forward(data, training)
        data = self.cast_data(data)  # new data samples: the caller's stay untouched
        stashed = []
        for sample in data["data_samples"]:
            fields = {}
            for name in self._field_pad_values:
                if name in sample:
                    fields[name] = sample.get(name)
                    delattr(sample, name)  # typed property (gt_sem_seg) or plain field
            stashed.append(fields)
        out = super().forward(data, training=True)
        pad_hw = tuple(out["inputs"].shape[-2:])
        for sample, fields in zip(out["data_samples"], stashed):
            padding_size = sample.metainfo["padding_size"]
            for name, pixel_data in fields.items():
                tensor = pixel_data.data
                del pixel_data.data
                pixel_data.data = F.pad(tensor, padding_size, value=self._field_pad_values[name])
                sample.set_data({name: pixel_data})
            if sample.metainfo.get("pad_shape", None) is None:
                sample.set_metainfo({"pad_shape": pad_hw})
        return out
