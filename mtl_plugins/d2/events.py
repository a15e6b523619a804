"""The MTL scalars a detectron2 training step writes to the ``EventStorage``."""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import torch

from ..core.backward import BackwardResult
from ..core.controller import MTLController


def mtl_scalars(controller: MTLController, task_losses: Mapping[str, torch.Tensor],
                counts: Sequence[int], result: Optional[BackwardResult]) -> Dict[str, float]:
    """``mtl/loss/<task>`` (unweighted), ``mtl/images/<task>`` (allocated images),
    ``mtl/weight/<task>``; with a backward result: ``mtl/skipped_step`` (AMP overflow, or no
    task on any rank), ``mtl/loss_scale``
    (AMP) and ``mtl/cos/<a>-<b>`` (task-gradient cosines, with an aggregator)."""
    tasks = controller.task_names
    scalars = {f"mtl/loss/{t}": float(v.detach()) for t, v in task_losses.items()}
    scalars.update({f"mtl/images/{t}": float(c) for t, c in zip(tasks, counts)})
    scalars.update({f"mtl/weight/{t}": float(w)
                    for t, w in controller.current_weights().items()})
    if result is not None:
        scalars["mtl/skipped_step"] = float(result.found_inf or result.empty)
        if controller.loss_scaler is not None:
            scalars["mtl/loss_scale"] = float(result.loss_scale)
        cos = result.cosines()
        if cos is not None:
            for i, a in enumerate(result.tasks):
                for j in range(i + 1, len(result.tasks)):
                    scalars[f"mtl/cos/{a}-{result.tasks[j]}"] = float(cos[i, j])
    return scalars
