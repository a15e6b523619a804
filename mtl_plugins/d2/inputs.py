"""The per-image task keys of detectron2 training inputs, read and written by the MTL step.

- ``"mtl_tasks"``: the tasks an image is annotated for (absent = every task); set by the
  multi-dataset loader or by a dataset's dicts.
- ``"mtl_alloc"``: the tasks an image trains at this (sub-)step; set from the allocation mask
  and read by :class:`~mtl_plugins.d2.modeling.MTLGeneralizedRCNN`.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import torch

from ..core.tasks import check_known_tasks


def available_tasks(data: Sequence[Mapping], tasks: Sequence[str]) -> torch.Tensor:
    """``[B, T]`` bool: image i is annotated for task t (its ``"mtl_tasks"``, else all)."""
    rows = []
    for i, d in enumerate(data):
        given = d.get("mtl_tasks") if isinstance(d, Mapping) else None
        if given is None:
            rows.append([True] * len(tasks))
            continue
        given = (given,) if isinstance(given, str) else tuple(given)
        check_known_tasks(given, tasks, key=f"data[{i}]['mtl_tasks']")
        rows.append([t in given for t in tasks])
    return torch.tensor(rows, dtype=torch.bool)


def allocate_inputs(data: Sequence[Mapping], mask: torch.Tensor,
                    tasks: Sequence[str]) -> List[Dict]:
    """Shallow copies of the inputs tagged with ``"mtl_alloc"``: the tasks of each mask row."""
    return [dict(d, mtl_alloc=tuple(t for t, m in zip(tasks, row) if m))
            for d, row in zip(data, mask.tolist())]
