"""Fixed (hand-set or grid-searched) task weights.

``L = sum_t w_t L_t`` with constant ``w_t`` (Vandenhende et al., "Multi-Task Learning for
Dense Prediction Tasks: A Survey", TPAMI 2021, Eq. 4; the survey's grid-searched baseline).
``weights=None`` gives equal weights 1 ("uniform" / EW), so the sum of the weighted losses is
the plain sum of the task losses.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch

from .base import LossBalancer, per_task_values


class FixedWeights(LossBalancer):
    """Constant per-task weights.

    Args:
        task_names: the tasks, in a fixed order.
        weights: ``{task: weight}`` naming every task, a list in ``task_names`` order, or
            ``None`` for weight 1 on every task. Weights must be finite and >= 0 (0 switches a
            task's loss off while keeping it in the graph).

    The weights are a non-persistent buffer: they come from the config, not from checkpoints,
    so changing them in the config and resuming takes effect.
    """

    def __init__(
        self,
        task_names: Sequence[str],
        weights: Optional[Union[Mapping[str, float], Sequence[float]]] = None,
    ) -> None:
        super().__init__(task_names)
        values = per_task_values(
            weights, self.task_names, "balancer.weights", 1.0, require_all=True, min_value=0.0
        )
        self.register_buffer("weights", torch.tensor(values, dtype=torch.float32), persistent=False)

    def task_weights(self) -> torch.Tensor:
        return self.weights

    def extra_repr(self) -> str:
        return f"weights={self.current_weights()}"
